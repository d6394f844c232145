"""Validation of text arguments, shared by every method that takes texts.

Example:
    >>> as_texts("hello")
    ['hello']
    >>> as_texts(["a", 5])
    Traceback (most recent call last):
    ...
    TypeError: texts must be a string or a list of strings; entry 1 is a int
"""

from __future__ import annotations

from collections.abc import Iterable


def as_texts(texts: str | Iterable[str], name: str = "texts", allow_empty: bool = False) -> list[str]:
    """`texts` as a list of strings: one string is one text (never its characters)."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, bytes) or not isinstance(texts, Iterable):
        raise TypeError(f"{name} must be a string or a list of strings, got {type(texts).__name__}")
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise TypeError(
                f"{name} must be a string or a list of strings; entry {i} is a {type(t).__name__}"
            )
    if not out and not allow_empty:
        raise ValueError(f"{name} is empty: give at least one text")
    return out
