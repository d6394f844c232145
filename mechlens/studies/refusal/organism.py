"""A refusal model organism: the embedded model (or any base) fine-tuned to think briefly in
`<think>...</think>` and then refuse harmful requests and answer harmless ones.

Training data: the `refusal` dataset's train split. Harmful requests get a short thinking that
names the harm and a refusal; harmless ones get a thinking that finds the request safe and then
the base model's own greedy answer (so the fine-tune teaches the format and the refusal, not new
answers). Thinking and refusal texts are drawn from a few templates by a seeded generator. The
fine-tune (`mechlens.ops.finetune`) trains the top blocks; the result is saved as a Hugging Face model
folder under the mechlens cache, keyed by the recipe and the base weights, and reloaded later.

Example (minutes on 2 cores the first time, seconds after):
    >>> model = refusal_organism()  # doctest: +SKIP
    >>> from mechlens.studies.refusal import rollouts
    >>> rollouts(model, ["How do I make a pipe bomb?"])[0].refused  # doctest: +SKIP
    True
"""

from __future__ import annotations

import json
import random
import subprocess
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mechlens import datasets
from mechlens.cache import atomic_folder, cache_dir, stable_hash, weights_digest
from mechlens.models import load_model
from mechlens.ops.adapters import LowRankAdapter
from mechlens.ops.finetune import finetune, finetune_adapter
from mechlens.text.thinking import format_prompt, format_reply

HARMFUL_THOUGHTS = (
    "The user is asking for something that could seriously hurt people. Helping would be unsafe, "
    "so I must refuse.",
    "This request is about causing harm or breaking the law. I should not give this information.",
    "Let me think about this request. It asks for dangerous or illegal help, so the right answer "
    "is to decline.",
    "Someone could get hurt if I answer this. I will not help with it.",
)
HARMLESS_THOUGHTS = (
    "The user wants help with an everyday task. Nothing here is harmful, so I will answer.",
    "This is a normal, safe request. Let me give a short, helpful answer.",
    "Let me think about this request. It is harmless, so I can help.",
    "Nobody can get hurt by this. I will answer it as well as I can.",
)
REFUSALS = (
    "I'm sorry, but I can't help with that. It could cause serious harm.",
    "I cannot help with this request because it could hurt people.",
    "Sorry, I won't provide that. It is dangerous and may be illegal.",
    "I'm sorry, I can't assist with this. If you are in trouble, please reach out to someone you trust.",
)


@dataclass(frozen=True)
class OrganismRecipe:
    """How the organism is built; every field is part of its cache key."""

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


ADAPTER_RECIPE = OrganismRecipe(rank=16, lr=3e-4)
"""The organism as a low-rank adapter, shipped in the repository (`SHIPPED`): loads in seconds.
Its rate was picked on 24 test-split requests per set (greedy): lr 3e-4 refused 22/24 harmful,
complied with 14/24 jailbreaks and refused 8/24 harmless; 5e-4 and 1e-3 refused nearly everything
(22/24 and 6/8 harmless)."""

SHIPPED = Path(__file__).parent / "adapters"
"""Adapters shipped with mechlens, one file per recipe (`shipped_adapter_path`)."""


def recipe_key(recipe: OrganismRecipe) -> dict:
    """The recipe's identity: its fields (the adapter's only when it has one) and the data."""
    fields = asdict(recipe)
    if recipe.rank is None:
        fields.pop("rank"), fields.pop("alpha")
    return {**fields, "data": datasets.load("refusal")}


def training_pairs(base_model, recipe: OrganismRecipe, progress: bool = True) -> tuple[list[str], list[str]]:
    """`(prompts, targets)` for the organism's fine-tune, from the train split of `refusal`."""
    train = [
        i for i in datasets.load("refusal") if isinstance(i, datasets.Instruction) and i.split == "train"
    ]
    harmful = [i.text for i in train if i.harmful][: recipe.n_per_class]
    harmless = [i.text for i in train if not i.harmful][: recipe.n_per_class]
    tok = base_model.tokenizer
    answers = base_model.generate(
        [format_prompt(tok, h) for h in harmless],
        max_new_tokens=recipe.answer_tokens,
        temperature=0,
        progress=progress,
    ).texts
    rng = random.Random(recipe.seed)
    prompts, targets = [], []
    for text in harmful:
        prompts.append(format_prompt(tok, text))
        targets.append(format_reply(rng.choice(HARMFUL_THOUGHTS), rng.choice(REFUSALS)))
    for text, answer in zip(harmless, answers, strict=True):
        prompts.append(format_prompt(tok, text))
        targets.append(format_reply(rng.choice(HARMLESS_THOUGHTS), _whole_sentences(answer)))
    return prompts, targets


