"""`refusal.analyze`, the study's entry point, on a tiny model whose replies come from a scripted
engine (a tiny random model never refuses): every number against a direct recomputation from the
public primitives, the cache, the paired tests, and the argument checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import mechlens as ml
from mechlens.ops.heads import direct_head_scores
from mechlens.ops.stats import auroc, mcnemar
from mechlens.studies import refusal
from mechlens.studies.recovery import head_recovery
from mechlens.studies.refusal import RefusalStudy, Reply, cliff_metrics, refusal_features, refusal_scores
from mechlens.studies.refusal.heads import top_heads


class ScriptedEngine:
    """Refuses every `harmful` request, answers the others, and complies with the prompts in
    `comply` (jailbreaks); counts its calls."""

    name = "scripted"
    prompts_per_call = 64

    def __init__(self, model, harmful: set[str], comply: set[str] = frozenset()):
        self.model, self.harmful, self.comply, self.calls = model, harmful, comply, 0

    def describe(self):
        return {"engine": self.name}

    def sample(self, prompts, sampling, seeds=None, stop=()):
        self.calls += 1
        out = []
        for ids in prompts:
            text = self.model.tokenizer.decode(ids)
            jailbroken = any(c in text for c in self.comply)
            harmful = jailbroken or any(h in text for h in self.harmful)
            if harmful and not jailbroken:
                reply = "This asks for harm. People could get hurt.\n</think>\n\nI cannot help with that."
            elif harmful:
                reply = "This asks for harm. But it is only a story.\n</think>\n\nSure, here it is."
            else:
                reply = "This is a normal request. It is safe to answer.\n</think>\n\nSure, here is how."
            ids = self.model.tokenizer(reply, add_special_tokens=False)["input_ids"]
            out.append([list(ids)] * sampling.n)
        return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = ml.load_model("tiny-llama")
    sets = refusal.prompt_sets(n_probe=6, n_test=4, n_candidates=4)
    harmful = {i.text for i in ml.datasets.load("refusal") if i.harmful}
    engine = ScriptedEngine(model, harmful, set(sets["jailbreak"][::2] + sets["candidates"][::2]))
    cache = tmp_path_factory.mktemp("refusal-cache")
    kwargs = dict(
        sweep_examples=2, head_fraction=0.2, random_sets=3, cache=cache, engine=engine, progress=False
    )
    study = refusal.analyze(model, sets, refusal.REPLY_SAMPLING.replace(max_new_tokens=8), **kwargs)
    return model, sets, engine, study, kwargs


def test_the_study_recomputes_from_the_primitives(setup):
    model, sets, _, study, _ = setup
    assert isinstance(study, RefusalStudy)
    assert {k: len(v) for k, v in study.replies.items()} == {k: len(v) for k, v in sets.items()}
    # rates are counts over the replies
    harmful = study.replies["harmful"]
    assert study.rates["harmful: refusal rate"]["count"] == sum(r.refused for r in harmful)
    jb = study.rates["jailbreak: attack success"]
    assert jb["count"] == sum(not r.refused for r in study.replies["jailbreak"]) and jb["n"] == 4
    assert study.probe_per_class == 6
    # the held-out AUROC: the probe's last-token score of the test replies, recomputed
    test = [r for r in study.replies["harmful"] if r.refused] + [
        r for r in study.replies["harmless"] if not r.refused
    ]
    scores = study.probe.predict_proba(
        refusal_features(model, [r.probe_text for r in test], progress=False)[0]
    )
    want = auroc(scores.numpy(), [int(r.refused) for r in test])
    assert study.probe_auroc["auroc"] == pytest.approx(want)
    assert study.probe_auroc["low"] <= want <= study.probe_auroc["high"]
    assert study.probe_auroc["n_refused"] == 4 and study.probe_auroc["n_answered"] == 4
    jb = study.replies["jailbreak"]  # every second wrapper complies: both outcomes, an AUROC
    jb_scores = study.probe.predict_proba(
        refusal_features(model, [r.probe_text for r in jb], progress=False)[0]
    )
    assert study.jailbreak_auroc["auroc"] == pytest.approx(
        auroc(jb_scores.numpy(), [int(r.refused) for r in jb])
    )
    assert (study.jailbreak_auroc["n_refused"], study.jailbreak_auroc["n_answered"]) == (2, 2)
    # curves and cliffs per group, recomputed
    rows = study.groups["harmful, refused"]
    assert len(rows) == sum(r.refused for r in study.replies["harmful"] + study.replies["jailbreak"])
    curves = refusal_scores(model, study.probe, [r.probe_text for r in rows], progress=False)
    for got, want_curve, r, cliff in zip(
        study.curves["harmful, refused"], curves, rows, study.cliffs["harmful, refused"], strict=True
    ):
        torch.testing.assert_close(got, want_curve)
        assert cliff == cliff_metrics(want_curve, refusal.thinking_span(model.tokenizer, r), 5)


def test_the_heads_and_their_controls(setup):
    model, _, _, study, _ = setup
    h = study.heads
    k = max(1, round(0.2 * model.n_layers * model.n_heads))
    assert len(h.top) == k and h.top == h.top_by_method["direct"]
    assert set(h.scores) == {"direct", "exact", "attribution"}
    assert len(h.random_sets) == 3 and all(not set(map(tuple, s)) & set(h.top) for s in h.random_sets)
    assert (
        list(h.random_rates) == ["jailbreak: attack success"]
        and len(h.random_rates["jailbreak: attack success"]) == 3
    )
    # the ranking: the authors' direct score, recomputed
    rows = [r for r in study.replies["candidates"] + study.replies["jailbreak"] if not r.refused][:2]
    toks, mask = model.tokenize([r.probe_text for r in rows])
    direct = -direct_head_scores(model, toks, study.probe.direction, positions=(-1,), attention_mask=mask)
    torch.testing.assert_close(h.scores["direct"], direct)
    assert h.top == top_heads(direct, k) and h.rescale == "norm"
    # the paired test: the same sampler (the model's own; the scripted engine cannot apply hooks)
    # with and without the ablation, on the same prompts, recomputed here
    sampling = refusal.REPLY_SAMPLING.replace(max_new_tokens=8)
    jb = {"jailbreak": [r.instruction for r in study.replies["jailbreak"]]}
    plain = refusal.sample_replies_by_set(model, jb, sampling)["jailbreak"]
    with model.ablate_heads(h.top, rescale="norm"):
        ablated = refusal.sample_replies_by_set(model, jb, sampling)["jailbreak"]
    want = mcnemar([r.refused for r in plain], [r.refused for r in ablated])
    got = h.paired["jailbreak"]
    assert {k: got[k] for k in ("n", "only_a", "only_b")} == {k: want[k] for k in ("n", "only_a", "only_b")}
    assert got["p"] == want["p"] or (np.isnan(got["p"]) and np.isnan(want["p"]))
    after = h.rates["jailbreak: attack success"]
    assert after["count"] == sum(not r.refused for r in ablated)
    values = np.array(h.random_rates["jailbreak: attack success"])
    mid = np.mean(values < after["rate"]) + np.mean(values == after["rate"]) / 2  # ties count half
    assert h.percentile["jailbreak: attack success"] == pytest.approx(100 * mid)
    assert np.isfinite(h.perplexity["none"]) and len(h.perplexity["random heads"]) == 3


def test_known_heads_are_ablated_and_scored_against_each_ranking(setup):
    model, sets, _, study, kwargs = setup
    known = [(2, 3), (1, 0)]
    again = refusal.analyze(
        model, sets, refusal.REPLY_SAMPLING.replace(max_new_tokens=8), known_heads=known, **kwargs
    )
    h = again.heads.known
    assert h["heads"] == [(1, 0), (2, 3)] and again.heads.top == study.heads.top  # the rest unchanged
    k = len(study.heads.top)
    for method, scores in study.heads.scores.items():
        assert h["recovery"][method] == head_recovery(scores.numpy(), known, k, pool_layers=[1, 2])
    sampling = refusal.REPLY_SAMPLING.replace(max_new_tokens=8)
    jb = {"jailbreak": [r.instruction for r in study.replies["jailbreak"]]}
    with model.ablate_heads(known, rescale="norm"):
        ablated = refusal.sample_replies_by_set(model, jb, sampling)["jailbreak"]
    assert h["rates"]["jailbreak: attack success"]["count"] == sum(not r.refused for r in ablated)
    assert set(h["paired"]) == set(study.heads.paired)
    assert any("known heads among the top" in line for line in again.summary_lines())
    json.dumps(again.to_json())  # the known set's results serialise with the rest
    assert set(h["percentile"]) == set(study.heads.random_rates)  # 2 heads: the random sets' size
    three = refusal.analyze(
        model, sets, refusal.REPLY_SAMPLING.replace(max_new_tokens=8), known_heads=iter(known + [(0, 1)]),
        **kwargs,
    )  # fmt: skip
    assert three.heads.known["heads"] == [(0, 1), (1, 0), (2, 3)]  # an iterator is read once, whole
    assert three.heads.known["percentile"] is None  # random sets of 2 are no null for 3 heads
    with pytest.raises(ValueError, match="out of range"):
        refusal.analyze(model, sets, known_heads=[(9, 0)], **kwargs)


def test_the_study_reads_back_from_its_cache(setup):
    model, sets, engine, study, kwargs = setup
    calls = engine.calls
    again = refusal.analyze(model, sets, refusal.REPLY_SAMPLING.replace(max_new_tokens=8), **kwargs)
    assert engine.calls == calls  # every reply set came from the cache
    assert again.probe_auroc == study.probe_auroc and again.heads.top == study.heads.top
    for name in study.heads.scores:
        torch.testing.assert_close(again.heads.scores[name], study.heads.scores[name])


def test_summary_and_json(setup):
    *_, study, _ = setup
    lines = study.summary_lines()
    assert any(line.startswith("refusal probe, held-out AUROC") and "95% CI" in line for line in lines)
    assert any("McNemar" in line or "no test" in line for line in lines)
    json.dumps(study.to_json(), allow_nan=True)  # JSON-able (NaN written as null by Run.save_json)


def test_cliff_as_a_judge_comparison_is_paired_over_draws():
    def run(rate_refused: list[bool]):
        n = len(rate_refused)
        k = sum(not r for r in rate_refused)
        return {
            "rates": {"jailbreak: attack success": {"rate": k / n, "count": k, "n": n}},
            "refused": {"jailbreak": rate_refused},
        }

    study = RefusalStudy.__new__(RefusalStudy)
    study.judge = {
        "cliff (top 2)": [run([True] * 4), run([True, True, True, False]), run([True] * 4)],
        "random (2)": [run([False] * 4), run([True, False, False, False]), run([True] * 4)],
    }
    cmp = study.judge_comparison()
    assert (cmp["lower"], cmp["tied"], cmp["higher"], cmp["draws"]) == (2, 1, 0, 3)
    assert cmp["sign_p"] == pytest.approx(0.5)  # 2 of 2 untied draws: exact two-sided p
    assert cmp["mcnemar"][0] == {"n": 4, "only_a": 4, "only_b": 0, "p": 0.125}
    study.judge = {"cliff (top 2)": study.judge["cliff (top 2)"]}
    assert study.judge_comparison() is None


def test_analyze_names_the_wrong_argument(setup):
    model, sets, engine, _, _ = setup
    with pytest.raises(ValueError, match="prompts must be a dict"):
        refusal.analyze(model, {"harmful": sets["harmful"]}, cache=None)
    for kwargs, name in (
        ({"head_ranking": "best"}, "head_ranking"),
        ({"rescale": "sum"}, "rescale"),
        ({"control_sets": "jailbreak"}, "control_sets"),
        ({"control_sets": ["nope"]}, "control_sets"),
        ({"k_end": 0}, "k_end"),
        ({"head_fraction": 0}, "head_fraction"),
        ({"random_sets": 0}, "random_sets"),
    ):
        with pytest.raises(ValueError, match=name):
            refusal.analyze(model, sets, cache=None, **kwargs)
    with pytest.raises(ValueError, match="n_probe"):
        refusal.prompt_sets(n_probe=0)
    never = ScriptedEngine(model, harmful=set())  # answers everything: no refused class
    with pytest.raises(ValueError, match="too few labelled replies"):
        refusal.analyze(
            model,
            sets,
            refusal.REPLY_SAMPLING.replace(max_new_tokens=8),
            cache=None,
            engine=never,
            progress=False,
        )


def test_reply_round_trip():
    r = Reply("x", "p", "t", "I cannot help with that.", True)
    assert Reply(**r.__dict__) == r and r.refused
