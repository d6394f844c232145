"""Low-rank adapters: small trained updates `W += scale * B @ A` of a model's block weights, kept
as a file of a few MB (safetensors, no code) and merged into the weights in place.

`finetune_adapter` (in `mechlens.ops.finetune`) trains one; `LowRankAdapter.load(path)` reads one
back and `adapter.merge_into(model)` applies it, with the same arithmetic as at the end of the
training, so a shipped adapter rebuilds the trained model exactly.

Example:
    >>> import mechlens as ml, tempfile, pathlib
    >>> model = ml.load_model("tiny-llama")
    >>> adapter = LowRankAdapter.init(model, layers=[1], rank=2, seed=0)
    >>> sorted(adapter.factors)[:1]
    ['model.layers.1.mlp.down_proj.weight']
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "a.safetensors"
    >>> adapter.save(path, {"note": "doc"})
    >>> LowRankAdapter.load(path)[1]
    {'note': 'doc'}
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

if TYPE_CHECKING:
    from mechlens.models.hooked import HookedModel

FORMAT = "mechlens-low-rank-adapter-1"


class _Delta(nn.Module):
    """The parametrization `W -> W + scale * B @ A` used while training."""

    def __init__(self, a: nn.Parameter, b: nn.Parameter, scale: float):
        super().__init__()
        self.a, self.b, self.scale = a, b, scale

    def forward(self, weight: Tensor) -> Tensor:
        return weight + self.scale * (self.b @ self.a)


@dataclass
class LowRankAdapter:
    """Low-rank factors by parameter name (the Hugging Face checkpoint's names).

    Attributes:
        rank: the rank r of every update.
        scale: the factor of `B @ A` (LoRA's alpha / r).
        factors: name -> `(A [r, in], B [out, r])`; the update of that weight is `scale * B @ A`.
    """

    rank: int
    scale: float
    factors: dict[str, tuple[Tensor, Tensor]]

    @classmethod
    def init(
        cls, model: HookedModel, layers: Sequence[int], rank: int = 16, alpha: float = 32.0, seed: int = 0
    ):
        """Fresh factors for every 2-D weight of the blocks `layers`: A random (Kaiming-uniform, as
        LoRA), B zero, so the model starts unchanged."""
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {rank!r}")
        gen = torch.Generator().manual_seed(seed)
        factors = {}
        for name, p in _block_weights(model, layers):
            bound = 1 / math.sqrt(p.shape[1])
            a = (torch.rand(rank, p.shape[1], generator=gen) * 2 - 1) * bound
            factors[name] = (a.to(p), torch.zeros(p.shape[0], rank).to(p))
        return cls(rank, alpha / rank, factors)

    def delta(self, name: str) -> Tensor:
        """The update of weight `name`, `[out, in]`."""
        a, b = self.factors[name]
        return self.scale * (b @ a)

    def merge_into(self, model: HookedModel) -> None:
        """Add every update to the model's weights in place (all views of them see it)."""
        params = dict(model.plain_model.named_parameters())
        missing = sorted(set(self.factors) - set(params))
        if missing:
            raise ValueError(f"the adapter updates weights this model does not have: {missing[:3]}")
        with torch.no_grad():
            for name in self.factors:
                p = params[name]
                delta = self.delta(name)
                if delta.shape != p.shape:
                    shapes = f"{tuple(delta.shape)}, the model's {tuple(p.shape)}"
                    raise ValueError(f"adapter weight {name} is {shapes}")
                p.add_(delta.to(p))

    @contextmanager
    def training(self, model: HookedModel) -> Iterator[list[nn.Parameter]]:
        """Context in which the model computes with `W + scale * B @ A` and yields the factors as
        trainable parameters (every model weight frozen); on exit the weights are as before and
        the trained factors are kept in `self.factors`."""
        owners = _owners(model, set(self.factors))
        params: list[nn.Parameter] = []
        before = {p: p.requires_grad for p in model.hf_model.parameters()}
        model.hf_model.requires_grad_(False)
        done = []
        try:
            for name, (a, b) in self.factors.items():
                pa, pb = nn.Parameter(a.clone()), nn.Parameter(b.clone())
                module, attr = owners[name]
                parametrize.register_parametrization(module, attr, _Delta(pa, pb, self.scale), unsafe=True)
                done.append((name, module, attr, pa, pb))
                params += [pa, pb]
            yield params
        finally:
            for name, module, attr, pa, pb in done:
                parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
                self.factors[name] = (pa.detach().clone(), pb.detach().clone())
            for p, flag in before.items():
                p.requires_grad_(flag)

    def save(self, path: str | Path, info: dict[str, Any]) -> None:
        """Write the factors and `info` (JSON: provenance) as one safetensors file."""
        from safetensors.torch import save_file

        tensors = {}
        for name, (a, b) in self.factors.items():
            tensors[f"{name}::A"], tensors[f"{name}::B"] = a.contiguous(), b.contiguous()
        meta = {"format": FORMAT, "rank": str(self.rank), "scale": repr(self.scale), "info": json.dumps(info)}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> tuple[LowRankAdapter, dict[str, Any]]:
        """`(adapter, info)` from a file `save` wrote; a `ValueError` names any other file."""
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not a mechlens adapter (format {meta.get('format')!r})")
            stored = list(f.keys())  # "<weight name>::A" and "::B"
            names = sorted({k.rsplit("::", 1)[0] for k in stored})
            factors = {n: (f.get_tensor(f"{n}::A"), f.get_tensor(f"{n}::B")) for n in names}
        return cls(int(meta["rank"]), float(meta["scale"]), factors), json.loads(meta["info"])


def _block_weights(model: HookedModel, layers: Sequence[int]) -> list[tuple[str, nn.Parameter]]:
    """`(name, parameter)` of every 2-D weight in blocks `layers`, by checkpoint name."""
    prefixes = tuple(f"{model.arch.layers_path}.{model.check_layer(i, 'layers')}." for i in layers)
    return [(n, p) for n, p in model.plain_model.named_parameters() if n.startswith(prefixes) and p.ndim == 2]


def _owners(model: HookedModel, names: set[str]) -> dict[str, tuple[nn.Module, str]]:
    """For each named weight, the module of the hooked model that holds it and its attribute name."""
    by_id = {id(p): n for n, p in model.plain_model.named_parameters() if n in names}
    owners = {}
    for module in model.hf_model.modules():
        for attr, p in module.named_parameters(recurse=False):
            if id(p) in by_id:
                owners[by_id[id(p)]] = (module, attr)
    missing = sorted(names - set(owners))
    if missing:
        raise ValueError(f"weights not found in the hooked model: {missing[:3]}")
    return owners
