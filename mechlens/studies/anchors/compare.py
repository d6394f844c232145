"""Comparing the three attributions: rank correlations per sentence and per sentence pair, and
means per category.

Example:
    >>> spearman([1, 2, 3, float("nan")], [10, 30, 20, 5])
    (0.5, 3)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mechlens.ops.stats import spearman

__all__ = ["category_means", "lower_triangle", "spearman"]


def lower_triangle(matrix, max_distance: int | None = None) -> np.ndarray:
    """Entries (i, j) with i > j of a square matrix, optionally only those with i - j <=
    `max_distance` (nearby pairs), flattened row by row."""
    m = np.asarray(matrix, dtype=float)
    i, j = np.tril_indices(m.shape[0], k=-1)
    if max_distance is not None:
        near = i - j <= max_distance
        i, j = i[near], j[near]
    return m[i, j]


def category_means(values, categories: Sequence[str]) -> dict[str, tuple[float, float, int]]:
    """`{category: (mean, standard error, count)}` of the finite `values`, one per sentence.

    >>> category_means([1.0, 3.0, 2.0], ["plan_generation", "plan_generation", "unknown"])
    {'plan_generation': (2.0, 1.0, 2), 'unknown': (2.0, nan, 1)}
    """
    values = np.asarray(values, dtype=float)
    if len(values) != len(categories):
        raise ValueError(f"{len(values)} values for {len(categories)} categories")
    out = {}
    for c in dict.fromkeys(categories):
        v = values[[k for k, x in enumerate(categories) if x == c]]
        v = v[np.isfinite(v)]
        if len(v):
            se = float(np.std(v, ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
            out[c] = (float(v.mean()), se, len(v))
    return out
