"""Depth scoring with the logit lens (Sun et al., "Detection and Mitigation of Hallucination in
Large Reasoning Models: A Mechanistic Perspective"): the Reasoning Score, hallucination features,
the RHD detector (`scoring`), per-token depth metrics such as the deep-thinking ratio registered by
name (`metrics`), and per-trace records and detector evaluation (`evaluation`).

Example:
    >>> from mechlens.studies import depth
    >>> depth.late_layers(30)[:3]
    [15, 16, 17]
"""

from mechlens.studies.depth.evaluation import SIGNALS, analyze, evaluate
from mechlens.studies.depth.metrics import (
    DEPTH_METRICS,
    DTR_DEPTH,
    DTR_THRESHOLD,
    DepthMetric,
    deep_thinking,
    register_depth_metric,
    token_depth,
)
from mechlens.studies.depth.scoring import (
    BACKTRACK_CUES,
    DIVERGENCES,
    FEATURES,
    ReasoningScore,
    RHDDetector,
    TraceAnalysis,
    analyze_trace,
    anomalous_steps,
    backtrack_attention,
    backtrack_steps,
    cross_validated_scores,
    feature_matrix,
    fluctuation,
    late_layers,
    pearson,
    reasoning_score,
    step_means,
)

__all__ = [
    "BACKTRACK_CUES",
    "DEPTH_METRICS",
    "DTR_DEPTH",
    "DTR_THRESHOLD",
    "DepthMetric",
    "DIVERGENCES",
    "FEATURES",
    "SIGNALS",
    "RHDDetector",
    "ReasoningScore",
    "TraceAnalysis",
    "analyze",
    "analyze_trace",
    "anomalous_steps",
    "backtrack_attention",
    "backtrack_steps",
    "cross_validated_scores",
    "deep_thinking",
    "evaluate",
    "feature_matrix",
    "fluctuation",
    "late_layers",
    "pearson",
    "reasoning_score",
    "register_depth_metric",
    "step_means",
    "token_depth",
]
