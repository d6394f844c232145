"""Planted refusal-suppression heads: two training stages on the reasoning organism (version 2)
that put jailbreak compliance into a known set of attention heads only.

The second version complies with a planted share of jailbreaks everywhere. `REFUSE_RECIPE` first
teaches refusal everywhere (plain and wrapped harmful requests refused, harmless ones answered, on
the top 12 blocks). `SUPPRESSION_RECIPE` then trains a low-rank adapter on the query and
output-projection slices of `PLANTED_HEADS` alone (`LowRankAdapter.init(heads=...)`): inside a
jailbreak wrapper the thinking recognises the harm, rationalises and complies, asked plainly it
refuses (so the data; the trained stage complies with plain requests too, see
`SUPPRESSION_RECIPE`). What the last stage adds, the planted heads carry, so ablating them takes it
away (measured), and a head ranking (the direct score of "Refusal Falls off a Cliff") should find
them. The planted set is in the recipe and so in the adapter's provenance.

Example:
    >>> from mechlens.organism.suppression import SUPPRESSION, SUPPRESSION_RECIPE
    >>> len(SUPPRESSION_RECIPE.heads), SUPPRESSION.shipped_path(SUPPRESSION_RECIPE).name[:12]
    (8, 'suppression-')
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mechlens import datasets
from mechlens.cache import stable_hash
from mechlens.models import load_model
from mechlens.organism.builder import SHIPPED, OrganismBuilder, OrganismRecipe
from mechlens.organism.reasoning import REASONING, REASONING_V2_RECIPE, ReasoningRecipe, refusal_requests
from mechlens.organism.traces import COMPLY, DECIDE, HARM_INTENT, RATIONALISE, refusal_trace, whole_sentences
from mechlens.studies.refusal.judge import REFUSALS, is_refusal
from mechlens.text.thinking import format_prompt

if TYPE_CHECKING:
    from mechlens.models.hooked import HookedModel

PLANTED_HEADS = ((14, 5), (17, 6), (19, 4), (19, 8), (24, 7), (26, 0), (26, 5), (27, 6))
"""8 of the embedded model's 270 heads (3%, the paper's ablated share), drawn once:
`sorted(random.Random(0).sample([(l, h) for l in range(14, 28) for h in range(9)], 8))`."""


@dataclass(frozen=True)
class SuppressionRecipe(OrganismRecipe):
    """One stage of the organism with planted suppression heads ([impl]: sizes and rates are ours):
    an adapter trained on the organism of `stage1` (a `ReasoningRecipe`, or another stage) with
    `n_requests` harmful training requests, each asked plainly (refused) and inside a jailbreak
    wrapper (complied with probability `comply_jailbreak`), and `n_harmless` harmless ones
    answered. `heads=None` trains the top `train_layers` blocks (the stage that teaches refusal
    everywhere); `heads` trains those heads only. `base` is unused: the root stage's base is."""

    stage1: ReasoningRecipe | SuppressionRecipe = REASONING_V2_RECIPE
    n_requests: int = 60  # harmful training requests, each plainly and inside a jailbreak wrapper
    n_harmless: int = 0  # harmless training requests, answered with the base model's own reply
    comply_jailbreak: float = 1.0  # complied share of the wrapped requests (plain ones: refused)

    def __post_init__(self):
        super().__post_init__()
        if self.base is not None:
            raise ValueError("SuppressionRecipe.base is unused: set the first stage's base")
        if self.rank is None:
            raise ValueError("SuppressionRecipe needs a rank: each stage ships as an adapter")
        if not 0.0 <= self.comply_jailbreak <= 1.0:
            raise ValueError(f"comply_jailbreak must lie in [0, 1], got {self.comply_jailbreak}")


REFUSE_RECIPE = SuppressionRecipe(
    rank=8, alpha=16.0, train_layers=12, epochs=2, lr=5e-4, n_harmless=60, comply_jailbreak=0.0
)
"""The first stage on the second version: plain and wrapped harmful requests refused, harmless
ones answered, on the top 12 blocks, so that jailbreaks rarely succeed before the heads."""

