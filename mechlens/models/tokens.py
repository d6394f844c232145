"""Tokenisation as every method here needs it: texts to left-padded ids and a mask, with no
special tokens added (the chat template adds its own), and ids back to one string per token;
`HookedModel.tokenize` and `to_str_tokens` call these with the model's tokenizer.

Example:
    >>> import mechlens as ml
    >>> tok = ml.load_model("tiny-llama").tokenizer
    >>> ids, mask = tokenize(tok, ["a b c", "a"])
    >>> mask.tolist()[1][0], ids.shape[0]   # the shorter row is padded on the left
    (0, 2)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def tokenize(
    tokenizer: Any, text: str | Sequence[str], device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """`(ids [batch, pos], attention_mask [batch, pos])` of one text or a list, left-padded, on
    `device`; `TypeError`/`ValueError` for anything but non-empty strings."""
    texts = [text] if isinstance(text, str) else list(text)
    if any(not isinstance(t, str) for t in texts):
        bad = next(t for t in texts if not isinstance(t, str))
        raise TypeError(f"text must be a string or a list of strings, got a {type(bad).__name__} entry")
    if not texts or any(not t for t in texts):
        raise ValueError("empty text: give at least one non-empty string")
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def str_tokens(tokenizer: Any, ids: Tensor) -> list[str]:
    """One string per token of a single sequence `ids` (any shape holding one row)."""
    return [tokenizer.decode([i]) for i in ids.reshape(-1).tolist()]
