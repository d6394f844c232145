"""Does a method recover the structure planted in the organism? Measured against chance.

`rank_recovery`: per-sentence importances (any attribution) against the planted decisive
sentences: their mean rank and the top-k hit rate, beside the same numbers for random rankings
(a distribution of seeded draws, not one). `cliff_recovery`: per-sentence refusal scores of
complied traces against the planted rationalising sentence: where the largest drop sits.

Example:
    >>> r = rank_recovery([[0.1, 0.9, 0.2, 0.0]], [[1]], draws=200)
    >>> r["mean_rank"], r["top_k_hits"], round(r["random_mean_rank"])
    (1.0, 1, 2)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata

from mechlens.ops.stats import wilson


def _check(
    values: Sequence[Sequence[float]], planted: Sequence[Sequence[int]], name: str
) -> list[np.ndarray]:
    if len(values) != len(planted):
        raise ValueError(f"need one planted list per trace: {len(values)} {name} and {len(planted)} planted")
    rows = [np.asarray(v, dtype=float) for v in values]
    for r, p in zip(rows, planted, strict=True):
        if r.ndim != 1 or any(not 0 <= k < len(r) for k in p):
            raise ValueError(f"planted indices must lie inside each trace's {name}: {list(p)} for {len(r)}")
    return rows


def rank_recovery(
    importances: Sequence[Sequence[float]],
    planted: Sequence[Sequence[int]],
    k: int = 3,
    draws: int = 2000,
    seed: int = 0,
) -> dict:
    """Ranks (1 = most important, ties averaged) of the planted sentences among each trace's.

    Returns n_traces (those with a planted sentence), n_planted, mean_rank (over planted
    sentences) with a 95% bootstrap interval over traces, top_k_hits / top_k_rate with its Wilson
    interval (a trace hits when a planted sentence is among its k most important), the same two
    numbers under `draws` seeded random rankings (mean and 2.5-97.5% range) and p_mean_rank, the
    share of random draws whose mean rank is at most ours. NaN importances rank last (counted in
    n_nan).
    """
    rows = _check(importances, planted, "importances")
    pairs = [(r, list(p)) for r, p in zip(rows, planted, strict=True) if len(p)]
    if not pairs:
        raise ValueError("no trace has a planted sentence")
    if k < 1 or draws < 1:
        raise ValueError(f"k and draws must be >= 1, got {k} and {draws}")
    n_nan = int(sum(np.isnan(r).sum() for r, _ in pairs))
    ranks, hits = [], []
    for r, p in pairs:
        order = rankdata(-np.nan_to_num(r, nan=-np.inf), method="average")  # 1 = largest
        ranks.append(order[p])
        hits.append(bool((order[p] <= k).any()))
    rng = np.random.default_rng(seed)
    flat = np.concatenate(ranks)
    boot = [
        np.concatenate([ranks[i] for i in rng.integers(0, len(ranks), len(ranks))]).mean()
        for _ in range(1000)
    ]
    random_rank, random_hits = [], []
    for _ in range(draws):
        perm = [rng.permutation(len(r))[p] + 1 for r, p in pairs]
        random_rank.append(np.concatenate(perm).mean())
        random_hits.append(np.mean([(x <= k).any() for x in perm]))
    rate, low, high = wilson(sum(hits), len(hits))
    return {
        "n_traces": len(pairs),
        "n_planted": len(flat),
        "n_nan": n_nan,
        "mean_rank": float(flat.mean()),
        "mean_rank_ci": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
        "mean_sentences": float(np.mean([len(r) for r, _ in pairs])),
        "k": k,
        "top_k_hits": int(sum(hits)),
        "top_k_rate": rate,
        "top_k_ci": [low, high],
        "random_mean_rank": float(np.mean(random_rank)),
        "random_mean_rank_range": [
            float(np.percentile(random_rank, 2.5)),
            float(np.percentile(random_rank, 97.5)),
        ],
        "random_top_k_rate": float(np.mean(random_hits)),
        "random_top_k_range": [
            float(np.percentile(random_hits, 2.5)),
            float(np.percentile(random_hits, 97.5)),
        ],
        "p_mean_rank": float(np.mean(np.array(random_rank) <= flat.mean())),
        "draws": draws,
    }


def largest_drop(scores: Sequence[float] | np.ndarray) -> int:
    """The sentence whose score falls most below the previous sentence's (index >= 1)."""
    s = np.asarray(scores, dtype=float)
    if s.ndim != 1 or len(s) < 2 or np.isnan(s).any():
        raise ValueError(f"need at least two finite sentence scores, got {s.tolist()}")
    return int(np.argmin(np.diff(s))) + 1


def cliff_recovery(
    scores: Sequence[Sequence[float]],
    planted: Sequence[int],
    refused: Sequence[Sequence[float]] = (),
    seed: int = 0,
) -> dict:
    """Where the refusal score falls in complied traces, against the planted rationalising sentence.

    scores: per complied trace, one refusal score per thinking sentence; planted: the index of its
    rationalising sentence; refused: the same scores of refused traces (their last sentence's
    change is the comparison). Returns at_planted (drop exactly at the planted sentence: k/n,
    Wilson interval, and chance_at_planted, the rate if the drop fell on a random sentence),
    mean_abs_distance (sentences, 95% bootstrap interval), the distances, and
    the mean change at the last sentence in complied vs refused traces.
    """
    rows = _check(scores, [[p] for p in planted], "scores")
    if not rows:
        raise ValueError("need at least one complied trace")
    distance = np.array([largest_drop(r) - p for r, p in zip(rows, planted, strict=True)])
    rng = np.random.default_rng(seed)
    boot = [np.abs(distance[rng.integers(0, len(distance), len(distance))]).mean() for _ in range(1000)]
    hits = int((distance == 0).sum())
    rate, low, high = wilson(hits, len(distance))
    last = lambda rs: [float(r[-1] - r[-2]) for r in rs if len(r) >= 2]  # noqa: E731
    return {
        "n": len(distance),
        "at_planted": hits,
        "at_planted_rate": rate,
        "at_planted_ci": [low, high],
        "chance_at_planted": float(np.mean([1 / (len(r) - 1) for r in rows])),  # a drop placed at random
        "mean_abs_distance": float(np.abs(distance).mean()),
        "mean_abs_distance_ci": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
        "distances": distance.tolist(),
        "last_change_complied": float(np.mean(last(rows))),
        "last_change_refused": float(np.mean(last([np.asarray(r, float) for r in refused])))
        if refused
        else None,
        "n_refused": len(refused),
    }
