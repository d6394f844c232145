"""The seeds' other papers: Echoes-as-Anchors' study entry point (scripted replies on a tiny
model, every number against a direct recomputation), the self-evolving chains' transition
estimates on a synthetic Markov chain with known rates, and the budget harness's token
accounting."""

from __future__ import annotations

import numpy as np
import pytest

import mechlens as ml
from mechlens.datasets import Problem
from mechlens.studies import budget, echoes, evolution


class Scripted:
    """An engine whose continuation is `reply(prompt text)`; it records the prompts it saw."""

    name = "scripted"
    prompts_per_call = 64

    def __init__(self, model, reply, cap=False):
        self.model, self.reply, self.cap, self.seen, self.seeds = model, reply, cap, [], []

    def describe(self):
        return {"engine": self.name}

    def sample(self, prompts, sampling, seeds=None, stop=()):
        out = []
        for i, ids in enumerate(prompts):
            text = self.model.tokenizer.decode(ids)
            self.seen.append(text)
            self.seeds.append(sampling.seed if seeds is None else (sampling.seed, seeds[i]))
            reply = self.model.tokenizer(self.reply(text), add_special_tokens=False)["input_ids"]
            out.append([reply[: sampling.max_new_tokens] if self.cap else reply] * sampling.n)
        return out


PROBLEMS = [
    Problem(
        "a", "Tom has 3 apples and buys 4 more apples. How many apples does Tom have?", "7", kind="number"
    ),
    Problem("b", "Ann has 5 pens and loses 2 pens. How many pens does Ann have?", "3", kind="number"),
    Problem(
        "c",
        "A box holds 6 eggs and 6 more eggs are added. How many eggs are in the box?",
        "12",
        kind="number",
    ),
]


def _reply(text: str) -> str:
    if "Look back again" in text:
        return " the answer is clear.\n</think>\n\nAnswer: 12"
    if "eggs" in text and text.rstrip().endswith("</think>"):
        return "\n\nAnswer: 11"
    if "eggs" in text:
        return (
            "<think>\nA box holds 6 eggs and 6 more eggs are added. I add six and six and get eleven eggs."
            "\n</think>\n\nAnswer: 11"
        )
    if "apples" in text:
        return (
            "<think>\nTom has 3 apples and buys 4 more apples. Adding three and four gives seven."
            "\n</think>\n\nAnswer: 7"
        )
    return "<think>\nFive minus two leaves three pens for her now.\n</think>\n\nAnswer: 3"


def test_the_echo_study_recomputes_from_its_measures(tmp_path):
    model = ml.load_model("tiny-llama")
    engine = Scripted(model, _reply)
    sampling = echoes.ECHO_SAMPLING.replace(max_new_tokens=40)
    study = echoes.analyze(model, PROBLEMS, sampling, trim="echo-span", prefix_tokens=6, first_tokens=12,
                           cache=tmp_path, engine=engine, progress=False)  # fmt: skip
    assert [r.correct for r in study.replies] == [True, True, False]
    assert study.echo_rate() == (2, 3)  # the apples and eggs replies open with the question
    for r in study.replies:
        want = echoes.likelihood_gap(
            model, r.problem.question, r.text, echoes.trim_echo(r.problem.question, r.text, "echo-span")
        )
        assert r.gap == want
        np.testing.assert_allclose(
            r.refocusing.to_prefix, echoes.refocusing(model, r.problem.question, r.text, 6).to_prefix
        )
    gap = study.gap_by_outcome()
    assert gap["right"]["n"] == 2 and gap["wrong"]["n"] == 1
    assert gap["right"]["mean"] == pytest.approx(np.mean([r.gap.delta_mean for r in study.replies[:2]]))
    assert gap["difference"][0] == pytest.approx(gap["right"]["mean"] - gap["wrong"]["mean"])
    groups = study.refocusing_by_outcome()
    assert set(groups) == {"early", "middle", "late", "last layer"}
    assert np.isnan(groups["early"]["d"][0])  # one wrong reply: Cohen's d is undefined, not ranked
    # Echoic Prompting: the failed problem, its first 12 reply tokens, then the injection or nothing
    p = study.prompting
    assert p.problems == ["c"] and p.echo == [True] and p.control == [False] and p.first_tokens == 12
    assert p.paired["only_a"] == 1 and p.paired["only_b"] == 0
    inserted = [s for s in engine.seen if "Look back again" in s]
    assert len(inserted) == 1 and inserted[0].endswith(
        "Look back again: " + PROBLEMS[2].question + "\nSo now I know that "
    )
    lines = study.summary_lines()
    assert lines[0].startswith("echo of the question opens the thinking: 2/3")
    assert any(line.startswith("Echoic Prompting on 1 failed problems") for line in lines)
    calls = len(engine.seen)
    again = echoes.analyze(model, PROBLEMS, sampling, trim="echo-span", prefix_tokens=6, first_tokens=12,
                           cache=tmp_path, engine=engine, progress=False)  # fmt: skip
    assert len(engine.seen) == calls and again.prompting == study.prompting  # read from the cache
    bad_arguments = (
        ({"first_tokens": 40}, "first_tokens"),
        ({"layer_groups": {"x": (0, 99)}}, "layer_groups"),
        ({"injection": "no slot"}, "injection"),
    )
    for bad, name in bad_arguments:
        with pytest.raises(ValueError, match=name):
            echoes.analyze(model, PROBLEMS, sampling, cache=None, engine=engine, **bad)
    with pytest.raises(ValueError, match="problems"):
        echoes.analyze(model, [], sampling, cache=None, engine=engine)


