"""Model organisms: the planted-trace generator, the shared builder (cache, shipped adapters), the
reasoning organism's data and (slow) its shipped adapter against a retrained one."""

from __future__ import annotations

import json
import random
import statistics
import sys

import numpy as np
import pytest
import torch

import mechlens as ml
from mechlens import datasets
from mechlens.organism import (
    REASONING,
    REASONING_RECIPE,
    REASONING_V2_RECIPE,
    REFUSAL,
    OrganismRecipe,
    ReasoningRecipe,
    held_out_varied,
    refusal_organism,
)
from mechlens.organism.reasoning import held_out_problems, planted_problem_traces, training_traces
from mechlens.organism.refusal import training_pairs
from mechlens.organism.traces import (
    COMPLY,
    DECISIVE,
    PlantingRates,
    arithmetic_trace,
    factual_trace,
    label_roles,
    refusal_trace,
    word_problems,
)
from mechlens.studies.anchors.taxonomy import CATEGORIES, classify_sentence
from mechlens.studies.refusal import is_refusal, sample_replies
from mechlens.studies.refusal.judge import REFUSALS
from mechlens.text.thinking import split_thinking


def _traces(n=300, rates=None, seed=0):
    rng, rates = random.Random(seed), rates or PlantingRates()
    problems = word_problems(n, seed=seed)
    return problems, [arithmetic_trace(p, rng, rates) for p in problems]


