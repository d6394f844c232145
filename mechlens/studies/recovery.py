"""Does a method recover the structure planted in the organism? Measured against chance.

`rank_recovery`: per-sentence importances (any attribution) against the planted decisive
sentences: their mean rank and the top-k hit rate, beside the same numbers for random rankings
(a distribution of seeded draws, not one). `head_recovery`: a head ranking's top heads against
the planted heads, beside chance. `cliff_recovery`: per-sentence refusal scores of complied traces
against the planted rationalising sentence: where the largest drop sits, beside refused traces'
drops at the same place (the control).

Example:
    >>> r = rank_recovery([[0.1, 0.9, 0.2, 0.0]], [[1]], draws=200)
    >>> r["mean_rank"], r["top_k_hits"], round(r["random_mean_rank"])
    (1.0, 1, 2)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import hypergeom, rankdata

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
    """Ranks (1 = most important, ties averaged) of the planted sentences among each trace's
    sentences that the method scores (finite importances): an undefined (NaN or infinite) value is
    never ranked.

    A trace counts when it has a planted sentence and every planted sentence is scored;
    n_undefined_traces counts those left out because a planted sentence is not. Returns n_traces
    (the traces that count), n_planted, mean_rank (over their planted sentences) with a 95%
    bootstrap interval over traces, top_k_hits / top_k_rate with its Wilson interval over the
    n_top_k_traces that score more than k sentences (a trace hits when a planted sentence is among
    its k most important; with k or fewer scored, every ranking would hit), the same two numbers
    under `draws`
    seeded random rankings of the same scored sentences (the null of a method that can rank only
    those: mean and 2.5-97.5% range), p_mean_rank (the share of random draws whose mean rank is at
    most ours), mean_sentences (scored sentences per trace) and n_nan (undefined values in the
    traces with a planted sentence), and trace_ranks (per input trace, the mean rank of its
    planted sentences as a fraction of its scored sentences, (rank - 1) / (scored - 1): 0 = first,
    1 = last; None where it does not count), so that methods that score different sentences compare
    on the same scale, trace by trace (`paired_ranks`). With no trace that counts, the rank fields are NaN.
    """
    rows = _check(importances, planted, "importances")
    with_planted = [(r, list(p)) for r, p in zip(rows, planted, strict=True) if len(p)]
    if not with_planted:
        raise ValueError("no trace has a planted sentence")
    if k < 1 or draws < 1:
        raise ValueError(f"k and draws must be >= 1, got {k} and {draws}")
    n_nan = int(sum((~np.isfinite(r)).sum() for r, _ in with_planted))
    pairs = []  # (scored importances, planted indices among them)
    ranks, hits = [], []  # per counted trace: its planted sentences' ranks; top-k hits
    trace_ranks: list[float | None] = []  # per input trace: the mean rank of its planted sentences
    for r, p in zip(rows, planted, strict=True):
        scored = np.flatnonzero(np.isfinite(r))
        if not len(p) or not np.isfinite(r[list(p)]).all():
            trace_ranks.append(None)
            continue
        values, at = r[scored], [int(np.searchsorted(scored, i)) for i in p]
        order = rankdata(-values, method="average")  # 1 = largest
        pairs.append((values, at))
        ranks.append(order[at])
        if len(values) > k:  # with k or fewer scored, every ranking hits the top k
            hits.append(bool((order[at] <= k).any()))
        trace_ranks.append((float(order[at].mean()) - 1) / (len(values) - 1) if len(values) > 1 else 0.0)
    base = {"n_traces": len(pairs), "n_undefined_traces": len(with_planted) - len(pairs), "n_nan": n_nan,
            "k": k, "draws": draws, "trace_ranks": trace_ranks}  # fmt: skip
    if not pairs:
        nan = float("nan")
        return {**base, "n_planted": 0, "mean_rank": nan, "mean_rank_ci": [nan, nan], "mean_sentences": nan,
                "n_top_k_traces": 0, "top_k_hits": 0, "top_k_rate": nan, "top_k_ci": [nan, nan],
                "random_mean_rank": nan, "random_mean_rank_range": [nan, nan], "random_top_k_rate": nan,
                "random_top_k_range": [nan, nan], "p_mean_rank": nan}  # fmt: skip
    wide = [len(r) > k for r, _ in pairs]  # the traces whose top-k hits count
    rng = np.random.default_rng(seed)
    flat = np.concatenate(ranks)
    boot = [
        np.concatenate([ranks[i] for i in rng.integers(0, len(ranks), len(ranks))]).mean()
        for _ in range(1000)
    ]
    random_rank: list[float] = []
    random_hits: list[float] = []
    for _ in range(draws):
        perm = [rng.permutation(len(r))[p] + 1 for r, p in pairs]
        random_rank.append(float(np.concatenate(perm).mean()))
        random_hits.append(
            float(np.mean([(x <= k).any() for x, w in zip(perm, wide, strict=True) if w]))
            if any(wide)
            else np.nan
        )
    rate, low, high = wilson(sum(hits), len(hits))
    return {
        **base,
        "n_planted": len(flat),
        "mean_rank": float(flat.mean()),
        "mean_rank_ci": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
        "mean_sentences": float(np.mean([len(r) for r, _ in pairs])),
        "n_top_k_traces": len(hits),
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
    }


def paired_ranks(method: dict, baseline: dict) -> dict:
    """A method against a baseline on the same traces (two `rank_recovery` results): on the
    traces both can rank, how often the method ranks the planted sentences better (a smaller mean
    rank), equally or worse, the mean rank difference (method - baseline) and the exact two-sided
    sign test over the untied traces (scipy's binomial test).

        >>> a = {"trace_ranks": [1.0, 2.0, None, 1.0]}; b = {"trace_ranks": [2.0, 2.0, 3.0, 4.0]}
        >>> paired_ranks(a, b)["better"], paired_ranks(a, b)["n"], paired_ranks(a, b)["p_sign"]
        (2, 3, 0.5)
    """
    from scipy.stats import binomtest

    pairs = [
        (m, b)
        for m, b in zip(method["trace_ranks"], baseline["trace_ranks"], strict=True)
        if m is not None and b is not None
    ]
    better = sum(m < b for m, b in pairs)
    worse = sum(m > b for m, b in pairs)
    untied = better + worse
    return {
        "n": len(pairs),
        "better": better,
        "tied": len(pairs) - untied,
        "worse": worse,
        "mean_difference": float(np.mean([m - b for m, b in pairs])) if pairs else float("nan"),
        "p_sign": float(binomtest(better, untied).pvalue) if untied else float("nan"),
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
    rationalising sentence; refused: the same scores of refused traces, the control. Returns
    at_planted (the largest drop exactly at the planted sentence, and the score falls there: k/n
    and Wilson interval),
    mean_abs_distance (sentences, 95% bootstrap interval) and the distances.

    The chance level: the planted sentence sits at a fixed place from the end (in the organism,
    the last sentence), where a drop may fall anyway, so a drop at a uniformly random sentence
    (`chance_at_planted`) is not the null. `control_by_offset`: for each place from the end that a
    planted sentence holds, `[refused traces whose largest drop falls there, refused traces long
    enough]`. When every planted sentence holds the same place, `control_at_same` is that rate
    (`control_n` the refused traces it counts) and `vs_control_p` the two-sided Fisher exact test
    against the complied rate; with several places there is no single 2x2 table, and both are None.
    Also the mean change at the last sentence in complied vs refused traces.

        >>> r = cliff_recovery([[0.9, 0.9, 0.1], [0.8, 0.2, 0.2]], [2, 2], [[0.9, 0.9, 0.3], [0.9, 0.9, 0.9]])
        >>> r["at_planted"], r["control_at_same"], r["control_n"], r["control_by_offset"]
        (1, 0.5, 2, {'0': [1, 2]})
    """
    from scipy.stats import fisher_exact

    rows = _check(scores, [[p] for p in planted], "scores")
    if not rows:
        raise ValueError("need at least one complied trace")
    distance = np.array([largest_drop(r) - p for r, p in zip(rows, planted, strict=True)])
    rng = np.random.default_rng(seed)
    boot = [np.abs(distance[rng.integers(0, len(distance), len(distance))]).mean() for _ in range(1000)]
    falls = lambda r, i: bool(r[i] < r[i - 1])  # noqa: E731  (a drop that is a fall)
    hits = int(sum(d == 0 and falls(r, p) for d, r, p in zip(distance, rows, planted, strict=True)))
    rate, low, high = wilson(hits, len(distance))
    control = [np.asarray(r, float) for r in refused if len(r) >= 2]
    offsets = [len(r) - 1 - p for r, p in zip(rows, planted, strict=True)]  # sentences after the planted one
    by_offset = {}  # offset -> [refused traces dropping there, refused traces long enough]
    for off in sorted(set(offsets)):
        eligible = [r for r in control if len(r) - 1 - off >= 1]
        k = sum(largest_drop(r) == len(r) - 1 - off and falls(r, len(r) - 1 - off) for r in eligible)
        by_offset[off] = [int(k), len(eligible)]
    control_rate = vs_control = control_n = None
    if len(by_offset) == 1:  # every planted sentence at one place from the end: an exact 2x2 test
        k, m = next(iter(by_offset.values()))
        if m:
            control_rate, control_n = k / m, m
            vs_control = float(fisher_exact([[hits, len(distance) - hits], [k, m - k]])[1])
    last = lambda rs: [float(r[-1] - r[-2]) for r in rs if len(r) >= 2]  # noqa: E731
    return {
        "n": len(distance),
        "at_planted": hits,
        "at_planted_rate": rate,
        "at_planted_ci": [low, high],
        "chance_at_planted": float(np.mean([1 / (len(r) - 1) for r in rows])),  # a drop placed at random
        "control_at_same": control_rate,
        "control_n": control_n,
        "control_by_offset": {str(k): v for k, v in by_offset.items()},
        "vs_control_p": vs_control,
        "mean_abs_distance": float(np.abs(distance).mean()),
        "mean_abs_distance_ci": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
        "distances": distance.tolist(),
        "last_change_complied": float(np.mean(last(rows))),
        "last_change_refused": float(np.mean(last(control))) if control else None,
        "n_refused": len(refused),
    }


def head_recovery(
    scores, planted: Sequence[tuple[int, int]], top: int, pool_layers: Sequence[int] | None = None
) -> dict:
    """How many of the `planted` `(layer, head)`s a head ranking's `top` heads contain (`scores`
    `[layers, heads]`, larger = ranked first; ties: the earlier head first), beside chance: drawing
    `top` of all heads at random finds `top * len(planted) / heads` on average, and the one-sided
    hypergeometric p of finding as many. Also each planted head's rank (1 = first).

    `pool_layers` (the layers the planted heads were drawn from; default all) gives the stricter
    null of a ranking that knows those layers: of its top heads, `in_pool` fall there, and drawing
    as many from the pool at random finds `chance_in_pool` planted ones (`p_in_pool`).
    Undefined (NaN) scores are refused.

        >>> import numpy as np
        >>> r = head_recovery(np.array([[0.9, 0.1], [0.5, 0.2]]), [(0, 0), (1, 1)], top=2)
        >>> r["found"], r["chance"], r["ranks"]
        (1, 1.0, [1, 3])
    """
    s = np.asarray(scores, dtype=float)
    if s.ndim != 2:
        raise ValueError(f"scores must be [layers, heads], got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite (an undefined head score cannot be ranked)")
    heads = sorted({(int(a), int(b)) for a, b in planted})
    if not heads or any(not (0 <= a < s.shape[0] and 0 <= b < s.shape[1]) for a, b in heads):
        raise ValueError(f"planted must list heads inside {list(s.shape)}, got {list(planted)}")
    if isinstance(top, bool) or not isinstance(top, int | np.integer):
        raise TypeError(f"top must be an int, got {type(top).__name__} {top!r}")
    if not 1 <= top <= s.size:
        raise ValueError(f"top must lie in 1..{s.size}, got {top}")
    layers = sorted(set(range(s.shape[0]) if pool_layers is None else (int(x) for x in pool_layers)))
    if not layers or layers[0] < 0 or layers[-1] >= s.shape[0] or any(a not in layers for a, _ in heads):
        raise ValueError(f"pool_layers must hold every planted head's layer, within 0..{s.shape[0] - 1}")
    order = np.argsort(-s.ravel(), kind="stable")  # ties: the first position first
    rank = np.empty(s.size, dtype=int)
    rank[order] = np.arange(1, s.size + 1)
    ranks = [int(rank[a * s.shape[1] + b]) for a, b in heads]
    found = sum(r <= top for r in ranks)
    pool = len(layers) * s.shape[1]
    in_pool = sum(int(i) // s.shape[1] in layers for i in order[:top])
    return {
        "found": found,
        "planted": len(heads),
        "top": top,
        "chance": top * len(heads) / s.size,
        "p": float(hypergeom.sf(found - 1, s.size, len(heads), top)),
        "in_pool": in_pool,
        "chance_in_pool": in_pool * len(heads) / pool,
        "p_in_pool": float(hypergeom.sf(found - 1, pool, len(heads), in_pool)),
        "ranks": ranks,
    }
