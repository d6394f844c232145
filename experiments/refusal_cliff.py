"""Refusal cliffs ("Refusal Falls off a Cliff"): a refusal probe, its score at every position of the
reasoning trace, cliff sizes, refusal-suppression heads and Cliff-as-a-Judge, by
`mechlens.refusal.analyze`. The default model is the reasoning organism, which in a planted share
of harmful traces rationalises right before `</think>` and complies: the run checks whether the
probe's drop sits at that sentence. `--organism blocks|adapter`: the older refusal organism;
`--model PATH --device cuda --dtype bfloat16`: a local reasoning model.

    python experiments/refusal_cliff.py [--quick] [--model PATH]
        [--organism reasoning|reasoning-v2|reasoning-v2-heads|blocks|adapter]

`--organism reasoning-v2-heads` is the second version with refusal-suppression heads planted
(`SUPPRESSION_RECIPE`): the run also ablates the planted heads and scores every head ranking
against them (`heads.known` in results.json).

Writes figures/refusal/ (each figure with provenance), results.json and summary.json; every
expensive step is cached, so a run resumes.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch

from mechlens import HookedModel
from mechlens.ops.stats import format_estimate, format_rate, mean_ci
from mechlens.organism import (
    ADAPTER_RECIPE,
    REASONING,
    REASONING_RECIPE,
    REASONING_V2_RECIPE,
    REFUSAL,
    SUPPRESSION,
    SUPPRESSION_RECIPE,
    OrganismRecipe,
    load_subject,
    reasoning,
    refusal_organism,
)
from mechlens.plots import control_strip, head_heatmap, histograms_by_group, mean_ci_lines
from mechlens.runs import Run, parse_config
from mechlens.studies import refusal
from mechlens.studies.refusal import GROUPS, REPLY_SAMPLING, JudgeSettings, RefusalStudy
from mechlens.studies.refusal.cliffs import end_aligned_mean_ci


@dataclass
class RefusalConfig:
    backend: Literal["transformer_lens", "nnsight"] = "transformer_lens"
    n_probe: int = 60  # train-split instructions per class whose rollouts label the probe
    n_test: int = 40  # test-split instructions per class (and as many jailbreak-wrapped harmful ones)
    n_candidates: int = 120  # jailbreak-wrapped train-split harmful prompts: the Cliff-as-a-Judge pool
    max_new_tokens: int = 96  # the reasoning organism thinks for ~70 tokens before answering
    temperature: float = 0.7  # the authors' (scripts/generation/*/inference.sh: 0.7, top-p 1); 0: greedy
    batch_size: int = 16
    k_end: int = 5  # tokens at the end of the thinking that the cliff and the head metric read
    sweep_examples: int = 6  # complied traces in the head scores
    head_fraction: float = 0.03
    head_ranking: Literal["direct", "exact", "attribution"] = "direct"  # the authors': direct score
    rescale: Literal["norm", "none"] = "norm"  # the authors' ablation keeps the attention output's norm
    random_sets: int = 20  # random head sets of the same size: the control distribution
    control_sets: str = "jailbreak"  # the sets (comma-separated) each random head set is sampled on
    judge_fraction: float = 0.25
    judge_epochs: int = 3
    judge_draws: int = 5  # fine-tunes per selection (seeds; the random selection redrawn): a distribution
    # the reasoning organism; the refusal organism: 8 blocks tuned here (~12 min) or its shipped adapter
    organism: Literal["reasoning", "reasoning-v2", "reasoning-v2-heads", "blocks", "adapter"] = "reasoning"
    model: str = ""  # a model path (or "base") instead of an organism
    device: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    organism_examples: int | None = None  # per class; None = the organism recipe's whole train split
    organism_epochs: int = 3
    quick: bool = False
    out: str = "figures/refusal"
    seed: int = 0

    def __post_init__(self):
        if self.quick:
            # smaller block organisms did not refuse (0/8) or refused everything: the shipped adapter
            self.organism = "adapter" if self.organism == "blocks" else self.organism
            self.n_probe, self.n_test, self.n_candidates, self.sweep_examples = 12, 8, 8, 1
            self.random_sets, self.max_new_tokens, self.judge_draws = 5, 80, 1  # minutes


def load_organism(cfg: RefusalConfig):
    """`(model, folder Cliff-as-a-Judge fine-tunes from, recipe or None for a model by path)`."""
    if cfg.model:
        model = load_subject(cfg.model, cfg.backend, cfg.device, cfg.dtype)
        return model, cfg.model if cfg.model != "base" else None, None
    if cfg.organism in ("reasoning", "reasoning-v2"):
        recipe = REASONING_RECIPE if cfg.organism == "reasoning" else REASONING_V2_RECIPE
        model = load_subject("organism" if cfg.organism == "reasoning" else "organism-v2", cfg.backend,
                             cfg.device, cfg.dtype)  # fmt: skip
        return model, REASONING.path(recipe), recipe
    if cfg.organism == "reasoning-v2-heads":
        model = load_subject("organism-v2-heads", cfg.backend, cfg.device, cfg.dtype)
        return model, SUPPRESSION.path(SUPPRESSION_RECIPE), SUPPRESSION_RECIPE
    shape = asdict(ADAPTER_RECIPE) if cfg.organism == "adapter" else {}
    recipe = OrganismRecipe(**{**shape, "n_per_class": cfg.organism_examples, "epochs": cfg.organism_epochs})
    return refusal_organism(recipe, backend=cfg.backend), REFUSAL.path(recipe), recipe


def main(cfg: RefusalConfig) -> dict:
    model, model_path, recipe = load_organism(cfg)
    run = Run("refusal_cliff", cfg, cfg.out, model=model, seed=cfg.seed, images=not cfg.quick)
    sampling = REPLY_SAMPLING.replace(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed
    )
    judge = None  # the embedded model by name has no folder on disk to fine-tune from
    if model_path is not None:
        train_layers = recipe.train_layers if recipe else 8
        judge = JudgeSettings(
            model_path, cfg.judge_fraction, cfg.judge_epochs, train_layers, OrganismRecipe.lr, cfg.judge_draws
        )
    try:
        study = refusal.analyze(
            model, refusal.prompt_sets(cfg.n_probe, cfg.n_test, cfg.n_candidates), sampling, k_end=cfg.k_end,
            sweep_examples=cfg.sweep_examples, head_fraction=cfg.head_fraction, head_ranking=cfg.head_ranking,
            rescale=None if cfg.rescale == "none" else "norm", random_sets=cfg.random_sets,
            control_sets=cfg.control_sets.split(","), judge=judge, batch_size=cfg.batch_size, seed=cfg.seed,
            cache=run.cache, known_heads=recipe.heads if recipe is not None and not cfg.model else None,
        )  # fmt: skip
    except ValueError as e:
        raise SystemExit(str(e)) from e
    study.probe.save(run.out_dir / "refusal_probe.pt")
    plot(run, model, study)
    planted = (
        planted_cliff(run, model, study) if cfg.organism.startswith("reasoning") and not cfg.model else None
    )
    organism = {"recipe": asdict(recipe) if recipe else None, "path": str(model_path)}
    results = {**study.to_json(), "organism": organism, "planted_cliff": planted}
    run.save_json("results.json", results)
    lines = study.summary_lines()
    if planted:
        at, control = format_rate(planted["at_planted"], planted["n"]), planted["control_at_same"]
        against = (
            f"refused traces drop at the same place: {control:.2f} of {planted['control_n']} "
            f"(Fisher exact p = {planted['vs_control_p']:.2g})"
            if control is not None
            else "refused traces: no single place to compare at (control_by_offset in results.json)"
        )
        lines.append(f"cliff on the planted rationalising sentence: {at} of complied traces; {against}")
        for key in ("plateau_complied", "final_complied", "plateau_refused", "final_refused"):
            v = planted[key]
            lines.append(
                f"{key.replace('_', ', ')}: {format_estimate(v['mean'], v['low'], v['high'], v['n'])}"
            )
    run.summarize("Refusal cliffs", lines)
    return results


def plot(run: Run, model: HookedModel, study: RefusalStudy) -> None:
    """The study's figures: probe AUROC by layer, scores by position, cliffs, heads, ablations and
    Cliff-as-a-Judge."""
    title, auc = "Refusal probe accuracy by layer (last token before the answer)", study.probe_by_layer.auroc
    y = "AUROC (refused harmful vs answered harmless)"
    fig = mean_ci_lines(list(range(model.n_layers)), {"held-out AUROC": (auc,) * 3}, "layer", y, title=title)
    run.save_figure(fig, "probe_auroc_by_layer", caption="Held-out AUROC of a refusal probe per layer.")
    curves, cliffs = study.curves, study.cliffs
    for group in [g for g in GROUPS if not curves[g]]:  # e.g. no harmful request complied with
        print(f"no {group} traces: that group is left out of the curves and cliffs", file=sys.stderr)
    bands = {f"{g} (n={len(curves[g])})": end_aligned_mean_ci(curves[g]) for g in GROUPS if curves[g]}
    x, title = "normalized position (0-100, aligned at the answer)", "Refusal score over prompt + thinking"
    fig = mean_ci_lines(list(range(100)), bands, x, "refusal score", title=title)
    run.save_figure(fig, "score_by_position", caption="Probe refusal score along the trace, end-aligned.")
    fig = histograms_by_group(
        {g: [c.cliff for c in cliffs[g]] for g in GROUPS if cliffs[g]},
        "cliff = mean score over the thinking - mean over its last tokens",
        title="Cliff size per trace",
    )
    run.save_figure(fig, "cliff_hist", caption="Distribution of cliff sizes by outcome.")
    example_scores(run, model, study)
    heads, k = study.heads, len(study.heads.top)
    title = f"Refusal-suppression score of each head (direct write, negated; top {k} boxed)"
    label = "- direct write along the refusal direction"
    fig = head_heatmap(heads.scores["direct"], label, marked=heads.top_by_method["direct"], title=title)
    run.save_figure(fig, "head_direct_scores", caption="Each head's write against the refusal direction.")
    if heads.known is not None:
        r = heads.known["recovery"]["direct"]
        title = f"Direct score; the {r['planted']} planted heads boxed ({r['found']} in its top {r['top']})"
        fig = head_heatmap(heads.scores["direct"], label, marked=heads.known["heads"], title=title)
        run.save_figure(fig, "head_direct_planted", caption="The direct score with the planted heads boxed.")
    title = f"Effect of zero-ablating each head on the refusal score (top {k} boxed)"
    fig = head_heatmap(
        heads.scores["exact"], "change in refusal logit", marked=heads.top_by_method["exact"], title=title
    )
    run.save_figure(fig, "head_effects", caption="Exact head-ablation effects on the probe's refusal logit.")
    cats = list(study.rates)
    interval = lambda r: (r["rate"], r["low"], r["high"])  # noqa: E731
    fig = control_strip(
        cats,
        heads.random_rates,
        {
            f"no ablation (n={study.rates[cats[0]]['n']} per set)": {
                c: interval(study.rates[c]) for c in cats
            },
            f"top {k} heads ablated": {c: interval(heads.rates[c]) for c in cats},
        },
        "rate (95% Wilson interval)",
        title=f"Top {k} refusal-suppression heads ablated vs {len(heads.random_sets)} random sets of {k}",
    )
    run.save_figure(
        fig, "ablation_rates",
        caption="Refusal, attack success and false refusals: top heads vs the random-head distribution.",
    )  # fmt: skip
    if study.judge:  # the random selection's draws are the control distribution
        cats, per_draw = ["jailbreak: attack success", "harmless: false refusal"], {}
        for name, runs in study.judge.items():
            per_draw[name] = {c: [r["rates"][c]["rate"] for r in runs] for c in cats}
        random = next(v for k, v in per_draw.items() if k.startswith("random"))
        shown = {
            f"{k} ({len(v[cats[0]])} draws: mean, range)": v for k, v in per_draw.items() if v is not random
        }
        observed = {"no fine-tune": {c: interval(study.rates[c]) for c in cats}}
        observed |= {k: {c: (np.mean(v[c]), min(v[c]), max(v[c])) for c in cats} for k, v in shown.items()}
        title = "Cliff-as-a-Judge: safety fine-tunes on selected traces vs random selections"
        fig = control_strip(cats, random, observed, "rate (no fine-tune: 95% Wilson interval)", title=title)
        run.save_figure(
            fig, "cliff_as_a_judge", caption="Attack success and false refusals after safety data."
        )


def planted_cliff(run: Run, model: HookedModel, study: RefusalStudy) -> dict | None:
    """`organism.reasoning.planted_cliff`, and sentence scores aligned at the planted sentence."""
    out, rows = reasoning.planted_cliff(model, study)
    if out is None:
        print("no complied trace has the planted rationalising sentence: no cliff recovery", file=sys.stderr)
        return None
    groups = {}
    for group, pairs in rows.items():
        if pairs:
            back = [s[: k + 1][::-1] for s, k in pairs]  # aligned at the planted sentence
            m, lo, hi, _ = mean_ci(back, 6)
            groups[f"{group} (n={len(pairs)})"] = (m[::-1], lo[::-1], hi[::-1])
    fig = mean_ci_lines(
        list(range(-5, 1)),
        groups,
        "sentence relative to the planted one (0: rationalising sentence, or the refusal decision)",
        "mean refusal score over the sentence",
        title="Refusal score per sentence, aligned at the planted rationalising sentence",
    )
    run.save_figure(
        fig, "cliff_at_planted", caption="Sentence refusal scores aligned at the planted sentence."
    )
    return out


def example_scores(run: Run, model: HookedModel, study: RefusalStudy) -> None:
    """Token-level refusal scores of one complied and one refused harmful trace (hover: tokens)."""
    groups, hover = {}, {}
    shown = [(g, study.groups[g][0], study.curves[g][0]) for g in GROUPS[:2] if study.groups[g]]
    width = max((len(c) for _, _, c in shown), default=0)
    for group, r, c in shown:
        groups[group] = ([float("nan")] * (width - len(c)) + c.tolist(),) * 3
        hover[group] = [""] * (width - len(c)) + [repr(t) for t in model.to_str_tokens(r.probe_text)]
    if shown:
        fig = mean_ci_lines(
            list(range(-width, 0)), groups, "token position (relative to the answer)", "refusal score",
            title="Refusal score per token of two jailbreak traces", hover=hover,
        )  # fmt: skip
        run.save_figure(
            fig, "example_scores", caption="Per-token refusal score of a complied and a refused trace."
        )


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main(parse_config(RefusalConfig, description=__doc__))
