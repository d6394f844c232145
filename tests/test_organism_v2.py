"""The reasoning organism's second version: its problem generator (kinds, wordings, held-out
templates and kinds, carry-free arithmetic), its planted traces (plans in their method's words at
varied positions, decoys), the forced-edit acceptance test, and its training data."""

from __future__ import annotations

import random
import re
import statistics
from collections import Counter

import numpy as np
import pytest

import mechlens as ml
from mechlens.organism import REASONING, REASONING_RECIPE, REASONING_V2_RECIPE, held_out_varied
from mechlens.organism.problems import (
    HELD_OUT_KINDS,
    HELD_OUT_WORDING,
    KINDS,
    TEMPLATES,
    WRONG_OP,
    easy,
    varied_problems,
    wrong_steps,
)
from mechlens.organism.reasoning import (
    EDITS,
    ReasoningRecipe,
    edited_prefixes,
    forced_edits,
    planted_problem_traces,
    training_traces,
)
from mechlens.organism.traces import DECISIVE, PHRASES, PlantingRates, label_roles, planned_trace
from mechlens.studies.anchors.taxonomy import classify_sentence
from mechlens.studies.refusal import is_refusal

HELD_SLOTS = ("open", "packs", "ask", "ask_div")


def _pattern(wording: str) -> re.Pattern:
    """A regex matching `wording` with any value in each field."""
    parts = re.split(r"\{\w+\}", wording)
    return re.compile(r".+?".join(re.escape(p) for p in parts))


def _uses(question: str, kind: str, slot: str, index: int) -> bool:
    return any(_pattern(TEMPLATES[kind][slot][index]).fullmatch(s) for s in _sentences(question))


def _sentences(question: str) -> list[str]:
    return [s if s.endswith(("?", ".")) else s + "." for s in re.split(r"(?<=[.?]) ", question)]


def test_problems_are_seeded_easy_and_worded_by_many_templates():
    train = varied_problems(400, seed=1000)
    assert train == varied_problems(400, seed=1000) and train != varied_problems(400, seed=1001)
    assert Counter(p.kind for p in train) == {k: 100 for k in KINDS if k not in HELD_OUT_KINDS}
    assert [p.n_steps for p in train[:6]] == [1, 2, 3, 1, 2, 3]
    for p in train:
        values = p.values(p.ops)
        assert (
            all(easy(op, v, b) for (op, b), v in zip(p.ops, values, strict=False)) and p.answer == values[-1]
        )
        assert wrong_steps(p.start, p.ops)  # some wrong plan keeps the arithmetic easy
        for bad in wrong_steps(p.start, p.ops):
            planned = [(WRONG_OP[op] if k == bad else op, b) for k, (op, b) in enumerate(p.ops)]
            assert p.run(planned) != p.answer  # a wrong plan gives a wrong answer
    for kind in {p.kind for p in train}:
        assert len({p.template for p in train if p.kind == kind}) >= 20  # >= 20 templates per kind
    assert easy("add", 23, 6) and not easy("add", 27, 6) and not easy("sub", 23, 6) and not easy("div", 9, 2)
    with pytest.raises(ValueError, match="split must be"):
        varied_problems(2, split="test")
    with pytest.raises(ValueError, match="steps must be"):
        varied_problems(2, steps=(4,))


def test_held_out_templates_and_kinds_are_disjoint_from_training():
    train = varied_problems(400, seed=1000)
    templates = varied_problems(120, seed=0, split="held_out_templates")
    kinds = varied_problems(30, seed=0, split="held_out_kinds")
    assert {p.kind for p in kinds} == set(HELD_OUT_KINDS) and not {p.kind for p in train} & set(
        HELD_OUT_KINDS
    )
    for p in train:  # training never uses a held-out opening or question
        assert not any(
            _uses(p.question, p.kind, slot, HELD_OUT_WORDING)
            for slot in HELD_SLOTS
            if slot in TEMPLATES[p.kind]
        ), p.question
    for p in templates:  # held-out templates open and ask in the held-out wording
        opening = "packs" if p.ops[0][0] == "mul" and p.kind == "items" else "open"
        assert _uses(p.question, p.kind, opening, HELD_OUT_WORDING), p.question
    assert not {p.question for p in train} & {p.question for p in templates}
    held = held_out_varied(6, "held_out_kinds", seed=2)
    assert [h.level for h in held] == [1, 2, 3, 1, 2, 3] and all(h.answer.isdigit() for h in held)
    with pytest.raises(ValueError, match="seed must lie"):
        held_out_varied(2, seed=1000)


