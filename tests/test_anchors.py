"""Thought anchors: taxonomy, resampling metrics on fixed rollouts, receiver heads against scipy and
hand-computed values, attention suppression against a plain-torch masked-attention reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import wrap_with_reference
from scipy import stats
from test_interventions import suppression_hooks

import mechlens as ml
from mechlens.datasets import Problem
from mechlens.ops.attention import span_attention
from mechlens.studies import anchors
from mechlens.studies.anchors.resampling import Resampling, Rollout

RESPONSE = (
    "<think>First, I add 2 and 3. That gives 5 in total.\n\nWait, let me check: 2 + 3 = 5. "
    "So the total is 5 apples. Done.</think>\nThe answer is 5."
)


def trace_of(model):
    return ml.ReasoningTrace.from_text(model, "What is 2+3?", RESPONSE)


# ---------------------------------------------------------------- taxonomy
def test_keyword_taxonomy():
    q = "Tom has 3 apples. He buys 4 more. How many apples does he have?"
    cases = {
        "Tom has 3 apples and buys 4 more.": "problem_setup",
        "Let me add the two amounts.": "plan_generation",
        "First, find how many he bought.": "plan_generation",
        "3 + 4 = 7.": "active_computation",
        "So he has 7 apples.": "result_consolidation",
        "Wait, that doesn't seem right.": "uncertainty_management",
        "Hmm, maybe I misread.": "uncertainty_management",
        "Let me check: 7 - 4 = 3.": "self_checking",
        "The answer is 7.": "final_answer_emission",
        "Recall that a dozen is twelve.": "fact_retrieval",
        "Nice weather today.": "unknown",
    }
    got = anchors.label_sentences(list(cases), q)
    assert dict(zip(cases, got, strict=True)) == cases
    assert set(got) <= set(anchors.CATEGORIES)


def test_label_sentences_checks_the_labeller():
    with pytest.raises(ValueError, match="valid categories"):
        anchors.label_sentences(["a b c"], labeller=lambda s, q: ["planning"])
    with pytest.raises(ValueError, match="2 labels for 1"):
        anchors.label_sentences(["a b c"], labeller=lambda s, q: ["unknown", "unknown"])
    assert anchors.label_sentences(["x y"], labeller=lambda s, q: ["self_checking"]) == ["self_checking"]


# ---------------------------------------------------------------- resampling metrics on fixed data
def test_answer_kl_hand_computed():
    p, q = {"7": 3, "8": 1}, {"7": 1, "8": 3}
    want = 0.75 * math.log(0.75 / 0.25) + 0.25 * math.log(0.25 / 0.75)
    assert anchors.answer_kl(p, q) == pytest.approx(want, abs=1e-8)
    # Laplace smoothing weights by the smoothed p (the authors' code): an answer only q has
    # counts in V and in the sum. {7: 2} vs {7: 1, 9: 1}: p_s = (3/4, 1/4), q_s = (1/2, 1/2)
    lap = anchors.answer_kl({"7": 2}, {"7": 1, "9": 1}, alpha=1.0)
    assert lap == pytest.approx(0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5))
    assert lap == pytest.approx(0.1308, abs=1e-4)  # not 0.405, the unsmoothed weighting
    three = anchors.answer_kl({"1": 5, "2": 1}, {"1": 1, "3": 2}, alpha=1.0)  # V = 3
    ps, qs = [6 / 9, 2 / 9, 1 / 9], [2 / 6, 1 / 6, 3 / 6]
    assert three == pytest.approx(sum(a * math.log(a / b) for a, b in zip(ps, qs, strict=True)))
    pt = (3 + 1) / (4 + 2)  # the Bernoulli variant: 3 of 4 correct vs 1 of 4, alpha = 1
    qt = (1 + 1) / (4 + 2)
    want_binary = pt * math.log(pt / qt) + (1 - pt) * math.log((1 - pt) / (1 - qt))
    got_binary = anchors.correct_kl({"True": 3, "False": 1}, {"True": 1, "False": 3}, alpha=1.0)
    assert got_binary == pytest.approx(want_binary)
    assert anchors.correct_kl({"True": 2}, {"True": 2}) == pytest.approx(0.0, abs=1e-12)
    assert anchors.answer_kl({"7": 2}, {"7": 2}) == 0.0
    assert math.isnan(anchors.answer_kl({}, {"7": 1}))


def roll(pos, answer, correct, resampled="x"):
    return Rollout(pos, "", resampled, answer, correct)


def test_resampling_metrics_on_fixed_rollouts():
    # two sentences; position 0: 2 different (wrong, 8), 2 similar (right, 7); position 1 and 2: right
    rollouts = [
        [
            roll(0, "8", False, "a"),
            roll(0, "8", False, "b"),
            roll(0, "7", True, "c"),
            roll(0, "7", True, "c"),
        ],
        [roll(1, "7", True), roll(1, "7", True), roll(1, None, False), roll(1, "7", True)],
        [roll(2, "7", True)] * 4,
    ]
    similarity = np.array([[0.1, 0.5, 0.9, 0.95], [0.9, 0.9, 0.1, 0.9]])
    res = Resampling(["S0", "S1"], rollouts, similarity)
    np.testing.assert_allclose(res.accuracy, [0.5, 1.0, 1.0])  # the unanswered rollout does not count
    np.testing.assert_allclose(res.resampling_importance, [0.5, 0.0])
    # D_0 = two wrong answers vs R_1 (all right): accuracy 0 - 1
    assert res.counterfactual_accuracy[0] == -1.0
    # KL(D_0 = {8: 2} || R_1 + similar_0 = {7: 5}) with alpha 1e-9
    a = 1e-9
    want = math.log(((2 + a) / (2 + 2 * a)) / ((0 + a) / (5 + 2 * a)))
    assert res.counterfactual_kl[0] == pytest.approx(want)
    # D_1 has only the unanswered rollout: no answer distribution, NaN (not a silent 0)
    assert math.isnan(res.counterfactual_kl[1]) and math.isnan(res.counterfactual_accuracy[1])
    np.testing.assert_allclose(res.different_fraction, [0.5, 0.25])
    np.testing.assert_allclose(res.overdeterminedness, [0.25, 0.75])  # a, b, c, c / x, x, x, x
    binary = res.counterfactual_kl_of(binary=True)[0]  # {False: 2} vs {True: 5}
    assert binary == pytest.approx(want)
    assert len(res.table()) == 2 and res.table()[0]["sentence"] == "S0"
    two = res.first(2)  # the first two rollouts of each position: D_0 = {8, 8}, nothing similar
    np.testing.assert_allclose(two.accuracy, [0.0, 1.0, 1.0])
    assert two.similarity.shape == (2, 2) and res.accuracy[0] == 0.5  # the original is unchanged
    assert two.counterfactual_accuracy[0] == -1.0
    forced = anchors.ForcedAnswers(rollouts).first(1)
    np.testing.assert_allclose(forced.accuracy, [0.0, 1.0, 1.0])
    for bad in (0, 5, 2.0, True):
        with pytest.raises(ValueError, match="n must be"):
            res.first(bad)


def fake_embed(texts):
    """Deterministic stand-in for MiniLM: a bag of characters, so equal texts have cosine 1."""
    out = torch.zeros(len(texts), 64)
    for i, t in enumerate(texts):
        for c in t:
            out[i, ord(c) % 64] += 1
    return out + 1e-3


@pytest.mark.parametrize("backend", ["transformer_lens", "nnsight"])
def test_resample_is_seeded_and_resumes_from_disk(backend, tmp_path, monkeypatch):
    model, _ = wrap_with_reference("llama", backend)
    trace = trace_of(model)
    problem = Problem("p", "What is 2+3?", "5", kind="number")
    sampling = anchors.ANCHORS_SAMPLING.replace(n=3, max_new_tokens=6)
    kw = dict(progress=False, embed=fake_embed)
    a = anchors.resample(model, trace, problem, sampling, cache=tmp_path, **kw)
    b = anchors.resample(model, trace, problem, sampling, cache=None, **kw)
    assert [[r.text for r in rows] for rows in a.rollouts] == [[r.text for r in rows] for rows in b.rollouts]
    assert len(a.rollouts) == len(trace.sentences) + 1 and all(len(r) == 3 for r in a.rollouts)
    c = anchors.resample(model, trace, problem, sampling.replace(seed=7), cache=None, **kw)
    assert [r.text for r in c.rollouts[0]] != [r.text for r in a.rollouts[0]]

    # every position is on disk: a second run generates nothing
    def fail(*args, **kwargs):
        raise AssertionError("generate called although the rollouts are cached")

    monkeypatch.setattr(model, "generate", fail)
    again = anchors.resample(model, trace, problem, sampling, cache=tmp_path, **kw)
    assert [r.text for r in again.rollouts[1]] == [r.text for r in a.rollouts[1]]


def test_rollouts_continue_the_exact_prefix_tokens(llama):
    model, _ = llama
    trace = trace_of(model)
    problem = Problem("p", "What is 2+3?", "5", kind="number")
    greedy = anchors.ANCHORS_SAMPLING.replace(n=2, max_new_tokens=4, temperature=0)
    res = anchors.resample(model, trace, problem, greedy, cache=None, progress=False, embed=fake_embed)
    s = trace.sentences[2]
    want = model.generate(trace.tokens[:, : s.start], max_new_tokens=4, temperature=0).texts[0]
    assert res.rollouts[2][0].text == want
    # the grader saw the trace's own text before the prefix end plus the continuation
    head = model.to_string(trace.tokens[0, trace.prompt_len : s.start])
    g = problem.grade(head + want)
    assert res.rollouts[2][0].correct == (g.correct and g.marked)


def test_rollout_answers_need_a_marker():
    from mechlens.studies.anchors.resampling import _rollout

    problem = Problem("p", "What is 8 - 4?", "4", kind="number")
    cut_off = _rollout(0, "Ivy has 8 books. ", "She gives 4", problem)  # ends on the right number
    assert cut_off.answer is None and not cut_off.correct
    done = _rollout(0, "Ivy has 8 books. ", "She gives 4 away, 8 - 4 = 4. Answer: 4 books", problem)
    assert done.answer == "4" and done.correct and done.resampled == "She gives 4 away, 8 - 4 = 4."


def test_forced_answers_counts(llama):
    model, _ = llama
    trace = trace_of(model)
    problem = Problem("p", "What is 2+3?", "5", kind="number")
    sampling = anchors.FORCED_SAMPLING.replace(n=2, max_new_tokens=3)
    forced = anchors.forced_answers(model, trace, problem, sampling, cache=None, progress=False)
    assert len(forced.rollouts) == len(trace.sentences) + 1 and all(len(r) == 2 for r in forced.rollouts)
    assert forced.importance.shape == forced.importance_kl.shape == (len(trace.sentences),)
    answers = [[("5", True), ("5", True)], [("5", True), ("6", False)], [(None, False), ("6", False)]]
    fixed = anchors.ForcedAnswers([[roll(p, a, c) for a, c in row] for p, row in enumerate(answers)])
    np.testing.assert_allclose(fixed.accuracy, [1.0, 0.5, 0.0])
    np.testing.assert_allclose(fixed.importance, [-0.5, -0.5])
    a = 1e-9  # KL({5: 2} || {5: 1, 6: 1}) over V = 2 answers
    assert fixed.importance_kl[0] == pytest.approx(
        math.log(((2 + a) / (2 + 2 * a)) / ((1 + a) / (2 + 2 * a)))
    )


def test_resampling_matrix_on_fixed_rollouts():
    # S2 reappears in every rollout that kept S0 (position 1) and in none that replaced it
    s = ["Alpha beta gamma.", "Delta epsilon zeta.", "Theta iota kappa."]
    keep = [Rollout(1, "Delta epsilon zeta. Theta iota kappa. Done now.</think>So 1.", s[1], "1", True)] * 2
    changed = [Rollout(0, "Omicron pi rho. Sigma tau upsilon.", "Omicron pi rho.", "2", False)] * 2
    res = Resampling(s, [changed, keep, keep, []], np.array([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]))
    m = anchors.resampling_matrix(res, embed=fake_embed, threshold=0.99)
    assert m[2, 0] == 1.0 and m[1, 0] == 1.0
    assert np.isnan(m[0]).all() and np.isnan(m[:, 2]).all()
    # source 1: every rollout at 1 kept its sentence. The authors compare the rollouts at 2 with
    # all rollouts at 1 (no difference: 0); ours, with the different ones only (none: NaN)
    assert m[2, 1] == 0.0
    ours = anchors.resampling_matrix(res, embed=fake_embed, threshold=0.99, compare="different")
    assert np.isnan(ours[2, 1]) and ours[2, 0] == 1.0
    with pytest.raises(ValueError, match="compare must be"):
        anchors.resampling_matrix(res, embed=fake_embed, compare="some")


@pytest.mark.slow
def test_minilm_embedder_offline():
    embed = anchors.sentence_embedder()
    e = embed(["I add 2 and 3.", "I add 2 and 3.", "The capital of France is Paris."])
    assert e.shape == (3, 384)
    sims = anchors.resampling.cosine(e[:1].expand(3, -1), e)
    assert sims[1] > 0.99 and sims[2] < 0.8


# ---------------------------------------------------------------- receiver heads
def test_vertical_scores_and_kurtosis_hand_computed():
    m = torch.tensor(
        [[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.2, 0.3, 0.5, 0], [0.1, 0.6, 0.1, 0.2]]
    )  # rows: query sentence, columns: key sentence
    # proximity 1: column k averages rows q > k
    v = anchors.vertical_scores(m, proximity=1)
    torch.testing.assert_close(v[:3], torch.tensor([(0.5 + 0.2 + 0.1) / 3, (0.3 + 0.6) / 2, 0.1]))
    assert torch.isnan(v[3])
    # proximity 2: column 0 averages rows 2, 3; column 1 row 3; the rest NaN
    v2 = anchors.vertical_scores(m, proximity=2)
    torch.testing.assert_close(v2[:2], torch.tensor([0.15, 0.6]))
    # control_depth: row ranks / row count; column 0 gets 1/1 (row 1), 1/2 (row 2 keeps 0.2, 0.3)
    # and 1.5/3 (row 3 keeps 0.1, 0.6, 0.1: the tied 0.1s share rank 1.5)
    v3 = anchors.vertical_scores(m, proximity=1, control_depth=True)
    torch.testing.assert_close(v3[0], torch.tensor((1.0 + 0.5 + 0.5) / 3))
    # kurtosis of [1, 2, 3, 4]: m2 = 1.25, m4 = 2.5625, m4 / m2^2 - 3
    assert anchors.kurtosis(torch.tensor([1.0, 2, 3, 4])).item() == pytest.approx(2.5625 / 1.25**2 - 3)


def test_vertical_scores_and_kurtosis_match_scipy_reference():
    """The reference code's numpy recipe, literally, on random matrices."""
    gen = torch.Generator().manual_seed(0)
    m = torch.rand(2, 3, 12, 12, generator=gen)
    for proximity, control in [(4, False), (2, True), (1, False)]:
        got = anchors.vertical_scores(m, proximity, control)
        for idx in np.ndindex(2, 3):
            a = m[idx].numpy().astype(float).copy()
            a[np.triu_indices_from(a, k=1)] = np.nan
            a[np.triu_indices_from(a, k=-proximity + 1)] = np.nan
            if control:
                a = stats.rankdata(a, axis=1, nan_policy="omit") / np.sum(~np.isnan(a), axis=1)[:, None]
            ref = [np.nanmean(a[c + proximity :, c]) if c + proximity < 12 else np.nan for c in range(12)]
            np.testing.assert_allclose(got[idx].numpy(), ref, rtol=1e-5, equal_nan=True)
            want_k = stats.kurtosis(ref, fisher=True, bias=True, nan_policy="omit")
            assert anchors.kurtosis(got[idx]).item() == pytest.approx(float(want_k), rel=1e-4)


