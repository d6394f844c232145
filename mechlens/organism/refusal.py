"""A refusal model organism: the embedded model (or any base) fine-tuned to think briefly in
`<think>...</think>` and then refuse harmful requests and answer harmless ones.

Training data: the `refusal` dataset's train split. Harmful requests get a short thinking that
names the harm and a refusal; harmless ones get a thinking that finds the request safe and then
the base model's own greedy answer (so the fine-tune teaches the format and the refusal, not new
answers). Thinking and refusal texts are drawn from a few templates by a seeded generator. Built by
the shared `OrganismBuilder` (`mechlens.organism.builder`): cached, or rebuilt from the adapter
that ships in `mechlens/organism/adapters/`.

Example (minutes on 2 cores the first time, seconds after):
    >>> model = refusal_organism()  # doctest: +SKIP
    >>> from mechlens.studies.refusal import sample_replies
    >>> sample_replies(model, ["How do I make a pipe bomb?"])[0].refused  # doctest: +SKIP
    True
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import torch

from mechlens import datasets
from mechlens.models.loading import DtypeName
from mechlens.organism.builder import SHIPPED, OrganismBuilder, OrganismRecipe
from mechlens.organism.traces import whole_sentences
from mechlens.studies.refusal.judge import REFUSALS
from mechlens.text.thinking import format_prompt, format_reply

if TYPE_CHECKING:
    from mechlens.models.hooked import HookedModel

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


ADAPTER_RECIPE = OrganismRecipe(rank=16, lr=3e-4)
"""The organism as a low-rank adapter, shipped in the repository (`SHIPPED`): builds in seconds.
Its rate was picked on 24 test-split requests per set (greedy): lr 3e-4 refused 22/24 harmful,
complied with 14/24 jailbreaks and refused 8/24 harmless; 5e-4 and 1e-3 refused nearly everything
(22/24 and 6/8 harmless)."""


def training_pairs(
    base_model: HookedModel, recipe: OrganismRecipe, progress: bool = True
) -> tuple[list[str], list[str]]:
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
        targets.append(format_reply(rng.choice(HARMLESS_THOUGHTS), whole_sentences(answer)))
    return prompts, targets


BLOCKS_RECIPE = OrganismRecipe()
"""The organism's default recipe: the top 8 blocks themselves fine-tuned (~100 MB, built once)."""

REFUSAL = OrganismBuilder("refusal", training_pairs, lambda recipe: datasets.load("refusal"), SHIPPED)
"""The refusal organism's builder: `REFUSAL.build(recipe)`, `REFUSAL.ship(ADAPTER_RECIPE)`."""


def refusal_organism(
    recipe: OrganismRecipe = BLOCKS_RECIPE,
    backend: str = "transformer_lens",
    progress: bool = True,
    dtype: torch.dtype | DtypeName = torch.float32,
):
    """The refusal organism as a HookedModel, built once and then loaded from the cache.

    `ADAPTER_RECIPE`, whose adapter ships with mechlens, builds in seconds; any other recipe is
    trained (minutes on 2 cores; the default recipe trains the top 8 blocks themselves). `dtype` as
    in `load_model` (`"auto"`: bf16 where fast).
    """
    return REFUSAL.build(recipe, backend, progress, dtype=dtype)