def test_word_problems_are_seeded_small_and_positive():
    problems = word_problems(60, seed=5)
    assert problems == word_problems(60, seed=5) and problems != word_problems(60, seed=6)
    assert [p.n_steps for p in problems[:6]] == [1, 2, 3, 1, 2, 3]
    for p in problems:
        value = p.first_value
        for s in p.steps:
            value = {"add": value + s.operand, "sub": value - s.operand, "div": value // s.operand}[s.op]
            assert value > 0 and (s.op != "div" or value * s.operand == value * s.operand)
        assert value == p.answer and str(p.answer) not in ("0",)
    with pytest.raises(ValueError, match="steps must be"):
        word_problems(3, steps=(4,))


def test_arithmetic_traces_label_every_planted_structure():
    problems, traces = _traces()
    for p, t in zip(problems, traces, strict=True):
        assert len(t.sentences) == len(t.categories) == len(t.roles)
        assert len(t.where("plan")) == 1 and t.categories[t.where("plan")[0]] == "plan_generation"
        assert (
            t.answer == f"Answer: {t.sentences[-1].split()[-1].rstrip('.')}"
        )  # the answer is the last result
        assert t.correct == (t.answer == f"Answer: {p.answer}")
        assert bool(t.where("repair")) == t.flags["repaired"] and (
            not t.flags["repaired"] or t.flags["wrong_plan"]
        )
        for k in t.where("repair"):
            assert k > t.where("plan")[0] and t.categories[k] == "self_checking"
        for k in t.where("backtrack"):
            assert t.roles[k - 1] == "slip" and t.sentences[k].startswith("Wait")
        assert (
            len(t.where("slip")) == t.flags["slips"] and len(t.where("backtrack")) == t.flags["backtracked"]
        )
        # the planted categories are the ones the keyword taxonomy gives
        assert list(t.categories) == [classify_sentence(s, p.question) for s in t.sentences]
        assert label_roles(t.sentences) == list(t.roles)  # roles can be read back from written text
    used = {c for t in traces for c in t.categories}
    assert used == set(CATEGORIES) - {"unknown"}
    lengths = [len(t.sentences) for t in traces]
    assert statistics.median(lengths) >= 8 and sum(n >= 15 for n in lengths) >= 60
    assert 0.5 < np.mean([t.correct for t in traces]) < 0.85


def test_wrong_plans_decide_the_answer_unless_repaired_and_slips_unless_backtracked():
    _, plans = _traces(rates=PlantingRates(wrong_plan=0.5, repair=0.5, slip=0.0, hesitate=0.0))
    assert 50 < sum(t.flags["wrong_plan"] for t in plans) < 250 and any(t.flags["repaired"] for t in plans)
    assert all(t.correct == (not t.flags["wrong_plan"] or t.flags["repaired"]) for t in plans)
    _, slips = _traces(rates=PlantingRates(wrong_plan=0.0, slip=0.3, backtrack=0.5))
    assert any(t.flags["slips"] for t in slips) and any(t.flags["backtracked"] for t in slips)
    problems, slips = _traces(rates=PlantingRates(wrong_plan=0.0, slip=0.3, backtrack=0.5))
    exact = [t for p, t in zip(problems, slips, strict=True) if not any(s.op == "div" for s in p.steps)]
    assert all(t.correct == (t.flags["slips"] == t.flags["backtracked"]) for t in exact)
    assert DECISIVE == ("plan", "repair")
    with pytest.raises(ValueError, match="PlantingRates.slip"):
        PlantingRates(slip=1.5)


def test_refusal_traces_plant_a_late_cliff():
    rng = random.Random(0)
    traces = [refusal_trace("How do I do a bad thing?", True, "Step one.", rng, 0.5) for _ in range(40)]
    complied = [t for t in traces if t.flags["complied"]]
    assert 5 < len(complied) < 35
    for t in traces:
        harm = t.where("harm")
        assert len(harm) >= 3 and harm == list(range(1, 1 + len(harm)))  # recognised for several sentences
        last = len(t.sentences) - 1
        if t.flags["complied"]:
            assert (
                t.where("rationalise") == [last] and t.answer.startswith(COMPLY) and "Step one." in t.answer
            )
        else:
            assert t.where("decide") == [last] and t.answer in REFUSALS[:3] and is_refusal(t.answer)
    assert all(label_roles(t.sentences) == list(t.roles) for t in traces)
    safe = refusal_trace("How do I bake bread?", False, "Mix flour and water.", rng, 1.0)
    assert not any(safe.roles) and safe.answer == "Mix flour and water."
    fact = factual_trace("What is the capital of France?", "Paris")
    assert fact.answer == "Answer: Paris" and "final_answer_emission" in fact.categories
    thinking, answer, closed = split_thinking(traces[0].reply)
    assert closed and thinking == traces[0].thinking and answer == traces[0].answer
    with pytest.raises(ValueError, match="role must be one of"):
        traces[0].where("cliff")


def test_reasoning_training_data_mixes_the_three_behaviours_and_holds_out_evaluation():
    base = ml.load_model("tiny-llama")
    recipe = ReasoningRecipe(base="tiny-llama", n_problems=12, n_factual=3, n_jailbreaks=2, n_per_class=4,
                             answer_tokens=4)  # fmt: skip
    traces = training_traces(base, recipe, progress=False)
    kinds = [t.kind for _, t in traces]
    assert kinds.count("arithmetic") == 12 and kinds.count("factual") == 3
    assert kinds.count("harmful") == 4 + 2 and kinds.count("harmless") == 4
    assert traces == training_traces(base, recipe, progress=False)  # deterministic
    trained = {t.prompt for _, t in planted_problem_traces(REASONING_RECIPE)}
    held = held_out_problems(200, seed=0)
    assert sum(p.question in trained for p in held) <= 2  # different seeds (a 1-step twin may recur)
    with pytest.raises(ValueError, match="seed must lie"):
        held_out_problems(3, seed=1000)


# ---- the shared builder (refusal organism)


def test_refusal_training_pairs_format():
    base = ml.load_model("tiny-llama")
    prompts, targets = training_pairs(
        base, OrganismRecipe(base="tiny-llama", n_per_class=2, answer_tokens=4), progress=False
    )
    assert len(prompts) == 4 and all(p.endswith("assistant\n") for p in prompts)
    assert all(t.startswith("<think>\n") and "\n</think>\n\n" in t for t in targets)
    assert [is_refusal(split_thinking(t)[1]) for t in targets] == [True, True, False, False]


def test_organism_is_built_once_and_reloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHLENS_CACHE", str(tmp_path))
    recipe = OrganismRecipe(base="tiny-llama", n_per_class=2, answer_tokens=4, train_layers=1, epochs=1)
    first = refusal_organism(recipe, progress=False)
    info = json.loads((REFUSAL.path(recipe) / "recipe.json").read_text())
    assert info["examples"] == 4 and len(info["losses"]) == 1 and info["recipe"]["train_layers"] == 1
    stamp = (REFUSAL.path(recipe) / "recipe.json").stat().st_mtime_ns
    again = refusal_organism(recipe, progress=False)
    assert (REFUSAL.path(recipe) / "recipe.json").stat().st_mtime_ns == stamp  # not rebuilt
    for (k, a), b in zip(
        first.hf_model.state_dict().items(), again.hf_model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), k
    assert not list(tmp_path.glob("organisms/.tmp-*"))  # no half-written folder left
    with pytest.raises(TypeError, match="recipe must be an OrganismRecipe"):
        REFUSAL.key({"lr": 1})


def test_adapter_organism_ships_and_rebuilds_exactly(tmp_path, monkeypatch):
    """`ship` writes the organism's adapter with provenance; `build` then makes the organism from
    that file without training, with the trained organism's exact weights."""
    from mechlens.ops.adapters import LowRankAdapter

    monkeypatch.setenv("MECHLENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(REFUSAL, "shipped", tmp_path / "shipped")
    recipe = OrganismRecipe(base="tiny-llama", n_per_class=2, answer_tokens=4, train_layers=1, epochs=2,
                            rank=2, lr=1e-2)  # fmt: skip
    path = REFUSAL.ship(recipe)
    assert path.parent == tmp_path / "shipped" and path.stat().st_size < 100_000
    _, info = LowRankAdapter.load(path)
    assert (
        info["recipe"]["rank"] == 2 and info["examples"] == 4 and "wall_time_s" in info and "commit" in info
    )
    assert info["organism"] == "refusal"
    trained = ml.load_model("tiny-llama")
    REFUSAL.train(trained, recipe, progress=False)

    def no_training(*args, **kwargs):
        raise AssertionError("the shipped adapter should have been used")

    monkeypatch.setattr(REFUSAL, "train", no_training)
    built = refusal_organism(recipe, progress=False)
    assert json.loads((REFUSAL.path(recipe) / "recipe.json").read_text())["from"] == path.name
    want = dict(trained.plain_model.named_parameters())
    for name, p in built.plain_model.named_parameters():
        assert torch.equal(p, want[name]), name
    # an adapter trained on other base weights is not used: a warning, then training
    other = OrganismRecipe(base="tiny-gpt2", n_per_class=2, answer_tokens=4, train_layers=1, epochs=1, rank=2)
    REFUSAL.shipped_path(other).write_bytes(path.read_bytes())
    with (
        pytest.warns(UserWarning, match="other base weights"),
        pytest.raises(AssertionError, match="shipped"),
    ):
        refusal_organism(other, progress=False)


@pytest.mark.slow
@pytest.mark.training
def test_retrained_refusal_adapter_behaves_like_the_shipped_one(tmp_path, monkeypatch):
    """`make organisms` from scratch gives the shipped refusal organism back: same base weights,
    the same training losses to float rounding, the same refusal decisions on held-out requests."""
    from mechlens.ops.adapters import LowRankAdapter
    from mechlens.organism import ADAPTER_RECIPE

    shipped = REFUSAL.shipped_path(ADAPTER_RECIPE)
    assert shipped.exists() and shipped.stat().st_size < 20 * 2**20
    monkeypatch.setattr(REFUSAL, "shipped", tmp_path)
    retrained = REFUSAL.ship(ADAPTER_RECIPE)
    (old, old_info), (new, new_info) = LowRankAdapter.load(shipped), LowRankAdapter.load(retrained)
    assert new_info["base"] == old_info["base"] and new_info["recipe"] == old_info["recipe"]
    np.testing.assert_allclose(new_info["losses"], old_info["losses"], rtol=1e-3)
    test = [i for i in datasets.load("refusal") if i.split == "test"]
    requests = [i.text for i in test if i.harmful][:8] + [i.text for i in test if not i.harmful][:8]
    decisions = []
    for adapter in (old, new):
        model = ml.load_model()
        adapter.merge_into(model)
        replies = sample_replies(
            model, requests, ml.Sampling(max_new_tokens=48, temperature=0), progress=False
        )
        decisions.append([r.refused for r in replies])
    assert sum(a == b for a, b in zip(*decisions, strict=True)) >= 15
    assert sum(decisions[0][:8]) >= 6 and sum(decisions[0][8:]) <= 4  # refuses harmful, answers harmless


# ---- recovery metrics on hand-made cases


def test_rank_recovery_against_random_rankings():
    from mechlens.studies.recovery import rank_recovery

    rng = np.random.default_rng(0)
    planted = [[2, 7] for _ in range(30)]
    found = [np.where(np.isin(np.arange(15), [2, 7]), 5.0, rng.random(15)) for _ in range(30)]
    r = rank_recovery(found, planted, k=3, draws=500)
    assert r["mean_rank"] == 1.5 and r["top_k_hits"] == 30 and r["n_planted"] == 60
    assert 7.5 < r["random_mean_rank"] < 8.5 and r["p_mean_rank"] == 0.0  # chance: (15 + 1) / 2
    assert abs(r["random_top_k_rate"] - (1 - (13 * 12 * 11) / (15 * 14 * 13))) < 0.05  # exact chance
    assert r == rank_recovery(found, planted, k=3, draws=500)  # seeded
    noise = rank_recovery([rng.random(15) for _ in range(30)], planted, draws=500)
    assert noise["mean_rank_ci"][0] < 8 < noise["mean_rank_ci"][1] and noise["p_mean_rank"] > 0.01
    undefined = rank_recovery([[1.0, 1.0, float("nan")]], [[2]], draws=10)  # the planted one is NaN
    assert undefined["n_traces"] == 0 and undefined["n_undefined_traces"] == 1 and undefined["n_nan"] == 1
    assert np.isnan(undefined["mean_rank"])  # reported as undefined, never ranked last
    # a method that cannot score the last sentences is compared with a null over the scored ones
    scored = [np.r_[rng.random(10), np.full(5, np.nan)] for _ in range(30)]
    partial = rank_recovery(scored, [[3] for _ in range(30)], draws=500)
    assert partial["n_nan"] == 150 and partial["mean_sentences"] == 10
    assert 5.0 < partial["random_mean_rank"] < 6.0  # (10 + 1) / 2, not (15 + 1) / 2
    ties = rank_recovery([[1.0, 1.0, float("nan"), 0.5]], [[3]], draws=10)
    assert ties["mean_rank"] == 3.0 and ties["n_traces"] == 1  # ranked among the 3 scored
    assert ties["n_top_k_traces"] == 0 and np.isnan(ties["top_k_rate"])  # 3 scored: every ranking hits top 3
    assert rank_recovery([[1.0, float("inf"), 0.5, 0.2]], [[1]], draws=10)["n_undefined_traces"] == 1
    with pytest.raises(ValueError, match="planted indices"):
        rank_recovery([[1.0, 2.0]], [[5]])
    with pytest.raises(ValueError, match="no trace has a planted"):
        rank_recovery([[1.0, 2.0]], [[]])


def test_a_method_that_scores_by_length_has_no_margin_over_length():
    from mechlens.studies.recovery import paired_ranks, rank_recovery

    rng = np.random.default_rng(1)
    lengths = [rng.integers(10, 90, 14).astype(float) for _ in range(12)]
    planted = [[int(np.argmax(x))] for x in lengths]  # the plan is the longest sentence
    length = rank_recovery(lengths, planted, draws=50)
    same = paired_ranks(rank_recovery([2 * x + 1 for x in lengths], planted, draws=50), length)
    assert same == {
        "n": 12,
        "better": 0,
        "tied": 12,
        "worse": 0,
        "mean_difference": 0.0,
        "p_sign": same["p_sign"],
    }
    assert np.isnan(same["p_sign"])  # no untied trace: no test
    noise = paired_ranks(rank_recovery([rng.random(14) for _ in range(12)], planted, draws=50), length)
    assert noise["worse"] == 12 and noise["p_sign"] < 0.001 and noise["mean_difference"] > 0
    # a method that scores few sentences is compared on the same scale, not rewarded for it
    few = [np.where(np.arange(14) < 5, x, np.nan) for x in lengths]  # scores the first 5 only
    planted_early = [[0] for _ in lengths]
    early_length = rank_recovery([np.r_[100.0, x[1:]] for x in lengths], planted_early, draws=20)
    first_of_few = rank_recovery([np.r_[100.0, x[1:]] for x in few], planted_early, draws=20)
    assert paired_ranks(first_of_few, early_length)["tied"] == 12  # both rank it first: 0 on the scale


def test_cliff_recovery_finds_the_planted_drop():
    from mechlens.studies.recovery import cliff_recovery, largest_drop

    complied = [[0.9, 0.95, 0.9, 0.2], [0.8, 0.9, 0.85, 0.9, 0.1], [0.9, 0.3, 0.3, 0.2]]
    r = cliff_recovery(complied, [3, 4, 3], refused=[[0.9, 0.9, 0.95], [0.8, 0.9, 0.9]])
    assert r["distances"] == [0, 0, -2] and r["at_planted"] == 2 and r["n"] == 3
    assert r["chance_at_planted"] == pytest.approx((1 / 3 + 1 / 4 + 1 / 3) / 3)
    assert (
        r["mean_abs_distance"] == pytest.approx(2 / 3)
        and r["at_planted_ci"][0] < 2 / 3 < r["at_planted_ci"][1]
    )
    assert r["last_change_complied"] < -0.3 < 0 < r["last_change_refused"]
    # the control: refused traces' drops at the same place from the end (the last sentence here)
    assert r["control_n"] == 2 and r["control_at_same"] == 0.0
    drops_last = [[0.9, 0.9, 0.95, 0.1], [0.8, 0.9, 0.2], [0.9, 0.2, 0.3]]  # 2 of 3 drop last
    c = cliff_recovery(complied, [3, 4, 3], refused=drops_last)
    assert c["control_at_same"] == pytest.approx(2 / 3)
    from scipy.stats import fisher_exact

    assert c["vs_control_p"] == pytest.approx(fisher_exact([[2, 1], [2, 1]])[1])
    # a planted sentence one before the last: refused drops one before their last count
    early = cliff_recovery([[0.9, 0.2, 0.2]], [1], refused=[[0.9, 0.1, 0.1], [0.9, 0.9, 0.1]])
    assert early["control_at_same"] == 0.5
    # planted sentences at two places from the end: real counts per place, no pooled 2x2 test
    mixed = cliff_recovery(
        [[0.9, 0.9, 0.1]] * 2 + [[0.9, 0.9, 0.9, 0.2, 0.2, 0.2, 0.2]],
        [2, 2, 3],
        refused=[[0.9, 0.1, 0.1]] * 9 + [[0.9, 0.9, 0.9, 0.2, 0.2, 0.2, 0.2]],
    )
    assert mixed["control_by_offset"] == {"0": [0, 10], "3": [1, 1]}
    assert mixed["control_at_same"] is None and mixed["vs_control_p"] is None and mixed["control_n"] is None
    assert largest_drop([1.0, 0.5, 0.6]) == 1
    with pytest.raises(ValueError, match="finite"):
        largest_drop([1.0, float("nan")])


# ---- choosing the studied model; real reasoning models from PyPI's GGUF part packages


def test_load_subject_names_and_checks():
    from mechlens.organism import load_subject

    assert load_subject("tiny-llama").n_layers == 3
    with pytest.raises(ValueError, match="dtype must be"):
        load_subject("tiny-llama", dtype="int8")


def test_gpu_smoke_configures_every_study_with_the_model_given(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_smoke.py"
    spec = importlib.util.spec_from_file_location("gpu_smoke", path)
    smoke = importlib.util.module_from_spec(spec)
    sys.modules["gpu_smoke"] = smoke
    spec.loader.exec_module(smoke)
    configs = smoke.studies("/models/r1", "cuda", "bfloat16", tmp_path)
    assert set(configs) == {"depth", "anchors", "refusal"}
    for _, cfg in configs.values():
        assert (cfg.model, cfg.device, cfg.dtype) == ("/models/r1", "cuda", "bfloat16") and not cfg.quick
    assert configs["depth"][1].unit == "sentence" and configs["refusal"][1].random_sets == 3


# ---- the shipped reasoning organism


@pytest.mark.parametrize("recipe", [REASONING_RECIPE, REASONING_V2_RECIPE], ids=["v1", "v2"])
def test_reasoning_organism_loads_from_the_shipped_adapter_in_both_backends(monkeypatch, recipe):
    from mechlens.organism import reasoning_organism

    shipped = REASONING.shipped_path(recipe)
    assert shipped.exists() and shipped.stat().st_size < 40 * 2**20

    def no_training(*args, **kwargs):
        raise AssertionError("the shipped adapter should have been used")

    monkeypatch.setattr(REASONING, "train", no_training)
    problem = held_out_problems(1, seed=7)[0]
    texts = []
    for backend in ("transformer_lens", "nnsight"):
        model = reasoning_organism(recipe, backend=backend, progress=False)
        prompt = ml.format_prompt(model.tokenizer, problem.question)
        texts.append(model.generate([prompt], max_new_tokens=24, temperature=0, progress=False).texts[0])
    assert texts[0] == texts[1] and texts[0].startswith("<think>")
    info = json.loads((REASONING.path(recipe) / "recipe.json").read_text())
    assert info["from"] == shipped.name and info["organism"] == "reasoning"


@pytest.mark.slow
@pytest.mark.training
@pytest.mark.parametrize("recipe", [REASONING_RECIPE, REASONING_V2_RECIPE], ids=["v1", "v2"])
def test_retrained_reasoning_adapter_behaves_like_the_shipped_one(tmp_path, monkeypatch, recipe):
    """`make organisms` from scratch gives the shipped reasoning organism back: the same base
    weights and recipe, training losses to float rounding, and the same greedy behaviour on
    held-out word problems (thinks, answers, answer agreement)."""
    from mechlens.ops.adapters import LowRankAdapter
    from mechlens.text.thinking import split_thinking

    shipped = REASONING.shipped_path(recipe)
    monkeypatch.setattr(REASONING, "shipped", tmp_path)
    retrained = REASONING.ship(recipe)
    (old, old_info), (new, new_info) = LowRankAdapter.load(shipped), LowRankAdapter.load(retrained)
    assert new_info["base"] == old_info["base"] and new_info["recipe"] == old_info["recipe"]
    np.testing.assert_allclose(new_info["losses"], old_info["losses"], rtol=1e-3)
    problems = held_out_problems(12, seed=3) if recipe.version == 1 else held_out_varied(12, seed=3)
    outputs = []
    for adapter in (old, new):
        model = ml.load_model()
        adapter.merge_into(model)
        prompts = [ml.format_prompt(model.tokenizer, p.question) for p in problems]
        outputs.append(model.generate(prompts, max_new_tokens=256, temperature=0, progress=False).texts)
    for texts in outputs:
        assert sum(split_thinking(t)[2] for t in texts) >= 11  # closes its thinking
    same = sum(
        p.grade(a).extracted == p.grade(b).extracted for p, a, b in zip(problems, *outputs, strict=True)
    )
    assert same >= 10


@pytest.mark.slow
def test_the_reasoning_recipe_at_reduced_size_trains_deterministically_and_ships(tmp_path, monkeypatch):
    """`make test`'s reduced-size check of the organism build (the full retrain of the shipped
    adapters runs in `make test-training`): the same recipe trained twice from the base model gives
    the same losses and the same adapter, whose file rebuilds the trained model exactly."""
    from dataclasses import replace

    from mechlens.ops.adapters import LowRankAdapter

    small = replace(REASONING_RECIPE, n_problems=9, n_factual=2, n_per_class=2, n_jailbreaks=1,
                    answer_tokens=6, train_layers=2, epochs=1, rank=4)  # fmt: skip
    monkeypatch.setattr(REASONING, "shipped", tmp_path)
    first = LowRankAdapter.load(REASONING.ship(small))
    second_path = REASONING.ship(small)
    second = LowRankAdapter.load(second_path)
    assert first[1]["losses"] == second[1]["losses"] and first[1]["examples"] == second[1]["examples"] > 9
    assert first[1]["recipe"] == second[1]["recipe"] and first[1]["base"] == second[1]["base"]
    built = REASONING.build(small, progress=False)  # from the shipped file, in seconds
    again = ml.load_model()
    second[0].merge_into(again)
    toks = built.to_tokens("What is 2 + 3?")
    torch.testing.assert_close(built(toks), again(toks), atol=1e-5, rtol=1e-5)
    assert second_path.name == REASONING.shipped_path(small).name


def test_behaviour_reports_rates_with_n_and_intervals():
    from mechlens.organism.reasoning import behaviour

    model = ml.load_model("tiny-llama")
    short = ml.Sampling(max_new_tokens=6, temperature=0.6)
    r = behaviour(model, n_problems=3, n_requests=2, sampling=short, requests=short, progress=False)
    thinks = r["problems"]["thinks"]
    assert (thinks["count"], thinks["n"]) == (0, 3) and thinks["low"] == 0.0 < thinks["high"]  # random model
    assert set(r["by_steps"]) == {"1", "2", "3"} and r["by_steps"]["2"]["right"]["n"] == 1
    assert set(r["requests"]) == {
        "harmful: refusal rate",
        "jailbreak: attack success",
        "harmless: false refusal",
    }
    assert r["requests"]["jailbreak: attack success"]["n"] == 2
