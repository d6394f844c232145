"""Token attention aggregated over spans (sentences, reasoning steps).

Example:
    >>> import torch
    >>> pattern = torch.tensor([[[1.0, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]]])  # [heads, q, k]
    >>> span_attention(pattern, [(0, 1), (1, 3)])             # mass from each span to each span
    tensor([[[1.0000, 0.0000],
             [0.3500, 0.6500]]])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def span_attention(pattern: Tensor, spans: Sequence[tuple[int, int]], keys: str = "sum") -> Tensor:
    """Span x span attention `[..., n_spans, n_spans]` from token attention `pattern [..., q, k]`.

    Entry (i, j) averages over the query tokens of span i the attention they pay to the key
    tokens of span j: summed over those keys (`keys="sum"`, the share of attention) or averaged
    (`keys="mean"`, the block mean). Spans are token ranges `[start, end)`.
    """
    if keys not in ("sum", "mean"):
        raise ValueError(f"keys must be 'sum' or 'mean', got {keys!r}")
    n_q, n_k = pattern.shape[-2:]
    if not spans or any(not 0 <= a < b <= min(n_q, n_k) for a, b in spans):
        raise ValueError(f"spans must be non-empty token ranges inside 0..{min(n_q, n_k)}, got {list(spans)}")
    index = torch.full((n_k,), len(spans), dtype=torch.long, device=pattern.device)  # n = outside
    for j, (a, b) in enumerate(spans):
        index[a:b] = j
    # sum key columns into span columns: [..., q, n_spans + 1]
    by_key = torch.zeros(*pattern.shape[:-1], len(spans) + 1, dtype=pattern.dtype, device=pattern.device)
    by_key.index_add_(-1, index, pattern)
    by_key = by_key[..., :-1]
    if keys == "mean":
        lengths = torch.tensor([b - a for a, b in spans], dtype=pattern.dtype, device=pattern.device)
        by_key = by_key / lengths
    rows = [by_key[..., a:b, :].mean(-2) for a, b in spans]  # each [..., n_spans]
    return torch.stack(rows, -2)
