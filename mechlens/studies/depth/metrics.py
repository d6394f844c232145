"""Per-token depth metrics over the streaming logit lens, registered by name.

A depth metric is a function of the logit-lens statistics of every layer, `LensResult` fields
`[layers, 1, pos]`, returning one value per position `[pos]` (the value of the distribution at
position t, which predicts token t+1). `token_depth` runs the streaming lens once for all the
metrics asked for (never `[layers, pos, vocab]`), and `analyze(..., metrics=...)` /
`evaluate` report each one's trace mean beside the Reasoning Score.

Built in:
- "reasoning_score": the Reasoning Score's per-token JSD, mean over the late layers
  (`late_layers`); sign -1 (low = shallow = suspicious).
- "dtr": deep-thinking tokens (Chen et al. 2026, "Think Deep, Not Just Long", arXiv 2602.13517):
  with D_l = JSD(p_final, p_l) and its running minimum over layers m_l = min_{j <= l} D_j, a
  token settles at the first layer with m_l <= `DTR_THRESHOLD`; it is deep-thinking when that
  layer is at or after `ceil(DTR_DEPTH * n_layers)`. A trace's deep-thinking ratio is the share
  of its tokens that are deep-thinking. Sign -1 (the paper: higher DTR, higher accuracy).
  The thresholds are the paper's as third-party notes give them (g = 0.5, rho = 0.85), with the
  JSD in nats (at most log 2) [impl: the unit is not given]; both are parameters
  (`deep_thinking`).

Example:
    >>> import mechlens as ml
    >>> model = ml.load_model("tiny-llama")
    >>> trace = ml.ReasoningTrace.from_text(model, "What is 2+3?", "Add 2 and 3. That gives 5.\\n")
    >>> values = token_depth(model, trace, ["dtr", "reasoning_score"])
    >>> values["dtr"].shape == (trace.n_tokens,)
    True
    >>> changes = lambda lens: (lens.top1[1:, 0] != lens.top1[:-1, 0]).sum(0).float()  # [pos]
    >>> register_depth_metric("top1_changes", changes, stats=("top1",), sign=+1)
    >>> float(token_depth(model, trace, ["top1_changes"])["top1_changes"][1]) >= 0
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mechlens.ops.lens import STATS, LensResult, logit_lens
from mechlens.studies.depth.scoring import _token_scores, late_layers
from mechlens.text.trace import ReasoningTrace

if TYPE_CHECKING:
    from mechlens.models.hooked import HookedModel

DTR_THRESHOLD = 0.5
"""g: the JSD (nats) below which a layer's prediction counts as settled."""
DTR_DEPTH = 0.85
"""rho: the share of the depth from which a settling layer counts as late."""


@dataclass(frozen=True)
class DepthMetric:
    """A registered metric: `fn(lens) -> [pos]`, the lens `stats` it reads, and `sign` (+1: higher
    means more suspicious of an error, -1: lower does)."""

    name: str
    fn: Callable[[LensResult], Tensor]
    stats: tuple[str, ...]
    sign: int


DEPTH_METRICS: dict[str, DepthMetric] = {}
"""The registry `token_depth` reads; `register_depth_metric` adds to it."""


def register_depth_metric(
    name: str, fn: Callable[[LensResult], Tensor], stats: Sequence[str] = ("jsd_final",), sign: int = -1
) -> None:
    """Register `fn(lens) -> [pos]` under `name` (replacing a metric of that name)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise TypeError(f"fn must be callable (LensResult -> [pos]), got {type(fn).__name__}")
    bad = [s for s in stats if s not in STATS or s == "target"]
    if isinstance(stats, str) or bad or not stats:
        raise ValueError(
            f"stats must list lens statistics from {[s for s in STATS if s != 'target']}, got {stats!r}"
        )
    if sign not in (-1, 1):
        raise ValueError(f"sign must be +1 or -1, got {sign!r}")
    DEPTH_METRICS[name] = DepthMetric(name, fn, tuple(stats), sign)


def deep_thinking(jsd_final: Tensor, threshold: float = DTR_THRESHOLD, depth: float = DTR_DEPTH) -> Tensor:
    """`[layers, pos]` JSD to the final distribution (every layer, in order) -> `[pos]` floats,
    1.0 where the token settles (running minimum <= `threshold`) only at or after layer
    `ceil(depth * layers)`, counting layers 1..L as the paper's notation does, else 0.0; NaN
    where the JSD is NaN (padding).

        >>> jsd = torch.tensor([[0.6, 0.6], [0.6, 0.1], [0.0, 0.0]])   # 3 layers, 2 positions
        >>> deep_thinking(jsd, depth=0.9).tolist()
        [1.0, 0.0]
    """
    if not 0 < depth <= 1:
        raise ValueError(f"depth must lie in (0, 1], got {depth}")
    if not 0 <= threshold <= math.log(2):
        raise ValueError(f"threshold must lie in [0, log 2] (a JSD in nats), got {threshold}")
    n_layers = jsd_final.shape[0]
    settled = jsd_final.cummin(0).values <= threshold  # [layers, pos]
    never = torch.full(settled.shape[1:], n_layers + 1, dtype=torch.long)
    first = torch.where(settled.any(0), settled.float().argmax(0) + 1, never)  # [pos], layers 1..L
    deep = (first >= math.ceil(depth * n_layers)).float()
    return deep.masked_fill(torch.isnan(jsd_final).any(0), float("nan"))


def _late_mean(lens: LensResult) -> Tensor:
    assert lens.jsd_final is not None  # registered with stats=("jsd_final",)
    late = late_layers(len(lens.layers))
    return lens.jsd_final[late, 0].mean(0)


def _dtr(lens: LensResult) -> Tensor:
    assert lens.jsd_final is not None
    return deep_thinking(lens.jsd_final[:, 0])


register_depth_metric("reasoning_score", _late_mean)
register_depth_metric("dtr", _dtr)


def token_depth(
    model: HookedModel, trace: ReasoningTrace, metrics: Sequence[str] = ("dtr",), chunk: int | None = None
) -> dict[str, Tensor]:
    """Each metric per token of `trace`, `[pos]` (the value of the distribution that predicted
    it; NaN at the first token), from one streaming lens over every layer."""
    if isinstance(metrics, str):
        raise TypeError("metrics must be a list of metric names, not one string")
    unknown = [m for m in metrics if m not in DEPTH_METRICS]
    if unknown:
        raise ValueError(f"unknown depth metrics {unknown}; registered: {sorted(DEPTH_METRICS)}")
    if not metrics:
        return {}
    stats = sorted({s for m in metrics for s in DEPTH_METRICS[m].stats})
    lens = logit_lens(model, trace.tokens, stats=stats, chunk=chunk)
    out = {}
    for name in metrics:
        per_position = torch.as_tensor(DEPTH_METRICS[name].fn(lens)).float().reshape(-1)
        if per_position.shape != (trace.n_tokens,):
            raise ValueError(f"depth metric {name!r} returned shape {tuple(per_position.shape)}, want [pos]")
        out[name] = _token_scores(per_position)
    return out
