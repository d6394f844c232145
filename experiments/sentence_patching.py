"""Sentence patching between traces on the reasoning organism (`mechlens.studies.patching`).

For held-out one-step word problems, the organism reads two traces of the same problem that
differ only in the plan sentence: a right plan ("I will add the 3 apples found.") and a wrong one
("I will subtract the 3 apples found."). The wrong-plan trace is cut after its plan and continued
greedily, unpatched and with the right plan's residual stream patched over its plan sentence at
one layer (the plan's last token, `align="last"`; `--align mean` writes the plan's mean over every
position of it). Two other sources are written the same way: the fact sentence just before the
plan ("I recall that finding more means adding.", which names the right operation) and, as the
control, the restated question ("The question: how many ..."), which decides nothing. Reported
per layer: how often the continuation computes with the right operation and reaches the right
answer, each with its Wilson interval, and McNemar's paired test of the plan against each other
source on the same problems.

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
ARMS = {
    "plan": "the right plan",
    "fact": "the fact sentence before it (names the right operation)",
    "question": "the restated question (control)",
}
"""What is written over the wrong plan: the source sentence of each arm."""
OTHERS = ("fact", "question")


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
        question = next(k for k, s in enumerate(source.sentences) if s.text.startswith("The question:"))

        def patched(pairs, j=j, source=source, target=target) -> dict:
            out = patching.patch_sentences(model, source, target, pairs, cfg.layer_list, site=cfg.site,
                                           align=cfg.align, cut=j, sampling=sampling)  # fmt: skip
            return {"baseline": out.baseline[0], "texts": {str(l): t[0] for l, t in out.texts.items()}}

        # the source sentence written over the target's plan, per arm ("control": the cache's name
        # for the fact sentence just before the plan, which names the right operation)
        sources = {"plan": ("plan", i), "fact": ("control", i - 1), "question": ("question", question)}
        texts = {arm: run.cached(step, lambda k=k, j=j: patched([(k, j)]), problem=problem.id)
                 for arm, (step, k) in sources.items()}  # fmt: skip
        rows.append({
            "problem": problem.id, "answer": problem.answer, "right_symbol": right_symbol,
            "plan_sentence": [source.sentences[i].text, target.sentences[j].text],
            "sentences": {arm: source.sentences[k].text for arm, (_, k) in sources.items()},
            "baseline": outcome(texts["plan"]["baseline"], right_symbol, problem.answer),
            **{arm: {l: outcome(t, right_symbol, problem.answer) for l, t in texts[arm]["texts"].items()}
               for arm in ARMS},
        })  # fmt: skip
    n = len(rows)
    base_ops = sum(r["baseline"]["right_op"] for r in rows)
    per_layer = {}
    for layer in cfg.layer_list:
        key = str(layer)
        entry: dict = {}
        for arm in ARMS:
            for what in ("right_op", "right_answer"):
                hits = sum(r[arm][key][what] for r in rows)
                entry[f"{arm}_{what}"] = {"count": hits, "n": n, "rate": wilson(hits, n)}
        plan_ops = [r["plan"][key]["right_op"] for r in rows]
        for other in OTHERS:
            entry[f"mcnemar_plan_vs_{other}"] = mcnemar(plan_ops, [r[other][key]["right_op"] for r in rows])
        per_layer[key] = entry
    groups = {}
    for arm, name in ARMS.items():
        rates = [per_layer[str(l)][f"{arm}_right_op"]["rate"] for l in cfg.layer_list]
        groups[name] = tuple([100 * r[i] for r in rates] for i in range(3))
    base = wilson(base_ops, n)
    groups["unpatched wrong-plan trace"] = tuple([100 * base[i]] * len(cfg.layer_list) for i in range(3))
    fig = mean_ci_lines(
        cfg.layer_list, groups, f"patched layer ({cfg.site})", "% of continuations with the right operation",
        title=f"Written over a wrong plan ({cfg.align} token), {n} one-step problems, greedy, 95% Wilson",
    )  # fmt: skip
    run.save_figure(fig, "follows_by_layer", caption="The continuation's operation after sentence patching.")
    results = {"n": n, "align": cfg.align, "baseline_right_op": {"count": base_ops, "n": n, "rate": base},
               "baseline_right_answer": sum(r["baseline"]["right_answer"] for r in rows),
               "per_layer": per_layer, "rows": rows}  # fmt: skip
    run.save_json("results.json", results)
    lines = [f"{n} problems; unpatched wrong-plan continuations compute the right operation "
             f"{format_rate(base_ops, n)}"]  # fmt: skip
    for layer in cfg.layer_list:
        e = per_layer[str(layer)]
        count = {arm: format_rate(e[f"{arm}_right_op"]["count"], n) for arm in ARMS}
        tests = ", ".join(f"plan vs {o} McNemar p = {e[f'mcnemar_plan_vs_{o}']['p']:.3g}" for o in OTHERS)
        lines.append(f"layer {layer}: right operation after writing the right plan {count['plan']}, the "
                     f"fact sentence {count['fact']}, the restated question {count['question']} "
                     f"({tests})")  # fmt: skip
    run.summarize("Sentence patching", lines)
    return results


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    np.seterr(all="ignore")
    main(parse_config(PatchingConfig, description=__doc__))
