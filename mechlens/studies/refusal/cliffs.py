"""Cliff metrics of a refusal-score curve, and curves aligned at their end and stretched onto a
0-100 position axis, as the paper plots them ("Refusal Falls off a Cliff").

Example:
    >>> c = cliff_metrics(torch.tensor([0.1, 0.9, 0.9, 0.9, 0.9, 0.2, 0.1]), think=(1, 5), k_end=2)
    >>> round(c.plateau, 2), round(c.end, 2), round(c.cliff, 2), c.drop_at
    (0.9, 0.15, 0.75, 5)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass
class Cliff:
    """Cliff metrics of one score curve.

    plateau: mean score over the thinking span; end: mean over the last `k_end` tokens;
    cliff = plateau - end; final: the last token's score (what Cliff-as-a-Judge ranks by);
    drop_at: the first position after which the score stays below the midpoint of plateau and
    end (the drop), or None when plateau <= end.
    """

    plateau: float
    end: float
    cliff: float
    final: float
    drop_at: int | None


def cliff_metrics(scores: Tensor, think: tuple[int, int], k_end: int = 5) -> Cliff:
    """Cliff metrics of `scores [pos]` with the thinking at token span `think`."""
    scores = torch.as_tensor(scores, dtype=torch.float32)
    start, end = think
    if scores.ndim != 1 or not 0 <= start < end <= len(scores):
        raise ValueError(
            f"need scores [pos] and a thinking span inside it; got {tuple(scores.shape)}, {think}"
        )
    if not 1 <= k_end <= len(scores):
        raise ValueError(f"k_end must lie in 1..{len(scores)}, got {k_end}")
    plateau = float(scores[start:end].mean())
    tail = float(scores[-k_end:].mean())
    drop_at = None
    if plateau > tail:
        above = (scores[start:] >= (plateau + tail) / 2).nonzero()[:, 0]
        drop_at = start + (int(above[-1]) + 1 if len(above) else 0)
        drop_at = min(drop_at, len(scores) - 1)
    return Cliff(plateau, tail, plateau - tail, float(scores[-1]), drop_at)


def align_end(curves: Sequence[Tensor], length: int | None = None) -> np.ndarray:
    """Curves aligned at their last token: `[n, length]`, NaN where a curve is shorter
    (`length` defaults to the longest)."""
    if not curves:
        raise ValueError("no curves to align")
    length = length or max(len(c) for c in curves)
    out = np.full((len(curves), length), np.nan)
    for i, curve in enumerate(curves):
        c = np.asarray(curve, dtype=float)[-length:]
        out[i, length - len(c) :] = c
    return out


def stretch(curve: Sequence[float], points: int = 100) -> np.ndarray:
    """`curve` stretched onto `points` evenly spaced points with a cubic spline (0-100 axis)."""
    from scipy.interpolate import CubicSpline

    values = np.asarray(curve, dtype=float)
    if len(values) == 1:
        return np.full(points, values[0])
    return CubicSpline(np.linspace(0, 100, len(values)), values)(np.linspace(0, 100, points))


def normalized_curve(curves: Sequence[Tensor], points: int = 100) -> np.ndarray:
    """The paper's aggregate: align at the end, average over curves (where present), resample the
    mean curve to `points` points -> `[points]` on a 0-100 position axis."""
    return stretch(np.nanmean(align_end(curves), 0), points)


def end_aligned_mean_ci(
    curves: Sequence[Tensor], points: int = 100
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`normalized_curve` with its 95% band: the end-aligned mean over `curves` and mean -/+ 1.96
    standard errors (per aligned position, over the curves present there), each stretched to
    `points` -> three `[points]` arrays."""
    aligned = align_end(curves)  # [n, longest]
    mean = np.nanmean(aligned, 0)
    present = np.maximum((~np.isnan(aligned)).sum(0), 1)
    se = np.nanstd(aligned, 0) / np.sqrt(present)
    return stretch(mean, points), stretch(mean - 1.96 * se, points), stretch(mean + 1.96 * se, points)