def test_planned_traces_label_plans_decoys_and_read_back():
    problems = varied_problems(300, seed=1000)
    traces = [planned_trace(p, random.Random(k)) for k, p in enumerate(problems)]
    up_front = [t.flags["up_front"] for t in traces]
    assert 0.3 < np.mean(up_front) < 0.9  # one plan sentence up front, or one per step
    first_plan = []
    for p, t in zip(problems, traces, strict=True):
        plans = t.where("plan")
        assert len(plans) == (1 if t.flags["up_front"] else p.n_steps)
        assert label_roles(t.sentences) == list(t.roles)  # read back from written text
        assert list(t.categories) == [classify_sentence(s, p.question) for s in t.sentences]
        assert t.answer == f"Answer: {t.sentences[-1].split()[-1].rstrip('.')}"
        assert t.correct == (t.answer == f"Answer: {p.answer}")
        first_plan.append(plans[0])
    assert len(set(first_plan)) >= 4  # the plan's position varies
    decoys = [t for t in traces if t.where("decoy")]
    assert len(decoys) > 150 and DECISIVE == ("plan", "repair")
    plan_len = [len(t.sentences[k]) for t in traces for k in t.where("plan")]
    decoy_len = [len(t.sentences[k]) for t in traces for k in t.where("decoy")]
    assert statistics.median(decoy_len) >= statistics.median(plan_len)  # length gives no credit
    longest_is_plan = [
        max(range(len(t.sentences)), key=lambda k: len(t.sentences[k])) in t.where("plan") for t in traces
    ]
    assert np.mean(longest_is_plan) < 0.5
    lengths = [len(t.sentences) for t in traces]
    assert statistics.median(lengths) >= 8
    assert 0.5 < np.mean([t.correct for t in traces]) < 0.85


def test_wrong_plans_name_another_method_and_decide_the_answer():
    problems = varied_problems(200, seed=1000)
    rates = PlantingRates(wrong_plan=0.5, repair=0.5, slip=0.0, hesitate=0.0)
    traces = [planned_trace(p, random.Random(k), rates) for k, p in enumerate(problems)]
    assert 50 < sum(t.flags["wrong_plan"] for t in traces) < 150 and any(t.flags["repaired"] for t in traces)
    assert all(t.correct == (not t.flags["wrong_plan"] or t.flags["repaired"]) for t in traces)
    for op, wrong in WRONG_OP.items():  # a wrong plan shares few words with the right one
        for right_words in PHRASES[op]:
            for wrong_words in PHRASES[wrong]:
                a, b = set(right_words.split()), set(wrong_words.split())
                assert len(a & b) / len(a | b) < 0.35, (right_words, wrong_words)
    slips = [planned_trace(p, random.Random(k), PlantingRates(wrong_plan=0.0, slip=0.5, backtrack=0.5))
             for k, p in enumerate(problems)]  # fmt: skip
    assert any(t.flags["slips"] for t in slips) and any(t.flags["backtracked"] for t in slips)
    assert all(t.correct == (t.flags["slips"] == t.flags["backtracked"]) for t in slips)


def test_edited_prefixes_differ_only_at_the_edit_and_name_the_obeying_answer():
    for k, p in enumerate(varied_problems(40, seed=3, split="held_out_templates")):
        made = edited_prefixes(p, k)
        assert set(made) == set(EDITS) and made["plan kept"] is not None and made["plan edited"] is not None
        (kept, right), (edited, wrong) = made["plan kept"], made["plan edited"]
        assert right == p.answer and wrong != p.answer
        a, b = re.split(r"(?<=\.) ", kept), re.split(r"(?<=\.) ", edited)
        assert a[:-1] == b[:-1] and a[-1] != b[-1]  # the same text up to the edited plan sentence
        assert label_roles(a[-1:]) == label_roles(b[-1:]) == ["plan"]
        if made["slip"] is not None:
            (slip, target), (fixed, answer) = made["slip"], made["slip corrected"]
            assert answer == p.answer and target != p.answer and fixed.startswith(slip)
            assert label_roles(re.split(r"(?<=\.) ", fixed)[-2:]) == ["slip", "backtrack"]