def test_transition_estimates_recover_a_known_markov_chain():
    rng = np.random.default_rng(0)
    p_up, p_down = 0.3, 0.1
    chains = np.zeros((400, 12), dtype=int)
    chains[:, 0] = rng.random(400) < 0.2
    for k in range(1, 12):
        flip = rng.random(400)
        chains[:, k] = np.where(chains[:, k - 1] == 0, flip < p_up, flip >= p_down)
    t = evolution.transition_estimates(chains.tolist(), draws=300)
    assert t.p_up[1] < p_up < t.p_up[2] and t.p_down[1] < p_down < t.p_down[2]
    assert t.stationary == pytest.approx(p_up / (p_up + p_down), abs=0.03)
    assert t.stationary_ci[0] < 0.75 < t.stationary_ci[1]
    # the counts by hand
    small = evolution.transition_estimates([[0, 1, 0], [1, 1, 1]], draws=10)
    assert (small.up, small.n_from_wrong, small.down, small.n_from_right) == (1, 1, 1, 3)
    assert small.stationary == pytest.approx(1 / (1 + 1 / 3))
    assert [a[0] for a in small.accuracy_by_iteration] == [0.5, 1.0, 0.5]
    never = evolution.transition_estimates([[1, 1], [1, 1]], draws=10)
    assert np.isnan(never.stationary) and np.isnan(never.p_up[0])  # undefined, not 1 or 0
    for bad in ([], [[0]], [[0, 1], [1]], [[0, 2]], [[0, None]]):
        with pytest.raises(ValueError, match="chains"):
            evolution.transition_estimates(bad)


def test_evolve_chains_refine_their_own_answer():
    model = ml.load_model("tiny-llama")

    def reply(text):  # wrong first; right once shown a wrong answer; stays right
        if "ended with: Answer: 5" in text or "ended with: Answer: 7" in text:
            return "<think>\nCheck it.\n</think>\n\nAnswer: 7"
        return "<think>\nGuess.\n</think>\n\nAnswer: 5"

    engine = Scripted(model, reply)
    sampling = evolution.EVOLVE_SAMPLING.replace(max_new_tokens=8, seed=3)
    chains = evolution.evolve(model, PROBLEMS[:2], n_chains=2, iterations=3, sampling=sampling, engine=engine)
    assert chains.correct.shape == (2, 2, 3)
    assert chains.correct[0].tolist() == [[0, 1, 1], [0, 1, 1]]  # problem "a" (answer 7)
    assert chains.correct[1].tolist() == [[0, 0, 0], [0, 0, 0]]  # problem "b" (answer 3)
    assert chains.answers[0][0] == ["5", "7", "7"]
    from mechlens.rollouts.engines import prompt_seeds

    # turn k samples with seed + k, and each of the 4 chains with its own seed
    want = [(3 + k, s) for k in range(3) for s in prompt_seeds(sampling.replace(seed=3 + k), 4)]
    assert engine.seeds == want and len({s for _, s in want[:4]}) == 4
    assert any("A previous attempt ended with: Answer: 5" in s for s in engine.seen)
    assert chains.majority_accuracy().tolist() == [0.0, 0.5, 0.5]
    t = evolution.transition_estimates(chains.flat())
    assert (t.up, t.n_from_wrong, t.down, t.n_from_right) == (2, 6, 0, 2)
    with pytest.raises(ValueError, match="iterations"):
        evolution.evolve(model, PROBLEMS, iterations=1, engine=engine)
    with pytest.raises(ValueError, match="template"):
        evolution.evolve(model, PROBLEMS, template="{question}", engine=engine)


