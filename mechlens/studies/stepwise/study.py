"""The stepwise-value study of a set of resampled traces: step values from the rollouts, SORM and
ORM probes scored on held-out traces, and error localisation against a planted error step.

Example (the traces and their `anchors.resample` results come from the thought-anchors study):
    >>> study = analyze(model, traces, [r.accuracy for r in resamplings], correct, planted)  # doctest: +SKIP
    >>> print("\\n".join(study.summary_lines()))                                             # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from mechlens.ops.stats import format_rate
from mechlens.studies.stepwise.values import (
    ValueProbe,
    first_below,
    localisation_null,
    step_features,
    step_values,
)
from mechlens.text.trace import ReasoningTrace

if TYPE_CHECKING:
    from mechlens.models.hooked import HookedModel

Localiser = Literal["rollout values", "SORM probe", "ORM probe"]
LOCALISERS: tuple[Localiser, ...] = ("rollout values", "SORM probe", "ORM probe")


@dataclass
class StepwiseStudy:
    """Per trace: `values [S]` (V after each step, from rollouts), the held-out `sorm` and `orm`
    probe predictions `[S]`, whether it is `correct`, and its `planted` error step (None: none)."""

    values: list[np.ndarray]
    sorm: list[np.ndarray]
    orm: list[np.ndarray]
    correct: list[bool]
    planted: list[int | None]
    layer: int
    threshold: float

    def localised(self, by: Localiser) -> list[int | None]:
        """The first step below `threshold` per trace, by each localiser."""
        rows = {"rollout values": self.values, "SORM probe": self.sorm, "ORM probe": self.orm}[by]
        return [first_below(v, self.threshold) for v in rows]

    def recovery(self, draws: int = 2000, seed: int = 0) -> dict[str, dict]:
        """Each localiser on the traces with a planted error: exact hits, the mean distance in
        steps (localised - planted, over the traces it localised), and the position-matched null
        (`localisation_null`)."""
        keep = [i for i, p in enumerate(self.planted) if p is not None]
        if not keep:
            return {}
        planted = [int(self.planted[i]) for i in keep]  # type: ignore[arg-type]
        out: dict[str, dict] = {}
        for by in LOCALISERS:
            localised = self.localised(by)
            found = [localised[i] for i in keep]
            dist = [f - p for f, p in zip(found, planted, strict=True) if f is not None]
            out[by] = {
                **localisation_null(found, planted, draws, seed),
                "localised": sum(f is not None for f in found),
                "mean_distance": float(np.mean(dist)) if dist else float("nan"),
            }
        return out

    def summary_lines(self) -> list[str]:
        lines = []
        for by, r in self.recovery().items():
            dist = f"{r['mean_distance']:+.1f}" if np.isfinite(r["mean_distance"]) else "undefined"
            lines.append(
                f"{by}: first step below {self.threshold} is the planted error in "
                f"{format_rate(r['hits'], r['n'])} traces (position-matched null {r['null_mean']:.2f}, "
                f"p = {r['p']:.2g}); localised {r['localised']}/{r['n']}, mean distance {dist} steps"
            )
        return lines


def analyze(
    model: HookedModel,
    traces: Sequence[ReasoningTrace],
    accuracies: Sequence[Sequence[float]],
    correct: Sequence[bool],
    planted: Sequence[int | None],
    layer: int | None = None,
    threshold: float = 0.5,
    l2: float = 1.0,
) -> StepwiseStudy:
    """Stepwise values of `traces` from their resampling `accuracies` (`[S + 1]` each,
    `anchors.Resampling.accuracy`), and SORM and ORM probes at `layer` (default: the middle one)
    fitted leave-one-trace-out: each trace's predictions come from a probe that never saw it.
    The SORM regresses V_k; the ORM regresses the trace's own correctness (one sample per
    prefix). `planted` is each trace's error step (None where nothing was planted)."""
    n = len(traces)
    if n < 2 or not (len(accuracies) == len(correct) == len(planted) == n):
        raise ValueError(
            f"need >= 2 traces with one accuracy row, outcome and planted step each; got {n}, "
            f"{len(accuracies)}, {len(correct)}, {len(planted)}"
        )
    layer = model.n_layers // 2 if layer is None else model.check_layer(layer)
    values = [step_values(a) for a in accuracies]
    feats = [step_features(model, t, layer) for t in traces]
    for i, (f, v) in enumerate(zip(feats, values, strict=True)):
        if len(f) != len(v):
            raise ValueError(
                f"trace {i} has {len(f)} sentences but {len(v) + 1} accuracy values (need S + 1)"
            )
    targets = {
        "sorm": [torch.tensor(v) for v in values],
        "orm": [torch.full((len(v),), float(c)) for v, c in zip(values, correct, strict=True)],
    }
    held: dict[str, list[np.ndarray]] = {"sorm": [], "orm": []}
    for i in range(n):
        for name, ys in targets.items():
            X = torch.cat([f for j, f in enumerate(feats) if j != i])
            y = torch.cat([t for j, t in enumerate(ys) if j != i])
            ok = torch.isfinite(y)
            held[name].append(ValueProbe(l2).fit(X[ok], y[ok]).predict(feats[i]).numpy())
    return StepwiseStudy(
        values, held["sorm"], held["orm"], [bool(c) for c in correct], list(planted), layer, threshold
    )
