"""White-box causal sentence importance by attention suppression (Thought Anchors).

For each source sentence j, attention to its tokens is suppressed in every layer and head (the
pre-softmax scores set to the dtype minimum); for every later token the KL divergence between
the clean and the suppressed next-token distributions (softmax at temperature 0.6) is taken in
log space, log(KL + 1e-9), and averaged over the tokens of each target sentence i > j.

Only the suffix from sentence j on is recomputed: the clean prefix's KV cache is reused, and
sentences are batched, each row suppressing its own sentence.

Example:
    >>> import mechlens as ml
    >>> model = ml.load_model("tiny-llama")
    >>> trace = ml.ReasoningTrace.from_text(model, "Q?", "One step here. Two steps here. Three here.")
    >>> m = suppression_matrix(model, trace)                  # [target, source]
    >>> bool(torch.isnan(m[0]).all()), bool(torch.isfinite(m[2, :2]).all())
    (True, True)
"""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mechlens.text.trace import ReasoningTrace


def token_kl(base: Tensor, other: Tensor, temperature: float = 0.6) -> Tensor:
    """KL(p_base || p_other) per position of logits `[..., vocab]` at `temperature` -> `[...]`,
    clamped at 0 (rounding can make a near-zero KL slightly negative, and its log NaN)."""
    log_p = torch.log_softmax(base.float() / temperature, -1)
    log_q = torch.log_softmax(other.float() / temperature, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0)


def _sentence_means(log_kl: Tensor, trace: ReasoningTrace, offset: int, only_first: int | None) -> Tensor:
    """Mean of `log_kl [pos]` (positions from `offset`) over each sentence's tokens -> `[S]`."""
    out = torch.full((len(trace.sentences),), float("nan"))
    for i, s in enumerate(trace.sentences):
        a, b = s.start - offset, s.end - offset
        if only_first is not None:
            b = min(b, a + only_first)
        if a >= 0:
            out[i] = log_kl[a:b].mean()
    return out


def suppression_matrix(
    model,
    trace: ReasoningTrace,
    temperature: float = 0.6,
    only_first: int | None = None,
    batch_size: int = 4,
    reuse_prefix: bool = True,
    progress: bool = False,
) -> Tensor:
    """Sentence x sentence suppression effect `[target i, source j]` (NaN unless i > j): the mean
    over the tokens of sentence i (the first `only_first` of them, when given) of
    log(KL(p_clean || p_suppressed) + 1e-9), with attention to sentence j suppressed.

    `reuse_prefix=False` runs one full forward per sentence (the slow reference; same numbers).
    """
    n = len(trace.sentences)
    eps = 1e-9
    matrix = torch.full((n, n), float("nan"))
    sentences = trace.sentences
    if reuse_prefix:
        prefix = model.cache_prefix(trace.tokens)
        base = prefix.logits[0]  # [T, vocab]
        groups = [list(range(j, min(j + batch_size, n))) for j in range(0, n, batch_size)]
        for group in tqdm(groups, desc="suppression", disable=not progress):
            start = sentences[group[0]].start  # rows share the suffix from the group's first sentence
            suffix = trace.tokens[:, start:].expand(len(group), -1)  # [rows, T - start]
            with model.suppress_attention([(sentences[j].start, sentences[j].end) for j in group]):
                logits = model.continue_prefix(prefix, suffix, upto=start)  # [rows, T - start, vocab]
            for row, j in enumerate(group):
                log_kl = torch.log(token_kl(base[start:], logits[row], temperature) + eps).cpu()
                matrix[:, j] = _sentence_means(log_kl, trace, start, only_first)
    else:
        with torch.no_grad():
            base = model(trace.tokens)[0]  # [T, vocab]
            for j in tqdm(range(n), desc="suppression (naive)", disable=not progress):
                with model.suppress_attention((sentences[j].start, sentences[j].end)):
                    logits = model(trace.tokens)[0]
                log_kl = torch.log(token_kl(base, logits, temperature) + eps).cpu()
                matrix[:, j] = _sentence_means(log_kl, trace, 0, only_first)
    below = torch.tril(torch.ones(n, n, dtype=torch.bool), diagonal=-1)
    return matrix.masked_fill(~below, float("nan"))


def outgoing_effect(matrix: Tensor) -> Tensor:
    """Per-sentence effect on all later sentences: the NaN-aware mean down each column `[S]`."""
    return torch.nanmean(matrix, 0)
