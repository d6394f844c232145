"""bfloat16 against float32 on the embedded model, method by method (issue 26, point 1).

The embedded SmolLM2-135M is loaded twice, in float32 and in bfloat16, and each method runs on the
same inputs in both; the float32 result is the reference. Per method: the largest and the mean
absolute difference, the relative difference `|bf16 - fp32|_2 / |fp32|_2` (over the entries
finite in both), and the agreement of the conclusion drawn from it:

- probe: final-normed last-token features of 80 harmful and 80 harmless requests of the
  `refusal` dataset (the refusal experiment's probe inputs: the chat-templated prompt), a
  `LinearProbe` per dtype on the fixed train split, its held-out probabilities and AUROC (with a
  95% bootstrap interval over the held-out rows, computed here: `mechlens.ops.stats` has none),
  and `probe_sweep`'s AUROC per layer (its best layer);
- head scores: `direct_head_scores` along the float32 probe's direction (the authors' ranking,
  negated as in the experiment), `head_ablation_effects` "exact" and "attribution" with the
  experiment's metric (the probe's logit over the last 5 positions, `on="hidden"`; in bf16 the
  probe then computes in bf16, and upcasting the hidden state first moved the largest difference
  by under 0.02 and no ranking), on 4 held-out harmful requests: Spearman over the 270 heads, overlap of the
  top 8 (the experiment's 3% of heads) and of the top 10;
- suppression: `suppression_matrix` of a 266-token, 15-sentence arithmetic trace (organism-free text), both
  KLs: the log-KL entries (Spearman, top-10 overlap) and the anchor ranking (`outgoing_effect`);
- depth: `reasoning_score` of the same trace (token and step scores, the step ranking) and the
  detector features of `analyze_trace` on 20 templated arithmetic traces (10 with a wrong
  result), with `evaluate`'s AUROCs (a priori and cross-validated, the RHD detector).

    python benchmarks/bf16.py
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from common import report

import mechlens as ml
from mechlens import datasets
from mechlens.ops.heads import direct_head_scores, head_ablation_effects
from mechlens.ops.probes import LinearProbe, probe_sweep
from mechlens.ops.stats import auroc, spearman
from mechlens.studies.anchors import outgoing_effect, suppression_matrix
from mechlens.studies.depth import analyze_trace, evaluate, reasoning_score
from mechlens.studies.refusal.scores import refusal_features
from mechlens.text.thinking import format_prompt

QUESTION = "A shop sells pencils at 3 dollars each and pens at 5 dollars each. Mia buys 4 pencils and 2 pens."
QUESTION += " How much does she pay?"
RESPONSE = "\n\n".join(
    [
        "First, I find the cost of the pencils. Each pencil costs 3 dollars, and Mia buys 4 of them. "
        "So the pencils cost 4 times 3, which is 12 dollars.",
        "Next, I find the cost of the pens. Each pen costs 5 dollars, and she buys 2 pens. "
        "So the pens cost 2 times 5, which is 10 dollars.",
        "Wait, let me check the pencils again. Four pencils at 3 dollars each is 3 + 3 + 3 + 3. "
        "That is 12 dollars, so the first step was right.",
        "Now I add the two amounts. The pencils and the pens together cost 12 + 10 dollars. "
        "That makes 22 dollars.",
        "Let me make sure nothing is missing. Mia buys only pencils and pens, and both are counted.",
        "So Mia pays 22 dollars in total.",
        "Answer: 22",
    ]
)
K_END = 5  # the refusal experiment's head metric reads the last k_end positions
HEAD_FRACTION = 0.03  # the experiment's share of heads called refusal-suppressing


def diffs(ref: torch.Tensor, low: torch.Tensor) -> dict[str, float]:
    """max / mean absolute and relative (L2) difference over the entries finite in both."""
    a, b = ref.double().flatten(), low.double().flatten()
    ok = torch.isfinite(a) & torch.isfinite(b)
    a, b = a[ok], b[ok]
    d = (a - b).abs()
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "rel": float(d.norm() / a.norm())}


def top_overlap(ref: torch.Tensor, low: torch.Tensor, k: int) -> int:
    """Entries among the `k` largest of both (NaN entries never count)."""
    a = torch.nan_to_num(ref.flatten().double(), nan=-math.inf)
    b = torch.nan_to_num(low.flatten().double(), nan=-math.inf)
    return len(set(a.topk(k).indices.tolist()) & set(b.topk(k).indices.tolist()))


def bootstrap_auroc(scores, labels, n: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the AUROC over `n` resamples of the rows."""
    s, y = np.asarray(scores, float), np.asarray(labels, int)
    rng, values = np.random.default_rng(seed), []
    for _ in range(n):
        idx = rng.integers(0, len(s), len(s))
        if 0 < y[idx].sum() < len(idx):
            values.append(auroc(s[idx], y[idx]))
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def ranking(ref: torch.Tensor, low: torch.Tensor, ks: tuple[int, ...]) -> dict[str, float]:
    out = {"spearman": spearman(ref.flatten().numpy(), low.flatten().numpy())[0]}
    out.update({f"top{k}": top_overlap(ref, low, k) for k in ks})
    return out


