"""Depth scoring with the logit lens: Reasoning Score, hallucination features, RHD detector.

Reproduces the analysis of "Detection and Mitigation of Hallucination in Large Reasoning Models:
A Mechanistic Perspective" on the model's own reasoning about word problems and factual
questions, labelled correct / hallucinated by checking the answer. The default model is the
reasoning organism (`mechlens.organism`) on problems it never trained on; `--model base` keeps the
plain embedded model (arithmetic dataset, one step per line), `--model PATH --device cuda
--dtype bfloat16` runs a local reasoning model.

    python experiments/depth_scoring.py [--quick] [--model organism|base|PATH] [--backend nnsight]

Writes figures/depth/: lens_heatmap, score_by_step, fluctuation_hist, roc, conditional_entropy
(HTML, plus PNG/SVG with a Chromium) with provenance, and results.json (AUROCs and counts).
Every expensive step is cached on disk, so an interrupted run resumes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

import mechlens as ml
from mechlens import Sampling, datasets
from mechlens.datasets import STEP_BY_STEP
from mechlens.ops.signals import p_true
from mechlens.ops.stats import mean_ci, roc_curve
from mechlens.organism import held_out_factual, held_out_problems, load_subject
from mechlens.plots import histograms_by_group, lens_heatmap, mean_ci_lines, roc_curves
from mechlens.rollouts import engine_for
from mechlens.rollouts.engines import sample_texts
from mechlens.runs import Run, parse_config
from mechlens.studies import depth
from mechlens.studies.depth import FEATURES
from mechlens.text.thinking import format_prompt

LABELS = {0: "correct", 1: "hallucinated"}


@dataclass
class DepthConfig:
    model: str = "organism"  # the reasoning organism; "base": the plain embedded model; or a path
    backend: Literal["transformer_lens", "nnsight"] = "transformer_lens"
    device: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    engine: Literal["auto", "local", "shared-prefix"] = "auto"  # in-process sampling (`engine_for`):
    # "auto" is the shared-prefix engine (bf16 where the CPU is fast at it); the analyses stay in --dtype
    n_arithmetic: int = 60
    n_factual: int = 100  # the organism: its 50 held-out factual questions at most
    max_new_tokens: int = 256
    batch_size: int = 16
    unit: Literal["auto", "sentence", "paragraph", "line"] = "auto"  # auto: lines for the base model
    # (SmolLM2 writes one step per line), sentences otherwise
    divergence: Literal["jsd", "kl"] = "jsd"
    metrics: str = "dtr"  # registered per-token depth metrics reported beside the Reasoning Score
    # (`mechlens.studies.depth.metrics`; comma-separated; "dtr": the deep-thinking ratio)
    min_steps: int = 3
    max_steps_plotted: int = 10
    folds: int = 5
    subset: Literal["factual", "all"] = "factual"  # traces compared by label in the figures
    endpoint: str = ""  # comma-separated OpenAI-compatible base URLs to sample from (default: here)
    served_model: str = ""  # the model name those servers serve (the same weights as --model)
    quick: bool = False
    out: str = "figures/depth"
    seed: int = 0

    def __post_init__(self):
        if self.unit == "auto":
            self.unit = "line" if self.model == "base" else "sentence"
        if self.quick:  # no depth metrics: the all-layer lens would double the demo's analysis time
            self.n_arithmetic, self.n_factual, self.max_new_tokens = 4, 8, 200
            self.subset, self.metrics = "all", ""
        if self.subset not in SUBSET_TITLES:
            raise ValueError(f"subset must be one of {list(SUBSET_TITLES)}, got {self.subset!r}")


def load_problems(cfg: DepthConfig) -> list[datasets.Problem]:
    """Word problems and factual questions; for the organism, only ones it was not trained on."""
    if cfg.model == "organism":
        factual = held_out_factual()
        random.Random(cfg.seed).shuffle(factual)
        return held_out_problems(cfg.n_arithmetic, seed=cfg.seed) + factual[: cfg.n_factual]
    arithmetic = datasets.load("arithmetic", n=cfg.n_arithmetic, seed=cfg.seed)
    factual = datasets.load("factual")
    random.Random(cfg.seed).shuffle(factual)
    return arithmetic + factual[: cfg.n_factual]


def generate_responses(model, run: Run, cfg: DepthConfig, problems, engine) -> list[str]:
    """Greedy step-by-step answers, cached per batch of problems."""
    sampling = Sampling(max_new_tokens=cfg.max_new_tokens, temperature=0)
    responses = []
    batches = range(0, len(problems), cfg.batch_size)
    for i in tqdm(batches, desc="generate traces"):
        chunk = problems[i : i + cfg.batch_size]
        prompts = [format_prompt(model.tokenizer, p.question + STEP_BY_STEP) for p in chunk]
        texts = run.cached(
            "responses",
            lambda prompts=prompts: sample_texts(engine, model, prompts, sampling),
            config=False,
            prompts=prompts,
            sampling=sampling,
            engine=engine.describe(),
        )
        responses.extend(texts)
    return responses


SUBSET_TITLES = {"all": "all traces", "factual": "factual questions"}
ROC_CURVES = ("RHD detector", "perplexity", "mean token entropy", "self-certainty", "P(True)")


def subsets(kept: list[dict]) -> dict[str, list[dict]]:
    """All analysed traces, and the factual ones alone (arithmetic answers are almost all wrong
    on a small model, so over all traces the label is confounded with the dataset)."""
    return {"all": kept, "factual": [r for r in kept if r["problem"].kind == "text"]}


def _nanmean(values: list[float]) -> float | None:
    finite = [v for v in values if not np.isnan(v)]
    return float(np.mean(finite)) if finite else None


def _direction(rows: list[dict], feature: str) -> str:
    """Whether `feature` is higher or lower on hallucinated than on correct traces among `rows`."""
    means = [_nanmean([r["features"][feature] for r in rows if r["label"] == label]) for label in (1, 0)]
    if None in means:
        return "undefined"
    return "higher when hallucinated" if means[0] > means[1] else "lower"


def main(cfg: DepthConfig) -> dict:
    model = load_subject(cfg.model, cfg.backend, cfg.device, cfg.dtype)
    run = Run("depth_scoring", cfg, cfg.out, model=model, seed=cfg.seed, images=not cfg.quick)
    problems = load_problems(cfg)
    engine = engine_for(model, cfg.endpoint, cfg.served_model, cfg.batch_size, local=cfg.engine)
    responses = generate_responses(model, run, cfg, problems, engine)

    metrics = [m for m in cfg.metrics.split(",") if m]
    records = []
    for problem, response in tqdm(list(zip(problems, responses, strict=True)), desc="analyse traces"):
        if not response.strip():
            continue
        trace = ml.ReasoningTrace.from_text(model, problem.question + STEP_BY_STEP, response)
        grade = problem.grade(response)
        result = run.cached(
            "analysis",
            lambda t=trace, a=problem.answer: depth.analyze(model, t, a, cfg.unit, cfg.divergence, metrics),
            config=False,
            text=trace.text,
            answer=problem.answer,
            unit=cfg.unit,
            divergence=cfg.divergence,
            metrics=metrics,
        )
        records.append(
            {"problem": problem, "trace": trace, "grade": grade, "label": int(not grade.correct), **result}
        )
    kept = [r for r in records if r["n_steps"] >= cfg.min_steps]
    proposed = [r["grade"].extracted or r["trace"].response.strip().splitlines()[-1] for r in kept]
    ptrue = run.cached(
        "p_true",
        lambda: p_true(model, [r["problem"].question for r in kept], proposed).tolist(),
        config=False,
        questions=[r["problem"].question for r in kept],
        proposed=proposed,
    )
    for r, p in zip(kept, ptrue, strict=True):
        r["p_true"] = p
    labels = np.array([r["label"] for r in kept])
    print(
        f"{len(records)} traces, {len(kept)} with >= {cfg.min_steps} steps; "
        f"{int(labels.sum())} hallucinated, {int((1 - labels).sum())} correct"
    )

    # ---- detector vs baselines, on every analysed trace and on the chosen subset
    by_subset = subsets(kept)
    evaluation = {
        name: depth.evaluate(rows, cfg.folds, cfg.seed, strata=[r["problem"].kind for r in rows])
        for name, rows in by_subset.items()
    }
    # the headline: the detector and the mean Reasoning Score alone, AUROC within each dataset
    # (datasets differ in accuracy, so an AUROC over all traces partly measures the dataset)
    headline = {
        name: {
            "auroc_stratified_by_dataset": res["auroc_stratified"],
            "auroc_stratified_ci": res["auroc_stratified_ci"],
            "auroc_by_dataset": res["auroc_by_stratum"],
            "auroc_pooled": res["auroc_cross_validated"],
            "auroc_pooled_ci": res["auroc_cross_validated_ci"],
        }
        for name, res in evaluation["all"].items()
        if name in ("RHD detector", "feature: mean_score", "perplexity") or name.startswith("depth: ")
    }
    shown = by_subset[cfg.subset]  # the traces the label-comparison figures show
    labels = np.array([r["label"] for r in shown])

    # ---- figures
    example = min((r for r in shown if r["label"] == 1), key=lambda r: r["trace"].n_tokens, default=shown[0])
    trace = example["trace"]
    span = range(max(0, trace.prompt_len - 8), trace.n_tokens)
    lens = ml.logit_lens(model, trace.tokens, top_k_positions=span, k=3)
    str_tokens = model.to_str_tokens(trace.tokens[:, span.start :])
    top = lens.top1_text(model.tokenizer, start=span.start)
    top_k = [["top-3: " + text for text in row] for row in lens.top_k_text(model.tokenizer)]
    fig = lens_heatmap(
        lens.entropy[:, 0, span.start :],
        top,
        str_tokens,
        lens.layers,
        extra_hover=top_k,
        title=f"Logit lens over a hallucinated trace ({example['problem'].id}): entropy; hover: top-1, top-3",
    )
    run.save_figure(
        fig, "lens_heatmap", caption="Logit-lens entropy by layer and token over one hallucinated trace."
    )

    groups, hover = {}, {}
    for label, name in LABELS.items():
        rows = [r["step_scores"] for r in shown if r["label"] == label]
        if rows:
            m, lo, hi, counts = mean_ci(rows, cfg.max_steps_plotted)
            groups[f"{name} (n={len(rows)})"] = (m, lo, hi)
            hover[f"{name} (n={len(rows)})"] = [f"traces with this step: {c}" for c in counts]
    x = list(range(1, cfg.max_steps_plotted + 1))
    fig = mean_ci_lines(
        x,
        groups,
        "reasoning step",
        f"Reasoning Score ({cfg.divergence.upper()}, nats)",
        title=f"Reasoning Score by step, {SUBSET_TITLES[cfg.subset]}: mean and 95% CI",
        hover=hover,
    )
    run.save_figure(fig, "score_by_step", caption="Reasoning Score per step, correct vs hallucinated traces.")

    fig = histograms_by_group(
        {
            name: [r["features"]["fluctuation"] for r in shown if r["label"] == label]
            for label, name in LABELS.items()
        },
        "early-stage fluctuation (CV of the Reasoning Score)",
        title=f"Early-stage fluctuation by label, {SUBSET_TITLES[cfg.subset]}",
    )
    run.save_figure(
        fig, "fluctuation_hist", caption="Coefficient of variation of early step scores, by label."
    )

    curves = {}
    for name, result in evaluation[cfg.subset].items():
        if name in ROC_CURVES and result["scores"] is not None:
            fpr, tpr = roc_curve(result["scores"], labels)
            cv = result["auroc_cross_validated"]
            curves[name] = (fpr, tpr, result["auroc_a_priori"] if np.isnan(cv) else cv)
    fig = roc_curves(
        curves, title=f"Hallucination detection, {SUBSET_TITLES[cfg.subset]} ({len(shown)} traces)"
    )
    run.save_figure(
        fig, "roc", caption="ROC of the RHD detector against output-level baselines (cross-validated)."
    )

    groups = {}
    for label, name in LABELS.items():
        rows = [r["conditional_entropy"] for r in shown if r["label"] == label]
        if rows:
            m, lo, hi, _ = mean_ci(rows, cfg.max_steps_plotted + 1)
            groups[f"{name} (n={len(rows)})"] = (m, lo, hi)
    title = f"Conditional entropy of the answer after k steps, {SUBSET_TITLES[cfg.subset]}"
    fig = mean_ci_lines(
        list(range(cfg.max_steps_plotted + 1)),
        groups,
        "steps seen (k)",
        "entropy of the gold answer (nats)",
        title=title,
    )
    run.save_figure(
        fig, "conditional_entropy", caption="Entropy of the teacher-forced gold answer after k steps."
    )

    results = {
        "sampling_engine": engine.describe(),
        "traces": len(records),
        "analysed": len(kept),
        "subset_shown": cfg.subset,
        "labels": {
            name: {
                "hallucinated": int(sum(r["label"] for r in rows)),
                "correct": int(sum(1 - r["label"] for r in rows)),
            }
            for name, rows in by_subset.items()
        },
        "accuracy_by_dataset": {
            kind: float(np.mean([1 - r["label"] for r in records if r["problem"].kind == kind]))
            for kind in ("number", "text")
            if any(r["problem"].kind == kind for r in records)
        },
        "auroc": {
            subset: {name: {k: v for k, v in res.items() if k != "scores"} for name, res in ev.items()}
            for subset, ev in evaluation.items()
        },
        "headline": headline,
        # the paper: hallucinated traces score lower (mean_score) and fluctuate more early, attend
        # more to anomalous shallow steps, and their step scores track perplexity more
        "feature_directions": {
            f: {
                "paper": "higher when hallucinated" if depth.SIGNALS[f"feature: {f}"][1] > 0 else "lower",
                "here": _direction(shown, f),
            }
            for f in FEATURES
        },
        "feature_means": {
            name: {
                f: _nanmean([r["features"][f] for r in shown if r["label"] == label])
                for f in [*FEATURES, "backtrack_attn"]
            }
            for label, name in LABELS.items()
        },
    }
    run.save_json("results.json", results)
    counts = results["labels"]["all"]
    lines = [
        f"{len(kept)} traces analysed: {counts['hallucinated']} hallucinated, {counts['correct']} correct"
    ]
    for name, h in headline.items():
        within = h["auroc_stratified_by_dataset"]
        if within is not None and np.isfinite(within):
            low, high = h["auroc_stratified_ci"]
            lines.append(f"{name}: AUROC within dataset {within:.2f} (95% CI {low:.2f}-{high:.2f})")
        else:
            low, high = h["auroc_pooled_ci"]
            lines.append(f"{name}: AUROC {h['auroc_pooled']:.2f} (95% CI {low:.2f}-{high:.2f})")
    if not headline:
        lines.append("one label only: no AUROC")
    run.summarize("Depth scoring (hallucinated = 1; cross-validated)", lines)
    return results


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main(parse_config(DepthConfig, description=__doc__))
