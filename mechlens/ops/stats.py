"""Statistics for figures and detectors: AUROC (with ties) and its bootstrap interval, the ROC
curve, means with 95% intervals over ragged rows, Wilson intervals for rates, Spearman rank
correlation, and the one-line forms a report prints.

Example:
    >>> auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    0.75
    >>> [round(x, 3) for x in wilson(3, 10)]
    [0.3, 0.108, 0.603]
    >>> spearman([1, 2, 3, float("nan")], [10, 30, 20, 5])
    (0.5, 3)
    >>> format_rate(3, 10)
    '3/10 = 0.30 (95% CI 0.11-0.60)'
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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


def stratified_auroc(scores: ArrayLike, labels: ArrayLike, strata: Sequence | np.ndarray) -> float:
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


def auroc_interval(
    scores: ArrayLike,
    labels: ArrayLike,
    strata: Sequence | None = None,
    draws: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUROC (of `stratified_auroc` when `strata` is given):
    positives and negatives are resampled with replacement within each stratum, so every draw
    keeps the class counts of every stratum. Seeded; NaN when one class is missing.

        >>> low, high = auroc_interval([0.1, 0.4, 0.35, 0.8, 0.7, 0.2], [0, 0, 1, 1, 1, 0], draws=500)
        >>> 0 <= low <= auroc([0.1, 0.4, 0.35, 0.8, 0.7, 0.2], [0, 0, 1, 1, 1, 0]) <= high <= 1
        True
    """
    s, y = _arrays(scores, labels)
    if not 0 < level < 1 or draws < 1:
        raise ValueError(f"level must lie in (0, 1) and draws be >= 1, got {level} and {draws}")
    groups = np.zeros(len(s), dtype=object) if strata is None else np.asarray(list(strata), dtype=object)
    if groups.shape != s.shape:
        raise ValueError(f"strata has {groups.shape[0]} entries for {s.shape[0]} scores")
    point = auroc(s, y) if strata is None else stratified_auroc(s, y, groups)
    if np.isnan(point):
        return float("nan"), float("nan")
    cells = [np.flatnonzero((groups == g) & (y == c)) for g in dict.fromkeys(groups.tolist()) for c in (0, 1)]
    cells = [c for c in cells if len(c)]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(draws):
        idx = np.concatenate([rng.choice(c, len(c)) for c in cells])
        values.append(
            auroc(s[idx], y[idx]) if strata is None else stratified_auroc(s[idx], y[idx], groups[idx])
        )
    tail = 100 * (1 - level) / 2
    return float(np.nanpercentile(values, tail)), float(np.nanpercentile(values, 100 - tail))


def permutation_null(
    a: Sequence,
    b: Sequence,
    statistic: Callable[[Sequence, Sequence], float],
    draws: int = 1000,
    seed: int = 0,
) -> np.ndarray:
    """`draws` values of `statistic(a', b')` where `a'` and `b'` split the pooled `a + b` at random
    into groups of the same sizes: the statistic's distribution when both samples come from one
    distribution, at these sample sizes (a small-sample estimator's own null, bias included).

        >>> null = permutation_null([1, 1, 0], [1, 0, 0], lambda x, y: abs(sum(x) - sum(y)), draws=200)
        >>> null.shape, sorted(set(null.tolist()))  # |sum a' - sum b'| over the splits of 3 ones, 3 zeros
        ((200,), [1.0, 3.0])
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    pooled = list(a) + list(b)
    rng = np.random.default_rng(seed)
    out = np.empty(draws)
    for k in range(draws):
        order = rng.permutation(len(pooled))
        out[k] = statistic([pooled[i] for i in order[: len(a)]], [pooled[i] for i in order[len(a) :]])
    return out


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Exact McNemar test of two paired binary outcomes (the same prompts under two conditions):
    `only_a` and `only_b` (the discordant pairs), `n` and the two-sided exact binomial p-value of
    `only_a` among the discordant pairs (NaN when there are none).

        >>> mcnemar([1, 1, 1, 0, 1], [0, 0, 1, 0, 0])
        {'n': 5, 'only_a': 3, 'only_b': 0, 'p': 0.25}
    """
    from scipy.stats import binomtest

    if not all(np.isin(np.asarray(v, dtype=object).ravel(), [0, 1]).all() for v in (a, b)):
        raise ValueError("a and b must hold outcomes that are True/False or 0/1 (no NaN or None)")
    x, y = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"a and b must be paired: one outcome each per prompt, got {x.shape} and {y.shape}")
    only_a, only_b = int((x & ~y).sum()), int((~x & y).sum())
    p = float(binomtest(only_a, only_a + only_b).pvalue) if only_a + only_b else float("nan")
    return {"n": int(len(x)), "only_a": only_a, "only_b": only_b, "p": p}


