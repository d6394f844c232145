"""Depth scoring of many traces: one trace's record (`analyze`), and the hallucination detector
and output-level baselines evaluated by AUROC (`evaluate`), as in Sun et al.'s comparison.

Example:
    >>> import mechlens as ml
    >>> model = ml.load_model("tiny-llama")
    >>> trace = ml.ReasoningTrace.from_text(model, "What is 2+3?", "Add 2 and 3.\\nThat gives 5.\\nAnswer: 5")
    >>> record = analyze(model, trace, "5")
    >>> record["n_steps"], sorted(record["features"])[:2]
    (2, ['attn_score', 'backtrack_attn'])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from mechlens.ops.signals import conditional_entropy_per_step, dynamic_instability
from mechlens.ops.stats import auroc, auroc_interval, stratified_auroc
from mechlens.studies.depth.metrics import DEPTH_METRICS, token_depth
from mechlens.studies.depth.scoring import FEATURES, analyze_trace, cross_validated_scores
from mechlens.text.trace import ReasoningTrace

if TYPE_CHECKING:
    from mechlens.models.hooked import HookedModel

SIGNALS: dict[str, tuple[str, int]] = {
    "perplexity": ("perplexity", +1),
    "mean token entropy": ("mean_entropy", +1),
    "self-certainty": ("self_certainty", -1),
    "P(True)": ("p_true", -1),
    "instability peak": ("instability_peak", +1),
    "feature: mean_score": ("mean_score", -1),  # low = shallow reasoning
    **{f"feature: {f}": (f, +1) for f in FEATURES[1:]},
}
"""Each baseline signal: its key in a record (or its features) and the direction that should mean
"hallucinated" (+1: higher is more suspicious)."""


def analyze(
    model: HookedModel,
    trace: ReasoningTrace,
    answer: str,
    unit: str = "line",
    divergence: str = "jsd",
    metrics: Sequence[str] = (),
) -> dict:
    """Everything depth scoring needs of one trace, JSON-able: the detector's features, the step
    scores, output-level signals, the dynamic instability peak, the conditional entropy of the
    gold `answer` after each step, and each registered depth metric in `metrics`
    (`mechlens.studies.depth.metrics`) averaged over the steps' tokens (`depth_metrics`)."""
    a = analyze_trace(model, trace, divergence=divergence, unit=unit)
    steps = a.score.steps
    instability = dynamic_instability(a.signals)
    in_steps = torch.zeros(trace.n_tokens, dtype=torch.bool)
    for s in steps:
        in_steps[s.start : s.end] = True
    depth = {
        name: float(values[in_steps].nanmean()) for name, values in token_depth(model, trace, metrics).items()
    }
    return {
        "depth_metrics": depth,
        "features": a.features,
        "step_scores": a.score.step_scores.tolist(),
        "perplexity": a.signals.perplexity,
        "mean_entropy": a.signals.mean_entropy,
        "self_certainty": a.signals.mean_self_certainty,
        "instability_peak": instability.peak,
        "instability_peak_fraction": instability.peak_fraction,
        "conditional_entropy": conditional_entropy_per_step(model, trace, answer, steps).tolist(),
        "n_steps": len(steps),
    }


def evaluate(
    records: Sequence[dict], folds: int = 5, seed: int = 0, strata: Sequence[str] | None = None
) -> dict[str, dict]:
    """AUROC of the RHD detector and of each signal in `SIGNALS` over `records` (each an `analyze`
    record with a `label`, 1 = hallucinated, and `p_true` when that baseline is wanted).

    `auroc_a_priori`: the signal in its expected direction; `auroc_cross_validated`: out-of-fold
    scores of a logistic regression on the signal (its direction learned), the detector's protocol.
    `scores` holds the scores behind the reported AUROC, and `auroc_cross_validated_ci` its 95%
    bootstrap interval (`auroc_interval`, seeded). Empty when only one label is present.

    With `strata` (one dataset name per record), the folds are stratified by dataset too, and each
    result adds `auroc_stratified` (pairs within a dataset only, `stratified_auroc`: a dataset
    that is simply harder cannot raise it) with `auroc_stratified_ci`, and `auroc_by_stratum`,
    all of the reported scores.

    On records analysed in bfloat16 on the embedded model (`benchmarks/bf16.py`: 20 templated
    arithmetic traces, 10 with a wrong result), the a-priori AUROCs differ from float32 by at most
    0.02 and the cross-validated ones by up to 0.07 (`attn_score` 0.415 vs 0.485, `mean_score` 0.39
    vs 0.33; the RHD detector 0.16 vs 0.17): the experiment should analyse the traces in float32
    (and may sample them in bfloat16)."""
    labels = np.array([r["label"] for r in records])
    if len(set(labels.tolist())) < 2:
        return {}
    if strata is not None and len(strata) != len(records):
        raise ValueError(f"strata has {len(strata)} entries for {len(records)} records")
    folds = min(folds, int(labels.sum()), int((1 - labels).sum()))  # < 2: no cross-validation
    out = {}
    if folds >= 2:
        rhd = cross_validated_scores(
            [r["features"] for r in records], labels, folds=folds, seed=seed, strata=strata
        )
        out["RHD detector"] = {"auroc_a_priori": float("nan"), "auroc_cross_validated": auroc(rhd, labels),
                               "scores": rhd}  # fmt: skip
    signals = {name: (key, sign, False) for name, (key, sign) in SIGNALS.items()}
    for metric in DEPTH_METRICS.values():  # read from each record's depth_metrics
        signals[f"depth: {metric.name}"] = (metric.name, metric.sign, True)

    def where(r: dict, key: str, depth_metric: bool) -> dict:
        return r.get("depth_metrics", {}) if depth_metric else r["features"] if key in FEATURES else r

    for name, (key, sign, depth_metric) in signals.items():
        if any(key not in where(r, key, depth_metric) for r in records):
            continue
        values = [{key: where(r, key, depth_metric)[key]} for r in records]
        prior = sign * np.array([v[key] for v in values])
        if np.isnan(prior).any():
            continue
        result = {"auroc_a_priori": auroc(prior, labels), "auroc_cross_validated": np.nan, "scores": prior}
        if folds >= 2:
            cv = cross_validated_scores(
                values, labels, folds=folds, seed=seed, strata=strata, features=(key,)
            )
            result.update(auroc_cross_validated=auroc(cv, labels), scores=cv)
        out[name] = result
    for result in out.values():
        result["auroc_cross_validated_ci"] = list(
            auroc_interval(np.asarray(result["scores"], dtype=float), labels, draws=1000, seed=seed)
        )
    if strata is not None:
        groups = np.asarray(list(strata), dtype=object)
        for result in out.values():
            s = np.asarray(result["scores"], dtype=float)
            result["auroc_stratified"] = stratified_auroc(s, labels, strata)
            result["auroc_stratified_ci"] = list(auroc_interval(s, labels, strata, draws=1000, seed=seed))
            result["auroc_by_stratum"] = {
                str(g): auroc(s[groups == g], labels[groups == g]) for g in dict.fromkeys(groups.tolist())
            }
    return out