def probe_section(models, results) -> LinearProbe:
    items = datasets.load("refusal", n=80)
    labels = torch.tensor([int(i.harmful) for i in items])
    train = torch.tensor([i.split == "train" for i in items])
    feats, probes, probs, sweeps = {}, {}, {}, {}
    for name, model in models.items():
        texts = [format_prompt(model.tokenizer, i.text) for i in items]
        feats[name] = refusal_features(model, texts, list(range(model.n_layers)), progress=False)
        probes[name] = LinearProbe(seed=0).fit(feats[name][-1, train], labels[train])
        probs[name] = probes[name].predict_proba(feats[name][-1, ~train])
        sweeps[name] = probe_sweep(feats[name][:, train], labels[train], seed=0)
    y = labels[~train].numpy()
    res = {"features_final_layer": diffs(feats["fp32"][-1], feats["bf16"][-1])}
    res["probabilities_held_out"] = diffs(probs["fp32"], probs["bf16"])
    # the float32 probe reading bf16 features: the difference the activations alone make
    same = probes["fp32"].predict_proba(feats["bf16"][-1, ~train])
    res["probabilities_fp32_probe_on_bf16_features"] = diffs(probs["fp32"], same)
    for name in models:
        lo, hi = bootstrap_auroc(probs[name].numpy(), y)
        res[f"auroc_{name}"] = {"auroc": auroc(probs[name].numpy(), y), "ci95": [lo, hi]}
    res["auroc_fp32_probe_on_bf16_features"] = auroc(same.numpy(), y)
    a32, a16 = sweeps["fp32"].auroc, sweeps["bf16"].auroc
    res["sweep_auroc_by_layer"] = {
        "max_abs": float(np.abs(a32 - a16).max()),
        "mean_abs": float(np.abs(a32 - a16).mean()),
        "spearman": spearman(a32, a16)[0],
        "best_layer_fp32": sweeps["fp32"].best_layer,
        "best_layer_bf16": sweeps["bf16"].best_layer,
        "layers_at_1_fp32": int((a32 == 1).sum()),
        "layers_at_1_bf16": int((a16 == 1).sum()),
    }
    results["probe"] = res
    return probes["fp32"]


def heads_section(models, probe: LinearProbe, results) -> None:
    items = [i for i in datasets.load("refusal") if i.harmful and i.split == "test"][:4]
    ref = models["fp32"]
    n_top = max(1, round(HEAD_FRACTION * ref.n_layers * ref.n_heads))
    direction = probe.direction

    def metric(hidden: torch.Tensor) -> torch.Tensor:  # [batch, pos, d] -> [batch], the experiment's
        return probe.decision_function(hidden[:, -K_END:]).mean(-1)  # in the model's dtype

    scores: dict[str, dict[str, torch.Tensor]] = {"direct": {}, "exact": {}, "attribution": {}}
    for name, model in models.items():
        toks, mask = model.tokenize([format_prompt(model.tokenizer, i.text) for i in items])
        scores["direct"][name] = -direct_head_scores(model, toks, direction, attention_mask=mask)
        for method in ("exact", "attribution"):
            scores[method][name] = head_ablation_effects(
                model, toks, metric, method, attention_mask=mask, on="hidden", progress=False
            )
    results["heads"] = {
        method: {
            **diffs(by_dtype["fp32"], by_dtype["bf16"]),
            **ranking(by_dtype["fp32"], by_dtype["bf16"], (n_top, 10)),
            "fp32_abs_mean": float(by_dtype["fp32"].abs().mean()),
        }
        for method, by_dtype in scores.items()
    }


