"""Token attention aggregated over spans (sentences, reasoning steps), also one query chunk at a
time, so that no `[heads, pos, pos]` pattern of a whole long trace is ever held.

Example:
    >>> import torch
    >>> pattern = torch.tensor([[[1.0, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]]])  # [heads, q, k]
    >>> span_attention(pattern, [(0, 1), (1, 3)])             # mass from each span to each span
    tensor([[[1.0000, 0.0000],
             [0.3500, 0.6500]]])
    >>> acc = SpanAttention([(0, 1), (1, 3)])                 # the same, query rows in two chunks
    >>> acc.add(pattern[:, :2, :2], query_start=0); acc.add(pattern[:, 2:], query_start=2)
    >>> torch.equal(acc.result(), span_attention(pattern, [(0, 1), (1, 3)]))
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

KEY_MODES = ("sum", "mean")


class SpanAttention:
    """Span x span attention accumulated over chunks of query rows.

    Entry (i, j) averages over the query tokens of span i the attention they pay to the key
    tokens of span j: summed over those keys (`keys="sum"`, the share of attention) or averaged
    (`keys="mean"`, the block mean). Spans are token ranges `[start, end)`. Feed each chunk of
    query rows `pattern [..., q_chunk, k]` (keys from position 0) with `add`, read `result()`.
    """

    def __init__(self, spans: Sequence[tuple[int, int]], keys: str = "sum"):
        if keys not in KEY_MODES:
            raise ValueError(f"keys must be one of {KEY_MODES}, got {keys!r}")
        if not spans or any(not 0 <= a < b for a, b in spans):
            raise ValueError(f"spans must be non-empty token ranges (start, end), got {list(spans)}")
        self.spans, self.keys = [(int(a), int(b)) for a, b in spans], keys
        self.total: Tensor | None = None  # [..., n_spans, n_spans] sums over query rows
        self.rows = torch.zeros(len(self.spans))  # query rows seen per span

    def add(self, pattern: Tensor, query_start: int) -> None:
        """Add the query rows `query_start .. query_start + pattern.shape[-2]` of a pattern whose
        key axis starts at position 0."""
        n_q, n_k = pattern.shape[-2:]  # keys past n_k are later tokens: causally unattended
        index = torch.full((n_k,), len(self.spans), dtype=torch.long, device=pattern.device)  # outside
        for j, (a, b) in enumerate(self.spans):
            index[a : min(b, n_k)] = j
        by_key = torch.zeros(
            *pattern.shape[:-1], len(self.spans) + 1, dtype=pattern.dtype, device=pattern.device
        )
        by_key.index_add_(-1, index, pattern)  # [..., q, n_spans + 1]
        by_key = by_key[..., :-1]
        if self.total is None:
            self.total = torch.zeros(
                *pattern.shape[:-2], len(self.spans), len(self.spans), dtype=pattern.dtype
            )
        for i, (a, b) in enumerate(self.spans):
            lo, hi = max(a, query_start), min(b, query_start + n_q)
            if lo < hi:
                self.total[..., i, :] += by_key[..., lo - query_start : hi - query_start, :].sum(-2).cpu()
                self.rows[i] += hi - lo

    def result(self) -> Tensor:
        """`[..., n_spans, n_spans]`; raises when a span's query rows were never added."""
        if self.total is None or (self.rows == 0).any():
            missing = [self.spans[i] for i in (self.rows == 0).nonzero()[:, 0].tolist()]
            raise ValueError(f"no query rows were added for the spans {missing or self.spans}")
        out = self.total / self.rows.to(self.total)[:, None]
        if self.keys == "mean":
            lengths = torch.tensor([b - a for a, b in self.spans], dtype=out.dtype)
            out = out / lengths
        return out


def span_attention(pattern: Tensor, spans: Sequence[tuple[int, int]], keys: str = "sum") -> Tensor:
    """Span x span attention `[..., n_spans, n_spans]` from token attention `pattern [..., q, k]`
    (see `SpanAttention`; this is the whole pattern at once)."""
    n_q, n_k = pattern.shape[-2:]
    if not spans or any(not 0 <= a < b <= min(n_q, n_k) for a, b in spans):
        raise ValueError(f"spans must be non-empty token ranges inside 0..{min(n_q, n_k)}, got {list(spans)}")
    acc = SpanAttention(spans, keys)
    acc.add(pattern, 0)
    return acc.result().to(pattern.device)
