"""What a forward holds in memory, estimated before it runs, and the chunk size that keeps one
layer's eager attention under a budget; `HookedModel.check_memory` and `chunk_size_for` call
these with the model's dimensions.

Example:
    >>> held = forward_bytes((1, 512), {"resid_post": [0, 1]}, True, d_model=64, n_heads=4, d_head=16,
    ...                      d_vocab=100, item=4)
    >>> held == 4 * (2 * 512 * 64 + 512 * 100 + 3 * 4 * 512 * 512)
    True
"""

from __future__ import annotations

CAPTURE_SIZES = {
    "resid_pre": ("pos", "d_model"),
    "resid_post": ("pos", "d_model"),
    "z": ("pos", "n_heads", "d_head"),
    "pattern": ("n_heads", "pos", "pos"),
}
"""The per-row shape of each capture of one layer (`HookedModel.run_with_cache`)."""


def forward_bytes(
    shape: tuple[int, ...],
    capture: dict[str, list[int]],
    logits: bool,
    d_model: int,
    n_heads: int,
    d_head: int,
    d_vocab: int,
    item: int,
    reduced: bool = False,
    d_mlp: int = 0,
) -> int:
    """Bytes a one-pass forward of `shape = (batch, pos)` holds: the `capture`d layers (none when
    each capture is `reduced` as it is taken), the logits when kept, and one layer's eager
    attention scores, float32 softmax and copy and its MLP activations (gate, up and their product, `d_mlp`
    wide); `item` bytes per number."""
    batch, pos = int(shape[0]), int(shape[1])
    dims = {"pos": pos, "d_model": d_model, "n_heads": n_heads, "d_head": d_head}
    held = 0
    if not reduced:
        for name, layers in capture.items():
            size = batch
            for dim in CAPTURE_SIZES[name]:
                size *= dims[dim]
            held += size * len(layers)
    held += batch * pos * d_vocab if logits else 0
    held += 3 * batch * pos * d_mlp  # the MLP's gate, up and their product, one layer at a time
    held *= item
    # one layer's scores and their cast back in the model's dtype, the softmax in float32
    return held + batch * n_heads * pos * pos * (2 * item + 4)


def chunk_size(n_pos: int, n_heads: int, budget_mb: float = 128) -> int:
    """Positions per chunk for a forward over `n_pos` tokens: 512, fewer on long inputs so that
    one layer's eager attention (scores, softmax and a copy: `3 x heads x chunk x n_pos` floats)
    stays under `budget_mb`; at least 64.

        >>> chunk_size(1000, n_heads=9), chunk_size(16000, n_heads=9)
        (512, 77)
    """
    per_position = 3 * n_heads * max(int(n_pos), 1) * 4
    return int(min(512, max(64, budget_mb * 2**20 // per_position)))
