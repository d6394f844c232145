"""Depth scoring with the logit lens: Reasoning Score, hallucination features, RHD detector.

Reproduces the analysis of "Detection and Mitigation of Hallucination in Large Reasoning Models:
A Mechanistic Perspective" on the model's own step-by-step answers to arithmetic word problems
and factual questions, labelled correct / hallucinated by checking the answer.

    python experiments/depth_scoring.py [--quick] [--model PATH] [--backend nnsight]

Writes figures/depth/: lens_heatmap, score_by_step, fluctuation_hist, roc, conditional_entropy
(HTML, plus PNG/SVG with a Chromium) with provenance, and results.json (AUROCs and counts).
Every expensive step is cached on disk, so an interrupted run resumes.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

import mechlens as ml
from mechlens import datasets
from mechlens.depth import FEATURES, analyze_trace, cross_validated_scores
from mechlens.metrics import auroc, roc_curve
from mechlens.plots import histograms_by_group, lens_heatmap, mean_ci_lines, roc_curves
from mechlens.runs import Run, atomic_write_text, parse_config
from mechlens.signals import conditional_entropy_per_step, dynamic_instability, p_true
from mechlens.trace import format_prompt

INSTRUCTION = " Think step by step, then give the final answer as 'Answer: <answer>'."
LABELS = {0: "correct", 1: "hallucinated"}


@dataclass
class DepthConfig:
    model: str = "smollm2-135m-instruct"
    backend: str = "transformer_lens"
    n_arithmetic: int = 60
    n_factual: int = 100
    max_new_tokens: int = 160
    batch_size: int = 16
    unit: str = "line"  # SmolLM2 writes one step per line
    divergence: str = "jsd"
    min_steps: int = 3
    max_steps_plotted: int = 10
    folds: int = 5
    quick: bool = False
    out: str = "figures/depth"
    seed: int = 0

    def __post_init__(self):
        if self.quick:
            self.n_arithmetic, self.n_factual, self.max_new_tokens = 8, 8, 112


def load_problems(cfg: DepthConfig) -> list[datasets.Problem]:
    arithmetic = datasets.load("arithmetic", n=cfg.n_arithmetic, seed=cfg.seed)
    factual = datasets.load("factual")
    random.Random(cfg.seed).shuffle(factual)
    return arithmetic + factual[: cfg.n_factual]


def generate_responses(model, run: Run, cfg: DepthConfig, problems) -> list[str]:
    """Greedy step-by-step answers, cached per batch of problems."""
    responses = []
    batches = range(0, len(problems), cfg.batch_size)
    for i in tqdm(batches, desc="generate traces"):
        chunk = problems[i : i + cfg.batch_size]
        prompts = [format_prompt(model.tokenizer, p.question + INSTRUCTION) for p in chunk]
        texts = run.cached(
            "responses",
            lambda prompts=prompts: (
                model.generate(
                    prompts, max_new_tokens=cfg.max_new_tokens, temperature=0, batch_size=cfg.batch_size
                ).texts
            ),
            config=False,
            prompts=prompts,
            max_new_tokens=cfg.max_new_tokens,
        )
        responses.extend(texts)
    return responses


def analyse(model, run: Run, cfg: DepthConfig, problem, trace) -> dict:
    """Features, scores and signals of one trace (cached)."""

    def compute():
        a = analyze_trace(model, trace, divergence=cfg.divergence, unit=cfg.unit)
        steps = a.score.steps
        instability = dynamic_instability(a.signals)
        cond = conditional_entropy_per_step(model, trace, problem.answer, steps)
        return {
            "features": a.features,
            "step_scores": a.score.step_scores.tolist(),
            "perplexity": a.signals.perplexity,
            "mean_entropy": a.signals.mean_entropy,
            "self_certainty": a.signals.mean_self_certainty,
            "instability_peak": instability.peak,
            "instability_peak_fraction": instability.peak_fraction,
            "conditional_entropy": cond.tolist(),
            "n_steps": len(steps),
        }

    return run.cached(
        "analysis", compute, config=False, text=trace.text, answer=problem.answer,
        unit=cfg.unit, divergence=cfg.divergence,
    )  # fmt: skip


def mean_ci(rows: list[list[float]], length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """Mean and 95% normal CI per position over ragged rows, up to `length`."""
    mean, low, high, counts = [], [], [], []
    for k in range(length):
        vals = np.array([r[k] for r in rows if len(r) > k])
        m = vals.mean() if len(vals) else np.nan
        se = vals.std(ddof=1) / np.sqrt(len(vals)) if len(vals) > 1 else 0.0
        mean.append(m)
        low.append(m - 1.96 * se)
        high.append(m + 1.96 * se)
        counts.append(len(vals))
    return np.array(mean), np.array(low), np.array(high), counts


def main(cfg: DepthConfig) -> dict:
    model = ml.load_model(cfg.model, backend=cfg.backend)
    run = Run("depth_scoring", cfg, cfg.out, model=model, seed=cfg.seed)
    problems = load_problems(cfg)
    responses = generate_responses(model, run, cfg, problems)

    records = []
    for problem, response in tqdm(list(zip(problems, responses, strict=True)), desc="analyse traces"):
        if not response.strip():
            continue
        trace = ml.ReasoningTrace.from_text(model, problem.question + INSTRUCTION, response)
        grade = problem.grade(response)
        result = analyse(model, run, cfg, problem, trace)
        records.append({"problem": problem, "trace": trace, "grade": grade, "label": int(not grade.correct),
                        **result})  # fmt: skip
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
    print(f"{len(records)} traces, {len(kept)} with >= {cfg.min_steps} steps; "
          f"{int(labels.sum())} hallucinated, {int((1 - labels).sum())} correct")  # fmt: skip

    # ---- detector vs baselines (higher score = more likely hallucinated)
    scores: dict[str, np.ndarray] = {}
    folds = min(cfg.folds, int(labels.sum()), int((1 - labels).sum()))
    if folds >= 2:
        scores["RHD (cross-validated)"] = cross_validated_scores(
            [r["features"] for r in kept], labels, folds=folds, seed=cfg.seed
        )
    scores["perplexity"] = np.array([r["perplexity"] for r in kept])
    scores["mean token entropy"] = np.array([r["mean_entropy"] for r in kept])
    scores["- self-certainty"] = -np.array([r["self_certainty"] for r in kept])
    scores["1 - P(True)"] = 1 - np.array([r["p_true"] for r in kept])
    scores["instability peak"] = np.array([r["instability_peak"] for r in kept])
    for f in FEATURES:
        scores[f"feature: {f}"] = np.array([r["features"][f] for r in kept])
    aurocs = {name: auroc(s, labels) if len(set(labels)) == 2 else float("nan") for name, s in scores.items()}

    # ---- figures
    example = min((r for r in kept if r["label"] == 1), key=lambda r: r["trace"].n_tokens, default=kept[0])
    trace = example["trace"]
    span = range(max(0, trace.prompt_len - 8), trace.n_tokens)
    lens = ml.logit_lens(model, trace.tokens, top_k_positions=span, k=3)
    str_tokens = model.to_str_tokens(trace.tokens[:, span.start :])
    top = [[model.tokenizer.decode([t]) for t in row] for row in lens.top1[:, 0, span.start :].tolist()]
    top_k = [["top-3: " + text for text in row] for row in lens.top_k_text(model.tokenizer)]
    fig = lens_heatmap(
        lens.entropy[:, 0, span.start :], top, str_tokens, lens.layers, extra_hover=top_k,
        title=f"Logit lens over a hallucinated trace ({example['problem'].id}): entropy, top-1 in hover",
    )  # fmt: skip
    run.save_figure(
        fig, "lens_heatmap", caption="Logit-lens entropy by layer and token over one hallucinated trace."
    )

    groups, hover = {}, {}
    for label, name in LABELS.items():
        rows = [r["step_scores"] for r in kept if r["label"] == label]
        if rows:
            m, lo, hi, counts = mean_ci(rows, cfg.max_steps_plotted)
            groups[f"{name} (n={len(rows)})"] = (m, lo, hi)
            hover[f"{name} (n={len(rows)})"] = [f"traces with this step: {c}" for c in counts]
    x = list(range(1, cfg.max_steps_plotted + 1))
    fig = mean_ci_lines(x, groups, "reasoning step", f"Reasoning Score ({cfg.divergence.upper()}, nats)",
                        title="Reasoning Score by step: mean and 95% CI", hover=hover)  # fmt: skip
    run.save_figure(fig, "score_by_step", caption="Reasoning Score per step, correct vs hallucinated traces.")

    fig = histograms_by_group(
        {
            name: [r["features"]["fluctuation"] for r in kept if r["label"] == label]
            for label, name in LABELS.items()
        },
        "early-stage fluctuation (CV of the Reasoning Score)",
        title="Early-stage fluctuation by label",
    )
    run.save_figure(
        fig, "fluctuation_hist", caption="Coefficient of variation of early step scores, by label."
    )

    curves = {}
    for name in [
        "RHD (cross-validated)",
        "perplexity",
        "mean token entropy",
        "- self-certainty",
        "1 - P(True)",
    ]:
        if name in scores and not np.isnan(aurocs[name]):
            fpr, tpr = roc_curve(scores[name], labels)
            curves[name] = (fpr, tpr, aurocs[name])
    fig = roc_curves(
        curves, title=f"Hallucination detection on {model.name.split('/')[-1]} ({len(kept)} traces)"
    )
    run.save_figure(
        fig, "roc", caption="ROC of the RHD detector (cross-validated) against output-level baselines."
    )

    groups = {}
    for label, name in LABELS.items():
        rows = [r["conditional_entropy"] for r in kept if r["label"] == label]
        if rows:
            m, lo, hi, _ = mean_ci(rows, cfg.max_steps_plotted + 1)
            groups[f"{name} (n={len(rows)})"] = (m, lo, hi)
    fig = mean_ci_lines(list(range(cfg.max_steps_plotted + 1)), groups, "steps seen (k)",
                        "entropy of the gold answer (nats)",
                        title="Conditional entropy of the answer after k steps")  # fmt: skip
    run.save_figure(
        fig, "conditional_entropy", caption="Entropy of the teacher-forced gold answer after k steps."
    )

    results = {
        "traces": len(records), "analysed": len(kept), "hallucinated": int(labels.sum()),
        "correct": int((1 - labels).sum()), "folds": folds, "auroc": aurocs,
        "accuracy_by_dataset": {
            kind: float(np.mean([1 - r["label"] for r in records if r["problem"].kind == kind]))
            for kind in ("number", "text") if any(r["problem"].kind == kind for r in records)
        },
        "feature_means": {name: {f: float(np.nanmean([r["features"][f] for r in kept if r["label"] == label]))
                                 for f in [*FEATURES, "backtrack_attn"]} for label, name in LABELS.items()},
    }  # fmt: skip
    atomic_write_text(run.out_dir / "results.json", json.dumps(results, indent=1))
    for name, value in aurocs.items():
        print(f"AUROC {name}: {value:.3f}")
    return results


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main(parse_config(DepthConfig, description=__doc__))
