"""Cliff-as-a-Judge ("Refusal Falls off a Cliff", section 5): choose safety fine-tuning data by the
refusal cliff. Complied replies whose refusal score falls most by the end of the thinking are
rewritten to refuse; a fine-tune on them is compared with random and full selections.

Example (minutes on 2 cores):
    >>> chosen = select_by_cliff(replies, final_scores, fraction=0.25)   # doctest: +SKIP
    >>> safety_finetune(organism_path, chosen, replay, eval_sets)        # doctest: +SKIP
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mechlens.models import load_model
from mechlens.models.sampling import Sampling
from mechlens.ops.finetune import finetune
from mechlens.studies.refusal.judge import REFUSALS
from mechlens.studies.refusal.replies import REPLY_SAMPLING, Reply, refusal_rates, sample_replies_by_set
from mechlens.text.thinking import format_reply


def selections(
    candidates: Sequence[Reply], final_scores: Sequence[float], fraction: float, seed: int = 0
) -> dict[str, list[Reply]]:
    """The paper's three selections of complied `candidates`: the `fraction` with the lowest
    final refusal score (the largest cliff), as many at random (seeded), and all of them."""
    if len(candidates) != len(final_scores):
        raise ValueError(f"{len(candidates)} candidates but {len(final_scores)} final_scores")
    if not candidates:
        raise ValueError("no candidates to select from")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    ranked = [candidates[i] for i in np.argsort(np.asarray(final_scores), kind="stable")]
    size = max(1, round(fraction * len(candidates)))
    return {
        f"cliff (top {size})": ranked[:size],
        f"random ({size})": random.Random(seed).sample(list(candidates), size),
        f"all ({len(candidates)})": list(candidates),
    }


def safety_finetune(
    organism: str | Path,
    chosen: Sequence[Reply],
    replay: Sequence[Reply],
    eval_sets: dict[str, list[str]],
    backend: str = "transformer_lens",
    train_layers: int = 8,
    epochs: int = 3,
    lr: float = 1e-4,
    seed: int = 0,
    sampling: Sampling = REPLY_SAMPLING,
) -> dict:
    """Fine-tune a fresh copy of the model at `organism` on the chosen replies (own thinking + a
    refusal), mixed with as many of its own answered harmless replies from `replay` (so that the
    fine-tune does not simply teach refusing everything). Returns its `rates` on `eval_sets`
    (`refusal_rates`), `refused` (per set, one bool per prompt: for paired tests), and the counts
    of `examples` and `replayed` replies."""
    model = load_model(str(organism), backend=backend)
    kept = list(replay[: len(chosen)])
    targets = [format_reply(r.thinking, REFUSALS[i % len(REFUSALS)]) for i, r in enumerate(chosen)]
    targets += [format_reply(r.thinking, r.answer) for r in kept]
    prompts = [r.prompt for r in [*chosen, *kept]]
    finetune(
        model, prompts, targets, train_layers=train_layers, epochs=epochs, lr=lr, batch_size=4, seed=seed
    )
    replies = sample_replies_by_set(model, eval_sets, sampling)
    return {
        "rates": refusal_rates(replies),
        "refused": {name: [r.refused for r in rows] for name, rows in replies.items()},
        "examples": len(chosen),
        "replayed": len(kept),
    }
