"""Depth scoring: Reasoning Score and features against plain references, hand-computed features,
the detector's determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import wrap_with_reference
from lens_reference import jsd_plain, reference_logprobs

import mechlens as ml
import mechlens.ops.stats
from mechlens.studies import depth
from mechlens.text.trace import Sentence

RESPONSE = "1. Add 2 and 3 first.\n2. That gives 5 apples.\n3. Wait, check it again.\n4. The answer is 5."


def steps_of(bounds):
    return [Sentence(i, f"s{i}", a, b, 0, 0) for i, (a, b) in enumerate(bounds)]


def test_hand_computed_features():
    scores = torch.tensor([0.2, 0.4, 0.1, 0.5, 0.3])
    # first ceil(0.5 * 5) = 3 steps: mean 0.7/3, population std
    early = np.array([0.2, 0.4, 0.1])
    assert depth.fluctuation(scores) == pytest.approx(early.std() / early.mean(), rel=1e-6)
    assert math.isnan(depth.fluctuation(scores[:1]))
    anomalous = depth.anomalous_steps(scores)  # below the 25% quantile (0.2): only step 2
    assert anomalous.tolist() == [False, False, True, False, False]
    assert depth.anomalous_steps(scores, tau=0.45).tolist() == [False, False, True, True, False]
    A = torch.tensor(
        [
            [1.0, 0, 0, 0, 0],
            [0.5, 0.5, 0, 0, 0],
            [0.2, 0.3, 0.5, 0, 0],
            [0.1, 0.2, 0.3, 0.4, 0],
            [0.1, 0.1, 0.4, 0.2, 0.2],
        ]
    )
    # queries 3, 4 with anomalous steps counted before step 3: 0.3/0.6 and 0.4/0.8
    assert depth.backtrack_attention(A, anomalous, [3, 4], early_end=3) == pytest.approx(0.5)
    assert math.isnan(depth.backtrack_attention(A, anomalous, []))
    assert depth.pearson(torch.tensor([1.0, 2, 3]), torch.tensor([2.0, 4, 6.5])) == pytest.approx(
        0.9986, abs=1e-3
    )
    assert depth.pearson(torch.tensor([1.0, 1, 1]), torch.tensor([1.0, 2, 3])) == 0.0
    assert depth.backtrack_steps(steps_of([(0, 1)] * 3)) == []
    cues = [Sentence(0, "First add.", 0, 1, 0, 0), Sentence(1, "Wait, that is wrong.", 1, 2, 0, 0)]
    assert depth.backtrack_steps(cues) == [1]
    torch.testing.assert_close(
        depth.step_means(torch.arange(6.0), steps_of([(0, 2), (2, 6)])), torch.tensor([0.5, 3.5])
    )


@pytest.mark.parametrize("divergence", ["jsd", "kl"])
def test_reasoning_score_equals_plain_reference(backend, divergence):
    model, reference = wrap_with_reference("llama", backend, n_layers=4)
    trace = ml.ReasoningTrace.from_text(model, "What is 2+3?", RESPONSE)
    rs = depth.reasoning_score(model, trace, layers=[1, 2], divergence=divergence, unit="line")
    assert [s.text for s in rs.steps] == RESPONSE.split("\n")
    logp = reference_logprobs(model, reference, trace.tokens)[:, 0]  # [layers, pos, vocab]
    final = logp[-1]
    if divergence == "jsd":
        per_layer = [jsd_plain(final, logp[l]) for l in (1, 2)]
    else:
        per_layer = [(final.exp() * (final - logp[l])).sum(-1).double() for l in (1, 2)]
    per_position = torch.stack(per_layer).mean(0)  # the distribution at t predicts token t + 1
    for s, got in zip(rs.steps, rs.step_scores, strict=True):
        want = per_position[s.start - 1 : s.end - 1].mean()
        assert float(got) == pytest.approx(float(want), abs=1e-5)
    assert math.isnan(rs.token_scores[0])


@pytest.mark.parametrize("chunk", [7, 33, 512])  # 7 and 33 divide no trace length here
def test_step_attention_and_features_match_plain_loop(backend, chunk):
    model, reference = wrap_with_reference("llama", backend, n_layers=4)
    trace = ml.ReasoningTrace.from_text(model, "What is 2+3?", RESPONSE)
    a = depth.analyze_trace(
        model, trace, layers=[1, 2], attention_layers=[2, 3], unit="line", late_fraction=0.5, chunk=chunk
    )
    with torch.no_grad():
        att = reference(trace.tokens, output_attentions=True).attentions  # per layer [1, heads, q, k]
    steps = a.score.steps
    want = torch.zeros(len(steps), len(steps))
    for i, si in enumerate(steps):
        for j, sj in enumerate(steps):
            vals = [att[l][0, h, q, sj.start : sj.end].sum() for l in (2, 3) for h in range(model.n_heads)
                    for q in range(si.start, si.end)]  # fmt: skip
            want[i, j] = torch.stack(vals).mean()
    torch.testing.assert_close(a.step_attention, want, atol=1e-5, rtol=0)
    scores = a.score.step_scores
    anomalous = depth.anomalous_steps(scores)
    assert a.features["attn_score"] == pytest.approx(
        depth.backtrack_attention(want, anomalous, [2, 3], 2), abs=1e-5
    )
    assert a.features["backtrack_attn"] == pytest.approx(
        depth.backtrack_attention(want, anomalous, [2]), abs=1e-5
    )
    assert a.features["mean_score"] == pytest.approx(float(scores.mean()))
    assert a.features["fluctuation"] == pytest.approx(depth.fluctuation(scores))
    nll = -a.signals.logprob
    ppl = [math.exp(float(nll[s.start - trace.prompt_len : s.end - trace.prompt_len].mean())) for s in steps]
    torch.testing.assert_close(a.step_perplexity, torch.tensor(ppl), rtol=1e-5, atol=0)


def test_detector_is_deterministic_and_learns():
    rng = np.random.default_rng(0)
    rows = [{f: float(v) for f, v in zip(depth.FEATURES, rng.normal(size=4), strict=True)} for _ in range(60)]
    labels = [int(r["mean_score"] + 0.3 * r["fluctuation"] > 0) for r in rows]
    a = depth.cross_validated_scores(rows, labels, folds=5, seed=3)
    b = depth.cross_validated_scores(rows, labels, folds=5, seed=3)
    assert np.array_equal(a, b)
    assert ml.stats.auroc(a, labels) > 0.9
    det = depth.RHDDetector(seed=1).fit(rows, labels)
    assert max(det.weights, key=det.weights.get) == "mean_score"
    assert np.array_equal(det.score(rows), depth.RHDDetector(seed=1).fit(rows, labels).score(rows))
    with pytest.raises(ValueError, match="fluctuation.*NaN"):
        depth.feature_matrix([{**rows[0], "fluctuation": float("nan")}])
    with pytest.raises(ValueError, match="at least 5 traces"):
        depth.cross_validated_scores(rows[:6], [0, 0, 0, 0, 1, 1])


def test_stratified_auroc_equals_pairs_within_a_dataset():
    rng = np.random.default_rng(1)
    scores, labels = rng.normal(size=40).round(1), rng.integers(0, 2, 40)
    strata = rng.choice(["number", "text", "other"], 40)
    wins = pairs = 0.0
    for i in range(40):
        for j in range(40):
            if labels[i] == 1 and labels[j] == 0 and strata[i] == strata[j]:
                pairs += 1
                wins += 1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0
    assert ml.stats.stratified_auroc(scores, labels, strata) == pytest.approx(wins / pairs)
    with pytest.raises(ValueError, match="strata has 3 entries"):
        ml.stats.stratified_auroc(scores, labels, ["a", "b", "c"])


def test_stratified_evaluation_removes_a_planted_dataset_confound():
    """A signal that only tells the datasets apart (arithmetic: mostly wrong and high; factual:
    mostly right and low) looks like a detector over all traces, not within a dataset."""
    rng = np.random.default_rng(0)
    records, strata = [], []
    for kind, wrong_rate, level in (("number", 0.9, 2.0), ("text", 0.2, 0.0)):
        for _ in range(50):
            feats = {f: float(rng.normal()) for f in depth.FEATURES}
            feats["mean_score"] = level + float(rng.normal(scale=0.3))  # the dataset, nothing else
            records.append({"label": int(rng.random() < wrong_rate), "features": feats, "perplexity": -level})
            strata.append(kind)
    ev = depth.evaluate(records, folds=5, seed=0, strata=strata)
    rhd = ev["RHD detector"]
    assert rhd["auroc_cross_validated"] > 0.75  # confounded
    assert abs(rhd["auroc_stratified"] - 0.5) < 0.15  # within a dataset: chance
    assert set(rhd["auroc_by_stratum"]) == {"number", "text"}
    assert abs(ev["feature: mean_score"]["auroc_stratified"] - 0.5) < 0.15
    folds_a = depth.cross_validated_scores([r["features"] for r in records], [r["label"] for r in records],
                                           seed=0, strata=strata)  # fmt: skip
    assert np.array_equal(folds_a, rhd["scores"])
    with pytest.raises(ValueError, match="strata has"):
        depth.evaluate(records, strata=strata[:3])


def test_depth_errors(llama):
    model, _ = llama
    trace = ml.ReasoningTrace.from_text(model, "What is 2+3?", RESPONSE)
    with pytest.raises(ValueError, match="divergence must be one of"):
        depth.reasoning_score(model, trace, divergence="tv")
    with pytest.raises(ValueError, match="unit must be"):
        depth.reasoning_score(model, trace, unit="word")
    with pytest.raises(ValueError, match="valid layers"):
        depth.reasoning_score(model, trace, layers=[7])
    assert depth.late_layers(30) == list(range(15, 29)) and depth.late_layers(3) == [1]


@pytest.mark.parametrize("chunk", [5, 16])
def test_chunked_analysis_equals_one_pass(backend, chunk):
    """Every number of the analysis is the same whatever the chunk (one chunk = the whole trace)."""
    model, _ = wrap_with_reference("llama", backend, n_layers=4)
    trace = ml.ReasoningTrace.from_text(model, "What is 2+3?", RESPONSE)
    whole = depth.analyze_trace(model, trace, unit="line", chunk=4096)
    part = depth.analyze_trace(model, trace, unit="line", chunk=chunk)
    torch.testing.assert_close(
        part.score.token_scores, whole.score.token_scores, atol=1e-5, rtol=0, equal_nan=True
    )
    torch.testing.assert_close(part.step_attention, whole.step_attention, atol=1e-6, rtol=0)
    torch.testing.assert_close(part.signals.logprob, whole.signals.logprob, atol=1e-5, rtol=0)
    torch.testing.assert_close(part.signals.instability, whole.signals.instability, atol=1e-6, rtol=0)
    for name, value in whole.features.items():
        assert part.features[name] == pytest.approx(value, abs=1e-5, nan_ok=True)
