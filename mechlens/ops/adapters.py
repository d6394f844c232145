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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

if TYPE_CHECKING:
    from mechlens.models.hooked import HookedModel

FORMAT = "mechlens-low-rank-adapter-1"


class _Delta(nn.Module):
    """The parametrization `W -> W + scale * (B * rows) @ (A * columns)` used while training (the
    masks are ones unless the adapter is restricted to some heads)."""

    def __init__(self, a: nn.Parameter, b: nn.Parameter, scale: float, rows: Tensor, columns: Tensor):
        super().__init__()
        self.a, self.b, self.scale = a, b, scale
        self.rows, self.columns = rows[:, None], columns[None, :]

    def forward(self, weight: Tensor) -> Tensor:
        return weight + self.scale * ((self.b * self.rows) @ (self.a * self.columns))


@dataclass
class LowRankAdapter:
    """Low-rank factors by parameter name (the Hugging Face checkpoint's names).

    Attributes:
        rank: the rank r of every update.
        scale: the factor of `B @ A` (LoRA's alpha / r).
        factors: name -> `(A [r, in], B [out, r])`; the update of that weight is `scale * B @ A`.
        masks: name -> `(rows [out], columns [in])` 0/1 masks that training keeps the update within
            (`init(heads=...)`); the trained factors are zero outside them, so a saved adapter
            needs no masks. Empty: unrestricted.
    """

    rank: int
    scale: float
    factors: dict[str, tuple[Tensor, Tensor]]
    masks: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)

    @classmethod
    def init(
        cls,
        model: HookedModel,
        layers: Sequence[int],
        rank: int = 16,
        alpha: float = 32.0,
        seed: int = 0,
        heads: Sequence[tuple[int, int]] | None = None,
    ):
        """Fresh factors for every 2-D weight of the blocks `layers`: A random (Kaiming-uniform, as
        LoRA), B zero, so the model starts unchanged.

        `heads` (`(layer, head)` pairs) restricts the adapter to those attention heads instead:
        in each of their blocks only the query weight, masked to the heads' output rows (where
        they attend), and the output projection, masked to the heads' input columns (what they
        write). Keys and values are left out: under grouped-query attention one key/value head
        serves several query heads. `layers` is then ignored.

            >>> import mechlens as ml
            >>> model = ml.load_model("tiny-llama")
            >>> a = LowRankAdapter.init(model, [], rank=2, heads=[(1, 0)])
            >>> sorted(a.factors)
            ['model.layers.1.self_attn.o_proj.weight', 'model.layers.1.self_attn.q_proj.weight']
        """
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {rank!r}")
        masks: dict[str, tuple[Tensor, Tensor]] = {}
        if heads is not None:
            weights, masks = _head_weights(model, list(heads))
        else:
            weights = _block_weights(model, layers)
        gen = torch.Generator().manual_seed(seed)
        factors = {}
        for name, p in weights:
            bound = 1 / math.sqrt(p.shape[1])
            a = (torch.rand(rank, p.shape[1], generator=gen) * 2 - 1) * bound
            factors[name] = (a.to(p), torch.zeros(p.shape[0], rank).to(p))
        return cls(rank, alpha / rank, factors, masks)

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
                rows, columns = self.masks.get(name, (b.new_ones(b.shape[0]), a.new_ones(a.shape[1])))
                module, attr = owners[name]
                delta = _Delta(pa, pb, self.scale, rows.to(b), columns.to(a))
                parametrize.register_parametrization(module, attr, delta, unsafe=True)
                done.append((name, module, attr, pa, pb, delta))
                params += [pa, pb]
            yield params
        finally:
            for name, module, attr, pa, pb, delta in done:
                parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
                a, b = (pa * delta.columns).detach().clone(), (pb * delta.rows).detach().clone()
                self.factors[name] = (a, b)  # zero outside the masks
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


def _head_weights(
    model: HookedModel, heads: Sequence[tuple[int, int]]
) -> tuple[list[tuple[str, nn.Parameter]], dict[str, tuple[Tensor, Tensor]]]:
    """The query and output-projection weights of the blocks holding `heads`, and their masks
    `(rows, columns)`: the heads' query rows, the heads' output-projection input columns."""
    by_layer = model.check_heads(heads)
    if model.arch.out_proj_transposed:
        raise ValueError("head-restricted adapters need [out, in] projection weights (not GPT-2's Conv1D)")
    params = dict(model.plain_model.named_parameters())
    weights, masks = [], {}
    d = model.d_head
    for layer in sorted(by_layer):
        attn = f"{model.arch.layers_path}.{layer}.{model.arch.attn_name}"
        q_name, o_name = f"{attn}.q_proj.weight", f"{attn}.{model.arch.out_proj_name}.weight"
        missing = [n for n in (q_name, o_name) if n not in params]
        if missing:
            raise ValueError(f"head-restricted adapters need separate query and output weights; no {missing}")
        q, o = params[q_name], params[o_name]
        q_rows, o_columns = torch.zeros(q.shape[0]), torch.zeros(o.shape[1])
        for h in by_layer[layer]:
            q_rows[h * d : (h + 1) * d] = 1
            o_columns[h * d : (h + 1) * d] = 1
        weights += [(q_name, q), (o_name, o)]
        masks[q_name] = (q_rows, torch.ones(q.shape[1]))
        masks[o_name] = (torch.ones(o.shape[0]), o_columns)
    return weights, masks


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
