"""White-box sentence importance by attention aggregation: receiver heads (Thought Anchors).

Per head, token attention is averaged over sentence blocks into a sentence x sentence matrix M.
A sentence's vertical score is the mean attention later sentences (at least `proximity` sentences
later) pay to it. Heads whose vertical scores are heavy-tailed (high Fisher kurtosis) "receive"
from a few broadcasting sentences; the top-k such heads (layer 0 excluded) are receiver heads,
and a sentence's receiver score is its mean vertical score over them.

Example:
    >>> import mechlens as ml
    >>> model = ml.load_model("tiny-llama")
    >>> trace = ml.ReasoningTrace.from_text(model, "Q?", "One step here. Two steps here. "
    ...     "Three steps here. Four steps here. Five steps here. Six steps here. End.")
    >>> m = sentence_attention(model, trace)                  # [layers, heads, S, S]
    >>> v = vertical_scores(m, proximity=2)                   # [layers, heads, S]
    >>> k = kurtosis(v)                                       # [layers, heads]
    >>> heads = receiver_heads(k, top_k=3)
    >>> receiver_scores(v, heads).shape
    torch.Size([6])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mechlens.ops.attention import SpanAttention
from mechlens.text.trace import ReasoningTrace

if TYPE_CHECKING:
    from mechlens.models.hooked import HookedModel


def sentence_attention(
    model: HookedModel, trace: ReasoningTrace, layers: Sequence[int] | None = None, chunk: int | None = None
) -> Tensor:
    """Sentence x sentence attention `[layers, heads, S, S]` of every head: the block mean of token
    attention from the tokens of sentence q (rows) to those of sentence k (columns).

    The forward runs `chunk` query positions at a time over a KV cache (default:
    `model.chunk_size_for` the trace), and each layer's
    `[heads, chunk, pos]` attention is pooled into sentence blocks as soon as it is captured, so
    memory depends on the chunk, not on the trace's length.
    """
    layer_list = model.check_layers(layers)
    spans = [(s.start, s.end) for s in trace.check_sentences()]
    pooled = {layer: SpanAttention(spans, keys="mean") for layer in layer_list}

    def pool(name: str, layer: int, pattern: Tensor) -> Tensor:  # [1, heads, q, k]: the last q of k
        pooled[layer].add(pattern[0].float(), query_start=pattern.shape[-1] - pattern.shape[-2])
        return pattern.new_zeros(0)

    for _ in model.forward_chunks(
        trace.tokens, None, chunk, capture={"pattern": layer_list}, stop_after=max(layer_list), reduce=pool
    ):
        pass
    return torch.stack([pooled[layer].result() for layer in layer_list])


def vertical_scores(matrix: Tensor, proximity: int = 4, control_depth: bool = False) -> Tensor:
    """Vertical score of each sentence `[..., S]` from sentence attention `matrix [..., S, S]`.

    Entries with row - column < `proximity` (the diagonal band and the upper triangle) are
    ignored; with `control_depth`, each row is replaced by its ranks (ties averaged) divided by its
    number of kept entries. v_k = mean over rows q >= k + proximity of M[q, k]; NaN for the last
    `proximity` sentences. As `get_vertical_scores` of the Thought Anchors code.

    >>> m = torch.tensor([[1., 0, 0], [.5, .5, 0], [.2, .3, .5]])
    >>> vertical_scores(m, proximity=1)
    tensor([0.3500, 0.3000,    nan])
    """
    if proximity < 1:
        raise ValueError(f"proximity must be >= 1 (the diagonal is always ignored), got {proximity}")
    n = matrix.shape[-1]
    rows = torch.arange(n)[:, None]
    cols = torch.arange(n)[None, :]
    keep = (rows - cols >= proximity).to(matrix.device)  # [S, S]
    m = matrix.float().masked_fill(~keep, float("nan"))
    if control_depth:
        m = _row_ranks(m, keep)
    kept = keep.sum(0)  # [S] rows counted per column
    total = torch.nan_to_num(m, nan=0.0).sum(-2)
    return torch.where(kept > 0, total / kept.clamp_min(1), torch.full_like(total, float("nan")))


def _row_ranks(m: Tensor, keep: Tensor) -> Tensor:
    """Average ranks (1-based) of the kept entries of each row, divided by the row's count."""
    from scipy.stats import rankdata

    ranks = torch.from_numpy(rankdata(m.cpu().numpy(), axis=-1, nan_policy="omit")).float()
    count = keep.sum(-1, keepdim=True).float().cpu()  # [S, 1]
    return (ranks / count.clamp_min(1)).to(m.device)


def kurtosis(values: Tensor) -> Tensor:
    """Fisher kurtosis (normal = 0, biased estimator) over the last axis, ignoring NaNs:
    `scipy.stats.kurtosis(x, fisher=True, bias=True, nan_policy="omit")`. `[..., S]` -> `[...]`.

    >>> kurtosis(torch.tensor([1.0, 2.0, 3.0, 4.0, float("nan")]))
    tensor(-1.3600)
    """
    ok = ~torch.isnan(values)
    n = ok.sum(-1).float()
    x = torch.nan_to_num(values.float(), nan=0.0)
    mean = x.sum(-1) / n
    dev = torch.where(ok, x - mean[..., None], torch.zeros_like(x))
    m2 = (dev**2).sum(-1) / n
    m4 = (dev**4).sum(-1) / n
    return m4 / m2**2 - 3


def receiver_heads(kurt: Tensor, top_k: int = 20, exclude_layer0: bool = True) -> list[tuple[int, int]]:
    """The `top_k` (layer, head) pairs of highest kurtosis `kurt [layers, heads]` (average it over
    traces first), layer 0 excluded as in the paper, NaNs never chosen."""
    k = kurt.clone().float()
    if exclude_layer0:
        k[0] = float("nan")
    k = torch.nan_to_num(k, nan=-float("inf"))
    valid = int(torch.isfinite(k).sum())
    if not 1 <= top_k <= valid:
        raise ValueError(f"top_k must lie in 1..{valid} (heads with a kurtosis), got {top_k}")
    order = k.flatten().argsort(descending=True)[:top_k]
    return [divmod(int(i), kurt.shape[1]) for i in order]


def receiver_scores(vertical: Tensor, heads: Sequence[tuple[int, int]]) -> Tensor:
    """Receiver score per sentence `[S]`: the mean vertical score over `heads` (NaN-aware)."""
    if not heads:
        raise ValueError("heads is empty: give (layer, head) pairs, e.g. from receiver_heads")
    v = torch.stack([vertical[l, h] for l, h in heads])  # [k, S]
    return torch.nanmean(v, 0)