@pytest.mark.parametrize("chunk", [5, 512])
def test_sentence_attention_equals_block_means_of_full_pattern(llama, chunk):
    model, _ = llama
    trace = trace_of(model)
    got = anchors.sentence_attention(model, trace, chunk=chunk)  # [layers, heads, S, S]
    _, cache = model.run_with_cache(trace.tokens, ["pattern"])
    spans = [(s.start, s.end) for s in trace.sentences]
    for layer in range(model.n_layers):
        a = cache["pattern"][layer, 0]  # [heads, T, T]
        for h in range(model.n_heads):
            for qi, (qa, qb) in enumerate(spans):
                for ki, (ka, kb) in enumerate(spans):
                    want = a[h, qa:qb, ka:kb].mean()
                    assert got[layer, h, qi, ki].item() == pytest.approx(want.item(), abs=1e-6)
    assert torch.allclose(got, span_attention(cache["pattern"][:, 0], spans, keys="mean"), atol=1e-6)


def test_short_traces_warn_before_their_kurtosis_is_used(llama):
    model, _ = llama
    trace = trace_of(model)
    a = anchors.analyze(model, trace, proximity=1, cache=None)
    with pytest.warns(UserWarning, match="fewer than 10 finite vertical scores"):
        anchors.assign_receivers([a], top_k=2)


