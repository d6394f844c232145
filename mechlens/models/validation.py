"""Checks of what users pass to a model: token ids, layers, heads, positions, directions. Each
raises a `ValueError` or `TypeError` that names the argument and says what is valid;
`HookedModel`'s `check_*` methods call these with the model's dimensions.

Example:
    >>> check_layers([0, 2], n_layers=3)
    [0, 2]
    >>> check_head(4, n_heads=4)
    Traceback (most recent call last):
    ...
    ValueError: head 4 out of range: valid heads are 0..3
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mechlens.models.interventions import unit_vector
from mechlens.models.sampling import is_int


def as_index(value: Any, name: str) -> int:
    """`value` as a Python int (ints, NumPy integers, 0-d integer tensors); `TypeError` for bools,
    floats and anything else, naming the argument."""
    if isinstance(value, bool) or (isinstance(value, Tensor) and value.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer, got the boolean {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None


def is_integer(value: Any) -> bool:
    """An int, a NumPy integer (`is_int`) or a 0-d integer tensor (not a bool)."""
    if isinstance(value, Tensor):
        return value.ndim == 0 and not value.is_floating_point() and value.dtype != torch.bool
    return is_int(value)


def check_tokens(tokens: Tensor, n_ctx: int, d_vocab: int, model_name: str = "the model") -> Tensor:
    """Token ids `[batch, pos]`: integers in `[0, d_vocab)`, at least one row and one position, at
    most `n_ctx` positions. Returns them."""
    if not isinstance(tokens, Tensor):
        raise TypeError(f"tokens must be a tensor of token ids, got {type(tokens).__name__}")
    if tokens.dtype == torch.bool or tokens.is_floating_point() or tokens.is_complex():
        raise TypeError(f"token ids must be integers, got dtype {tokens.dtype}")
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
    if tokens.shape[0] == 0:
        raise ValueError("empty batch: tokens have 0 rows")
    if tokens.shape[1] == 0:
        raise ValueError("empty input: tokens have 0 positions")
    if tokens.shape[1] > n_ctx:
        raise ValueError(
            f"input of {tokens.shape[1]} tokens is longer than the context window ({n_ctx} tokens) "
            f"of {model_name}"
        )
    if tokens.min() < 0 or tokens.max() >= d_vocab:
        raise ValueError(f"token ids must lie in [0, {d_vocab}); got {tokens.min()}..{tokens.max()}")
    return tokens


def _in_range(value: Any, count: int, name: str, plural: str) -> int:
    index = as_index(value, name)
    if not 0 <= index < count:
        raise ValueError(f"{name} {index} out of range: valid {plural} are 0..{count - 1}")
    return index


def check_layer(layer: Any, n_layers: int, name: str = "layer") -> int:
    """`layer` as an int in `0..n_layers-1`."""
    return _in_range(layer, n_layers, name, "layers")


def _index_list(value: Any, name: str, what: str) -> Sequence:
    """One integer as a list of one, a 1-d tensor or array as a list; `TypeError` naming `name`
    for anything but a sequence."""
    if is_integer(value):
        value = [value]
    if isinstance(value, Tensor | np.ndarray):
        value = value.tolist() if value.ndim == 1 else value
    if isinstance(value, str) or not isinstance(value, Sequence | range):
        raise TypeError(f"{name} must be a list of {what}, got {type(value).__name__}")
    return value


def check_layers(layers: Any, n_layers: int, name: str = "layers") -> list[int]:
    """A list of valid layers (None: all of them); one int counts as a list of one."""
    if layers is None:
        return list(range(n_layers))
    checked = [check_layer(l, n_layers, f"{name} entry") for l in _index_list(layers, name, "layer indices")]
    if not checked:
        raise ValueError(f"{name} is empty: give at least one layer (None means all of them)")
    return checked


def check_head(head: Any, n_heads: int, name: str = "head") -> int:
    """`head` as an int in `0..n_heads-1`."""
    return _in_range(head, n_heads, name, "heads")


def check_heads(heads: Any, n_layers: int, n_heads: int) -> dict[int, list[int]]:
    """`(layer, head)` pairs grouped by layer; raises naming the first malformed entry."""
    if isinstance(heads, Tensor | np.ndarray) and heads.ndim == 2:
        heads = heads.tolist()
    if isinstance(heads, str) or not isinstance(heads, Sequence | Iterator):
        raise TypeError(f"heads must be a list of (layer, head) pairs, got {type(heads).__name__}")
    by_layer: dict[int, list[int]] = {}
    for pair in heads:
        if isinstance(pair, Tensor | np.ndarray):
            pair = pair.tolist()
        if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise ValueError(f"heads must be (layer, head) pairs; got the entry {pair!r}")
        layer, head = check_layer(pair[0], n_layers), check_head(pair[1], n_heads)
        by_layer.setdefault(layer, []).append(head)
    if not by_layer:
        raise ValueError("heads is empty: give (layer, head) pairs")
    return by_layer


def check_direction(direction: Any, d_model: int, device: torch.device | str = "cpu") -> Tensor:
    """A finite, non-zero `[d_model]` vector (float32, or float64 when given so, on `device`);
    tiny and huge vectors are fine (`unit_vector` normalises them scale-safely)."""
    if not isinstance(direction, Tensor | np.ndarray | Sequence) or isinstance(direction, str):
        raise TypeError(f"direction must be a [d_model] tensor, got {type(direction).__name__}")
    direction = torch.as_tensor(direction)
    if direction.shape != (d_model,):
        raise ValueError(f"direction must have shape ({d_model},), got {tuple(direction.shape)}")
    if direction.dtype == torch.bool or direction.is_complex():
        raise TypeError(f"direction must be real numbers, got dtype {direction.dtype}")
    unit_vector(direction)  # raises for non-finite or zero vectors
    return direction.detach().to(device, torch.float64 if direction.dtype == torch.float64 else torch.float32)


def check_positions(positions: Any, n_ctx: int, name: str = "positions") -> list[int] | None:
    """A non-empty list of positions in `0..n_ctx-1` (None stays None: every position)."""
    if positions is None:
        return None
    out = [as_index(p, f"{name} entry") for p in _index_list(positions, name, "token positions")]
    if not out or any(not 0 <= p < n_ctx for p in out):
        raise ValueError(f"{name} must be a non-empty list of positions in 0..{n_ctx - 1}, got {out}")
    return out
