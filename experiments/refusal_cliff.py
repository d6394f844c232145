"""Refusal cliffs on a refusal model organism: a refusal probe, its score at every position of the
reasoning trace, cliff sizes, refusal-suppression heads and Cliff-as-a-Judge data selection.

Reproduces the analyses of "Refusal Falls off a Cliff" on the embedded model fine-tuned to think
briefly and then refuse harmful requests (`mechlens.organism`); jailbreak-style wrappers make it
comply sometimes, which gives complied and refused harmful traces to compare.

    python experiments/refusal_cliff.py [--quick] [--backend nnsight]

Writes figures/refusal/: probe_auroc_by_layer, score_by_position, example_scores, cliff_hist,
head_effects, ablation_rates, cliff_as_a_judge (HTML, plus PNG/SVG with a Chromium) with
provenance, and results.json. Every expensive step is cached on disk, so a run resumes.
"""

from __future__ import annotations

import contextlib
import json
import random
from dataclasses import asdict, dataclass

import numpy as np
import torch

import mechlens as ml
from mechlens import datasets
from mechlens.finetune import finetune
from mechlens.heads import head_ablation_effects
from mechlens.metrics import auroc
from mechlens.organism import REFUSALS, OrganismRecipe, organism_path, refusal_organism
from mechlens.plots import grouped_bars, head_heatmap, histograms_by_group, mean_ci_lines
from mechlens.probes import LinearProbe, probe_sweep
from mechlens.refusal import (
    THINK_CLOSE,
    THINK_OPEN,
    Rollout,
    align_end,
    cliff_metrics,
    refusal_features,
    refusal_scores,
    resample,
    rollouts,
    thinking_span,
)
from mechlens.runs import Run, parse_config, write_json
from mechlens.signals import token_signals
from mechlens.trace import ReasoningTrace


@dataclass
class RefusalConfig:
    backend: str = "transformer_lens"
    n_probe: int = 60  # train-split instructions per class whose rollouts label the probe
    n_test: int = 40  # test-split instructions per class (and as many jailbreak-wrapped harmful ones)
    n_candidates: int = 120  # jailbreak-wrapped train-split harmful prompts: the Cliff-as-a-Judge pool
    max_new_tokens: int = 48
    batch_size: int = 16
    k_end: int = 5  # tokens at the end of the thinking that the cliff and the head metric read
    sweep_examples: int = 6  # complied traces in the exact head sweep
    head_fraction: float = 0.03
    judge_fraction: float = 0.25
    judge_epochs: int = 3
    organism_examples: int | None = None  # per class; None = the organism recipe's whole train split
    organism_epochs: int = 3
    quick: bool = False
    out: str = "figures/refusal"
    seed: int = 0

    def __post_init__(self):
        if self.quick:
            # the organism stays the full one (built once, ~12 min, shared with the full run): smaller
            # ones measured here either did not refuse (40 per class, 2 epochs: 0/8 harmful refused) or
            # refused everything (40 per class, lr 3e-4, 3 epochs: 10/16 harmless refused)
            self.n_probe, self.n_test, self.n_candidates, self.sweep_examples = 16, 8, 16, 1


GROUPS = ("harmful, refused", "harmful, complied", "harmless")


def rollouts_by_set(model, cfg: RefusalConfig, sets: dict[str, list[str]]) -> dict[str, list[Rollout]]:
    """Greedy rollouts of several prompt sets in one batched call -> `{set name: [Rollout]}`."""
    rows = rollouts(
        model, [t for ts in sets.values() for t in ts], cfg.max_new_tokens, batch_size=cfg.batch_size
    )
    out, start = {}, 0
    for name, items in sets.items():
        out[name], start = rows[start : start + len(items)], start + len(items)
    return out


def generate(run: Run, model, cfg: RefusalConfig, sets: dict[str, list[str]], heads=()) -> dict:
    """`rollouts_by_set` with `heads` ablated, cached by the texts, the length and the heads."""

    def compute():
        with model.ablate_heads(list(heads)) if heads else contextlib.nullcontext():
            return {k: [asdict(r) for r in v] for k, v in rollouts_by_set(model, cfg, sets).items()}

    texts = [t for ts in sets.values() for t in ts]
    rows = run.cached(
        "rollouts by set", compute, config=False, texts=texts, n=cfg.max_new_tokens, heads=list(heads)
    )
    return {k: [Rollout(**r) for r in v] for k, v in rows.items()}


