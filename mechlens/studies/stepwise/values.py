"""Stepwise values and value probes (GLoRe's stepwise outcome reward models, seed 001).

The value of step k, V_k, is the share of continuations from the prefix that ends with step k
that reach the right answer: exactly the accuracy the thought-anchors resampling already
measures at the next position (`anchors.Resampling.accuracy`), so nothing is sampled twice. A
SORM is a model of V_k from the prefix; here a probe on the hidden state at the last token of
step k (`ValueProbe`, ridge regression, [impl]), or a classifier at a threshold. An ORM learns
the same from a single sample: the trace's own final correctness, repeated at every step. The
first step whose value falls below a threshold localises the error (`first_below`).

Example:
    >>> after = step_values(np.array([0.9, 0.8, 0.2, 0.1]))   # accuracy before each sentence + at the end
    >>> after.tolist(), first_below(after, 0.5)
    ([0.8, 0.2, 0.1], 1)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from mechlens.text.trace import ReasoningTrace

if TYPE_CHECKING:
    from mechlens.models.hooked import HookedModel


def step_values(accuracy: np.ndarray | Sequence[float]) -> np.ndarray:
    """`[S]`: V after each of S steps, from the resampling accuracy `[S + 1]` at each position
    (position i: rollouts that start before sentence i; the last: after every sentence)."""
    acc = np.asarray(accuracy, dtype=float)
    if acc.ndim != 1 or len(acc) < 2:
        raise ValueError(f"accuracy must be [S + 1] with S >= 1, got shape {acc.shape}")
    return acc[1:]


def first_below(values: np.ndarray | Sequence[float], threshold: float = 0.5) -> int | None:
    """The first step whose value is below `threshold` (NaN values skipped); None if none is."""
    v = np.asarray(values, dtype=float)
    below = np.flatnonzero(np.nan_to_num(v, nan=np.inf) < threshold)
    return int(below[0]) if len(below) else None


@torch.no_grad()
def step_features(model: HookedModel, trace: ReasoningTrace, layer: int) -> Tensor:
    """`[S, d_model]`: the residual stream after block `layer` at the last token of each sentence
    of `trace` (the state a SORM reads at the end of a step)."""
    layer = model.check_layer(layer)
    if not trace.sentences:
        raise ValueError("the trace has no sentences")
    _, cache = model.run_with_cache(trace.tokens, names=["resid_post"], layers=[layer], return_logits=False)
    resid = cache["resid_post"][0, 0]  # [pos, d]
    return resid[[s.end - 1 for s in trace.sentences]].float().cpu()


class ValueProbe:
    """Ridge regression of a value in [0, 1] on standardised features, predictions clipped to
    [0, 1]: `ValueProbe(l2).fit(X [n, d], v [n]).predict(X)`.

        >>> X = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
        >>> ValueProbe(l2=1e-6).fit(X, torch.tensor([0.0, 0.25, 0.5, 0.75])).predict(torch.tensor([[1.5]]))
        tensor([0.3750])
    """

    def __init__(self, l2: float = 1.0):
        if isinstance(l2, bool) or not isinstance(l2, int | float) or not l2 > 0:
            raise ValueError(f"l2 must be a number > 0 (features outnumber the steps), got {l2!r}")
        self.l2 = float(l2)
        self.mean: Tensor | None = None
        self.std: Tensor | None = None
        self.w: Tensor | None = None
        self.b = 0.0

    def fit(self, X: Tensor, v: Tensor) -> ValueProbe:
        X, v = torch.as_tensor(X, dtype=torch.float64), torch.as_tensor(v, dtype=torch.float64)
        if X.ndim != 2 or v.shape != (X.shape[0],) or len(v) < 2:
            raise ValueError(f"X must be [n >= 2, d] and v [n]; got {tuple(X.shape)} and {tuple(v.shape)}")
        if not (torch.isfinite(X).all() and torch.isfinite(v).all()):
            raise ValueError("X and v must be finite (drop steps whose value is undefined)")
        self.mean, self.std = X.mean(0), X.std(0).clamp_min(1e-8)
        Z = (X - self.mean) / self.std
        self.b = float(v.mean())
        gram = Z.T @ Z + self.l2 * torch.eye(Z.shape[1], dtype=Z.dtype)
        self.w = torch.linalg.solve(gram, Z.T @ (v - self.b))
        return self

    def predict(self, X: Tensor) -> Tensor:
        if self.w is None or self.mean is None or self.std is None:
            raise ValueError("fit the probe first")
        Z = (torch.as_tensor(X, dtype=torch.float64) - self.mean) / self.std
        return (Z @ self.w + self.b).clamp(0, 1).float()


def localisation_null(
    found: Sequence[int | None], planted: Sequence[int], draws: int = 2000, seed: int = 0
) -> dict:
    """Hits of `found` (localised step per trace, None: nothing localised) on `planted` (the
    error's step), beside a position-matched null: the same localised positions permuted across
    traces (`draws` seeded permutations), which keeps where a method tends to point and breaks
    its link to each trace. Returns hits, n, the null's mean and the share of draws with at
    least as many hits (a one-sided permutation p-value).

        >>> r = localisation_null([2, 5, None], [2, 5, 1], draws=200)
        >>> r["hits"], r["n"]
        (2, 3)
    """
    if len(found) != len(planted) or not planted:
        raise ValueError(
            f"found and planted must be equally long and non-empty, got {len(found)} and {len(planted)}"
        )
    hits = sum(f is not None and f == p for f, p in zip(found, planted, strict=True))
    rng = np.random.default_rng(seed)
    null = []
    for _ in range(draws):
        order = rng.permutation(len(found))
        null.append(sum(found[j] is not None and found[j] == p for j, p in zip(order, planted, strict=True)))
    null_arr = np.array(null)
    return {"hits": int(hits), "n": len(planted), "null_mean": float(null_arr.mean()),
            "p": float((null_arr >= hits).mean())}  # fmt: skip
