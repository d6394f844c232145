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

import random
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

import mechlens as ml
from mechlens import datasets
from mechlens.datasets import STEP_BY_STEP
from mechlens.depth import FEATURES, analyze_trace, cross_validated_scores
from mechlens.metrics import auroc, roc_curve
from mechlens.plots import histograms_by_group, lens_heatmap, mean_ci_lines, roc_curves
from mechlens.runs import Run, parse_config, write_json
from mechlens.signals import conditional_entropy_per_step, dynamic_instability, p_true
from mechlens.trace import format_prompt

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
    subset: str = "factual"  # traces compared by label in the figures: "factual" or "all"
    quick: bool = False
    out: str = "figures/depth"
    seed: int = 0

    def __post_init__(self):
        if self.quick:
            self.n_arithmetic, self.n_factual, self.max_new_tokens = 4, 12, 112
            self.subset = "all"
        if self.subset not in SUBSET_TITLES:
            raise ValueError(f"subset must be one of {list(SUBSET_TITLES)}, got {self.subset!r}")


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
        prompts = [format_prompt(model.tokenizer, p.question + STEP_BY_STEP) for p in chunk]
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


SUBSET_TITLES = {"all": "all traces", "factual": "factual questions"}
ROC_CURVES = ("RHD detector", "perplexity", "mean token entropy", "self-certainty", "P(True)")
# each signal with the direction that should mean "hallucinated" (+1: higher is more suspicious)
SIGNALS = {
    "perplexity": ("perplexity", +1), "mean token entropy": ("mean_entropy", +1),
    "self-certainty": ("self_certainty", -1), "P(True)": ("p_true", -1),
    "instability peak": ("instability_peak", +1),
    "feature: mean_score": ("mean_score", -1),  # low = shallow reasoning
    **{f"feature: {f}": (f, +1) for f in FEATURES[1:]},
}  # fmt: skip


def subsets(kept: list[dict]) -> dict[str, list[dict]]:
    """All analysed traces, and the factual ones alone (arithmetic answers are almost all wrong
    on a small model, so over all traces the label is confounded with the dataset)."""
    return {"all": kept, "factual": [r for r in kept if r["problem"].kind == "text"]}


def evaluate(rows: list[dict], cfg: DepthConfig) -> dict[str, dict]:
    """AUROC of the RHD detector and of each signal, "hallucinated" the positive class.

    a_priori: the signal in its expected direction (e.g. high perplexity = suspicious);
    cross_validated: out-of-fold scores of a logistic regression on the signal (its direction
    learned), the same protocol as the detector.
    """
    labels = np.array([r["label"] for r in rows])
    if len(set(labels.tolist())) < 2:
        return {}
    folds = min(cfg.folds, int(labels.sum()), int((1 - labels).sum()))  # < 2: no cross-validation
    out = {}
    if folds >= 2:
        rhd = cross_validated_scores([r["features"] for r in rows], labels, folds=folds, seed=cfg.seed)
        out["RHD detector"] = {"auroc_a_priori": float("nan"), "auroc_cross_validated": auroc(rhd, labels),
                               "scores": rhd}  # fmt: skip
    for name, (key, sign) in SIGNALS.items():
        values = [{key: (r["features"] if key in FEATURES else r)[key]} for r in rows]
        prior = sign * np.array([v[key] for v in values])
        if np.isnan(prior).any():
            continue
        result = {"auroc_a_priori": auroc(prior, labels), "auroc_cross_validated": np.nan, "scores": prior}
        if folds >= 2:
            cv = cross_validated_scores(values, labels, folds=folds, seed=cfg.seed, features=(key,))
            result.update(auroc_cross_validated=auroc(cv, labels), scores=cv)
        out[name] = result
    return out


def _nanmean(values: list[float]) -> float | None:
    finite = [v for v in values if not np.isnan(v)]
    return float(np.mean(finite)) if finite else None


def main(cfg: DepthConfig) -> dict:
    model = ml.load_model(cfg.model, backend=cfg.backend)
    run = Run("depth_scoring", cfg, cfg.out, model=model, seed=cfg.seed)
    problems = load_problems(cfg)
    responses = generate_responses(model, run, cfg, problems)

    records = []
    for problem, response in tqdm(list(zip(problems, responses, strict=True)), desc="analyse traces"):
        if not response.strip():
            continue
        trace = ml.ReasoningTrace.from_text(model, problem.question + STEP_BY_STEP, response)
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

    # ---- detector vs baselines, on every analysed trace and on the chosen subset
    by_subset = subsets(kept)
    evaluation = {name: evaluate(rows, cfg) for name, rows in by_subset.items()}
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
        lens.entropy[:, 0, span.start :], top, str_tokens, lens.layers, extra_hover=top_k,
        title=f"Logit lens over a hallucinated trace ({example['problem'].id}): entropy; hover: top-1, top-3",
    )  # fmt: skip
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
    fig = mean_ci_lines(x, groups, "reasoning step", f"Reasoning Score ({cfg.divergence.upper()}, nats)",
                        title=f"Reasoning Score by step, {SUBSET_TITLES[cfg.subset]}: mean and 95% CI",
                        hover=hover)  # fmt: skip
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
    fig = mean_ci_lines(list(range(cfg.max_steps_plotted + 1)), groups, "steps seen (k)",
                        "entropy of the gold answer (nats)", title=title)  # fmt: skip
    run.save_figure(
        fig, "conditional_entropy", caption="Entropy of the teacher-forced gold answer after k steps."
    )

    results = {
        "traces": len(records), "analysed": len(kept), "subset_shown": cfg.subset,
        "labels": {name: {"hallucinated": int(sum(r["label"] for r in rows)),
                          "correct": int(sum(1 - r["label"] for r in rows))}
                   for name, rows in by_subset.items()},
        "accuracy_by_dataset": {
            kind: float(np.mean([1 - r["label"] for r in records if r["problem"].kind == kind]))
            for kind in ("number", "text") if any(r["problem"].kind == kind for r in records)
        },
        "auroc": {subset: {name: {k: v for k, v in res.items() if k != "scores"} for name, res in ev.items()}
                  for subset, ev in evaluation.items()},
        "feature_means": {name: {f: _nanmean([r["features"][f] for r in shown if r["label"] == label])
                                 for f in [*FEATURES, "backtrack_attn"]} for label, name in LABELS.items()},
    }  # fmt: skip
    write_json(run.out_dir / "results.json", results)
    for subset, ev in evaluation.items():
        for name, res in ev.items():
            print(f"AUROC [{subset}] {name}: a priori {res['auroc_a_priori']:.3f}, "
                  f"cross-validated {res['auroc_cross_validated']:.3f}")  # fmt: skip
    return results


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main(parse_config(DepthConfig, description=__doc__))
