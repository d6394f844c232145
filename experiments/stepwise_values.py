"""Stepwise values (GLoRe's SORMs): V_k, the share of rollouts from each step's prefix that reach
the right answer (the thought-anchors resampling's accuracy, `mechlens.anchors.resample`), SORM
and ORM value probes on the hidden state at each step's end, held out by trace
(`mechlens.stepwise.analyze`), and how well the first step below 0.5 finds the organism's
planted uncorrected slip, against a position-matched null.

    python experiments/stepwise_values.py [--quick] [--model organism|base|PATH] [--rollouts 16]

Writes figures/stepwise/ (each figure with provenance), results.json and summary.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from mechlens.ops.stats import mean_ci
from mechlens.organism import held_out_problems, load_subject
from mechlens.organism.traces import label_roles
from mechlens.plots import grouped_bars, mean_ci_lines
from mechlens.rollouts import LocalEngine
from mechlens.rollouts.engines import sample_texts
from mechlens.runs import Run, parse_config
from mechlens.studies import anchors, stepwise
from mechlens.text import ReasoningTrace, format_prompt


@dataclass
class StepwiseConfig:
    model: str = "organism"  # the reasoning organism; "base": the plain embedded model; or a path
    backend: Literal["transformer_lens", "nnsight"] = "transformer_lens"
    n_candidates: int = 40  # held-out 2-3 step word problems sampled once each (T = 0.6)
    n_traces: int = 12  # traces resampled: those with an uncorrected planted slip first
    rollouts: int = 16  # per position (the thought-anchors default here; the paper: 100)
    max_new_tokens: int = 256
    threshold: float = 0.5
    quick: bool = False
    out: str = "figures/stepwise"
    seed: int = 0

    def __post_init__(self):
        if self.quick:
            self.n_candidates, self.n_traces, self.rollouts, self.max_new_tokens = 8, 3, 4, 160


def planted_slip(sentences: list[str]) -> int | None:
    """The first slip the organism did not correct in the next sentence (None: none)."""
    roles = label_roles(sentences)
    for k, role in enumerate(roles):
        if role == "slip" and (k + 1 == len(roles) or roles[k + 1] != "backtrack"):
            return k
    return None


def aligned_band(rows: list[np.ndarray], at: list[int], offsets: range) -> tuple[np.ndarray, ...]:
    """`(mean, low, high)` of `rows[i][at[i] + o]` for each offset `o`, over the rows that have
    that step (`mean_ci`; NaN where none does)."""
    band = []
    for o in offsets:
        values = [[float(r[k + o])] for r, k in zip(rows, at, strict=True) if 0 <= k + o < len(r)]
        band.append([x[0] for x in mean_ci(values, 1)[:3]] if values else [np.nan] * 3)
    return tuple(np.array(column) for column in zip(*band, strict=True))


def main(cfg: StepwiseConfig) -> dict:
    model = load_subject(cfg.model, cfg.backend)
    run = Run("stepwise_values", cfg, cfg.out, model=model, seed=cfg.seed, images=not cfg.quick)
    sampling = anchors.ANCHORS_SAMPLING.replace(n=1, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    problems = held_out_problems(cfg.n_candidates, seed=cfg.seed, steps=(2, 3))
    prompts = [format_prompt(model.tokenizer, p.question) for p in problems]
    texts = run.cached("traces", lambda: sample_texts(LocalEngine(model), model, prompts, sampling))
    candidates = []
    for p, text in zip(problems, texts, strict=True):
        trace = ReasoningTrace.from_text(model, p.question, text)
        if len(trace.sentences) >= 4:
            candidates.append((planted_slip([s.text for s in trace.sentences]) is None, p, trace))
    chosen = sorted(candidates, key=lambda c: c[0])[: cfg.n_traces]  # planted slips first (stable)
    if len(chosen) < 2:
        raise SystemExit(f"only {len(chosen)} traces with 4 or more sentences: sample more candidates")
    rollout = anchors.ANCHORS_SAMPLING.replace(n=cfg.rollouts, max_new_tokens=cfg.max_new_tokens)
    accuracies, correct, planted = [], [], []
    for _, p, trace in chosen:
        res = anchors.resample(model, trace, p, rollout, cache=run.cache)
        accuracies.append(res.accuracy)
        correct.append(p.grade(trace.response).correct)
        planted.append(planted_slip([s.text for s in trace.sentences]))
    traces = [t for _, _, t in chosen]
    study = stepwise.analyze(model, traces, accuracies, correct, planted, threshold=cfg.threshold)
    with_slip = [i for i, k in enumerate(planted) if k is not None]
    x, at = range(-3, 4), [int(planted[i]) for i in with_slip]  # type: ignore[arg-type]
    named = {"rollout values": study.values, "SORM probe": study.sorm, "ORM probe": study.orm}
    bands = {
        f"{k} (n={len(at)})": aligned_band([v[i] for i in with_slip], at, x) for k, v in named.items() if at
    }
    fig = mean_ci_lines(
        list(x), bands, "step relative to the planted uncorrected slip", "value V (share of rollouts right)",
        title="Stepwise values around the planted slip",
    )  # fmt: skip
    run.save_figure(fig, "values_at_slip", caption="V, SORM and ORM predictions aligned at the planted slip.")
    rec = study.recovery(seed=cfg.seed)
    if rec:
        hits, null = [r["hits"] for r in rec.values()], [r["null_mean"] for r in rec.values()]
        fig = grouped_bars(
            list(rec),
            {"hits": hits, "position-matched null (mean)": null},
            f"traces whose first step below {cfg.threshold} is the slip",
            title="Error localisation against the planted slip",
            counts={
                "hits": [f"{r['hits']}/{r['n']}" for r in rec.values()],
                "position-matched null (mean)": [f"p = {r['p']:.2g}" for r in rec.values()],
            },
        )
        run.save_figure(fig, "localisation", caption="Localised steps on the planted slip, beside the null.")
    results = {
        "values": [v.tolist() for v in study.values],
        "sorm": [v.tolist() for v in study.sorm],
        "orm": [v.tolist() for v in study.orm],
        "correct": correct,
        "planted": planted,
        "recovery": rec,
        "layer": study.layer,
    }
    run.save_json("results.json", results)
    lines = [
        f"{len(traces)} traces resampled at {cfg.rollouts} rollouts per step, {len(with_slip)} with a slip"
    ]
    run.summarize("Stepwise values", lines + study.summary_lines())
    return results


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main(parse_config(StepwiseConfig, description=__doc__))
