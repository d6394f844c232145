"""A KV cache whose layers reserve their final length up front, for chunked forwards.

`transformers.DynamicCache` grows each layer by concatenation, one new `[batch, kv_heads, pos,
head_dim]` tensor per layer per chunk. Over a long trace these freed, ever larger blocks fragment
the allocator: a 4000-token forward of the embedded model in chunks of 256 grew the process by
650-770 MB for a 188 MB cache. `reserved_cache` writes each chunk into a buffer of the final
length and hands attention a view of the filled part, so the numbers equal `DynamicCache`'s.

    >>> import torch, mechlens as ml
    >>> model = ml.load_model("tiny-llama")
    >>> cache = reserved_cache(model.hf_model.config, 32)
    >>> k, v = cache.update(torch.ones(1, 2, 5, 4), torch.ones(1, 2, 5, 4), 0)
    >>> cache.get_seq_length(), tuple(k.shape)
    (5, (1, 2, 5, 4))
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class ReservedLayer(DynamicLayer):
    """A `DynamicLayer` that writes into buffers of `capacity` positions (allocated at the first
    update) and keeps `keys`/`values` as views of their filled part. Past the capacity, or once
    another method has replaced `keys` (a crop, a reorder), it concatenates as `DynamicLayer` does."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self._buffers: tuple[Tensor, Tensor] | None = None

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            shape = (*key_states.shape[:2], self.capacity, key_states.shape[3])
            vshape = (*value_states.shape[:2], self.capacity, value_states.shape[3])
            self._buffers = (key_states.new_empty(shape), value_states.new_empty(vshape))
            self._filled = 0
        buffers, n, new, keys = self._buffers, self._filled, key_states.shape[-2], self.keys
        ours = (
            buffers is not None
            and keys is not None
            and n + new <= self.capacity
            and (n == 0 or (keys.shape[-2] == n and keys.data_ptr() == buffers[0].data_ptr()))
            and tuple(key_states.shape[:2]) == tuple(buffers[0].shape[:2])
        )
        if not ours:
            self._buffers = None
            return super().update(key_states, value_states, *args, **kwargs)
        assert buffers is not None
        buffers[0][:, :, n : n + new] = key_states
        buffers[1][:, :, n : n + new] = value_states
        self._filled = n + new
        self.keys, self.values = buffers[0][:, :, : n + new], buffers[1][:, :, : n + new]
        return self.keys, self.values


def reserved_cache(config: Any, capacity: int) -> DynamicCache:
    """A `DynamicCache` for `config` whose full-attention layers reserve `capacity` positions
    (sliding-window layers keep their own kind)."""
    cache = DynamicCache(config=config)
    cache.layers = [
        ReservedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers
    ]
    return cache
