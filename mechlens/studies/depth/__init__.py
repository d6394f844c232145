"""Depth scoring with the logit lens (Sun et al., "Detection and Mitigation of Hallucination in
Large Reasoning Models: A Mechanistic Perspective"): the Reasoning Score, hallucination features,
the RHD detector (`scoring`), and per-trace records and detector evaluation (`evaluation`).

Example:
    >>> from mechlens.studies import depth
    >>> depth.late_layers(30)[:3]
    [15, 16, 17]
"""

from mechlens.studies.depth.evaluation import SIGNALS, analyze, evaluate
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
    "evaluate",
    "feature_matrix",
    "fluctuation",
    "late_layers",
    "pearson",
    "reasoning_score",
    "step_means",
]
