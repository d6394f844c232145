"""Sentence patching between traces on the reasoning organism (`mechlens.studies.patching`).

For held-out one-step word problems, the organism reads two traces of the same problem that
differ only in the plan sentence: a right plan ("I will add the 3 apples found.") and a wrong one
("I will subtract the 3 apples found."). The wrong-plan trace is cut after its plan and continued
greedily, unpatched and with the right plan's residual stream patched over its plan sentence at
one layer (the plan's last token, `align="last"`). The control patches a non-decisive sentence of
the right trace (the restated question just before the plan) into the same place. Reported per
layer: how often the continuation computes with the right operation and reaches the right
answer, each with its Wilson interval, and McNemar's paired test of the plan against the control.

    python experiments/sentence_patching.py [--quick] [--layers 0,3,6,...]

Writes figures/patching/: follows_by_layer (with provenance), results.json and summary.json.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from mechlens import ReasoningTrace
from mechlens.models.sampling import Sampling
from mechlens.ops.stats import format_rate, mcnemar, wilson
from mechlens.organism import PlantingRates, load_subject
from mechlens.organism.traces import arithmetic_trace, label_roles, word_problems
from mechlens.plots import mean_ci_lines
from mechlens.runs import Run, parse_config
from mechlens.studies import patching
from mechlens.text.answers import final_number

PROBLEM_SEED = 7300
"""Seed of the patched problems (not the organism's training seed)."""
ONLY_PLAN = dict(slip=0.0, hesitate=0.0, repair=0.0)
COMPUTATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)\.")
SYMBOL = {"add": "+", "sub": "-", "mul": "*", "div": "/"}


@dataclass
class PatchingConfig:
    model: str = "organism"
    backend: Literal["transformer_lens", "nnsight"] = "transformer_lens"
    device: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    n_problems: int = 30
    layers: str = "0,3,6,9,12,15,18,21,24,27,29"
    site: Literal["resid_post", "z"] = "resid_post"
    align: Literal["last", "mean"] = "last"
    max_new_tokens: int = 96  # enough for the computation, the check and the answer
    quick: bool = False
    out: str = "figures/patching"
    seed: int = 0

    def __post_init__(self):
        if self.quick:
            self.n_problems, self.layers = 6, "6,18,27"

    @property
    def layer_list(self) -> list[int]:
        return [int(x) for x in self.layers.split(",")]


def pair_of_traces(model, problem, seed: int) -> tuple[ReasoningTrace, ReasoningTrace, str, str] | None:
    """(right-plan trace, wrong-plan trace, right symbol, wrong symbol) of one problem."""
    right = arithmetic_trace(problem, random.Random(seed), PlantingRates(wrong_plan=0.0, **ONLY_PLAN))
    wrong = arithmetic_trace(problem, random.Random(seed), PlantingRates(wrong_plan=1.0, **ONLY_PLAN))
    if not wrong.flags["wrong_plan"]:
        return None
    a = ReasoningTrace.from_text(model, problem.question, right.reply)
    b = ReasoningTrace.from_text(model, problem.question, wrong.reply)
    ops = ([("mul", problem.per_pack)] if problem.per_pack else []) + [
        (s.op, s.operand) for s in problem.steps
    ]
    right_op = ops[0][0]
    wrong_op = {"mul": "add", "add": "sub", "sub": "add", "div": "sub"}[right_op]
    return a, b, SYMBOL[right_op], SYMBOL[wrong_op]


def outcome(text: str, right_symbol: str, answer: int) -> dict:
    """The first computation's operation and the answer of one continuation."""
    m = COMPUTATION.search(text)
    number = final_number(text)
    return {"op": m.group(2) if m else None, "right_op": bool(m and m.group(2) == right_symbol),
            "right_answer": number is not None and int(number) == answer}  # fmt: skip


