"""Refusal cliffs: a refusal probe, its score at every position of the reasoning trace, cliff
sizes, refusal-suppression heads and Cliff-as-a-Judge data selection.

Reproduces the analyses of "Refusal Falls off a Cliff". The default model is the reasoning organism
(`mechlens.organism`): harmful requests make it recognise the harm for several sentences, and in a
planted share of traces a rationalising sentence right before `</think>` leads to compliance
(more often inside jailbreak wrappers); the run measures whether the probe's drop sits at that
sentence. `--organism blocks|adapter` uses the older refusal organism (brief templated thinking);
`--model PATH --device cuda --dtype bfloat16` a local reasoning model.

    python experiments/refusal_cliff.py [--quick] [--organism reasoning|blocks|adapter] [--model PATH]

Writes figures/refusal/: probe_auroc_by_layer, score_by_position, example_scores, cliff_hist,
cliff_at_planted (reasoning organism), head_effects, ablation_rates, cliff_as_a_judge (HTML, plus
PNG/SVG with a Chromium) with provenance, and results.json. Every expensive step is cached on
disk, so a run resumes.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from mechlens import datasets
from mechlens.ops.heads import direct_head_scores, head_ablation_effects
from mechlens.ops.probes import LinearProbe, probe_sweep
from mechlens.ops.stats import auroc, auroc_interval, format_rate, mcnemar, mean_ci, spearman
from mechlens.organism import (
    ADAPTER_RECIPE,
    REASONING,
    REASONING_RECIPE,
    REFUSAL,
    OrganismRecipe,
    load_subject,
    refusal_organism,
)
from mechlens.organism.traces import label_roles
from mechlens.plots import control_strip, grouped_bars, head_heatmap, histograms_by_group, mean_ci_lines
from mechlens.runs import Run, parse_config
from mechlens.studies.recovery import cliff_recovery
from mechlens.studies.refusal import (
    REPLY_SAMPLING,
    Reply,
    cliff_as_judge,
    cliff_metrics,
    end_aligned_mean_ci,
    refusal_features,
    refusal_rates,
    refusal_scores,
    sample_replies_by_set,
    sentence_scores,
    thinking_span,
)
from mechlens.studies.refusal.heads import answer_perplexity, random_head_sets, top_heads


@dataclass
class RefusalConfig:
    backend: Literal["transformer_lens", "nnsight"] = "transformer_lens"
    n_probe: int = 60  # train-split instructions per class whose rollouts label the probe
    n_test: int = 40  # test-split instructions per class (and as many jailbreak-wrapped harmful ones)
    n_candidates: int = 120  # jailbreak-wrapped train-split harmful prompts: the Cliff-as-a-Judge pool
    max_new_tokens: int = 96  # the reasoning organism thinks for ~70 tokens before answering
    temperature: float = 0.7  # the authors sample every rollout at 0.7 (scripts/generation/*/
    # inference.sh: --temperature=0.7, top-p 1); seeded per prompt. 0: greedy (earlier releases)
    batch_size: int = 16
    k_end: int = 5  # tokens at the end of the thinking that the cliff and the head metric read
    sweep_examples: int = 6  # complied traces in the head scores
    head_fraction: float = 0.03
    head_ranking: Literal["direct", "exact", "attribution"] = "direct"  # the authors': direct score
    rescale: Literal["norm", "none"] = "norm"  # the authors' ablation keeps the attention output's norm
    random_sets: int = 20  # random head sets of the same size: the control distribution
    # the sets (comma-separated) each random head set runs on: attack success, the paper's headline
    # (adding harmless measures false refusals too, for another 20 x 40 replies)
    control_sets: str = "jailbreak"
    judge_fraction: float = 0.25
    judge_epochs: int = 3
    organism: Literal["reasoning", "blocks", "adapter"] = "reasoning"  # the reasoning organism (shipped
    # adapter); or the refusal organism: top 8 blocks fine-tuned (built here, ~12 min once) or the
    # low-rank adapter of the same recipe shipped with mechlens (loads in seconds)
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
            # the shipped adapter organism: nothing to train. Smaller block organisms measured here
            # either did not refuse (40 per class, 2 epochs: 0/8 harmful refused) or refused
            # everything (40 per class, lr 3e-4, 3 epochs: 10/16 harmless refused)
            self.organism = "adapter" if self.organism == "blocks" else self.organism
            self.n_probe, self.n_test, self.n_candidates, self.sweep_examples = 12, 8, 8, 1
            self.random_sets, self.max_new_tokens = 5, 80  # a small control distribution: minutes
        unknown = set(self.control_sets.split(",")) - {"harmful", "jailbreak", "harmless"}
        if unknown:
            raise ValueError(f"control_sets must name harmful, jailbreak or harmless; got {sorted(unknown)}")


GROUPS = ("harmful, refused", "harmful, complied", "harmless")


def load_organism(cfg: RefusalConfig):
    """`(model, folder, recipe)`: the model studied, the folder Cliff-as-a-Judge fine-tunes from,
    and its recipe (None for a model given by path)."""
    if cfg.model:
        model = load_subject(cfg.model, cfg.backend, cfg.device, cfg.dtype)
        return model, cfg.model if cfg.model != "base" else None, None
    if cfg.organism == "reasoning":
        model = load_subject("organism", cfg.backend, cfg.device, cfg.dtype)
        return model, REASONING.path(REASONING_RECIPE), REASONING_RECIPE
    shape = asdict(ADAPTER_RECIPE) if cfg.organism == "adapter" else {}
    recipe = OrganismRecipe(**{**shape, "n_per_class": cfg.organism_examples, "epochs": cfg.organism_epochs})
    return refusal_organism(recipe, backend=cfg.backend), REFUSAL.path(recipe), recipe


def main(cfg: RefusalConfig) -> dict:
    model, model_path, recipe = load_organism(cfg)
    run = Run("refusal_cliff", cfg, cfg.out, model=model, seed=cfg.seed, images=not cfg.quick)
    sampling = REPLY_SAMPLING.replace(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed
    )
    data = datasets.load("refusal")

    def pick(harmful: bool, split: str, n: int) -> list[str]:
        return [i.text for i in data if i.harmful == harmful and i.split == split][:n]

    rescale = None if cfg.rescale == "none" else cfg.rescale

    def replies(sets: dict[str, list[str]], heads=()) -> dict[str, list[Reply]]:
        def compute():
            with model.ablate_heads(list(heads), rescale=rescale) if heads else contextlib.nullcontext():
                rows = sample_replies_by_set(model, sets, sampling, cfg.batch_size)
            return {k: [asdict(r) for r in v] for k, v in rows.items()}

        rows = run.cached(
            "replies", compute, config=False, sets=sets, sampling=sampling, heads=list(heads),
            rescale=rescale if heads else None,
        )  # fmt: skip
        return {k: [Reply(**r) for r in v] for k, v in rows.items()}

    train_harmful = pick(True, "train", 10_000)
    prompts = {
        "probe harmful": pick(True, "train", cfg.n_probe),
        "probe harmless": pick(False, "train", cfg.n_probe),
        "harmful": pick(True, "test", cfg.n_test),
        "harmless": pick(False, "test", cfg.n_test),
        "jailbreak": [datasets.jailbreak(t, i) for i, t in enumerate(pick(True, "test", cfg.n_test))],
        "candidates": [
            datasets.jailbreak(train_harmful[i % len(train_harmful)], i) for i in range(cfg.n_candidates)
        ],
    }
    rolls = replies(prompts)
    organism = refusal_rates(rolls)
    lines = [f"organism, {k}: {format_rate(v['count'], v['n'])}" for k, v in organism.items()]

    # ---- the probe: own replies, harmful refused = 1, harmless answered = 0, classes balanced
    pos = [r for r in rolls["probe harmful"] if r.refused]
    neg = [r for r in rolls["probe harmless"] if not r.refused]
    n = min(len(pos), len(neg))
    if n < 4:
        raise SystemExit(f"too few labelled replies for the probe ({len(pos)} refused, {len(neg)} answered)")
    train, labels = pos[:n] + neg[:n], [1] * n + [0] * n
    texts = [r.probe_text for r in train]
    all_layers = list(range(model.n_layers))
    feats = run.cached(
        "probe features",
        lambda: refusal_features(model, texts, all_layers, progress=False),
        config=False,
        texts=texts,
    )  # [layers, n, d]
    sweep = probe_sweep(feats, labels, seed=cfg.seed)
    probe = LinearProbe(seed=cfg.seed).fit(feats[-1], torch.tensor(labels))
    probe.save(run.out_dir / "refusal_probe.pt")
    final_score: dict[str, float] = {}  # probe_text -> refusal score at the last token

    def final_scores(rows: list[Reply]) -> list[float]:
        missing = [r.probe_text for r in rows if r.probe_text not in final_score]
        if missing:
            scores = probe.predict_proba(refusal_features(model, missing, progress=False)[0])
            final_score.update(zip(missing, scores.tolist(), strict=True))
        return [final_score[r.probe_text] for r in rows]

    test = [r for r in rolls["harmful"] if r.refused] + [r for r in rolls["harmless"] if not r.refused]
    probe_test_auroc = auroc(final_scores(test), [int(r.refused) for r in test])
    jb_y = [int(r.refused) for r in rolls["jailbreak"]]
    ood_auroc = auroc(final_scores(rolls["jailbreak"]), jb_y) if 0 < sum(jb_y) < len(jb_y) else float("nan")
    test_y = [int(r.refused) for r in test]
    low, high = probe_ci = auroc_interval(final_scores(test), test_y, seed=cfg.seed)
    ood_ci = (float("nan"), float("nan"))
    lines.append(
        f"refusal probe, held-out AUROC {probe_test_auroc:.2f} (95% CI {low:.2f}-{high:.2f}; "
        f"{sum(test_y)} refused vs {len(test_y) - sum(test_y)} answered)"
    )
    if not np.isnan(ood_auroc):
        low, high = ood_ci = auroc_interval(final_scores(rolls["jailbreak"]), jb_y, seed=cfg.seed)
        lines.append(
            f"refusal probe, jailbreak (out of distribution) AUROC {ood_auroc:.2f} "
            f"(95% CI {low:.2f}-{high:.2f}; "
            f"{sum(jb_y)} refused vs {len(jb_y) - sum(jb_y)} complied)"
        )
    fig = mean_ci_lines(
        list(range(model.n_layers)),
        {"held-out AUROC": (sweep.auroc,) * 3},
        "layer",
        "AUROC (refused harmful vs answered harmless)",
        title="Refusal probe accuracy by layer (last token before the answer)",
    )
    run.save_figure(fig, "probe_auroc_by_layer", caption="Held-out AUROC of a refusal probe per layer.")

    # ---- refusal score at every position; cliffs
    harmful = rolls["harmful"] + rolls["jailbreak"]
    traces = {
        "harmful, refused": [r for r in harmful if r.refused],
        "harmful, complied": [r for r in harmful if not r.refused],
        "harmless": [r for r in rolls["harmless"] if not r.refused],
    }
    curves, cliffs = {}, {}
    for group, rows in traces.items():
        if not rows:  # e.g. no harmful request complied with: that group has no curve
            print(f"no {group} traces: that group is left out of the curves and cliffs")
            curves[group], cliffs[group] = [], []
            continue
        texts = [r.probe_text for r in rows]
        curves[group] = run.cached(
            "scores",
            lambda texts=texts: refusal_scores(model, probe, texts, progress=False),
            config=False,
            texts=texts,
            probe=probe.direction,
        )
        spans = [thinking_span(model.tokenizer, r) for r in rows]
        cliffs[group] = [cliff_metrics(s, t, cfg.k_end) for s, t in zip(curves[group], spans, strict=True)]
    bands = {f"{g} (n={len(curves[g])})": end_aligned_mean_ci(curves[g]) for g in GROUPS if curves[g]}
    fig = mean_ci_lines(
        list(range(100)),
        bands,
        "normalized position (0-100, aligned at the answer)",
        "refusal score",
        title="Refusal score over prompt + thinking",
    )
    run.save_figure(fig, "score_by_position", caption="Probe refusal score along the trace, end-aligned.")
    fig = histograms_by_group(
        {g: [c.cliff for c in cliffs[g]] for g in GROUPS if cliffs[g]},
        "cliff = mean score over the thinking - mean over its last tokens",
        title="Cliff size per trace",
    )
    run.save_figure(fig, "cliff_hist", caption="Distribution of cliff sizes by outcome.")
    example_scores(run, model, traces, curves)
    planted = (
        planted_cliff(run, model, traces, curves, cliffs)
        if cfg.organism == "reasoning" and not cfg.model
        else None
    )

    # ---- refusal-suppression heads: the authors rank heads by their direct write against the
    # refusal direction at the last thinking token; the exact ablation effect and attribution
    # patching (the rise of the refusal score over the last k_end tokens) are reported beside it
    complied = [r for r in rolls["candidates"] + rolls["jailbreak"] if not r.refused]
    sweep_rows = complied[: cfg.sweep_examples] or traces["harmful, refused"][: cfg.sweep_examples]
    toks, mask = model.tokenize([r.probe_text for r in sweep_rows])

    def metric(hidden: torch.Tensor) -> torch.Tensor:  # [batch, pos, d] -> [batch]
        return probe.decision_function(hidden[:, -cfg.k_end :]).mean(-1)

    key = dict(texts=[r.probe_text for r in sweep_rows], probe=probe.direction, k=cfg.k_end)
    scores = {
        method: run.cached(
            f"head {method}",
            lambda method=method: head_ablation_effects(
                model, toks, metric, method=method, attention_mask=mask, on="hidden"
            ),
            config=False,
            **key,
        )
        for method in ("exact", "attribution")
    }
    scores["direct"] = run.cached(
        "head direct",
        lambda: -direct_head_scores(model, toks, probe.direction, positions=(-1,), attention_mask=mask),
        config=False,
        **key,
    )  # negated: larger = more refusal-suppressing, as the other two
    n_heads = max(1, round(cfg.head_fraction * model.n_layers * model.n_heads))
    ranked = {method: top_heads(s, n_heads) for method, s in scores.items()}
    top = ranked[cfg.head_ranking]
    agreement = {
        f"{a} vs {b}": {
            f"top{n_heads}_overlap": len(set(ranked[a]) & set(ranked[b])),
            "spearman": spearman(scores[a].flatten().numpy(), scores[b].flatten().numpy())[0],
        }
        for a, b in (("direct", "exact"), ("direct", "attribution"), ("exact", "attribution"))
    }
    fig = head_heatmap(
        scores["direct"],
        "- direct write along the refusal direction",
        marked=top,
        title=f"Refusal-suppression score of each head (direct write, negated; top {n_heads} boxed)",
    )
    run.save_figure(
        fig,
        "head_direct_scores",
        caption="Each head's write against the refusal direction at the last token.",
    )
    fig = head_heatmap(
        scores["exact"],
        "change in refusal logit",
        marked=ranked["exact"],
        title=f"Effect of zero-ablating each head on the refusal score (top {n_heads} boxed)",
    )
    run.save_figure(fig, "head_effects", caption="Exact head-ablation effects on the probe's refusal logit.")

    # ablate the top heads, and random head sets of the same size (the control distribution)
    eval_sets = {s: prompts[s] for s in ("harmful", "jailbreak", "harmless")}
    controls = random_head_sets(scores["exact"].shape, n_heads, cfg.random_sets, exclude=top, seed=cfg.seed)

    def perplexity(heads) -> float:
        return run.cached(
            "perplexity",
            lambda: answer_perplexity(model, traces["harmless"], heads, rescale=rescale),
            config=False, heads=list(heads), rescale=rescale if heads else None,
            texts=[r.probe_text for r in traces["harmless"]],
        )  # fmt: skip

    top_replies = replies(eval_sets, top)
    top_rates = refusal_rates(top_replies)
    # the same prompts and seeds with and without the ablation: a paired test per set (McNemar)
    paired = {
        name: mcnemar([r.refused for r in rolls[name]], [r.refused for r in top_replies[name]])
        for name in eval_sets
    }
    control_eval = {s: eval_sets[s] for s in cfg.control_sets.split(",")}
    random_rates = [refusal_rates(replies(control_eval, h)) for h in tqdm(controls, desc="random heads")]
    cats = list(organism)
    control = {c: [r[c]["rate"] for r in random_rates] for c in random_rates[0]}
    # where the top heads' rate falls among the random draws (0: below all, 100: above all)
    percentile = {c: 100 * float(np.mean(np.array(v) < top_rates[c]["rate"])) for c, v in control.items()}
    ablation = {
        "organism": organism,
        f"top {n_heads} heads ({cfg.head_ranking}) ablated": top_rates,
        f"{n_heads} random heads ablated ({len(controls)} draws)": {
            c: {"mean": float(np.mean(v)), "min": min(v), "max": max(v), "values": v}
            for c, v in control.items()
        },
    }
    ppl = {
        "organism": perplexity(()),
        "top heads": perplexity(top),
        "random heads": [perplexity(heads) for heads in controls],
    }
    interval = lambda r: (r["rate"], r["low"], r["high"])  # noqa: E731
    fig = control_strip(
        cats,
        control,
        {
            f"no ablation (n={organism[cats[0]]['n']} per set)": {c: interval(organism[c]) for c in cats},
            f"top {n_heads} heads ablated": {c: interval(top_rates[c]) for c in cats},
        },
        "rate (95% Wilson interval)",
        title=f"Top {n_heads} refusal-suppression heads ablated vs {len(controls)} random sets of {n_heads}",
    )
    run.save_figure(
        fig,
        "ablation_rates",
        caption="Refusal, attack success and false refusals: top heads vs the random-head distribution.",
    )

    # ---- Cliff-as-a-Judge: safety data from the organism's complied jailbreak replies
    candidates = [r for r in rolls["candidates"] if not r.refused]
    if model_path is None:  # the embedded model by name: nothing on disk to fine-tune from
        candidates = []
    replay = [r for r in rolls["probe harmless"] if not r.refused]  # keeps the answers to harmless requests
    judge = {}
    if len(candidates) >= 2:
        chosen_sets = cliff_as_judge.selections(
            candidates, final_scores(candidates), cfg.judge_fraction, cfg.seed
        )
        judge_sets = {s: prompts[s] for s in ("jailbreak", "harmless")}
        for name, chosen in chosen_sets.items():
            judge[name] = run.cached(
                "judge",
                lambda chosen=chosen: cliff_as_judge.safety_finetune(
                    model_path,
                    chosen,
                    replay,
                    judge_sets,
                    cfg.backend,
                    recipe.train_layers if recipe else 8,
                    cfg.judge_epochs,
                    OrganismRecipe.lr,  # the block fine-tune's rate, whichever organism
                    cfg.seed,
                    sampling,
                ),
                config=False,
                chosen=[r.probe_text for r in chosen],
                replay=[r.probe_text for r in replay],
                epochs=cfg.judge_epochs,
                sampling=sampling,
                eval=judge_sets,
                rates="wilson",  # each rate with its interval and n
            )
        cats = ["jailbreak: attack success", "harmless: false refusal"]
        shown = {"organism": organism, **judge}
        fig = grouped_bars(
            cats,
            {k: [v[c]["rate"] for c in cats] for k, v in shown.items()},
            "rate (95% Wilson interval)",
            title="Cliff-as-a-Judge: safety fine-tune on selected traces",
            counts={k: [f"{v[c]['count']}/{v[c]['n']}" for c in cats] for k, v in shown.items()},
            intervals={k: [(v[c]["low"], v[c]["high"]) for c in cats] for k, v in shown.items()},
        )
        run.save_figure(
            fig, "cliff_as_a_judge", caption="Attack success and false refusals after safety data."
        )

    summary = {
        group: {
            "n": len(c),
            **{
                f"{m}_mean": float(np.mean([getattr(x, m) for x in c])) if c else None
                for m in ("cliff", "plateau", "final")
            },
            "cliff_sd": float(np.std([x.cliff for x in c])) if c else None,
        }
        for group, c in cliffs.items()
    }
    results = {
        "organism": {**organism, "recipe": asdict(recipe) if recipe else None, "path": str(model_path)},
        "planted_cliff": planted,
        "probe": {
            "train_per_class": n,
            "auroc_by_layer": sweep.auroc.tolist(),
            "best_layer": sweep.best_layer,
            "held_out_auroc_final_layer": probe_test_auroc,
            "held_out_auroc_ci": list(probe_ci),
            "held_out_n": {"refused": sum(test_y), "answered": len(test_y) - sum(test_y)},
            "jailbreak_ood_auroc": ood_auroc,
            "jailbreak_ood_auroc_ci": list(ood_ci),
        },
        "cliffs": summary,
        "heads": {
            "n_ablated": n_heads,
            "ranking": cfg.head_ranking,
            "rescale": rescale,
            "top": top,
            "top_by_method": ranked,
            "agreement": agreement,
            "random_sets": controls,
            "sweep_examples": len(sweep_rows),
            "rates": ablation,
            "top_percentile_among_random": percentile,
            "refused_without_vs_with_ablation_mcnemar": paired,
            "harmless_reply_perplexity": ppl,
        },
        "cliff_as_a_judge": judge,
    }
    run.save_json("results.json", results)
    if planted:
        lines.append(
            "cliff on the planted rationalising sentence: "
            f"{format_rate(planted['at_planted'], planted['n'])} of complied traces "
            f"(a random sentence: {planted['chance_at_planted']:.2f})"
        )
    for c, values in control.items():  # the sets the random head sets ran on
        lines.append(
            f"top {n_heads} heads ablated, {c}: {format_rate(top_rates[c]['count'], top_rates[c]['n'])}; "
            f"percentile {percentile[c]:.0f} among {len(values)} random sets of as many heads"
        )
    for name, m in paired.items():
        lines.append(
            f"top {n_heads} heads ablated, {name}: of {m['n']} prompts, {m['only_a']} refused only without "
            f"the ablation, {m['only_b']} only with it "
            + (
                f"(exact McNemar p = {m['p']:.2g})"
                if m["only_a"] + m["only_b"]
                else "(no discordant prompt: no test)"
            )
        )
    for name, rates in judge.items():
        c = "jailbreak: attack success"
        lines.append(f"Cliff-as-a-Judge, {name}, {c}: {format_rate(rates[c]['count'], rates[c]['n'])}")
    run.summarize("Refusal cliffs", lines)
    return results


def planted_cliff(run: Run, model, traces: dict, curves: dict, cliffs: dict) -> dict | None:
    """Where the probe's score falls in complied traces against the planted rationalising sentence
    (read back from each trace's text), refused traces beside them; the cliff's AUROC between the
    two; and a figure of sentence scores aligned at the planted sentence (refused: at the decision)."""
    rows = {}
    for group, role in (("harmful, complied", "rationalise"), ("harmful, refused", "decide")):
        rows[group] = []
        for r, c in zip(traces[group], curves[group], strict=True):
            sentences, scores = sentence_scores(model.tokenizer, r, c)
            roles = label_roles(sentences)
            if role in roles and len(scores) >= 2:
                rows[group].append((scores, roles.index(role)))
    complied, refused = rows["harmful, complied"], rows["harmful, refused"]
    if not complied:
        print("no complied trace has the planted rationalising sentence: no cliff recovery")
        return None
    out = cliff_recovery([s for s, _ in complied], [k for _, k in complied], [s for s, _ in refused])
    a, b = cliffs["harmful, complied"], cliffs["harmful, refused"]
    # complied traces that never recognised the harm (no rationalising sentence) are not in `n`
    out["complied_without_planted_sentence"] = len(traces["harmful, complied"]) - len(complied)
    out["refused_without_decision_sentence"] = len(traces["harmful, refused"]) - len(refused)
    out["cliff_auroc_complied_vs_refused"] = (
        auroc([c.cliff for c in a + b], [1] * len(a) + [0] * len(b)) if a and b else None
    )
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


def example_scores(run: Run, model, traces: dict, curves: dict) -> None:
    """Token-level refusal scores of one complied and one refused harmful trace (hover: tokens)."""
    shown = [(g, traces[g][0], curves[g][0]) for g in ("harmful, complied", "harmful, refused") if traces[g]]
    if not shown:
        return
    width = max(len(c) for _, _, c in shown)
    groups, hover = {}, {}
    for group, r, c in shown:
        groups[group] = ([float("nan")] * (width - len(c)) + c.tolist(),) * 3
        hover[group] = [""] * (width - len(c)) + [repr(t) for t in model.to_str_tokens(r.probe_text)]
    fig = mean_ci_lines(
        list(range(-width, 0)),
        groups,
        "token position (relative to the answer)",
        "refusal score",
        title="Refusal score per token of two jailbreak traces",
        hover=hover,
    )
    run.save_figure(
        fig, "example_scores", caption="Per-token refusal score of a complied and a refused trace."
    )


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main(parse_config(RefusalConfig, description=__doc__))