def suppression_section(models, results) -> None:
    res = {}
    for kl in ("full", "authors"):
        mats = {}
        for name, model in models.items():
            trace = ml.ReasoningTrace.from_text(model, QUESTION, RESPONSE)
            mats[name] = suppression_matrix(model, trace, kl=kl)
        a, b = mats["fp32"], mats["bf16"]
        below = torch.isfinite(a)
        out32, out16 = outgoing_effect(a), outgoing_effect(b)
        res[kl] = {
            **diffs(a, b),
            **ranking(a[below], b[below], (10,)),
            "n_entries": int(below.sum()),
            "n_sentences": int(a.shape[0]),
            "fp32_range": [float(a[below].min()), float(a[below].max())],
            "bf16_range": [float(b[below].min()), float(b[below].max())],
            "n_tokens": trace.n_tokens,
            "outgoing_fp32_top3": sorted(out32[:-1].tolist(), reverse=True)[:3],
            "outgoing_bf16_top3": sorted(out16[:-1].tolist(), reverse=True)[:3],
            "outgoing_spearman": spearman(out32.numpy(), out16.numpy())[0],
            "outgoing_top3": top_overlap(out32, out16, 3),
            "outgoing_argmax_same": int(out32[:-1].argmax() == out16[:-1].argmax()),
        }
    results["suppression"] = res


def templated_traces(model, n: int = 20) -> tuple[list, list[int]]:
    problems = [p for p in datasets.load("arithmetic", n=60, seed=0) if p.expression][:n]
    traces, labels = [], []
    for k, p in enumerate(problems):
        wrong = k % 2 == 1
        value = int(p.answer) + (3 if wrong else 0)
        text = (
            f"We need {p.expression}.\nComputing {p.expression} step by step gives {value}.\n"
            f"Checking once more, the result is {value}.\nAnswer: {value}"
        )
        traces.append(ml.ReasoningTrace.from_text(model, p.question, text))
        labels.append(int(wrong))
    return traces, labels


def depth_section(models, results) -> None:
    res, step, feats, evals = {}, {}, {}, {}
    token = {}
    for name, model in models.items():
        trace = ml.ReasoningTrace.from_text(model, QUESTION, RESPONSE)
        rs = reasoning_score(model, trace)
        token[name], step[name] = rs.token_scores, rs.step_scores
        traces, labels = templated_traces(model)
        rows = [analyze_trace(model, t, unit="line").features for t in traces]
        feats[name] = {f: torch.tensor([r[f] for r in rows]) for f in sorted(rows[0])}
        records = [{"features": r, "label": y} for r, y in zip(rows, labels, strict=True)]
        evals[name] = evaluate(records)
    res["token_scores"] = diffs(token["fp32"], token["bf16"])
    res["step_scores"] = {**diffs(step["fp32"], step["bf16"]), **ranking(step["fp32"], step["bf16"], (3,))}
    res["step_scores"]["n_steps"] = len(step["fp32"])
    res["features"] = {  # backtrack_attn is NaN on these traces (no backtracking cue)
        f: diffs(v, feats["bf16"][f]) for f, v in feats["fp32"].items() if torch.isfinite(v).any()
    }
    res["auroc"] = {
        key: {
            "a_priori": [evals[n][key]["auroc_a_priori"] for n in models],
            "cross_validated": [evals[n][key]["auroc_cross_validated"] for n in models],
        }
        for key in evals["fp32"]
    }
    results["depth"] = res


def flat(prefix: str, value) -> list[tuple[str, object]]:
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in flat(f"{prefix}.{k}", v)]
    return [(prefix, value)]


def main() -> None:
    torch.manual_seed(0)
    start = time.perf_counter()
    models = {"fp32": ml.load_model(dtype=torch.float32), "bf16": ml.load_model(dtype=torch.bfloat16)}
    results: dict = {}
    timings, t = {}, time.perf_counter()
    probe = probe_section(models, results)
    timings["probe"], t = time.perf_counter() - t, time.perf_counter()
    heads_section(models, probe, results)
    timings["heads"], t = time.perf_counter() - t, time.perf_counter()
    suppression_section(models, results)
    timings["suppression"], t = time.perf_counter() - t, time.perf_counter()
    depth_section(models, results)
    timings["depth"] = time.perf_counter() - t
    results["seconds"] = {**timings, "total": time.perf_counter() - start}
    for key, value in flat("bf16", results):
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, list):
            value = "[" + ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in value) + "]"
        print(f"{key}: {value}")
    report("bf16", results)


if __name__ == "__main__":
    main()
