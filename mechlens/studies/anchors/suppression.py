"""White-box causal sentence importance by attention suppression (Thought Anchors).

For each source sentence j, attention to its tokens is suppressed in every layer and head (the
pre-softmax scores set to the dtype minimum); for every later token the KL divergence between
the clean and the suppressed next-token distributions (softmax at temperature 0.6) is taken in
log space, log(KL + 1e-9), and averaged over the tokens of each target sentence i > j.

Only the suffix from sentence j on is recomputed: the clean prefix's KV cache is reused, and
sentences are batched, each row suppressing its own sentence; every forward runs a chunk of
positions at a time, so an 8k-token trace needs memory for its KV caches, not for its logits.

Example:
    >>> import mechlens as ml
    >>> model = ml.load_model("tiny-llama")
    >>> trace = ml.ReasoningTrace.from_text(model, "Q?", "One step here. Two steps here. Three here.")
    >>> m = suppression_matrix(model, trace)                  # [target, source]
    >>> bool(torch.isnan(m[0]).all()), bool(torch.isfinite(m[2, :2]).all())
    (True, True)
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mechlens.ops.distributions import BLOCK_ROWS
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
    batch_size: int | None = None,
    reuse_prefix: bool = True,
    progress: bool = False,
    chunk: int | None = None,
    sources: Sequence[int] | None = None,
) -> Tensor:
    """Sentence x sentence suppression effect `[target i, source j]` (NaN unless i > j): the mean
    over the tokens of sentence i (the first `only_first` of them, when given) of
    log(KL(p_clean || p_suppressed) + 1e-9), with attention to sentence j suppressed.

    The clean trace runs once, `chunk` positions at a time, keeping its KV cache and its last
    layer's residual stream (`[pos, d_model]`, from which each chunk's clean distribution is
    read). Each group of `batch_size` source sentences (default: 4, fewer on long traces so that
    their KV caches stay near 4096 rows x positions) continues from the clean cache cropped at
    its first sentence, each row suppressing its own sentence, again `chunk` positions at a time:
    memory depends on the chunk and the trace's KV cache, never on `[pos, vocab]`.
    `sources` limits the columns computed (default: all). `reuse_prefix=False` runs one full
    forward per sentence (the slow reference; same numbers).
    """
    n = len(trace.sentences)
    eps = 1e-9
    matrix = torch.full((n, n), float("nan"))
    sentences = trace.sentences
    columns = list(range(n)) if sources is None else sorted({int(j) for j in sources})
    if any(not 0 <= j < n for j in columns):
        raise ValueError(f"sources must be sentence indices in 0..{n - 1}, got {list(sources or [])}")
    if batch_size is None:
        batch_size = max(1, min(4, 4096 // trace.n_tokens))
    if reuse_prefix:
        last = model.n_layers - 1
        capture = {"resid_post": [last]}
        clean: list[Tensor] = []
        past: Any = None  # the clean trace's KV cache
        for _, out in model.forward_chunks(trace.tokens, None, chunk, capture=capture, stop_after=last):
            clean.append(out.acts["resid_post"][last][0])
            past = out.past_key_values
        clean_resid = torch.cat(clean)  # [T, d_model]
        groups = [columns[g : g + batch_size] for g in range(0, len(columns), batch_size)]
        for group in tqdm(groups, desc="suppression", disable=not progress):
            start = sentences[group[0]].start  # rows share the suffix from the group's first sentence
            rows = copy.deepcopy(past)
            rows.crop(start - trace.n_tokens)  # a negative count removes that many positions
            if len(group) > 1:
                rows.batch_repeat_interleave(len(group))
            suffix = trace.tokens[:, start:].expand(len(group), -1)  # [rows, T - start]
            kl = []
            with model.suppress_attention([(sentences[j].start, sentences[j].end) for j in group]):
                for a, out in model.forward_chunks(
                    suffix, None, chunk, capture=capture, stop_after=last, past_key_values=rows
                ):
                    resid = out.acts["resid_post"][last]  # [rows, c, d_model]
                    step = max(1, BLOCK_ROWS // len(group))  # unembed [rows, step, vocab] at a time
                    for b in range(0, resid.shape[1], step):
                        at = start + a + b
                        supp = model.unembed(resid[:, b : b + step])  # [rows, c, vocab], c <= step
                        base = model.unembed(clean_resid[at : at + supp.shape[1]])  # [c, vocab]
                        kl.append(token_kl(base[None], supp, temperature).cpu())  # [rows, <=step]
            log_kl = torch.log(torch.cat(kl, 1) + eps)  # [rows, T - start]
            for row, j in enumerate(group):
                matrix[:, j] = _sentence_means(log_kl[row], trace, start, only_first)
    else:
        with torch.no_grad():
            base = model(trace.tokens)[0]  # [T, vocab]
            for j in tqdm(columns, desc="suppression (naive)", disable=not progress):
                with model.suppress_attention((sentences[j].start, sentences[j].end)):
                    logits = model(trace.tokens)[0]
                log_kl = torch.log(token_kl(base, logits, temperature) + eps).cpu()
                matrix[:, j] = _sentence_means(log_kl, trace, 0, only_first)
    below = torch.tril(torch.ones(n, n, dtype=torch.bool), diagonal=-1)
    return matrix.masked_fill(~below, float("nan"))


def outgoing_effect(matrix: Tensor) -> Tensor:
    """Per-sentence effect on all later sentences: the NaN-aware mean down each column `[S]`."""
    return torch.nanmean(matrix, 0)
