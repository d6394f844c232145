"""The Echo Likelihood Gap and attention refocusing ("Echoes as Anchors").

`likelihood_gap` follows the authors' `compare_trimmed_accuracy.py`
(`_extend_samples_with_metrics`): the response tokens' log-probs given the prompt, teacher-forced,
for the raw and the echo-trimmed response; the gap in their means and sums, the removed tokens
(raw tokens minus the token LCS of the two), and the gap over their longest common token suffix.
`refocusing` follows `src/evaluation/attention_metrics.py` (`compute_attention_for_pair`): per
layer, the head-averaged attention that every response token pays to the first
`prefix_tokens` response tokens (the echo region; default 32) and to the question's tokens, summed
over those keys and averaged over the response tokens.

Example:
    >>> import mechlens as ml
    >>> model = ml.load_model("tiny-llama")
    >>> q, r = "What is 2 + 3?", "<think>\\nWhat is 2 + 3? Add them: 5.\\n</think>\\n5"
    >>> gap = likelihood_gap(model, q, r, "<think>\\nAdd them: 5.\\n</think>\\n5")
    >>> gap.removed_tokens > 0, gap.suffix_tokens > 0
    (True, True)
    >>> refocusing(model, q, r, prefix_tokens=4).to_prefix.shape
    (3,)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from mechlens.ops.signals import token_signals
from mechlens.text.trace import ReasoningTrace

if TYPE_CHECKING:
    from mechlens.models.hooked import HookedModel

PREFIX_TOKENS = 32
"""The authors' echo region for attention: the first 32 response tokens (`--attention_prefix_tokens`)."""


@dataclass
class LikelihoodGap:
    """One response's Echo Likelihood Gap (nats); `None` where a value is undefined (no token
    removed, no common suffix)."""

    delta_mean: float  # mean log p(raw) - mean log p(trimmed): the paper's Delta-L per token
    delta_sum: float
    raw_tokens: int
    trimmed_tokens: int
    removed_tokens: int  # raw tokens - LCS(raw, trimmed)
    added_tokens: int
    suffix_tokens: int  # the longest common token suffix
    delta_sum_per_removed: float | None
    delta_mean_per_removed: float | None
    delta_suffix_sum: float | None  # over the common suffix only
    delta_suffix_mean: float | None


def lcs_length(a: list[int], b: list[int]) -> int:
    """Length of the longest common subsequence of two token lists.

    >>> lcs_length([1, 2, 3, 4], [1, 3, 4, 5])
    3
    """
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def common_suffix(a: list[int], b: list[int]) -> int:
    """Length of the longest common suffix of two token lists.

    >>> common_suffix([1, 2, 3], [9, 2, 3])
    2
    """
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def _response(model: HookedModel, question: str, response: str) -> tuple[list[int], torch.Tensor]:
    trace = ReasoningTrace.from_text(model, question, response)
    ids = trace.tokens[0, trace.prompt_len :].tolist()
    return ids, token_signals(model, trace).logprob.double()


def likelihood_gap(model: HookedModel, question: str, raw: str, trimmed: str) -> LikelihoodGap:
    """The Echo Likelihood Gap of `raw` against `trimmed` (responses to `question`, chat-templated
    as `ReasoningTrace.from_text` templates them)."""
    raw_ids, raw_lp = _response(model, question, raw)
    trim_ids, trim_lp = _response(model, question, trimmed)
    lcs = lcs_length(raw_ids, trim_ids)
    removed, suffix = max(0, len(raw_ids) - lcs), common_suffix(raw_ids, trim_ids)
    delta_mean = float(raw_lp.mean() - trim_lp.mean())
    delta_sum = float(raw_lp.sum() - trim_lp.sum())
    tail = (raw_lp[-suffix:], trim_lp[-suffix:]) if suffix else None
    return LikelihoodGap(
        delta_mean=delta_mean,
        delta_sum=delta_sum,
        raw_tokens=len(raw_ids),
        trimmed_tokens=len(trim_ids),
        removed_tokens=removed,
        added_tokens=max(0, len(trim_ids) - lcs),
        suffix_tokens=suffix,
        delta_sum_per_removed=delta_sum / removed if removed else None,
        delta_mean_per_removed=delta_mean / removed if removed else None,
        delta_suffix_sum=float(tail[0].sum() - tail[1].sum()) if tail else None,
        delta_suffix_mean=float(tail[0].mean() - tail[1].mean()) if tail else None,
    )


@dataclass
class Refocusing:
    """Per layer `[layers]`: the share of attention (head mean, summed over the keys, mean over
    response tokens) from response tokens to the echo region and to the question."""

    to_prefix: np.ndarray
    to_question: np.ndarray
    prefix_tokens: int  # the echo region's length used (at most the response's)
    question_span: tuple[int, int] | None  # token span of the question in the prompt


def _question_span(trace: ReasoningTrace, question: str) -> tuple[int, int] | None:
    """Tokens of the prompt whose characters lie inside the question's text."""
    start = trace.text.find(question)
    if start < 0 or start >= len(trace.text) - len(trace.response):
        return None
    end = start + len(question)
    inside = [i for i, (a, b) in enumerate(trace.offsets[: trace.prompt_len]) if a < end and b > start]
    return (inside[0], inside[-1] + 1) if inside else None


@torch.no_grad()
def refocusing(
    model: HookedModel, question: str, response: str, prefix_tokens: int | tuple[int, int] = PREFIX_TOKENS
) -> Refocusing:
    """Attention refocusing of one response: `prefix_tokens` the echo region's length from the
    response's start (the authors' default 32), or a `(start, end)` token span of the response
    (e.g. the detected echo, `echo_span`)."""
    trace = ReasoningTrace.from_text(model, question, response)
    p, n = trace.prompt_len, trace.n_tokens
    if isinstance(prefix_tokens, tuple):
        a, b = prefix_tokens
        if not 0 <= a < b <= n - p:
            raise ValueError(
                f"prefix_tokens span {prefix_tokens} must lie inside the {n - p} response tokens"
            )
        dst = (p + a, p + b)
    else:
        if isinstance(prefix_tokens, bool) or not isinstance(prefix_tokens, int) or prefix_tokens < 1:
            raise ValueError(f"prefix_tokens must be an int >= 1 or a token span, got {prefix_tokens!r}")
        dst = (p, p + min(prefix_tokens, n - p))
    q_span = _question_span(trace, question)

    def reduce(name: str, layer: int, pattern: torch.Tensor) -> torch.Tensor:
        mean = pattern[0, :, p:n].float().mean(0)  # [response queries, keys], head mean
        to_q = mean[:, q_span[0] : q_span[1]].sum(-1).mean() if q_span else torch.tensor(float("nan"))
        return torch.stack([mean[:, dst[0] : dst[1]].sum(-1).mean(), to_q])

    _, cache = model.run_with_cache(trace.tokens, names=["pattern"], return_logits=False, reduce=reduce)
    values = cache["pattern"].double().numpy()  # [layers, 2]
    return Refocusing(values[:, 0], values[:, 1], dst[1] - dst[0], q_span)