def format_rate(successes: int, n: int) -> str:
    """`"k/n = rate (95% CI low-high)"` with the Wilson interval; `"0/0 (undefined)"` for n = 0."""
    if n == 0:
        return "0/0 (undefined)"
    rate, low, high = wilson(successes, n)
    return f"{successes}/{n} = {rate:.2f} (95% CI {low:.2f}-{high:.2f})"


def format_estimate(value: float, low: float, high: float, n: int | None = None, digits: int = 2) -> str:
    """`"value (95% CI low to high, n=...)"`; "undefined" for a NaN value, and "no interval" when
    the interval is NaN (too few values).

        >>> format_estimate(0.5, 0.2, 0.8, n=12), format_estimate(3.1, float("nan"), float("nan"), n=1)
        ('0.50 (95% CI 0.20 to 0.80, n=12)', '3.10 (no interval, n=1)')
        >>> format_estimate(float("nan"), float("nan"), float("nan"), n=0)
        'undefined (n=0)'
    """
    count = "" if n is None else f", n={n}"
    if not np.isfinite(value):
        return f"undefined ({count[2:]})" if count else "undefined"
    if not (np.isfinite(low) and np.isfinite(high)):
        return f"{value:.{digits}f} (no interval{count})"
    return f"{value:.{digits}f} (95% CI {low:.{digits}f} to {high:.{digits}f}{count})"


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


def rate_record(successes: int, n: int) -> dict[str, float | int]:
    """`{"count", "n", "rate", "low", "high"}`: a rate with its n and 95% Wilson interval (`wilson`),
    as results report it.

        >>> rate_record(3, 4)["n"], round(rate_record(3, 4)["low"], 2)
        (4, 0.3)
    """
    rate, low, high = wilson(successes, n)
    return {"count": successes, "n": n, "rate": rate, "low": low, "high": high}


def mean_record(values: Sequence[float]) -> dict[str, float | int]:
    """`{"mean", "low", "high", "n"}`: a mean with its n and 95% normal interval, as results report
    it (`format_estimate` prints it); NaN mean for no values, NaN interval for fewer than two.

        >>> mean_record([0.25, 0.5, 0.75])["mean"], mean_record([0.5])["n"]
        (0.5, 1)
    """
    x = np.asarray(values, dtype=float).ravel()
    if not np.isfinite(x).all():
        raise ValueError("values must be finite (drop undefined ones first)")
    n = len(x)
    mean = float(x.mean()) if n else float("nan")
    half = 1.96 * float(x.std(ddof=1)) / np.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


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


def cohens_d(a: Sequence[float], b: Sequence[float], z: float = 1.96) -> tuple[float, float, float]:
    """`(d, low, high)`: Cohen's d of `a` against `b` (mean difference over the pooled standard
    deviation) and its 95% normal interval (standard error sqrt((na + nb) / (na nb) + d^2 /
    (2 (na + nb)))); NaN with fewer than 2 values in a group or no spread.

        >>> [round(x, 3) for x in cohens_d([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])]
        [1.0, -0.697, 2.697]
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("a and b must hold finite values (drop undefined ones first)")
    if not z > 0:
        raise ValueError(f"z must be > 0, got {z!r}")
    na, nb = len(x), len(y)
    if na < 2 or nb < 2:
        return float("nan"), float("nan"), float("nan")
    pooled = np.sqrt(((na - 1) * x.var(ddof=1) + (nb - 1) * y.var(ddof=1)) / (na + nb - 2))
    if pooled == 0:
        return float("nan"), float("nan"), float("nan")
    d = float((x.mean() - y.mean()) / pooled)
    se = float(np.sqrt((na + nb) / (na * nb) + d * d / (2 * (na + nb))))
    return d, d - z * se, d + z * se


def mean_difference(
    a: Sequence[float], b: Sequence[float], draws: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """`(mean(a) - mean(b), low, high)` with a 95% percentile bootstrap interval (each group
    resampled on its own, seeded); NaN when a group is empty.

        >>> diff, low, high = mean_difference([2.0, 3.0, 4.0, 5.0], [1.0, 2.0, 2.0, 3.0], draws=500)
        >>> diff, low <= diff <= high
        (1.5, True)
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("a and b must hold finite values (drop undefined ones first)")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be an int >= 1, got {draws!r}")
    if not len(x) or not len(y):
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    boot = [rng.choice(x, len(x)).mean() - rng.choice(y, len(y)).mean() for _ in range(draws)]
    return float(x.mean() - y.mean()), float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))
