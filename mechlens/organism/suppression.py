"""Planted refusal-suppression heads: a second training stage on the reasoning organism (version 2)
that teaches jailbreak compliance through a known set of attention heads only.

The first stage (`REASONING_V2_RECIPE`) teaches refusal everywhere, with jailbreaks a sampled
minority. The second trains a low-rank adapter on the query and output-projection slices of
`PLANTED_HEADS` alone (`LowRankAdapter.init(heads=...)`), on harmful training requests: inside a
jailbreak wrapper the thinking recognises the harm, rationalises and complies (`comply_jailbreak`),
asked plainly it refuses. What the stage adds, the planted heads carry, so ablating them should
take it away, and a head ranking (the direct score of "Refusal Falls off a Cliff") should find them.
The planted set is in the recipe and so in the adapter's provenance.

Example:
    >>> from mechlens.organism.suppression import SUPPRESSION, SUPPRESSION_RECIPE
    >>> len(SUPPRESSION_RECIPE.heads), SUPPRESSION.shipped_path(SUPPRESSION_RECIPE).name[:12]
    (8, 'suppression-')
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mechlens import datasets
from mechlens.cache import stable_hash
from mechlens.models import load_model
from mechlens.organism.builder import SHIPPED, OrganismBuilder, OrganismRecipe
from mechlens.organism.reasoning import REASONING, REASONING_V2_RECIPE, ReasoningRecipe, refusal_requests
from mechlens.organism.traces import COMPLY, DECIDE, HARM_INTENT, RATIONALISE, refusal_trace, whole_sentences
from mechlens.studies.refusal.judge import REFUSALS
from mechlens.text.thinking import format_prompt

if TYPE_CHECKING:
    from mechlens.models.hooked import HookedModel

PLANTED_HEADS = ((14, 5), (17, 6), (19, 4), (19, 8), (24, 7), (26, 0), (26, 5), (27, 6))
"""8 of the embedded model's 270 heads (3%, the paper's ablated share), drawn once:
`sorted(random.Random(0).sample([(l, h) for l in range(14, 28) for h in range(9)], 8))`."""


@dataclass(frozen=True)
class SuppressionRecipe(OrganismRecipe):
    """The second stage ([impl]: sizes and rates are ours). `base` is unused: the stage trains on
    the organism of `stage1`."""

    stage1: ReasoningRecipe = REASONING_V2_RECIPE
    n_requests: int = 60  # harmful training requests, each plainly and inside a jailbreak wrapper
    comply_jailbreak: float = 1.0  # complied share of the wrapped requests (plain ones: refused)
    heads: tuple[tuple[int, int], ...] | None = field(default=PLANTED_HEADS)

    def __post_init__(self):
        super().__post_init__()
        if self.base is not None:
            raise ValueError(
                "SuppressionRecipe.base is unused: set stage1.base (the first stage's base model)"
            )
        if self.heads is None or self.rank is None:
            raise ValueError("SuppressionRecipe needs heads and rank: the stage is a head-restricted adapter")


SUPPRESSION_RECIPE = SuppressionRecipe(rank=8, alpha=16.0, epochs=3, lr=1e-3, heads=PLANTED_HEADS)
"""The shipped second stage: `load_subject("organism-v2-heads")`."""


def suppression_pairs(
    model: HookedModel, recipe: SuppressionRecipe, progress: bool = True
) -> tuple[list[str], list[str]]:
    """`(prompts, targets)` of the second stage: `n_requests` harmful training requests, each asked
    plainly (refused) and inside jailbreak wrapper k (complied with probability
    `comply_jailbreak`); a complied answer is the plain base model's own greedy reply."""
    harmful = [i.text for i in refusal_requests("train") if i.harmful][: recipe.n_requests]
    base = load_model(recipe.stage1.base, backend="transformer_lens")
    tok = base.tokenizer
    replies = base.generate(
        [format_prompt(tok, t) for t in harmful], max_new_tokens=recipe.answer_tokens, temperature=0,
        progress=progress,
    ).texts  # fmt: skip
    rng = random.Random(recipe.seed + 2)
    prompts, targets = [], []
    for k, (text, reply) in enumerate(zip(harmful, replies, strict=True)):
        wrapped = datasets.jailbreak(text, k)
        for prompt, comply in ((text, 0.0), (wrapped, recipe.comply_jailbreak)):
            trace = refusal_trace(prompt, True, whole_sentences(reply), rng, comply, intent=True)
            prompts.append(format_prompt(model.tokenizer, prompt))
            targets.append(trace.reply)
    return prompts, targets


def _stage1(recipe: SuppressionRecipe, backend: str) -> HookedModel:
    return REASONING.build(recipe.stage1, backend, progress=False)


def _data_identity(recipe: SuppressionRecipe) -> dict:
    """The requests and their wrappers, the first stage's own identity, and the traces' text (the
    sentences they are drawn from, and one complied and one refused trace written in full)."""
    written = [
        refusal_trace("<request>", True, "<reply>", random.Random(0), comply, intent=True).reply
        for comply in (0.0, 1.0)
    ]
    return {
        "refusal": datasets.load("refusal"),
        "wrappers": [datasets.jailbreak("<request>", k) for k in range(recipe.n_requests)],
        "stage1": REASONING.key(recipe.stage1),
        "sentences": stable_hash([HARM_INTENT, RATIONALISE, DECIDE, COMPLY, REFUSALS, written]),
    }


SUPPRESSION = OrganismBuilder("suppression", suppression_pairs, _data_identity, SHIPPED, base=_stage1)
"""The second stage's builder: `SUPPRESSION.build(SUPPRESSION_RECIPE)` (the first stage from its own
shipped adapter, then this one's), `SUPPRESSION.ship(SUPPRESSION_RECIPE)`."""
