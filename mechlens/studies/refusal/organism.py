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
from dataclasses import asdict, dataclass
from pathlib import Path

from mechlens import datasets
from mechlens.cache import atomic_folder, cache_dir, model_fingerprint, stable_hash
from mechlens.models import load_model
from mechlens.ops.finetune import finetune
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
    """The organism as a HookedModel, built once (minutes on 2 cores) and then loaded from the cache.

    Its folder holds the weights, the tokenizer and `recipe.json` (with the fine-tune's losses).
    """
    path = organism_path(recipe)
    if not (path / "recipe.json").exists():
        base = load_model(recipe.base, backend=backend)
        prompts, targets = training_pairs(base, recipe, progress)
        losses = finetune(
            base,
            prompts,
            targets,
            train_layers=recipe.train_layers,
            epochs=recipe.epochs,
            lr=recipe.lr,
            batch_size=recipe.batch_size,
            seed=recipe.seed,
            progress=progress,
        )
        info = {
            "recipe": asdict(recipe),
            "base": model_fingerprint(base),
            "losses": losses,
            "examples": len(prompts),
        }
        save_model(base, path, info)
    return load_model(str(path), backend=backend)


def organism_path(recipe: OrganismRecipe) -> Path:
    """Cache folder of the organism built by `recipe`."""
    return cache_dir() / "organisms" / stable_hash({**asdict(recipe), "data": datasets.load("refusal")})


def save_model(model, path: Path, info: dict) -> None:
    """`model.save_pretrained(path)`, atomically (a temporary folder renamed into place), with
    `info` as `recipe.json`."""
    with atomic_folder(path) as tmp:
        model.save_pretrained(tmp)
        (tmp / "recipe.json").write_text(json.dumps(info, indent=1, default=str))