def test_receiver_heads_and_scores():
    kurt = torch.tensor([[9.0, 8.0], [1.0, 5.0], [float("nan"), 3.0]])
    assert anchors.receiver_heads(kurt, top_k=2) == [(1, 1), (2, 1)]  # layer 0 excluded, NaN skipped
    assert anchors.receiver_heads(kurt, top_k=1, exclude_layer0=False) == [(0, 0)]
    with pytest.raises(ValueError, match="top_k must lie in 1..3"):
        anchors.receiver_heads(kurt, top_k=5)
    vertical = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[5.0, float("nan")], [7.0, 8.0]]])
    torch.testing.assert_close(anchors.receiver_scores(vertical, [(0, 1), (1, 0)]), torch.tensor([4.0, 4.0]))


# ---------------------------------------------------------------- attention suppression
def reference_matrix(model, reference, trace, temperature=0.6):
    """Plain torch: the raw HF model with each sentence's key columns masked in every layer."""
    with torch.no_grad():
        base = reference(trace.tokens).logits[0]
        n = len(trace.sentences)
        out = torch.full((n, n), float("nan"))
        for j, sj in enumerate(trace.sentences):
            with suppression_hooks(model, reference, sj.start, sj.end):
                supp = reference(trace.tokens).logits[0]
            p = torch.softmax(base / temperature, -1)
            kl = (
                p * (torch.log_softmax(base / temperature, -1) - torch.log_softmax(supp / temperature, -1))
            ).sum(-1)
            for i, si in enumerate(trace.sentences):
                if i > j:
                    out[i, j] = torch.log(kl[si.start : si.end] + 1e-9).mean()
    return out


