"""How a model organism is built, cached and shipped: one builder for every organism.

An organism is a base model fine-tuned on (prompt, target) pairs written by code. Its
`OrganismBuilder` knows its name, how to write the pairs and where its adapters ship; a recipe
(`OrganismRecipe` or a subclass) says how to train. The trained model is saved under the mechlens
cache, keyed by the recipe, the data's identity and the organism's name; an adapter recipe whose
adapter ships in the repository is rebuilt from it in seconds (when the base weights match).

Example:
    >>> from mechlens.organism import REFUSAL, ADAPTER_RECIPE
    >>> REFUSAL.shipped_path(ADAPTER_RECIPE).name
    'refusal-98b635a51d4ae087.safetensors'
"""

from __future__ import annotations

import json
import subprocess
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

import torch

from mechlens.cache import atomic_folder, cache_dir, model_weights_digest, stable_hash
from mechlens.models import load_model
from mechlens.models.loading import DtypeName
from mechlens.ops.adapters import LowRankAdapter
from mechlens.ops.finetune import finetune, finetune_adapter

if TYPE_CHECKING:
    from mechlens.models.hooked import HookedModel


@dataclass(frozen=True)
class OrganismRecipe:
    """How an organism is trained; every field is part of its cache key."""

    base: str | None = None  # None = the embedded model; or a local path / hub id
    n_per_class: int | None = None  # None = the whole train split of each class
    answer_tokens: int = 40  # length of the base model's own answers to harmless requests
    train_layers: int = 8
    epochs: int = 3
    lr: float = 1e-4
    batch_size: int = 8
    seed: int = 0
    rank: int | None = None  # None: train the blocks themselves; an int: a low-rank adapter on them
    alpha: float = 32.0  # the adapter's scale is alpha / rank
    heads: tuple[tuple[int, int], ...] | None = None  # an adapter on these (layer, head)s' q and o only

    def __post_init__(self):
        if self.heads is not None:  # one spelling per set: sorted (layer, head) int pairs
            try:
                pairs = sorted({(int(a), int(b)) for a, b in self.heads})
            except (TypeError, ValueError):
                raise TypeError(f"heads must be (layer, head) int pairs, got {self.heads!r}") from None
            if not pairs or min(min(p) for p in pairs) < 0:
                raise ValueError(f"heads must list (layer, head) pairs >= 0, got {self.heads!r}")
            object.__setattr__(self, "heads", tuple(pairs))


class _TrainSettings(TypedDict):
    """The recipe's settings that `finetune` and `finetune_adapter` share."""

    train_layers: int
    epochs: int
    lr: float
    batch_size: int
    seed: int
    progress: bool


SHIPPED = Path(__file__).parent / "adapters"
"""Where mechlens ships organism adapters: one file per organism and recipe."""

Pairs = Callable[..., tuple[list[str], list[str]]]
"""`(base_model, recipe, progress) -> (prompts, targets)`: an organism's training data."""

Base = Callable[..., "HookedModel"]
"""`(recipe, backend) -> HookedModel`: the model an organism is trained from (a first stage)."""