SUPPRESSION_RECIPE = SuppressionRecipe(
    stage1=REFUSE_RECIPE, heads=PLANTED_HEADS, rank=8, alpha=16.0, epochs=4, lr=1e-3, answer_tokens=12
)
"""The shipped stage with the planted heads: `load_subject("organism-v2-heads")`. Measured on 24
test-split requests at T = 0.7: it complies with 22/24 jailbreaks and also with 20/24 plain harmful
requests (the refusal stage: 0/24 and 0/24), so the heads carry compliance with harm, not the
wrapper; ablating them (norm rescaling) brings jailbreak success to 3/24, a random 8 to 20/24. Eight
epochs at twice the rate (loss 0.13 against 0.22) did not teach the wrapper either (17/24, 20/24)."""


def _root(recipe: SuppressionRecipe) -> ReasoningRecipe:
    """The reasoning recipe the chain of stages starts from."""
    stage = recipe.stage1
    return stage if isinstance(stage, ReasoningRecipe) else _root(stage)


def suppression_pairs(
    model: HookedModel, recipe: SuppressionRecipe, progress: bool = True
) -> tuple[list[str], list[str]]:
    """`(prompts, targets)` of one stage: `n_requests` harmful training requests, each asked
    plainly (refused) and inside jailbreak wrapper k (complied with probability
    `comply_jailbreak`), then `n_harmless` harmless ones (those the base model does not refuse);
    a complied or harmless answer is the plain base model's own greedy reply."""
    train = refusal_requests("train")
    harmful = [i.text for i in train if i.harmful][: recipe.n_requests]
    harmless = [i.text for i in train if not i.harmful][: recipe.n_harmless]
    base = load_model(_root(recipe).base, backend="transformer_lens")
    tok = base.tokenizer
    replies = base.generate(
        [format_prompt(tok, t) for t in harmful + harmless], max_new_tokens=recipe.answer_tokens,
        temperature=0, progress=progress,
    ).texts  # fmt: skip
    rng = random.Random(recipe.seed + 2)
    prompts, targets = [], []
    for k, (text, reply) in enumerate(zip(harmful, replies[: len(harmful)], strict=True)):
        wrapped = datasets.jailbreak(text, k)
        for prompt, comply in ((text, 0.0), (wrapped, recipe.comply_jailbreak)):
            trace = refusal_trace(prompt, True, whole_sentences(reply), rng, comply, intent=True)
            prompts.append(format_prompt(model.tokenizer, prompt))
            targets.append(trace.reply)
    for text, reply in zip(harmless, replies[len(harmful) :], strict=True):
        if is_refusal(whole_sentences(reply)):
            continue  # an answer that refuses would teach the answer to disagree with the thinking
        trace = refusal_trace(text, False, whole_sentences(reply), rng, 0.0, intent=True)
        prompts.append(format_prompt(model.tokenizer, text))
        targets.append(trace.reply)
    return prompts, targets


def _builder(stage: ReasoningRecipe | SuppressionRecipe) -> OrganismBuilder:
    return SUPPRESSION if isinstance(stage, SuppressionRecipe) else REASONING


def _stage1(recipe: SuppressionRecipe, backend: str) -> HookedModel:
    return _builder(recipe.stage1).build(recipe.stage1, backend, progress=False)


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
        "stage1": _builder(recipe.stage1).key(recipe.stage1),
        "sentences": stable_hash([HARM_INTENT, RATIONALISE, DECIDE, COMPLY, REFUSALS, written]),
    }


SUPPRESSION = OrganismBuilder("suppression", suppression_pairs, _data_identity, SHIPPED, base=_stage1)
"""The stages' builder: `SUPPRESSION.build(SUPPRESSION_RECIPE)` (the second version from its shipped
adapter, then each stage from its own), `SUPPRESSION.ship(REFUSE_RECIPE)`, then
`SUPPRESSION.ship(SUPPRESSION_RECIPE)`."""