@pytest.mark.parametrize("batch_size", [1, 3])
def test_suppression_matrix_equals_masked_attention_reference(backend, batch_size):
    model, reference = wrap_with_reference("llama", backend)
    trace = trace_of(model)
    fast = anchors.suppression_matrix(model, trace, batch_size=batch_size)
    naive = anchors.suppression_matrix(model, trace, reuse_prefix=False)
    for chunk in (7,):  # the forwards in chunks (7 divides no length here) give the same matrix
        chunked = anchors.suppression_matrix(model, trace, batch_size=batch_size, chunk=chunk)
        torch.testing.assert_close(chunked, fast, atol=1e-5, rtol=0, equal_nan=True)
    some = anchors.suppression_matrix(model, trace, batch_size=batch_size, sources=[1, 3])
    torch.testing.assert_close(some[:, [1, 3]], fast[:, [1, 3]], atol=1e-5, rtol=0, equal_nan=True)
    assert torch.isnan(some[:, [0, 2]]).all()
    want = reference_matrix(model, reference, trace)
    torch.testing.assert_close(naive, want, atol=1e-4, rtol=0, equal_nan=True)
    torch.testing.assert_close(fast, naive, atol=1e-4, rtol=0, equal_nan=True)
    below = torch.tril(torch.ones_like(fast, dtype=torch.bool), -1)
    assert torch.isfinite(fast[below]).all() and torch.isnan(fast[~below]).all()
    first = anchors.suppression_matrix(model, trace, only_first=2)
    assert not torch.allclose(first[below], fast[below])
    torch.testing.assert_close(anchors.outgoing_effect(fast), torch.nanmean(fast, 0), equal_nan=True)


