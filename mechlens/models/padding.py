"""Padding: one place for how a batch of rows of different lengths is laid out and read.

A padded batch is token ids `[batch, pos]` with an attention mask `[batch, pos]` that holds, in
each row, one run of 1s (the row's own tokens) with 0s on the left, the right or both. Every
method counts positions in each row's own tokens (0 = its first real token, -1 = its last), so
left and right padding give the same numbers per row. Without a mask, a batch whose rows hold
padding is refused (`check_unmasked`): a silent read of pad tokens as text is never an answer.

Example:
    >>> import torch
    >>> mask = torch.tensor([[0, 1, 1], [1, 1, 1], [1, 1, 0]])
    >>> row_columns(mask, [0, -1]).tolist()   # each row's own first and last token
    [[1, 2], [0, 2], [0, 1]]
    >>> tokens = torch.tensor([[7, 8, 0], [5, 6, 9]])
    >>> [t.tolist() for t in left_align(tokens, torch.tensor([[1, 1, 0], [1, 1, 1]]), pad=0)]
    [[[0, 7, 8], [5, 6, 9]], [[0, 1, 1], [1, 1, 1]]]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def check_mask(mask: Tensor, shape: tuple[int, ...]) -> Tensor:
    """`mask` as a long tensor of `shape` holding, per row, one non-empty run of 1s (padding as
    0s on either side); `ValueError` naming `attention_mask` otherwise."""
    mask = torch.as_tensor(mask)
    if mask.ndim == 1:
        mask = mask[None]
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} != tokens {tuple(shape)}")
    if mask.is_floating_point() or mask.is_complex():
        if not torch.isin(mask, torch.tensor([0.0, 1.0], dtype=mask.dtype, device=mask.device)).all():
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    elif not torch.isin(mask.long(), torch.tensor([0, 1], device=mask.device)).all():
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    mask = mask.long()
    if (mask.sum(1) == 0).any():
        raise ValueError("attention_mask has a row with no token")
    # one run of 1s: the mask rises at most once and falls at most once
    steps = mask.diff(dim=1, prepend=torch.zeros_like(mask[:, :1]))
    if ((steps == 1).sum(1) > 1).any():
        row = int(((steps == 1).sum(1) > 1).nonzero()[0, 0])
        raise ValueError(
            f"attention_mask row {row} has padding between tokens: each row must be one run of 1s "
            "(padding on the left, the right or both)"
        )
    return mask


def _edge_run(tokens: Tensor, pad: int, from_end: bool) -> Tensor:
    """How many `pad` tokens each row of `tokens [batch, pos]` starts (or ends) with: `[batch]`."""
    rows = tokens.flip(1) if from_end else tokens
    is_pad = (rows == pad).long()
    return is_pad.cumprod(1).sum(1)


def check_unmasked(tokens: Tensor, tokenizer) -> None:
    """`ValueError` when ids given without an attention mask hold padding.

    A row holds padding when it starts with the pad token (twice, where the pad token is also the
    beginning-of-sequence token), or ends with it (twice, where it is also the end-of-sequence
    token), or when rows start or end with different numbers of pad tokens. An all-ones
    `attention_mask` states that there is none."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        return
    lead, trail = _edge_run(tokens, pad, False), _edge_run(tokens, pad, True)
    lead_min = 2 if pad == getattr(tokenizer, "bos_token_id", None) else 1
    trail_min = 2 if pad == getattr(tokenizer, "eos_token_id", None) else 1
    uneven = len(tokens) > 1 and (lead.unique().numel() > 1 or trail.unique().numel() > 1)
    if uneven or (lead >= lead_min).any() or (trail >= trail_min).any():
        raise ValueError(
            f"token ids hold padding (rows start or end with the pad token {pad}) but no "
            "attention_mask was given: pass the mask (model.tokenize(texts) returns both; an all-ones "
            "mask says there is no padding) or give the prompts as texts"
        )


def as_positions(values: Sequence[int], name: str = "positions") -> list[int]:
    """`values` as Python ints (NumPy and 0-d tensor integers too); `TypeError` naming `name`."""
    if isinstance(values, str) or not isinstance(values, Sequence | range | Tensor):
        raise TypeError(f"{name} must be a list of token positions, got {type(values).__name__}")
    out = []
    for v in values:
        if isinstance(v, bool) or not hasattr(v, "__index__"):
            raise TypeError(f"{name} entries must be integers, got {v!r}")
        out.append(int(v.__index__()))
    return out


def row_columns(mask: Tensor, positions: Sequence[int], name: str = "positions") -> Tensor:
    """Columns `[batch, len(positions)]` of each row's own positions: `p >= 0` is its p-th real
    token, `p < 0` counts back from its last real token. `ValueError` when a position lies outside
    the shortest row."""
    lengths = mask.sum(1)  # [batch]
    shortest = int(lengths.min())
    wanted = as_positions(positions, name)
    if not wanted or any(not -shortest <= p < shortest for p in wanted):
        raise ValueError(
            f"{name} must be a non-empty list in [-{shortest}, {shortest}); got {wanted} (the "
            f"shortest row has {shortest} tokens)"
        )
    first = mask.long().argmax(1)  # [batch]: column of each row's first real token
    own = torch.tensor(wanted, device=mask.device)[None] % lengths[:, None]  # [batch, n]
    return first[:, None] + own


def left_align(tokens: Tensor, mask: Tensor, pad: int) -> tuple[Tensor, Tensor]:
    """The same rows with every row's tokens moved to the right edge (left padding), as sampling
    appends new tokens there; `(tokens, mask)`, both `[batch, pos]`."""
    lengths = mask.sum(1)
    width = tokens.shape[1]
    if bool((mask[:, -1] == 1).all()):
        return tokens, mask
    out = torch.full_like(tokens, pad)
    new_mask = torch.zeros_like(mask)
    for b in range(len(tokens)):
        n = int(lengths[b])
        out[b, width - n :] = tokens[b][mask[b].bool()]
        new_mask[b, width - n :] = 1
    return out, new_mask
