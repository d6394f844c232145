"""Refusal-suppression heads: the heads that write most against the refusal direction (the
authors' direct score, `mechlens.ops.heads.direct_head_scores`, ranked ascending) or whose ablation
most raises the refusal score of complied replies; random control sets of the same size, and the
capability check under ablation.

Example:
    >>> import torch
    >>> effects = torch.tensor([[0.1, 0.9], [0.5, -0.2]])
    >>> top_heads(effects, 2)
    [(0, 1), (1, 0)]
    >>> top_heads(-effects, 1)  # ascending: the most negative direct score first
    [(1, 1)]
    >>> random_heads(effects.shape, 1, exclude=[(0, 1), (1, 0)], seed=0)
    [(1, 1)]
    >>> len(random_head_sets(effects.shape, 1, draws=2, exclude=[(0, 1)], seed=0))
    2
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from torch import Tensor

from mechlens.ops.signals import token_signals
from mechlens.studies.refusal.replies import Reply
from mechlens.text.thinking import format_reply
from mechlens.text.trace import ReasoningTrace

if TYPE_CHECKING:
    from mechlens.models.hooked import HookedModel


def top_heads(effects: Tensor, count: int) -> list[tuple[int, int]]:
    """The `count` `(layer, head)` pairs of `effects [layers, heads]` with the largest values."""
    n_heads = effects.shape[1]
    order = effects.flatten().argsort(descending=True, stable=True)  # ties: the earlier head first
    return [divmod(int(i), n_heads) for i in order[:count]]


def random_heads(
    shape: Sequence[int], count: int, exclude: Sequence[tuple[int, int]] = (), seed: int = 0
) -> list[tuple[int, int]]:
    """`count` random `(layer, head)` pairs of a `[layers, heads]` grid, none in `exclude`, sorted;
    seeded."""
    excluded = {tuple(h) for h in exclude}
    others = [(l, h) for l in range(shape[0]) for h in range(shape[1]) if (l, h) not in excluded]
    if count > len(others):
        raise ValueError(f"count={count} exceeds the {len(others)} heads outside `exclude`")
    return sorted(random.Random(seed).sample(others, count))


def random_head_sets(
    shape: Sequence[int], count: int, draws: int = 20, exclude: Sequence[tuple[int, int]] = (), seed: int = 0
) -> list[list[tuple[int, int]]]:
    """`draws` independent random sets of `count` heads (`random_heads`, draw k seeded from
    `(seed, k)`): the control distribution that a chosen head set is compared against."""
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be an int >= 1, got {draws!r}")
    return [random_heads(shape, count, exclude, seed=seed * 100_003 + k) for k in range(draws)]


def answer_perplexity(
    model: HookedModel,
    replies: Sequence[Reply],
    heads: Sequence[tuple[int, int]] = (),
    rescale: str | None = None,
) -> float:
    """Capability check: mean perplexity of `replies` (the model's own, teacher-forced) with `heads`
    zero-ablated (`rescale` as in `model.ablate_heads`)."""
    with model.ablate_heads(list(heads), rescale=rescale) if heads else contextlib.nullcontext():
        values = [
            token_signals(
                model, ReasoningTrace.from_text(model, r.instruction, format_reply(r.thinking, r.answer))
            ).perplexity
            for r in replies
        ]
    return float(np.mean(values))
