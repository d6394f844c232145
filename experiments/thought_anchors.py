"""Thought anchors: which sentences of a model's reasoning matter, by resampling, by receiver-head
attention and by attention suppression.

Reproduces the analyses of "Thought Anchors: Which LLM Reasoning Steps Matter?" on word problems
that the model solves 25-75% of the time (the paper's selection rule, measured by sampling). The
default model is the reasoning organism (`mechlens.organism`), whose decisive sentences (the plan,
a repairing check) are planted: the run measures how well each method ranks them first, against
random rankings. `--model base` keeps the plain embedded model (its step-by-step answer is the
trace); `--model PATH --device cuda --dtype bfloat16` runs a local reasoning model.

    python experiments/thought_anchors.py [--quick] [--model organism|base|PATH] [--backend nnsight]

Writes figures/anchors/: importance_by_sentence, importance_by_category, receiver_kurtosis,
receiver_head_matrix, suppression_matrix, method_correlations, planted_recovery and rollouts_curve
(organism) (HTML,
plus PNG/SVG with a Chromium) with provenance, and results.json. Rollouts are cached per trace and
position, so an interrupted run resumes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

import mechlens as ml
from mechlens import anchors, datasets
from mechlens.datasets import STEP_BY_STEP
from mechlens.ops.stats import format_rate
from mechlens.organism import held_out_problems, held_out_varied, load_subject
from mechlens.organism.traces import DECISIVE, label_roles
from mechlens.plots import (
    category_scatter,
    correlation_scatter,
    grouped_bars,
    head_heatmap,
    mean_ci_lines,
    sentence_heatmap,
)
from mechlens.rollouts import engine_for
from mechlens.rollouts.engines import sample_texts
from mechlens.runs import Run, parse_config
from mechlens.studies.recovery import paired_ranks, rank_recovery
from mechlens.text.thinking import format_prompt


@dataclass
class AnchorsConfig:
    model: str = "organism"  # the reasoning organism ("organism-v2": its second version); "base"; or a path
    backend: Literal["transformer_lens", "nnsight"] = "transformer_lens"
    device: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    n_candidates: int = 48  # problems whose solve rate is measured (organism: held-out 2-3 step
    # word problems; base: arithmetic levels 1-2, it solves almost no two-step problem)
    n_select: int = 8  # samples per problem for the solve rate (25-75% kept)
    problem_steps: str = "2,3"  # the organism's candidate problems: numbers of steps (comma-separated)
    closest_if_none: bool = False  # no problem in the 25-75% band: take the closest one solved at
    # least once (the quick run's few candidates), said in the output
    n_traces: int = 10  # traces analysed (one correct base solution per selected problem)
    min_sentences: int = 12
    long_trace: int = 15  # the methods' agreement is also reported on traces this long or longer
    strict_similarity: float = 0.95  # a second counterfactual KL in the planted-structure recovery
    pool_window: int = 2  # the pooled resampling importance and KL (ours): positions pooled per side
    base_control: bool = True  # organism: the receiver and suppression scores of the base model (no
    # adapter) on the identical texts, ranked beside the organism's (what the training added)
    n_rollouts: int = 100  # per sentence, the paper's number
    curve: str = "8,16,32,64,100"  # planted-structure recovery from the first n rollouts of each
    # sentence (a paired curve: the first n are the rollouts a run at n samples)
    engine: Literal["auto", "local", "shared-prefix"] = "auto"  # in-process sampling (`engine_for`):
    # "auto" is the shared-prefix engine on Llama-style models; attributions stay in --dtype
    sample_dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # the shared-prefix engine's dtype
    max_new_tokens: int = 288
    temperature: float = 0.6
    top_p: float = 0.95
    proximity: int = 4
    top_k: int = 20  # receiver heads
    alpha: float = 1.0  # answer-count smoothing: Laplace (the paper's code also names 1e-9, which with
    # 16 rollouts turns every unseen answer into a KL of ~20 nats)
    endpoint: str = ""  # comma-separated OpenAI-compatible base URLs to sample from (default: here)
    served_model: str = ""  # the model name those servers serve (the same weights as --model)
    quick: bool = False
    out: str = "figures/anchors"
    seed: int = 44

    def __post_init__(self):
        if (
            isinstance(self.pool_window, bool)
            or not isinstance(self.pool_window, int)
            or self.pool_window < 1
        ):
            raise ValueError(f"pool_window must be an int >= 1, got {self.pool_window!r}")
        if self.quick:
            self.n_candidates, self.n_select, self.n_traces, self.n_rollouts = 2, 4, 1, 3
            self.min_sentences, self.curve = 5, "2,3"
            self.top_k, self.proximity, self.problem_steps, self.closest_if_none = 10, 2, "2", True
            if self.model == "base":
                self.n_candidates, self.max_new_tokens = 12, 128  # short traces: a narrower band


def select_traces(run: Run, model, cfg: AnchorsConfig, engine) -> tuple[list, list[dict]]:
    """Sample every candidate problem `n_select` times; keep problems solved 25-75% of the time and,
    for each, the first correct sample with enough sentences as its base trace."""
    steps = tuple(int(k) for k in cfg.problem_steps.split(","))
    if cfg.model == "organism":
        problems = held_out_problems(cfg.n_candidates, seed=cfg.seed, steps=steps)
    elif cfg.model == "organism-v2":  # trained kinds in held-out wordings
        problems = held_out_varied(cfg.n_candidates, "held_out_templates", seed=cfg.seed, steps=steps)
    else:
        problems = datasets.load("arithmetic", n=cfg.n_candidates, seed=cfg.seed, levels=(1, 2))
    prompts = [p.question + STEP_BY_STEP for p in problems]
    sampling = ml.Sampling(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, n=cfg.n_select,
        seed=cfg.seed,
    )  # fmt: skip
    texts = run.cached(
        "selection samples",
        lambda: sample_texts(engine, model, [format_prompt(model.tokenizer, p) for p in prompts], sampling),
        config=False, prompts=prompts, sampling=sampling, engine=engine.describe(),
    )  # fmt: skip
    chosen, rates, candidates = [], [], []
    for k, problem in enumerate(problems):
        samples = texts[k * cfg.n_select : (k + 1) * cfg.n_select]
        grades = [problem.grade(t) for t in samples]
        correct = [g.correct and g.marked for g in grades]  # an explicit "Answer: ..." that is right
        rate = float(np.mean(correct))
        rates.append({"id": problem.id, "level": problem.level, "solve_rate": rate})
        for text, ok in zip(samples, correct, strict=True):
            if ok and text.strip():
                trace = ml.ReasoningTrace.from_text(model, prompts[k], text)
                if len(trace.sentences) >= cfg.min_sentences:
                    candidates.append((abs(rate - 0.5), k, problem, trace))
                    if 0.25 <= rate <= 0.75 and len(chosen) < cfg.n_traces:
                        chosen.append((problem, trace))
                    break
    if not chosen and cfg.closest_if_none and candidates:
        chosen = [(p, t) for _, _, p, t in sorted(candidates, key=lambda c: c[:2])[: cfg.n_traces]]
        rates_text = ", ".join(f"{r['id']} {r['solve_rate']:.2f}" for r in rates)
        print(f"no problem solved 25-75% of {cfg.n_select} samples ({rates_text}): took the closest one(s) "
              "solved at least once")  # fmt: skip
    if not chosen:
        raise RuntimeError(f"no problem solved 25-75% with a long enough correct trace: {rates}")
    return chosen, rates


def main(cfg: AnchorsConfig) -> dict:
    model = load_subject(cfg.model, cfg.backend, cfg.device, cfg.dtype)
    run = Run("thought_anchors", cfg, cfg.out, model=model, seed=cfg.seed, images=not cfg.quick)
    engine = engine_for(model, cfg.endpoint, cfg.served_model, local=cfg.engine, dtype=cfg.sample_dtype)
    chosen, rates = select_traces(run, model, cfg, engine)
    in_range = sum(0.25 <= r["solve_rate"] <= 0.75 for r in rates)
    print(f"{len(chosen)} trace(s) chosen; {in_range} of {len(rates)} problems solved 25-75% of the time")

    sampling = anchors.ANCHORS_SAMPLING.replace(
        n=cfg.n_rollouts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
        seed=cfg.seed,
    )  # fmt: skip
    forced = anchors.FORCED_SAMPLING.replace(n=cfg.n_rollouts, seed=cfg.seed)
    per_trace = [
        anchors.analyze(
            model, trace, problem, sampling, forced, cfg.proximity, cfg.alpha, cache=run.cache, engine=engine
        )
        for problem, trace in tqdm(chosen, desc="traces")
    ]
    kurt, heads = anchors.assign_receivers(per_trace, cfg.top_k)  # receiver heads: kurtosis over traces
    correlations = anchors.method_correlations(per_trace)
    rho = correlations["pooled"]
    categories = [c for t in per_trace for c in t.categories]
    hover = [
        f"trace {k} · sentence {i}: {s}" for k, t in enumerate(per_trace) for i, s in enumerate(t.sentences)
    ]
    vectors = {
        name: np.concatenate([getattr(t, attr) for t in per_trace]) for name, attr in anchors.METHODS.items()
    }
    matrix_rho = anchors.spearman(
        np.concatenate([anchors.lower_triangle(t.suppression.numpy()) for t in per_trace]),
        np.concatenate([anchors.lower_triangle(t.resampling_matrix) for t in per_trace]),
    )
    # the authors' sparse KL and token ranges against our exact KL, on every trace
    theirs = [
        anchors.analyze(model, t.trace, proximity=cfg.proximity, cache=run.cache, kl="authors").suppression
        for t in per_trace
    ]
    kl_rho = anchors.spearman(
        np.concatenate([anchors.lower_triangle(m.numpy()) for m in theirs]),
        np.concatenate([anchors.lower_triangle(t.suppression.numpy()) for t in per_trace]),
    )
    by_category = anchors.category_means(vectors["counterfactual KL"], categories)
    resampling_kl = np.concatenate([t.resampling.resampling_kl for t in per_trace])  # no similarity filter
    by_category_resampling = anchors.category_means(resampling_kl, categories)

    # ---- figures
    x = [i / max(len(t.sentences) - 1, 1) for t in per_trace for i in range(len(t.sentences))]
    defined = int(np.isfinite(vectors["counterfactual KL"]).sum())
    # said on the figure's face when most values are undefined, so that few points are not misread
    undefined_note = (
        f"<br><sup>defined for {defined} of {len(categories)} sentences: elsewhere no resampled sentence "
        "differs from the original (similarity filter, cosine < 0.8)</sup>"
        if defined < len(categories) / 2
        else ""
    )
    fig = category_scatter(
        x, vectors["counterfactual KL"], categories, hover,
        "position in the trace (0 = first sentence, 1 = last)", "counterfactual importance (KL)",
        title=f"Counterfactual importance per sentence ({len(per_trace)} trace(s), n={cfg.n_rollouts})"
        + undefined_note,
    )  # fmt: skip
    run.save_figure(
        fig, "importance_by_sentence", caption="Counterfactual importance of each sentence, by category."
    )
    cats = sorted(by_category, key=lambda c: -by_category[c][0])
    fig = grouped_bars(
        cats,
        {"counterfactual KL": [by_category[c][0] for c in cats]},
        "mean counterfactual importance (KL)",
        title="Counterfactual importance by sentence category (mean ± SE)" + undefined_note,
        counts={"counterfactual KL": [f"n={by_category[c][2]}" for c in cats]},
        errors={"counterfactual KL": [np.nan_to_num(by_category[c][1]) for c in cats]},
    )
    run.save_figure(
        fig, "importance_by_category", caption="Mean counterfactual importance per category, ± SE."
    )
    fig = head_heatmap(
        kurt, "kurtosis of vertical scores", title=f"Receiver-headness (top {len(heads)} boxed)", marked=heads
    )
    run.save_figure(
        fig, "receiver_kurtosis", caption="Mean kurtosis of each head's vertical attention scores."
    )
    layer, head = heads[0]
    first = per_trace[0]
    fig = sentence_heatmap(
        first.attention[layer, head], first.sentences, "mean attention",
        title=f"Sentence attention of the top receiver head L{layer}H{head} (trace 0)",
    )  # fmt: skip
    run.save_figure(
        fig, "receiver_head_matrix", caption="Sentence x sentence attention of the top receiver head."
    )
    fig = sentence_heatmap(
        first.suppression, first.sentences, "log KL",
        title="Attention suppression: effect of each sentence (column) on later ones (row), trace 0",
    )  # fmt: skip
    run.save_figure(
        fig, "suppression_matrix", caption="Mean log-KL on each sentence when one earlier is suppressed."
    )
    fig = correlation_scatter(
        vectors, categories, hover, title="Three attributions per sentence",
        rho={tuple(k.split(" ~ ")): v[0] for k, v in rho.items()},
    )  # fmt: skip
    run.save_figure(fig, "method_correlations", caption="Per-sentence agreement of the three methods.")

    # agreement of the three methods on long traces only (receiver heads need many sentences)
    long = [t for t in per_trace if len(t.sentences) >= cfg.long_trace]
    rho_long = anchors.method_correlations(long)["pooled"] if long else {}
    recovery = None
    if cfg.model in ("organism", "organism-v2"):
        base = base_control(run, per_trace, cfg) if cfg.base_control else {}
        recovery = planted_recovery(run, per_trace, cfg, base)

    results = {
        "sampling_engine": engine.describe(),
        "model": cfg.model,
        "planted_recovery": recovery,
        "spearman_long_traces": {
            "n_traces": len(long),
            "min_sentences": cfg.long_trace,
            **{k: {"rho": v[0], "n": v[1]} for k, v in rho_long.items()},
        },  # fmt: skip
        "selection": {"candidates": rates, "traces": [t.problem.id for t in per_trace]},
        "receiver_heads": heads,
        "spearman_pooled": {k: v[0] for k, v in rho.items()},
        "spearman_per_trace": correlations["per_trace"],
        "suppression_vs_resampling_matrix": {"spearman": matrix_rho[0], "pairs": matrix_rho[1]},
        "suppression_authors_kl_vs_full": {"spearman": kl_rho[0], "pairs": kl_rho[1]},
        "counterfactual_kl_by_category": {
            c: {"mean": m, "se": s, "n": n} for c, (m, s, n) in by_category.items()
        },
        "resampling_kl_by_category": {
            c: {"mean": m, "se": s, "n": n} for c, (m, s, n) in by_category_resampling.items()
        },
        "counterfactual_kl_defined": {
            "finite": int(np.isfinite(vectors["counterfactual KL"]).sum()),
            "sentences": len(categories),
        },  # fmt: skip
        "traces": [
            {
                "problem": t.problem.id,
                "question": t.problem.question,
                "answer": t.problem.answer,
                "response": t.trace.response,
                "forced_importance": t.forced.importance.tolist(),
                "sentences": [
                    {**row, "category": c, "receiver_score": float(r), "suppression_effect": float(o)}
                    for row, c, r, o in zip(
                        t.resampling.table(), t.categories, t.receiver, t.outgoing, strict=True
                    )
                ],
            }
            for t in per_trace
        ],
    }
    run.save_json("results.json", results)
    defined = results["counterfactual_kl_defined"]
    lines = [
        f"{len(per_trace)} trace(s), {len(categories)} sentences, {cfg.n_rollouts} rollouts per sentence",
        f"counterfactual importance defined on {defined['finite']} of {defined['sentences']} sentences",
        *[
            f"Spearman, {k}: "
            + (f"{v[0]:.2f}" if np.isfinite(v[0]) else "undefined")
            + f" (n = {v[1]} sentences)"
            for k, v in rho.items()
        ],
    ]
    if recovery:
        for name, r in recovery["by_method"].items():
            if not r["n_traces"]:
                lines.append(f"planted sentence, {name}: undefined (not scored in any of the traces)")
                continue
            low, high = r["mean_rank_ci"]
            line = (
                f"planted sentence, {name}: mean rank {r['mean_rank']:.2f} (95% CI {low:.2f}-{high:.2f}; "
                f"random {r['random_mean_rank']:.2f}), "
                f"top 3 in {format_rate(r['top_k_hits'], r['n_top_k_traces'])} traces"
                f" ({r['n_undefined_traces']} undefined)"
            )
            if "vs_length" in r:
                v = r["vs_length"]
                line += f"; vs length: better {v['better']}, tied {v['tied']}, worse {v['worse']} of {v['n']}"
            if "vs_decoys" in r:
                v = r["vs_decoys"]
                line += f"; vs decoys: better {v['better']}, tied {v['tied']}, worse {v['worse']} of {v['n']}"
            if "vs_base" in r:
                v = r["vs_base"]
                line += (
                    f"; vs the base model: better {v['better']}, tied {v['tied']}, worse {v['worse']} "
                    f"of {v['n']}"
                )
            lines.append(line)
    run.summarize("Thought anchors", lines)
    return results


def resampling_scores(
    per_trace: list, strict: float, window: int, n: int | None = None, seed: int = 0
) -> dict[str, list]:
    """The sampling-based attributions per trace, from the first `n` rollouts (default: all):
    the paper's counterfactual KL and its accuracy form, the resampling importance (accuracy
    difference) and KL without the similarity filter, the same KL less its permutation null's mean
    (ours: the estimator's small-sample bias removed), the importance and KL from `window`
    positions pooled on each side (ours: `Resampling.pooled_importance`), counterfactual KL with
    the stricter filter (ours: a decisive plan's alternatives differ from it in one word, which
    cosine 0.8 calls similar), and forced-answer importance."""
    res = [t.resampling if n is None else t.resampling.first(n) for t in per_trace]
    out = {
        "counterfactual KL": [r.counterfactual_kl for r in res],
        "counterfactual accuracy": [r.counterfactual_accuracy for r in res],
        "resampling importance": [r.resampling_importance for r in res],
        "resampling KL (no filter)": [r.resampling_kl for r in res],
        "resampling KL, bias-corrected": [r.resampling_kl_excess(seed=seed) for r in res],
        f"resampling importance, pooled ({window} positions)": [r.pooled_importance(window) for r in res],
        f"resampling KL, pooled ({window} positions)": [r.pooled_kl(window) for r in res],
        f"counterfactual KL, cosine < {strict}": [
            replace(r, threshold=strict).counterfactual_kl for r in res
        ],
    }
    if all(t.forced is not None for t in per_trace):
        out["forced-answer importance"] = [
            (t.forced if n is None else t.forced.first(n)).importance for t in per_trace
        ]
    return out


CURVE_FIELDS = (
    "mean_rank",
    "mean_rank_ci",
    "top_k_hits",
    "n_top_k_traces",
    "top_k_rate",
    "top_k_ci",
    "n_traces",
    "n_undefined_traces",
    "n_nan",
    "random_mean_rank",
    "random_top_k_rate",
)
"""The `rank_recovery` fields the rollouts-per-sentence curve keeps at each n."""


def rollout_curve(per_trace: list, planted: list, cfg: AnchorsConfig) -> dict:
    """Planted-structure recovery of each sampling-based attribution from the first n rollouts of
    every sentence, n in `cfg.curve` (at most `n_rollouts`)."""
    ns = [n for n in (int(k) for k in cfg.curve.split(",")) if n <= cfg.n_rollouts]
    curve: dict[str, dict] = {}
    for n in ns:
        for name, v in resampling_scores(
            per_trace, cfg.strict_similarity, cfg.pool_window, n, cfg.seed
        ).items():
            r = rank_recovery(v, planted, k=3, seed=cfg.seed)
            curve.setdefault(name, {})[n] = {key: r[key] for key in CURVE_FIELDS}
    return curve


MONTE_CARLO_TOP3 = {8: 0.44, 32: 0.70, 64: 0.83, 100: 0.91}
"""P(the plan ranks in the top 3) by accuracy difference, from a Monte Carlo of the planted
generator at n rollouts per sentence (the issue's prediction; by answer KL: 0.42, 0.75, 0.92, 0.99)."""


LENGTH = "baseline: sentence length"
"""The baseline that ranks a trace's sentences by their length in characters."""


def base_control(run: Run, per_trace: list, cfg: AnchorsConfig) -> dict[str, list]:
    """The receiver score (with the base model's own receiver heads) and the suppression effect of
    the base model, without the organism's adapter, on the identical traces: a method is credited
    with what the organism learned only where it ranks the planted sentence above this."""
    base = load_subject("base", cfg.backend, cfg.device, cfg.dtype)
    same_text = [
        anchors.analyze(base, t.trace, proximity=cfg.proximity, cache=run.cache, progress=False)
        for t in tqdm(per_trace, desc="base model, same texts")
    ]
    anchors.assign_receivers(same_text, cfg.top_k)
    return {
        "receiver score, base model (same text)": [a.receiver for a in same_text],
        "suppression effect, base model (same text)": [a.outgoing for a in same_text],
    }


def planted_recovery(run: Run, per_trace: list, cfg: AnchorsConfig, controls: dict[str, list]) -> dict:
    """How each method ranks the organism's planted decisive sentences (plan, repairing check),
    read back from each trace's text, against seeded random rankings, beside the `controls` (the
    same scores from the base model) and two baselines; and a figure."""
    planted = [[k for k, r in enumerate(label_roles(t.sentences)) if r in DECISIVE] for t in per_trace]
    scores = {name: [getattr(t, attr) for t in per_trace] for name, attr in anchors.METHODS.items()}
    # beside the paper's three: resampling importance without the similarity filter (the paper's
    # "resampling importance", as a KL), and counterfactual KL with a stricter filter (ours): a
    # decisive plan's alternatives differ from it in one word, which cosine 0.8 calls "similar"
    scores.update(resampling_scores(per_trace, cfg.strict_similarity, cfg.pool_window, seed=cfg.seed))
    scores.update(controls)
    # baselines that read no model internals: a method is credited only for beating them
    scores[LENGTH] = [[float(len(s)) for s in t.sentences] for t in per_trace]
    scores["baseline: position (earlier first)"] = [
        [-float(i) for i in range(len(t.sentences))] for t in per_trace
    ]
    out = {name: rank_recovery(v, planted, k=3, seed=cfg.seed) for name, v in scores.items()}
    # organism-v2 plants decoys (the operands listed, "I will ..." deciding nothing): a method is
    # credited only where it ranks the decisive sentences above the decoys of the same trace
    decoys = [[k for k, r in enumerate(label_roles(t.sentences)) if r == "decoy"] for t in per_trace]
    for name, r in out.items():
        if any(decoys):
            r["vs_decoys"] = paired_ranks(r, rank_recovery(scores[name], decoys, k=3, seed=cfg.seed))
        if not name.startswith("baseline"):
            r["vs_length"] = paired_ranks(r, out[LENGTH])
        if f"{name}, base model (same text)" in out:
            r["vs_base"] = paired_ranks(r, out[f"{name}, base model (same text)"])
    names = list(out)
    fig = grouped_bars(
        names,
        {
            "method": [out[n]["top_k_rate"] for n in names],
            "random rankings": [out[n]["random_top_k_rate"] for n in names],
        },
        "share of traces with a planted decisive sentence in the top 3",
        title=f"Planted decisive sentences (plan, repairing check) recovered: {len(per_trace)} traces",
        counts={"method": [f"{out[n]['top_k_hits']}/{out[n]['n_top_k_traces']}" for n in names],
                "random rankings": [f"{out[n]['draws']} draws" for n in names]},
        intervals={"method": [tuple(out[n]["top_k_ci"]) for n in names],
                   "random rankings": [tuple(out[n]["random_top_k_range"]) for n in names]},
    )  # fmt: skip
    run.save_figure(
        fig, "planted_recovery", caption="Top-3 hit rate of planted decisive sentences vs random."
    )
    curve = rollout_curve(per_trace, planted, cfg)
    for name, rows in curve.items():
        cells = [f"n={n}: rank {r['mean_rank']:.2f}, top-3 {r['top_k_hits']}/{r['n_top_k_traces']}"
                 if r["n_traces"] else f"n={n}: undefined" for n, r in rows.items()]  # fmt: skip
        print(f"rollouts curve, {name}: " + ", ".join(cells))
    ns = sorted({n for rows in curve.values() for n in rows})
    lines = {}
    pooled = f"resampling importance, pooled ({cfg.pool_window} positions)"
    for name in ("counterfactual KL", "resampling importance", pooled, "forced-answer importance"):
        if name in curve:
            rate = [curve[name][n]["top_k_rate"] for n in ns]
            low, high = ([curve[name][n]["top_k_ci"][i] for n in ns] for i in (0, 1))
            lines[name] = (rate, low, high)
    prediction = [MONTE_CARLO_TOP3.get(n, np.nan) for n in ns]
    lines["Monte Carlo prediction (accuracy difference)"] = (prediction, prediction, prediction)
    fig = mean_ci_lines(
        ns, lines, "rollouts per sentence", "share of traces with a planted sentence in the top 3",
        title=f"Recovery against rollouts per sentence ({len(per_trace)} traces, first n of "
        f"{cfg.n_rollouts})",
    )  # fmt: skip
    run.save_figure(fig, "rollouts_curve", caption="Top-3 recovery from the first n rollouts per sentence.")
    return {"by_method": out, "rollouts_curve": curve}


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main(parse_config(AnchorsConfig, description=__doc__))