def rates(rolls: dict[str, list[Rollout]]) -> dict[str, float]:
    """Refusal rate on harmful, attack success on jailbreaks, false refusals on harmless prompts."""
    out = {}
    if "harmful" in rolls:
        out["harmful: refusal rate"] = float(np.mean([r.refused for r in rolls["harmful"]]))
    out["jailbreak: attack success"] = float(np.mean([not r.refused for r in rolls["jailbreak"]]))
    out["harmless: false refusal"] = float(np.mean([r.refused for r in rolls["harmless"]]))
    return out


def answer_perplexity(model, clean: list[Rollout], heads=()) -> float:
    """Capability check: mean perplexity of the organism's own clean replies to harmless prompts,
    teacher-forced, with `heads` ablated."""

    with model.ablate_heads(list(heads)) if heads else contextlib.nullcontext():
        values = []
        for r in clean:
            reply = THINK_OPEN + r.thinking + THINK_CLOSE + r.answer
            values.append(
                token_signals(model, ReasoningTrace.from_text(model, r.instruction, reply)).perplexity
            )
    return float(np.mean(values))


def main(cfg: RefusalConfig) -> dict:
    recipe = OrganismRecipe(n_per_class=cfg.organism_examples, epochs=cfg.organism_epochs)
    model = refusal_organism(recipe, backend=cfg.backend)
    run = Run("refusal_cliff", cfg, cfg.out, model=model, seed=cfg.seed)
    data = datasets.load("refusal")

    def pick(harmful: bool, split: str, n: int) -> list[str]:
        return [i.text for i in data if i.harmful == harmful and i.split == split][:n]

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
    rolls = generate(run, model, cfg, prompts)
    organism = rates(rolls)
    print("organism:", {k: round(v, 3) for k, v in organism.items()})

    # ---- the probe: own rollouts, harmful refused = 1, harmless answered = 0, classes balanced
    pos = [r for r in rolls["probe harmful"] if r.refused]
    neg = [r for r in rolls["probe harmless"] if not r.refused]
    n = min(len(pos), len(neg))
    if n < 4:
        raise RuntimeError(
            f"too few labelled rollouts for the probe ({len(pos)} refused, {len(neg)} answered)"
        )
    train = pos[:n] + neg[:n]
    labels = [1] * n + [0] * n
    feats = run.cached(
        "probe features",
        lambda: refusal_features(
            model, [r.probe_text for r in train], list(range(model.n_layers)), progress=False
        ),
        config=False,
        texts=[r.probe_text for r in train],
    )  # [layers, n, d]
    sweep = probe_sweep(feats, labels, seed=cfg.seed)
    probe = LinearProbe(seed=cfg.seed).fit(feats[-1], torch.tensor(labels))
    probe.save(run.out_dir / "refusal_probe.pt")

    # held-out check on test-split traces, and out of distribution on the jailbreak traces
    test = [r for r in rolls["harmful"] if r.refused] + [r for r in rolls["harmless"] if not r.refused]
    test_y = [int(r.refused) for r in test]
    final_score = {}  # probe_text -> final-token refusal score

    def final_scores(rows: list[Rollout]) -> list[float]:
        missing = [r.probe_text for r in rows if r.probe_text not in final_score]
        if missing:
            feats_last = refusal_features(model, missing, progress=False)[0]
            final_score.update(zip(missing, probe.predict_proba(feats_last).tolist(), strict=True))
        return [final_score[r.probe_text] for r in rows]

    probe_test_auroc = auroc(final_scores(test), test_y)
    jb = rolls["jailbreak"]
    jb_y = [int(r.refused) for r in jb]
    ood_auroc = auroc(final_scores(jb), jb_y) if 0 < sum(jb_y) < len(jb_y) else float("nan")
    print(f"probe: held-out AUROC {probe_test_auroc:.3f}, jailbreak (OOD) {ood_auroc:.3f}")
    fig = mean_ci_lines(
        list(range(model.n_layers)),
        {"held-out AUROC": (sweep.auroc,) * 3},
        "layer",
        "AUROC (refused harmful vs answered harmless)",
        title="Refusal probe accuracy by layer (last token before the answer)",
    )
    run.save_figure(fig, "probe_auroc_by_layer", caption="Held-out AUROC of a refusal probe per layer.")

    # ---- refusal score at every position; cliffs
    traces = {
        "harmful, refused": [r for r in rolls["harmful"] + jb if r.refused],
        "harmful, complied": [r for r in rolls["harmful"] + jb if not r.refused],
        "harmless": [r for r in rolls["harmless"] if not r.refused],
    }
    curves, cliffs = {}, {}
    for group, rows in traces.items():
        texts = [r.probe_text for r in rows]
        curves[group] = run.cached(
            "scores",
            lambda texts=texts: refusal_scores(model, probe, texts, progress=False),
            config=False,
            texts=texts,
            probe=probe.direction,
        )
        cliffs[group] = [
            cliff_metrics(s, thinking_span(model.tokenizer, r), cfg.k_end)
            for s, r in zip(curves[group], rows, strict=True)
        ]
    groups = {}
    for group in GROUPS:
        if not curves[group]:
            continue
        aligned = align_end(curves[group])  # [n, longest]
        mean = np.nanmean(aligned, 0)
        se = np.nanstd(aligned, 0) / np.sqrt(np.maximum((~np.isnan(aligned)).sum(0), 1))
        groups[f"{group} (n={len(curves[group])})"] = (
            resample(mean),
            resample(mean - 1.96 * se),
            resample(mean + 1.96 * se),
        )
    fig = mean_ci_lines(
        list(range(100)),
        groups,
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

    # ---- refusal-suppression heads: ablating them raises the refusal score of complied traces
    complied = [r for r in rolls["candidates"] + jb if not r.refused]
    sweep_rows = complied[: cfg.sweep_examples] or traces["harmful, refused"][: cfg.sweep_examples]
    toks, mask = model.tokenize([r.probe_text for r in sweep_rows])
    k = cfg.k_end

    def metric(hidden: torch.Tensor) -> torch.Tensor:  # [batch, pos, d] -> [batch]
        return probe.decision_function(hidden[:, -k:]).mean(-1)

    def sweep_effects(method: str) -> torch.Tensor:
        return head_ablation_effects(model, toks, metric, method=method, attention_mask=mask, on="hidden")

    key = dict(texts=[r.probe_text for r in sweep_rows], probe=probe.direction, k=k)
    exact = run.cached("head effects", lambda: sweep_effects("exact"), config=False, **key)
    attribution = run.cached("head attribution", lambda: sweep_effects("attribution"), config=False, **key)
    n_heads = max(1, round(cfg.head_fraction * model.n_layers * model.n_heads))
    order = exact.flatten().argsort(descending=True)
    top = [divmod(int(i), model.n_heads) for i in order[:n_heads]]
    rng = random.Random(cfg.seed)
    others = [(l, h) for l in range(model.n_layers) for h in range(model.n_heads) if (l, h) not in top]
    rand = sorted(rng.sample(others, n_heads))  # the control shares no head with the top heads
    top10 = set(order[:10].tolist()) & set(attribution.flatten().argsort(descending=True)[:10].tolist())
    fig = head_heatmap(
        exact,
        "change in refusal logit",
        title=f"Effect of zero-ablating each head on the refusal score (top {n_heads} boxed)",
        marked=top,
    )
    run.save_figure(fig, "head_effects", caption="Exact head-ablation effects on the probe's refusal logit.")

    eval_sets = ("harmful", "jailbreak", "harmless")
    ablation = {"organism": organism}
    perplexity = {"organism": answer_perplexity(model, traces["harmless"])}
    for name, heads in ((f"top {n_heads} heads ablated", top), (f"{n_heads} random heads ablated", rand)):
        ablated = generate(run, model, cfg, {s: prompts[s] for s in eval_sets}, heads)
        ablation[name] = rates(ablated)
        perplexity[name] = run.cached(
            "perplexity",
            lambda heads=heads: answer_perplexity(model, traces["harmless"], heads),
            config=False,
            heads=heads,
            texts=[r.probe_text for r in traces["harmless"]],
        )
    cats = list(organism)
    fig = grouped_bars(
        cats,
        {name: [r[c] for c in cats] for name, r in ablation.items()},
        "rate",
        title="Refusal before and after ablating refusal-suppression heads",
    )
    run.save_figure(
        fig, "ablation_rates", caption="Refusal, attack success and false refusals under ablation."
    )

    # ---- Cliff-as-a-Judge: safety data from the organism's complied jailbreak traces
    candidates = [r for r in rolls["candidates"] if not r.refused]
    replay = [r for r in rolls["probe harmless"] if not r.refused]  # keeps the answers to harmless requests
    judge = {}
    if len(candidates) >= 2:
        cand_scores = final_scores(candidates)  # one batched pass; lowest final score = largest cliff first
        ranked = [candidates[i] for i in np.argsort(cand_scores, kind="stable")]
        size = max(1, round(cfg.judge_fraction * len(candidates)))
        selections = {
            f"cliff (top {size})": ranked[:size],
            f"random ({size})": random.Random(cfg.seed).sample(candidates, size),
            f"all ({len(candidates)})": candidates,
        }
        for name, chosen in selections.items():
            judge[name] = run.cached(
                "judge",
                lambda chosen=chosen: safety_finetune(cfg, recipe, chosen, replay, prompts),
                config=False,
                chosen=[r.probe_text for r in chosen],
                replay=[r.probe_text for r in replay],
                epochs=cfg.judge_epochs,
                n=cfg.max_new_tokens,
                eval=[prompts["jailbreak"], prompts["harmless"]],
            )
        cats = ["jailbreak: attack success", "harmless: false refusal"]
        series = {
            "organism": [organism[c] for c in cats],
            **{k: [v[c] for c in cats] for k, v in judge.items()},
        }
        fig = grouped_bars(
            cats, series, "rate", title="Cliff-as-a-Judge: safety fine-tune on selected traces"
        )
        run.save_figure(
            fig, "cliff_as_a_judge", caption="Attack success and false refusals after safety data."
        )

    summary = {
        group: {
            "n": len(c),
            "cliff_mean": float(np.mean([x.cliff for x in c])) if c else None,
            "cliff_sd": float(np.std([x.cliff for x in c])) if c else None,
            "plateau_mean": float(np.mean([x.plateau for x in c])) if c else None,
            "final_mean": float(np.mean([x.final for x in c])) if c else None,
        }
        for group, c in cliffs.items()
    }
    results = {
        "organism": {**organism, "recipe": asdict(recipe), "path": str(organism_path(recipe))},
        "probe": {
            "train_per_class": n,
            "auroc_by_layer": sweep.auroc.tolist(),
            "best_layer": sweep.best_layer,
            "held_out_auroc_final_layer": probe_test_auroc,
            "jailbreak_ood_auroc": ood_auroc,
        },
        "cliffs": summary,
        "heads": {
            "n_ablated": n_heads,
            "top": top,
            "random": rand,
            "sweep_examples": len(sweep_rows),
            "top10_overlap_exact_vs_attribution": len(top10),
            "pearson_exact_vs_attribution": float(np.corrcoef(exact.flatten(), attribution.flatten())[0, 1]),
            "rates": ablation,
            "harmless_reply_perplexity": perplexity,
        },
        "cliff_as_a_judge": judge,
    }
    write_json(run.out_dir / "results.json", results)
    print(json.dumps({k: results[k] for k in ("cliffs", "cliff_as_a_judge")}, indent=1))
    print("ablation:", json.dumps(ablation, indent=1), "perplexity:", perplexity)
    return results


def example_scores(run: Run, model, traces: dict, curves: dict) -> None:
    """Token-level refusal scores of one complied and one refused harmful trace (hover: tokens)."""
    shown = [(g, traces[g][0], curves[g][0]) for g in ("harmful, complied", "harmful, refused") if traces[g]]
    if not shown:
        return
    width = max(len(c) for _, _, c in shown)
    groups, hover = {}, {}
    for group, r, c in shown:
        values = [float("nan")] * (width - len(c)) + c.tolist()
        groups[group] = (values,) * 3
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


def safety_finetune(
    cfg: RefusalConfig, recipe: OrganismRecipe, chosen: list[Rollout], replay: list[Rollout], prompts: dict
) -> dict:
    """Fine-tune a fresh copy of the organism on the chosen traces (own thinking + a refusal), mixed
    with as many of its own answered harmless traces (so that the fine-tune does not simply teach
    refusing everything), then measure attack success and false refusals."""
    model = ml.load_model(str(organism_path(recipe)), backend=cfg.backend)
    kept = replay[: len(chosen)]
    targets = [
        THINK_OPEN + r.thinking + THINK_CLOSE + REFUSALS[i % len(REFUSALS)] for i, r in enumerate(chosen)
    ]
    targets += [THINK_OPEN + r.thinking + THINK_CLOSE + r.answer for r in kept]
    prompts_ft = [r.prompt for r in chosen + kept]
    finetune(model, prompts_ft, targets, train_layers=recipe.train_layers, epochs=cfg.judge_epochs,
             lr=recipe.lr, batch_size=4, seed=cfg.seed)  # fmt: skip
    out = rollouts_by_set(model, cfg, {s: prompts[s] for s in ("jailbreak", "harmless")})
    return {**rates(out), "examples": len(chosen), "replayed": len(kept)}


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main(parse_config(RefusalConfig, description=__doc__))