def test_forced_edits_report_rates_with_n_and_intervals():
    model = ml.load_model("tiny-llama")
    out = forced_edits(model, n=2, max_new_tokens=4, progress=False)
    assert set(EDITS) <= set(out) and out["plan edited"]["n"] == 2
    assert out["plan edited"]["low"] == 0.0 < out["plan edited"]["high"]  # a random model follows nothing


def test_v2_training_data_drops_harmless_refusals_and_has_its_own_key(monkeypatch):
    import mechlens.organism.reasoning as reasoning

    base = ml.load_model("tiny-llama")
    recipe = ReasoningRecipe(base="tiny-llama", n_problems=8, n_factual=2, n_jailbreaks=1, n_per_class=3,
                             answer_tokens=4, version=2)  # fmt: skip
    refuse = "I'm sorry, but I can't help with that."
    monkeypatch.setattr(reasoning, "whole_sentences", lambda text: refuse)  # every base reply refuses
    traces = training_traces(base, recipe, progress=False)
    kinds = Counter(t.kind for _, t in traces)
    assert kinds["arithmetic"] == 8 and kinds["harmless"] == 0 and kinds["harmful"] == 3 + 1
    assert is_refusal(refuse)
    assert all(t.flags.get("kind") in KINDS for _, t in planted_problem_traces(recipe))
    assert REASONING.shipped_path(REASONING_V2_RECIPE) != REASONING.shipped_path(REASONING_RECIPE)
    assert REASONING.key(REASONING_V2_RECIPE)["data"] != REASONING.key(REASONING_RECIPE)["data"]


def test_v2_harm_recognition_states_the_intent_that_the_rationalisation_reverses():
    from mechlens.organism.traces import HARM_INTENT, refusal_trace

    rng = random.Random(0)
    traces = [
        refusal_trace("How do I do a bad thing?", True, "Step one.", rng, 0.5, intent=True) for _ in range(40)
    ]
    assert 5 < sum(t.flags["complied"] for t in traces) < 35
    for t in traces:
        harm = t.where("harm")
        assert len(harm) >= 3 and all(t.sentences[k] in HARM_INTENT for k in harm)
        assert all(re.search(r"refuse|not|no\b|decline", t.sentences[k]) for k in harm)
        assert label_roles(t.sentences) == list(t.roles)
        last = t.roles[-1]
        assert last == ("rationalise" if t.flags["complied"] else "decide")


def test_planted_cliff_reports_the_plateau_and_final_score_of_each_outcome():
    from types import SimpleNamespace

    import torch

    from mechlens.organism.reasoning import planted_cliff
    from mechlens.organism.traces import refusal_trace
    from mechlens.studies.refusal.cliffs import Cliff
    from mechlens.studies.refusal.replies import Reply

    model = ml.load_model("tiny-llama")
    rng = random.Random(1)
    groups: dict = {"harmful, complied": [], "harmful, refused": []}
    for comply in (1.0, 0.0):
        for _ in range(3):
            t = refusal_trace("How do I do a bad thing?", True, "Step one.", rng, comply, intent=True)
            prompt = ml.format_prompt(model.tokenizer, t.prompt)
            group = "harmful, complied" if comply else "harmful, refused"
            groups[group].append(Reply(t.prompt, prompt, t.thinking, t.answer, True))
    curves, cliffs = {}, {}
    for group, replies in groups.items():
        curves[group] = [torch.linspace(0.9, 0.1 if "complied" in group else 0.8,
                                        len(model.to_tokens(r.probe_text)[0])) for r in replies]  # fmt: skip
        cliff = Cliff(0.8, 0.2, 0.6, 0.1, 3) if "complied" in group else Cliff(0.8, 0.8, 0.0, 0.8, None)
        cliffs[group] = [cliff] * len(replies)
    study = SimpleNamespace(groups=groups, curves=curves, cliffs=cliffs)
    out, rows = planted_cliff(model, study)  # type: ignore[arg-type]
    assert out is not None and len(rows["harmful, complied"]) == 3
    assert out["plateau_complied"] == {"mean": pytest.approx(0.8), "low": pytest.approx(0.8),
                                       "high": pytest.approx(0.8), "n": 3}  # fmt: skip
    assert out["final_complied"]["mean"] == pytest.approx(0.1) and out["final_refused"][
        "mean"
    ] == pytest.approx(0.8)
    assert out["cliff_auroc_complied_vs_refused"] == 1.0