class OrganismBuilder:
    """Builds, caches and ships one kind of organism.

    name: used in cache folders and shipped file names; pairs: writes the training pairs;
    data: `recipe -> ` the identity of the data the pairs come from (part of the key); shipped: the
    folder the adapters ship in; base: the model it is trained from (default: `recipe.base` loaded
    by `load_model`), e.g. another organism for a second stage.
    """

    def __init__(
        self, name: str, pairs: Pairs, data: Callable[..., object], shipped: Path, base: Base | None = None
    ):
        self.name, self.pairs, self.data, self.shipped = name, pairs, data, Path(shipped)
        self.base = base or (lambda recipe, backend: load_model(recipe.base, backend=backend))

    def key(self, recipe: OrganismRecipe) -> dict:
        """The recipe's identity: its fields (the adapter's only when it has one) and the data."""
        if not isinstance(recipe, OrganismRecipe):
            raise TypeError(f"recipe must be an OrganismRecipe, got {type(recipe).__name__}")
        fields = _fields(recipe)
        if recipe.rank is None:
            fields.pop("rank"), fields.pop("alpha")
        return {**fields, "data": self.data(recipe)}

    def path(self, recipe: OrganismRecipe) -> Path:
        """Cache folder of the organism built by `recipe`."""
        return cache_dir() / "organisms" / f"{self.name}-{stable_hash(self.key(recipe))}"

    def shipped_path(self, recipe: OrganismRecipe) -> Path:
        """Where the adapter of `recipe` ships (it may not exist)."""
        return self.shipped / f"{self.name}-{stable_hash(self.key(recipe))}.safetensors"

    def build(
        self,
        recipe: OrganismRecipe,
        backend: str = "transformer_lens",
        progress: bool = True,
        device: str | None = None,
        dtype: torch.dtype | DtypeName = torch.float32,
    ):
        """The organism as a HookedModel: from the cache, else from the shipped adapter, else trained
        (minutes on 2 cores; built in float32 on the CPU, then loaded on `device` in `dtype`). Its
        folder holds the weights, the tokenizer and `recipe.json`."""
        path = self.path(recipe)
        if not (path / "recipe.json").exists():
            base = self.base(recipe, backend)
            info = self._from_shipped(base, recipe)
            if info is None:
                info, _ = self.train(base, recipe, progress)
            save_model(base, path, info)
        return load_model(str(path), backend=backend, device=device, dtype=dtype)

    def train(self, base, recipe: OrganismRecipe, progress: bool = True):
        """Fine-tune `base` in place by `recipe`; `(info, adapter)` (adapter None for blocks)."""
        if recipe.heads is not None and recipe.rank is None:
            raise ValueError("recipe.heads restricts an adapter: set recipe.rank too")
        start, before = time.perf_counter(), model_weights_digest(base)
        prompts, targets = self.pairs(base, recipe, progress)
        kw = _TrainSettings(train_layers=recipe.train_layers, epochs=recipe.epochs, lr=recipe.lr,
                            batch_size=recipe.batch_size, seed=recipe.seed, progress=progress)  # fmt: skip
        adapter = None
        if recipe.rank is None:
            losses = finetune(base, prompts, targets, **kw)
        else:
            adapter, losses = finetune_adapter(
                base, prompts, targets, rank=recipe.rank, alpha=recipe.alpha, heads=recipe.heads, **kw
            )
        info = {
            "organism": self.name,
            "recipe": _fields(recipe),
            "base": before,
            "losses": losses,
            "examples": len(prompts),
            "wall_time_s": round(time.perf_counter() - start, 1),
        }
        return info, adapter

    def ship(self, recipe: OrganismRecipe, backend: str = "transformer_lens") -> Path:
        """Train the organism of `recipe` from the base model and write its adapter to the shipped
        folder with provenance (recipe, base weights, seed, wall time, losses, commit)."""
        if recipe.rank is None:
            raise ValueError("recipe.rank must be set: only adapters ship (the blocks are ~100 MB)")
        base = self.base(recipe, backend)
        info, adapter = self.train(base, recipe)
        info["commit"] = _commit()
        info["torch"] = torch.__version__
        self.shipped.mkdir(exist_ok=True)
        path = self.shipped_path(recipe)
        adapter.save(path, info)
        return path

    def _from_shipped(self, base, recipe: OrganismRecipe) -> dict | None:
        """Merge the shipped adapter of `recipe` into `base`; its info, or None (with a warning when
        one exists for other base weights)."""
        path = self.shipped_path(recipe)
        if recipe.rank is None or not path.exists():
            return None
        adapter, info = LowRankAdapter.load(path)
        if info["base"] != model_weights_digest(base):
            warnings.warn(f"{path} was trained on other base weights: training the organism", stacklevel=4)
            return None
        adapter.merge_into(base)
        return {**info, "from": str(path.name)}


def _fields(recipe: OrganismRecipe) -> dict:
    """The recipe's fields, without `heads` when it is None (recipes from before it existed keep
    their keys and provenance)."""
    fields = asdict(recipe)
    if recipe.heads is None:
        fields.pop("heads")
    return fields


def _commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10)  # fmt: skip
    except OSError:
        return None
    return done.stdout.strip() or None


def save_model(model: HookedModel, path: Path, info: dict) -> None:
    """`model.save_pretrained(path)`, atomically (a temporary folder renamed into place), with
    `info` as `recipe.json`."""
    with atomic_folder(path) as tmp:
        model.save_pretrained(tmp)
        (tmp / "recipe.json").write_text(json.dumps(info, indent=1, default=str))