def authors_compress(logits, p=0.9999, max_k=100, temperature=0.6):
    """Port of their `compress_logits_top_p` for one position: (indices, float16 logits)."""
    probs = torch.softmax(logits / temperature, -1)
    sorted_probs, sorted_idx = torch.sort(probs, descending=True)
    k = min(torch.searchsorted(torch.cumsum(sorted_probs, 0), p, right=False).item() + 1, max_k)
    top = sorted_idx[: max(1, k)]
    return top.numpy().astype(np.int32), logits[top].numpy().astype(np.float16)


def authors_sparse_kl(b, s, temperature=0.6):
    """Port of their `calculate_kl_divergence_sparse` (numpy union, -1e9 fill, clip at 0)."""
    (b_idx, b_logits), (s_idx, s_logits) = b, s
    union = np.union1d(b_idx, s_idx)
    at = {idx: k for k, idx in enumerate(union)}
    bu, su = np.full(len(union), -1e9, np.float32), np.full(len(union), -1e9, np.float32)
    for idx, z in zip(b_idx, b_logits.astype(np.float32), strict=True):
        bu[at[idx]] = z
    for idx, z in zip(s_idx, s_logits.astype(np.float32), strict=True):
        su[at[idx]] = z
    log_p = torch.log_softmax(torch.from_numpy(bu) / temperature, 0)
    log_q = torch.log_softmax(torch.from_numpy(su) / temperature, 0)
    p_dist = log_p.exp()
    terms = torch.where(p_dist == 0, torch.tensor(0.0), p_dist * (log_p - log_q))
    return max(float(terms.sum()), 0.0)