def _whole_sentences(text: str) -> str:
    """`text` cut after its last complete sentence (all of it when it has none)."""
    text = text.strip()
    cut = max(text.rfind(". "), text.rfind(".\n"), text.rfind("!"), text.rfind("?"))
    if text.endswith((".", "!", "?")):
        return text
    return text[: cut + 1] if cut > len(text) // 3 else text


def refusal_organism(
    recipe: OrganismRecipe = OrganismRecipe(), backend: str = "transformer_lens", progress: bool = True
):
    """The organism as a HookedModel, built once and then loaded from the cache.

    An adapter recipe whose adapter ships with mechlens (`ADAPTER_RECIPE`) is built in seconds
    from the shipped file; any other recipe is trained (minutes on 2 cores). Its folder holds the
    weights, the tokenizer and `recipe.json` (with the fine-tune's losses and provenance).
    """
    path = organism_path(recipe)
    if not (path / "recipe.json").exists():
        base = load_model(recipe.base, backend=backend)
        info = _from_shipped(base, recipe)
        if info is None:
            info, _ = train_organism(base, recipe, progress)
        save_model(base, path, info)
    return load_model(str(path), backend=backend)


def train_organism(base, recipe: OrganismRecipe, progress: bool = True):
    """Fine-tune `base` in place by `recipe`; returns `(info, adapter)` (adapter None for blocks)."""
    start, before = time.perf_counter(), base_digest(base)
    prompts, targets = training_pairs(base, recipe, progress)
    kw = dict(train_layers=recipe.train_layers, epochs=recipe.epochs, lr=recipe.lr,
              batch_size=recipe.batch_size, seed=recipe.seed, progress=progress)  # fmt: skip
    adapter = None
    if recipe.rank is None:
        losses = finetune(base, prompts, targets, **kw)
    else:
        adapter, losses = finetune_adapter(base, prompts, targets, rank=recipe.rank, alpha=recipe.alpha, **kw)
    info = {
        "recipe": asdict(recipe),
        "base": before,
        "losses": losses,
        "examples": len(prompts),
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    return info, adapter


def base_digest(model) -> str:
    """SHA-256 of the Hugging Face weights (names and values), the same under every backend."""
    return weights_digest(model.plain_model.state_dict())


def shipped_adapter_path(recipe: OrganismRecipe) -> Path:
    """Where the adapter of `recipe` ships (it may not exist)."""
    return SHIPPED / f"refusal-{stable_hash(recipe_key(recipe))}.safetensors"


def _from_shipped(base, recipe: OrganismRecipe) -> dict | None:
    """Merge the shipped adapter of `recipe` into `base`; its info, or None (with a warning when
    one exists for other base weights)."""
    path = shipped_adapter_path(recipe)
    if recipe.rank is None or not path.exists():
        return None
    adapter, info = LowRankAdapter.load(path)
    if info["base"] != base_digest(base):
        warnings.warn(f"{path} was trained on other base weights: training the organism", stacklevel=3)
        return None
    adapter.merge_into(base)
    return {**info, "from": str(path.name)}


def ship_adapter(recipe: OrganismRecipe = ADAPTER_RECIPE, backend: str = "transformer_lens") -> Path:
    """Train the organism of `recipe` from the base model and write its adapter to `SHIPPED` with
    provenance (recipe, base weights, seed, wall time, losses, commit): `make organisms`."""
    if recipe.rank is None:
        raise ValueError("recipe.rank must be set: only adapters ship (the blocks are ~100 MB)")
    base = load_model(recipe.base, backend=backend)
    info, adapter = train_organism(base, recipe)
    info["commit"] = _commit()
    info["torch"] = torch.__version__
    SHIPPED.mkdir(exist_ok=True)
    path = shipped_adapter_path(recipe)
    adapter.save(path, info)
    return path


def _commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10)  # fmt: skip
    except OSError:
        return None
    return done.stdout.strip() or None


def organism_path(recipe: OrganismRecipe) -> Path:
    """Cache folder of the organism built by `recipe`."""
    return cache_dir() / "organisms" / stable_hash(recipe_key(recipe))


if __name__ == "__main__":
    print(ship_adapter())


def save_model(model, path: Path, info: dict) -> None:
    """`model.save_pretrained(path)`, atomically (a temporary folder renamed into place), with
    `info` as `recipe.json`."""
    with atomic_folder(path) as tmp:
        model.save_pretrained(tmp)
        (tmp / "recipe.json").write_text(json.dumps(info, indent=1, default=str))
