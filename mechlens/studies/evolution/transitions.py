"""The Markov-chain diagnostic of iterated verify-and-refine ("Deep Self-Evolving Reasoning").

A chain's correctness over iterations, `c_0, c_1, ...`, is read as a two-state Markov chain:
p_up = P(c_{k+1} = 1 | c_k = 0) and p_down = P(c_{k+1} = 0 | c_k = 1). Its stationary accuracy
p_up / (p_up + p_down) is where a long chain settles, and many chains voting settle on the right
answer when it exceeds one half. The paper (seed 004) gives no code; the estimates pool the
transitions of every chain and iteration ([impl]), with Wilson intervals, and the stationary
accuracy's interval comes from a bootstrap over chains (a chain's transitions are not
independent of each other).

Example:
    >>> t = transition_estimates([[0, 1, 1, 1], [0, 0, 1, 1], [1, 1, 0, 1]])
    >>> t.up, t.n_from_wrong, t.down, t.n_from_right
    (3, 4, 1, 5)
    >>> round(t.stationary, 3)
    0.789
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mechlens.ops.stats import wilson


@dataclass
class Transitions:
    """Pooled transition counts and rates of correctness chains (every rate with its 95% Wilson
    interval; NaN when undefined)."""

    up: int  # wrong at k, right at k+1
    n_from_wrong: int
    down: int  # right at k, wrong at k+1
    n_from_right: int
    p_up: tuple[float, float, float]
    p_down: tuple[float, float, float]
    stationary: float  # p_up / (p_up + p_down); NaN when both are 0 or undefined
    stationary_ci: tuple[float, float]  # bootstrap over chains
    accuracy_by_iteration: list[tuple[float, float, float]]  # share of chains right at each iteration
    n_chains: int


def _check_chains(chains: Sequence[Sequence[int]]) -> np.ndarray:
    rows = [list(c) for c in chains]
    if not rows or any(len(r) != len(rows[0]) for r in rows) or len(rows[0]) < 2:
        raise ValueError("chains must be a non-empty list of equally long rows of >= 2 iterations")
    x = np.asarray(rows, dtype=object)
    if not np.isin(x.ravel(), [0, 1]).all():
        raise ValueError("chains must hold 0/1 or True/False correctness values (no NaN or None)")
    return x.astype(int)


def _counts(x: np.ndarray) -> tuple[int, int, int, int]:
    before, after = x[:, :-1], x[:, 1:]
    wrong, right = before == 0, before == 1
    return int((after[wrong] == 1).sum()), int(wrong.sum()), int((after[right] == 0).sum()), int(right.sum())


def _stationary(up: int, n_wrong: int, down: int, n_right: int) -> float:
    if n_wrong == 0 or n_right == 0:
        return float("nan")
    p, q = up / n_wrong, down / n_right
    return p / (p + q) if p + q > 0 else float("nan")


def transition_estimates(chains: Sequence[Sequence[int]], draws: int = 2000, seed: int = 0) -> Transitions:
    """Transition estimates of `chains` (one row of 0/1 correctness per chain, one column per
    iteration, all rows as long)."""
    x = _check_chains(chains)
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be an int >= 1, got {draws!r}")
    up, n_wrong, down, n_right = _counts(x)
    rng = np.random.default_rng(seed)
    boot = [_stationary(*_counts(x[rng.integers(0, len(x), len(x))])) for _ in range(draws)]
    boot = [b for b in boot if np.isfinite(b)]
    ci = (float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))) if boot else (np.nan, np.nan)
    return Transitions(
        up=up,
        n_from_wrong=n_wrong,
        down=down,
        n_from_right=n_right,
        p_up=wilson(up, n_wrong),
        p_down=wilson(down, n_right),
        stationary=_stationary(up, n_wrong, down, n_right),
        stationary_ci=ci,
        accuracy_by_iteration=[wilson(int(col.sum()), len(col)) for col in x.T],
        n_chains=len(x),
    )


def majority_vote(answers: Sequence[str | None], truth: str) -> bool:
    """Whether the most common non-None answer equals `truth` (a tie goes to the answer seen
    first; no answer at all is wrong).

        >>> majority_vote(["7", "5", "7", None], "7"), majority_vote([None, None], "7")
        (True, False)
    """
    given = [a for a in answers if a is not None]
    if not given:
        return False
    counts: dict[str, int] = {}
    for a in given:
        counts[a] = counts.get(a, 0) + 1
    return max(counts, key=lambda a: counts[a]) == truth