def test_budget_token_accounting():
    s = [budget.Sample(30, "7"), budget.Sample(50, None), budget.Sample(20, "5"), budget.Sample(40, "5")]
    assert [budget.parallel_used(s, b) for b in (29, 30, 79, 80, 100, 139, 140)] == [0, 1, 1, 2, 3, 3, 4]
    assert budget.parallel_right(s, "7", 100)  # "7" vs "5": a tie, the first answer wins
    assert not budget.parallel_right(s, "7", 140)  # "5" twice
    assert budget.parallel_right(s, "7", 140, vote="oracle") and not budget.parallel_right(s, "7", 20)
    model = ml.load_model("tiny-llama")
    ids = model.tokenizer("<think>\nthree and four\n</think>\n\nAnswer: 7", add_special_tokens=False)[
        "input_ids"
    ]
    got = budget.answers_at(model.tokenizer, ids, [3, len(ids)], numeric=True)
    assert got == [None, "7"]  # cut inside the thinking: no answer yet
    with pytest.raises(ValueError, match="budget"):
        budget.parallel_used(s, 0)
    with pytest.raises(ValueError, match="vote"):
        budget.parallel_right(s, "7", 10, vote="best")


def test_budget_curve_on_scripted_traces(tmp_path):
    model = ml.load_model("tiny-llama")
    long = (
        "<think>\nThree and four. Wait, let me check again: three plus four is seven.\n</think>\n\nAnswer: 7"
    )
    short = "<think>\nFive less two.\n</think>\n\nAnswer: 3"
    n_long, n_short = (len(model.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in (long, short))
    assert (n_long, n_short) == (82, 29)  # the numbers below follow from these lengths
    engine = Scripted(model, lambda text: long if "apples" in text else short, cap=True)
    curve = budget.budget_curve(model, PROBLEMS[:2], budgets=(120, 20, 82), short_tokens=30,
                                cache=tmp_path, engine=engine)  # fmt: skip
    assert curve.budgets == [20, 82, 120] and curve.long_texts == [long, short]
    assert curve.sequential.tolist() == [[0, 1, 1], [0, 1, 1]]  # each answers at its last token
    # 4 short traces of at most 30 tokens: "a"'s are cut before any answer, "b"'s answer in 29
    assert (
        curve.majority.tolist() == [[0, 0, 0], [0, 1, 1]] and curve.oracle.tolist() == curve.majority.tolist()
    )
    assert curve.mean_tokens["sequential"] == [20, (82 + 29) / 2, (82 + 29) / 2]
    assert curve.mean_tokens["parallel"] == [0, (60 + 58) / 2, (120 + 116) / 2]
    m = curve.paired(82)
    assert (m["n"], m["only_a"], m["only_b"]) == (2, 1, 0)
    assert len(curve.summary_lines()) == 3
    with pytest.raises(ValueError, match="short_tokens"):
        budget.budget_curve(model, PROBLEMS, budgets=(10,), short_tokens=20, cache=None, engine=engine)


def test_sorm_labels_are_the_counted_rollouts():
    from mechlens.studies import stepwise
    from mechlens.studies.anchors.resampling import Resampling, Rollout

    graded = [[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]  # rollouts before sentences 0, 1 and after 1
    rollouts = [[Rollout(i, "", "", "7" if c else "5", bool(c)) for c in row] for i, row in enumerate(graded)]
    res = Resampling(["s0", "s1"], rollouts, np.zeros((2, 4)))
    assert stepwise.step_values(res.accuracy).tolist() == [1 / 4, 0.0]  # V after step 0, after step 1
    assert stepwise.first_below(stepwise.step_values(res.accuracy), 0.5) == 0
    assert (
        stepwise.first_below([0.9, float("nan"), 0.2], 0.5) == 2 and stepwise.first_below([0.9], 0.5) is None
    )
    with pytest.raises(ValueError, match="accuracy"):
        stepwise.step_values([0.5])


def test_step_features_and_held_out_probes(backend):
    from conftest import wrap_with_reference

    from mechlens.studies import stepwise

    model, ref = wrap_with_reference("llama", backend)
    texts = [
        "First add them. Then it is seven. So the answer is seven.",
        "Take two away. That leaves three. Done now here.",
    ]
    traces = [ml.ReasoningTrace.from_text(model, "Q?", t) for t in texts]
    feats = stepwise.step_features(model, traces[0], layer=1)
    import torch

    with torch.no_grad():
        hidden = ref(traces[0].tokens, output_hidden_states=True).hidden_states[2][0]  # after block 1
    ends = [s.end - 1 for s in traces[0].sentences]
    torch.testing.assert_close(feats, hidden[ends].float(), atol=1e-4, rtol=1e-4)
    acc = [np.linspace(1, 0, len(t.sentences) + 1) for t in traces]
    study = stepwise.analyze(model, traces, acc, [False, True], [1, None], layer=1)
    assert [len(v) for v in study.sorm] == [len(t.sentences) for t in traces]
    # held out: trace 0's predictions do not change when its own values change
    other = stepwise.analyze(
        model, traces, [np.full_like(acc[0], 0.3), acc[1]], [False, True], [1, None], layer=1
    )
    np.testing.assert_allclose(other.sorm[0], study.sorm[0])
    assert not np.allclose(other.sorm[1], study.sorm[1])
    assert study.orm[0].tolist() == pytest.approx(
        [1.0] * len(study.orm[0]), abs=1e-5
    )  # trained on trace 1: right
    rec = study.recovery(draws=50)
    assert set(rec) == set(stepwise.LOCALISERS) and rec["rollout values"]["n"] == 1
    with pytest.raises(ValueError, match="accuracy values"):
        stepwise.analyze(model, traces, [acc[0][:-1], acc[1]], [0, 1], [None, None], layer=1)
    with pytest.raises(ValueError, match=">= 2 traces"):
        stepwise.analyze(model, traces[:1], acc[:1], [0], [None])


def test_localisation_null_is_a_permutation_distribution():
    from itertools import permutations

    from mechlens.studies import stepwise

    found, planted = [1, 2, 3], [1, 2, 0]
    r = stepwise.localisation_null(found, planted, draws=4000)
    exact = [
        sum(found[j] == p for j, p in zip(order, planted, strict=True)) for order in permutations(range(3))
    ]
    assert r["hits"] == 2 and r["null_mean"] == pytest.approx(np.mean(exact), abs=0.05)
    assert r["p"] == pytest.approx(np.mean([e >= 2 for e in exact]), abs=0.03)
    with pytest.raises(ValueError, match="equally long"):
        stepwise.localisation_null([1], [1, 2])


def test_the_new_arguments_are_checked(tmp_path):
    from mechlens.ops.stats import cohens_d, mean_difference
    from mechlens.studies import stepwise

    model = ml.load_model("tiny-llama")
    engine = Scripted(model, _reply)
    sampling = echoes.ECHO_SAMPLING.replace(max_new_tokens=40)
    for bad, name in (
        ({"trim": "lcs"}, "trim"),
        ({"threshold": 0}, "threshold"),
        ({"prefix_tokens": 0}, "prefix_tokens"),
        ({"injection": "{question} and {question}"}, "injection"),
        ({"layer_groups": {}}, "layer_groups"),
    ):
        with pytest.raises(ValueError, match=name):
            echoes.analyze(model, PROBLEMS, sampling, cache=None, engine=engine, **bad)
    assert not engine.seen  # every argument is checked before anything is sampled
    with pytest.raises(ValueError, match="l2"):
        stepwise.ValueProbe(l2=0)
    with pytest.raises(ValueError, match="draws"):
        mean_difference([1.0, 2.0], [1.0], draws=0)
    with pytest.raises(ValueError, match="z"):
        cohens_d([1.0, 2.0], [1.0, 3.0], z=0)
    with pytest.raises(ValueError, match="draws"):
        evolution.transition_estimates([[0, 1]], draws=0)
    # the bootstrap interval is pinned: each group resampled on its own, seeded
    a, b = [2.0, 3.0, 4.0, 5.0], [1.0, 2.0, 2.0, 3.0]
    rng = np.random.default_rng(7)
    boot = [rng.choice(a, 4).mean() - rng.choice(b, 4).mean() for _ in range(300)]
    assert mean_difference(a, b, draws=300, seed=7) == (
        1.5,
        np.percentile(boot, 2.5),
        np.percentile(boot, 97.5),
    )


def test_refusal_arguments_are_checked():
    from mechlens.studies import refusal

    model = ml.load_model("tiny-llama")
    sets = refusal.prompt_sets(2, 2, 2)
    for bad, name in (({"sweep_examples": 0}, "sweep_examples"), ({"batch_size": 0}, "batch_size"),
                      ({"head_fraction": True}, "head_fraction")):  # fmt: skip
        with pytest.raises(ValueError, match=name):
            refusal.analyze(model, sets, cache=None, **bad)
    with pytest.raises(ValueError, match=r"prompts\['harmful'\]"):
        refusal.analyze(model, {**sets, "harmful": "one string"}, cache=None)
    with pytest.raises(ValueError, match="draws"):
        refusal.JudgeSettings("folder", draws=0)
    with pytest.raises(ValueError, match="fraction"):
        refusal.JudgeSettings("folder", fraction=1.5)