def main(cfg: PatchingConfig) -> dict:
    model = load_subject(cfg.model, cfg.backend, cfg.device, cfg.dtype)
    run = Run("patching", cfg, cfg.out, model=model, seed=cfg.seed, images=not cfg.quick)
    sampling = Sampling(temperature=0.0, max_new_tokens=cfg.max_new_tokens)
    rows = []
    problems = word_problems(cfg.n_problems * 2, seed=PROBLEM_SEED + cfg.seed, steps=(1,))
    for k, problem in enumerate(tqdm(problems, desc="problems")):
        if len(rows) == cfg.n_problems:
            break
        pair = pair_of_traces(model, problem, cfg.seed + k)
        if pair is None:
            continue
        source, target, right_symbol, _ = pair
        src_roles = label_roles([s.text for s in source.sentences])
        tgt_roles = label_roles([s.text for s in target.sentences])
        if "plan" not in src_roles or "plan" not in tgt_roles:
            continue
        i, j = src_roles.index("plan"), tgt_roles.index("plan")

        def patched(pairs, i=i, j=j, source=source, target=target) -> dict:
            out = patching.patch_sentences(model, source, target, pairs, cfg.layer_list, site=cfg.site,
                                           align=cfg.align, cut=j, sampling=sampling)  # fmt: skip
            return {"baseline": out.baseline[0], "texts": {str(l): t[0] for l, t in out.texts.items()}}

        plan = run.cached("plan", lambda i=i, j=j: patched([(i, j)]), problem=problem.id)
        control = run.cached("control", lambda i=i, j=j: patched([(i - 1, j)]), problem=problem.id)
        rows.append({
            "problem": problem.id, "answer": problem.answer, "right_symbol": right_symbol,
            "plan_sentence": [source.sentences[i].text, target.sentences[j].text],
            "control_sentence": source.sentences[i - 1].text,
            "baseline": outcome(plan["baseline"], right_symbol, problem.answer),
            "plan": {l: outcome(t, right_symbol, problem.answer) for l, t in plan["texts"].items()},
            "control": {l: outcome(t, right_symbol, problem.answer) for l, t in control["texts"].items()},
        })  # fmt: skip
    n = len(rows)
    base_ops = sum(r["baseline"]["right_op"] for r in rows)
    per_layer = {}
    for layer in cfg.layer_list:
        key = str(layer)
        entry = {}
        for arm in ("plan", "control"):
            for what in ("right_op", "right_answer"):
                hits = sum(r[arm][key][what] for r in rows)
                entry[f"{arm}_{what}"] = {"count": hits, "n": n, "rate": wilson(hits, n)}
        entry["mcnemar_right_op"] = mcnemar([r["plan"][key]["right_op"] for r in rows],
                                            [r["control"][key]["right_op"] for r in rows])  # fmt: skip
        per_layer[key] = entry
    groups = {}
    for arm, name in (
        ("plan", "right plan patched in"),
        ("control", "restated question patched in (control)"),
    ):
        rates = [per_layer[str(l)][f"{arm}_right_op"]["rate"] for l in cfg.layer_list]
        groups[name] = tuple([100 * r[i] for r in rates] for i in range(3))
    base = wilson(base_ops, n)
    groups["unpatched wrong-plan trace"] = tuple([100 * base[i]] * len(cfg.layer_list) for i in range(3))
    fig = mean_ci_lines(
        cfg.layer_list, groups, f"patched layer ({cfg.site})", "% of continuations with the right operation",
        title=f"Patching the right plan over a wrong plan ({n} one-step problems, greedy, 95% Wilson)",
    )  # fmt: skip
    run.save_figure(fig, "follows_by_layer", caption="The continuation's operation after sentence patching.")
    results = {"n": n, "baseline_right_op": {"count": base_ops, "n": n, "rate": base},
               "baseline_right_answer": sum(r["baseline"]["right_answer"] for r in rows),
               "per_layer": per_layer, "rows": rows}  # fmt: skip
    run.save_json("results.json", results)
    lines = [f"{n} problems; unpatched wrong-plan continuations compute the right operation "
             f"{format_rate(base_ops, n)}"]  # fmt: skip
    for layer in cfg.layer_list:
        e = per_layer[str(layer)]
        count = {key: format_rate(value["count"], n) for key, value in e.items() if "count" in value}
        lines.append(
            f"layer {layer}: right operation with the plan patched {count['plan_right_op']}, control "
            f"{count['control_right_op']} (McNemar p = {e['mcnemar_right_op']['p']:.3g}); right answer "
            f"{count['plan_right_answer']} vs {count['control_right_answer']}"
        )
    run.summarize("Sentence patching", lines)
    return results


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    np.seterr(all="ignore")
    main(parse_config(PatchingConfig, description=__doc__))