def test_nucleus_kl_equals_the_authors_code():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(12, 300, generator=g) * 4
    other = base + torch.randn(12, 300, generator=g) * torch.linspace(0, 3, 12)[:, None]
    other[3] = base[3]  # identical: 0
    other[4, base[4].argmax()] -= 30  # the top token leaves the nucleus: the -1e9 fill dominates
    peaked = base.clone()
    peaked[5, 7] = 60  # a one-token nucleus
    got = anchors.nucleus_kl(peaked, other)
    want = [authors_sparse_kl(authors_compress(peaked[r]), authors_compress(other[r])) for r in range(12)]
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-6)
    assert got[3] == 0 and got[4] > 1e6 and (got >= 0).all()
    full = anchors.token_kl(peaked, other)
    assert not torch.allclose(got, full)  # an approximation of the exact KL, not the same number


def authors_token_ranges(model, text, sentences):
    """Their `get_chunk_ranges` end (content, then the whitespace after it) and
    `get_sentence_token_boundaries` (token counts of the text up to each end)."""
    out, pos = [], 0
    for sentence in sentences:
        start = text.find(sentence, pos)
        end = start + len(sentence)
        while end < len(text) and text[end].isspace():
            end += 1
        pos = end
        n = [len(model.tokenizer(text[:c], add_special_tokens=False)["input_ids"]) for c in (start, end)]
        out.append(tuple(n))
    return out


def test_authors_token_spans(backend):
    model, _ = wrap_with_reference("llama", backend)
    trace = trace_of(model)
    spans = anchors.authors_token_spans(model, trace)
    assert spans == authors_token_ranges(model, trace.text, [s.text for s in trace.sentences])
    ours = [(s.start, s.end) for s in trace.sentences]
    # a sentence after ". " starts one token late (the space is its own token in a prefix)
    assert spans != ours and all(b[0] - a[0] in (0, 1) for a, b in zip(ours, spans, strict=True))


def test_suppression_authors_kl_equals_their_pipeline(backend):
    model, reference = wrap_with_reference("llama", backend)
    trace = trace_of(model)
    spans = anchors.authors_token_spans(model, trace)
    with torch.no_grad():
        base = reference(trace.tokens).logits[0]
        n = len(spans)
        want = torch.full((n, n), float("nan"))
        for j, (a, b) in enumerate(spans):
            with suppression_hooks(model, reference, a, b):
                supp = reference(trace.tokens).logits[0]
            log_kl = [
                np.log(authors_sparse_kl(authors_compress(base[t]), authors_compress(supp[t])) + 1e-9)
                for t in range(trace.n_tokens)
            ]
            for i, (c, d) in enumerate(spans):
                if i > j:
                    want[i, j] = float(np.mean(log_kl[c:d]))
    for kwargs in ({}, {"reuse_prefix": False}, {"batch_size": 2, "chunk": 5}):
        got = anchors.suppression_matrix(model, trace, kl="authors", **kwargs)
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4, equal_nan=True)
    with pytest.raises(ValueError, match="kl must be one of"):
        anchors.suppression_matrix(model, trace, kl="sparse")


def test_sentence_heatmap_center_rows():
    from mechlens.plots import sentence_heatmap

    m = torch.tensor([[float("nan")] * 3, [1.0, float("nan"), float("nan")], [2.0, 4.0, float("nan")]])
    z = np.array(sentence_heatmap(m, ["a", "b", "c"], "x", center_rows=True).data[0].z, dtype=float)
    np.testing.assert_allclose(z[2, :2], [-1.0, 1.0])
    assert z[1, 0] == 0 and np.isnan(z[0]).all()


