"""Statistics for figures and detectors: AUROC (with ties), the ROC curve, means with 95%
intervals over ragged rows, Wilson intervals for rates, Spearman rank correlation.

Example:
    >>> auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    0.75
    >>> [round(x, 3) for x in wilson(3, 10)]
    [0.3, 0.108, 0.603]
    >>> spearman([1, 2, 3, float("nan")], [10, 30, 20, 5])
    (0.5, 3)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import rankdata, spearmanr


def _arrays(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=float).ravel()
    y = np.asarray(labels).ravel().astype(int)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.shape[0]} vs {y.shape[0]}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    return s, y


def auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties count 1/2.

    NaN when one class is missing.
    """
    s, y = _arrays(scores, labels)
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)  # average ranks handle ties
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def stratified_auroc(scores: ArrayLike, labels: ArrayLike, strata: Sequence) -> float:
    """AUROC over positive-negative pairs from the same stratum only (e.g. the same dataset):
    P(positive > negative | same stratum), ties 1/2; the per-stratum AUROCs weighted by their
    number of pairs. A dataset whose accuracy differs from another's cannot raise it.

        >>> stratified_auroc([0.9, 0.8, 0.2, 0.1], [1, 0, 1, 0], ["a", "a", "b", "b"])
        1.0
        >>> auroc([0.9, 0.8, 0.2, 0.1], [1, 0, 1, 0])
        0.75
    """
    s, y = _arrays(scores, labels)
    groups = np.asarray(list(strata), dtype=object)
    if groups.shape != s.shape:
        raise ValueError(f"strata has {groups.shape[0]} entries for {s.shape[0]} scores")
    total = weight = 0.0
    for g in dict.fromkeys(groups.tolist()):
        at = groups == g
        pairs = float(y[at].sum() * (1 - y[at]).sum())
        if pairs:
            total += auroc(s[at], y[at]) * pairs
            weight += pairs
    return total / weight if weight else float("nan")


def roc_curve(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every threshold, from (0, 0) to (1, 1)."""
    s, y = _arrays(scores, labels)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each distinct score
    tp = np.cumsum(y)[last]
    fp = np.cumsum(1 - y)[last]
    tpr = np.r_[0, tp / max(1, y.sum())]
    fpr = np.r_[0, fp / max(1, (1 - y).sum())]
    return fpr, tpr


def mean_ci(
    rows: Sequence[Sequence[float]], length: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """Mean and 95% normal interval per position over ragged `rows`, up to `length`:
    `(mean, low, high, counts)`; NaN where no row reaches a position, no width where one does.

        >>> m, lo, hi, n = mean_ci([[1.0, 2.0], [3.0]], 3)
        >>> m.tolist()[:2], n
        ([2.0, 2.0], [2, 1, 0])
    """
    mean, low, high, counts = [], [], [], []
    for k in range(length):
        vals = np.array([r[k] for r in rows if len(r) > k], dtype=float)
        m = vals.mean() if len(vals) else np.nan
        se = vals.std(ddof=1) / np.sqrt(len(vals)) if len(vals) > 1 else 0.0
        mean.append(m)
        low.append(m - 1.96 * se)
        high.append(m + 1.96 * se)
        counts.append(len(vals))
    return np.array(mean), np.array(low), np.array(high), counts


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float, float]:
    """`(rate, low, high)`: a rate and its Wilson score interval (95% by default); NaN for n = 0."""
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return p, float(max(0.0, centre - half)), float(min(1.0, centre + half))


def _finite_pairs(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if a.shape != b.shape:
        raise ValueError(f"the two score vectors differ in length: {a.shape} vs {b.shape}")
    ok = np.isfinite(a) & np.isfinite(b)
    return a[ok], b[ok]


def spearman(a, b) -> tuple[float, int]:
    """Spearman rank correlation of two score vectors over the entries finite in both, and the
    number of such entries (NaN below 3 entries or for a constant vector)."""
    x, y = _finite_pairs(a, b)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), len(x)
    return float(spearmanr(x, y).statistic), len(x)