def test_token_kl_never_negative():
    logits = torch.randn(5, 100, generator=torch.Generator().manual_seed(0))
    kl = anchors.token_kl(logits, logits + 1e-7 * torch.randn(5, 100))
    assert (kl >= 0).all() and torch.isfinite(torch.log(kl + 1e-9)).all()


def test_per_row_suppression_equals_separate_runs(llama, tokens):
    model, _ = llama
    with model.suppress_attention([(1, 3), (4, 7)]):
        both = model(tokens)
    with model.suppress_attention((1, 3)):
        first = model(tokens[:1])
    with model.suppress_attention((4, 7)):
        second = model(tokens[1:])
    torch.testing.assert_close(both, torch.cat([first, second]), atol=1e-5, rtol=0)
    with (
        pytest.raises(ValueError, match="3 suppressed spans for a batch of 2"),
        model.suppress_attention([(1, 2), (1, 2), (1, 2)]),
    ):
        model(tokens)
    with pytest.raises(ValueError, match="one per batch row"):
        model.suppress_attention([(1, 2), (5, 3)])


# ---------------------------------------------------------------- comparison helpers
def test_compare_helpers():
    rho, n = anchors.spearman([1, 2, 3, 4, np.nan], [1, 3, 2, 4, 0])
    assert n == 4 and rho == pytest.approx(stats.spearmanr([1, 2, 3, 4], [1, 3, 2, 4]).statistic)
    assert math.isnan(anchors.spearman([1, 1, 1], [1, 2, 3])[0])
    m = np.arange(16.0).reshape(4, 4)
    np.testing.assert_array_equal(anchors.lower_triangle(m), [4, 8, 9, 12, 13, 14])
    np.testing.assert_array_equal(anchors.lower_triangle(m, max_distance=1), [4, 9, 14])
    means = anchors.category_means([1.0, 2.0, np.nan, 4.0], ["a", "a", "b", "b"])
    assert means["a"][:2] == (1.5, pytest.approx(0.5)) and means["b"] == (
        4.0,
        pytest.approx(np.nan, nan_ok=True),
        1,
    )


# ---------------------------------------------------------------- protocol additions they rely on
def test_run_with_cache_reduce_equals_reducing_afterwards(llama):
    model, _ = llama
    toks = model.to_tokens("The cat sat on the mat and slept")
    _, full = model.run_with_cache(toks, ["pattern", "resid_post"])
    _, red = model.run_with_cache(
        toks,
        ["pattern", "resid_post"],
        reduce=lambda name, layer, t: t.sum(-1) if name == "pattern" else t[..., :3],
    )
    torch.testing.assert_close(red["pattern"], full["pattern"].sum(-1))
    torch.testing.assert_close(red["resid_post"], full["resid_post"][..., :3])


def test_generate_from_token_ids_equals_from_text(llama):
    model, _ = llama
    text = "The cat sat on the mat"
    ids = model.to_tokens(text)
    a = model.generate(ids, max_new_tokens=4, temperature=0.7, seed=3, n=2)
    b = model.generate(text, max_new_tokens=4, temperature=0.7, seed=3, n=2)
    assert a.texts == b.texts and a.prompts == [text]


def test_analyze_cache_follows_the_segmentation(tmp_path):
    model = ml.load_model("tiny-llama")
    authors = trace_of(model)
    ours = ml.ReasoningTrace.from_text(model, "What is 2+3?", RESPONSE, rule="thought-branches")
    assert torch.equal(authors.tokens, ours.tokens) and authors.sentences[-1].end < ours.sentences[-1].end
    for trace in (authors, ours, authors):  # same tokens, other sentences: never the stored matrix
        a = anchors.analyze(model, trace, proximity=1, cache=tmp_path, progress=False)
        want = anchors.suppression_matrix(model, trace)
        torch.testing.assert_close(a.suppression, want, equal_nan=True)
    full = anchors.analyze(model, authors, proximity=1, cache=tmp_path, progress=False)
    theirs = anchors.analyze(model, authors, proximity=1, cache=tmp_path, progress=False, kl="authors")
    assert not torch.allclose(full.suppression, theirs.suppression, equal_nan=True)
