"""Echoes as Anchors: echo detection and trimming against the authors' rule on fixed texts, the
Echo Likelihood Gap against log-probs computed by hand on a plain HF model, and the refocusing
share against a loop that sums the attention pattern."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import wrap_with_reference

from mechlens.studies.echoes.echo import echo_span, is_echo, overlap, trim_echo
from mechlens.studies.echoes.measures import common_suffix, lcs_length, likelihood_gap, refocusing
from mechlens.text.trace import ReasoningTrace

Q = "Tom has 3 apples and buys 4 more apples. How many apples does Tom have now?"
R = (
    "<think>\nOkay. Tom has 3 apples and buys 4 more apples. How many apples does Tom have now? "
    "First I add the two numbers together. Three plus four gives seven apples in total."
    "\n</think>\n\nAnswer: 7"
)


def authors_trim(text: str, question: str) -> str:
    """The authors' `_remove_repetitive_content`, transcribed line by line."""
    think_match = re.search(r"(.*<think>\s*)(.*)", text, re.DOTALL)
    if not think_match:
        return text
    prefix, think_content = think_match.group(1), think_match.group(2).strip()
    question_words = set(re.sub(r"[^\w\s]", "", question.lower()).split())
    filtered = []
    for sentence in re.split(r"[.!?]", think_content):
        sentence = sentence.strip()
        if not sentence:
            continue
        sentence_words = set(re.sub(r"[^\w\s]", "", sentence.lower()).split())
        if len(sentence_words) > 0:  # noqa: SIM102 (the authors' code, line by line)
            if len(question_words & sentence_words) / len(sentence_words) < 0.6 and len(sentence_words) > 3:
                filtered.append(sentence)
    if len(filtered) == 0:
        new = "Now I need to solve this step by step."
    elif len(filtered) < 2:
        new = filtered[0] + ". Now let me continue solving this."
    else:
        new = ". ".join(filtered[-2:])
        if not new.endswith("."):
            new += "."
        new += " Let me work through this systematically."
    return prefix + new


@pytest.mark.parametrize(
    "response",
    [
        R,
        "<think>\nHi.\n</think>",
        "<think>\nOnly one long sentence about adding numbers here",
        "no think tag at all. Two words",
        "\n  leading whitespace and no tag. Then a second sentence with more words here.",
        R.replace("Okay. ", ""),
    ],
)
def test_the_authors_trim_is_transcribed(response):
    # the authors trim prompt + response, their prompt ending in "<think>": a response without the
    # tag is all thinking
    head = "" if "<think>" in response else "Answer: <think>"
    assert head + trim_echo(Q, response, rule="authors") == authors_trim(head + response, Q)


def test_echo_detection_and_the_echo_span_trim():
    assert overlap(Q, "Tom has 3 apples") == 1.0 and overlap(Q, "...") == 0.0
    assert is_echo(Q, "How many apples does Tom have now?") and not is_echo(Q, "Tom has")  # too short
    span = echo_span(Q, R)
    # the splitter merges the short "Okay." into the first sentence: the span is whole sentences
    assert (
        R[span[0] : span[1]]
        == "Okay. Tom has 3 apples and buys 4 more apples. How many apples does Tom have now?"
    )
    trimmed = trim_echo(Q, R, rule="echo-span")
    assert trimmed == R[: span[0]] + R[span[1] :].lstrip(" ")
    assert trimmed.endswith("seven apples in total.\n</think>\n\nAnswer: 7")
    no_echo = "<think>\nFirst I add the two numbers together. Seven.\n</think>\n7"
    assert echo_span(Q, no_echo) is None and trim_echo(Q, no_echo, rule="echo-span") == no_echo
    with pytest.raises(ValueError, match="rule"):
        trim_echo(Q, R, rule="lcs")
    with pytest.raises(ValueError, match="threshold"):
        echo_span(Q, R, threshold=0)
    with pytest.raises(TypeError, match="question"):
        echo_span(None, R)


def test_lcs_and_suffix_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(30):
        a, b = (
            rng.integers(0, 4, rng.integers(0, 8)).tolist(),
            rng.integers(0, 4, rng.integers(0, 8)).tolist(),
        )
        from itertools import combinations

        best = max(
            (k for k in range(len(a) + 1) for c in combinations(a, k) if _is_subsequence(list(c), b)),
            default=0,
        )
        assert lcs_length(a, b) == best
        assert common_suffix(a, b) == next(
            k for k in range(min(len(a), len(b)), -1, -1) if a[len(a) - k :] == b[len(b) - k :]
        )


def _is_subsequence(s, b):
    it = iter(b)
    return all(x in it for x in s)


def _reference_logprobs(model, ref, question, response):
    trace = ReasoningTrace.from_text(model, question, response)
    ids = trace.tokens
    with torch.no_grad():
        logp = ref(ids).logits.double().log_softmax(-1)[0]
    rows = [float(logp[t - 1, ids[0, t]]) for t in range(trace.prompt_len, trace.n_tokens)]
    return ids[0, trace.prompt_len :].tolist(), np.array(rows)


def test_likelihood_gap_against_log_probs_by_hand(backend):
    model, ref = wrap_with_reference("llama", backend)
    trimmed = trim_echo(Q, R, rule="echo-span")
    gap = likelihood_gap(model, Q, R, trimmed)
    raw_ids, raw = _reference_logprobs(model, ref, Q, R)
    trim_ids, trim = _reference_logprobs(model, ref, Q, trimmed)
    assert gap.raw_tokens == len(raw_ids) and gap.trimmed_tokens == len(trim_ids)
    assert gap.delta_mean == pytest.approx(raw.mean() - trim.mean(), abs=1e-4)
    assert gap.delta_sum == pytest.approx(raw.sum() - trim.sum(), abs=1e-3)
    k = common_suffix(raw_ids, trim_ids)
    assert gap.suffix_tokens == k > 0
    assert gap.delta_suffix_sum == pytest.approx(raw[-k:].sum() - trim[-k:].sum(), abs=1e-3)
    assert gap.removed_tokens == len(raw_ids) - lcs_length(raw_ids, trim_ids) > 0
    assert gap.delta_mean_per_removed == pytest.approx(gap.delta_mean / gap.removed_tokens)
    same = likelihood_gap(model, Q, R, R)
    assert same.delta_mean == 0 and same.removed_tokens == 0 and same.delta_mean_per_removed is None


def test_refocusing_against_a_pattern_summing_loop(backend):
    model, ref = wrap_with_reference("llama", backend)
    trace = ReasoningTrace.from_text(model, Q, R)
    p, n = trace.prompt_len, trace.n_tokens
    with torch.no_grad():
        attn = ref(trace.tokens, output_attentions=True).attentions  # per layer [1, heads, q, k]
    start = trace.text.find(Q)
    q_tokens = [i for i, (a, b) in enumerate(trace.offsets[:p]) if a < start + len(Q) and b > start]
    for prefix in (8, (3, 9)):
        got = refocusing(model, Q, R, prefix_tokens=prefix)
        lo, hi = (p, p + 8) if prefix == 8 else (p + 3, p + 9)
        for layer, pattern in enumerate(attn):
            heads = pattern[0].double()
            to_prefix = np.mean(
                [sum(float(heads[:, q, k].mean()) for k in range(lo, hi)) for q in range(p, n)]
            )
            to_q = np.mean([sum(float(heads[:, q, k].mean()) for k in q_tokens) for q in range(p, n)])
            assert got.to_prefix[layer] == pytest.approx(to_prefix, abs=1e-5)
            assert got.to_question[layer] == pytest.approx(to_q, abs=1e-5)
    assert refocusing(model, Q, R, prefix_tokens=10_000).prefix_tokens == n - p  # capped at the response
    for bad in (0, (5, 5), (0, 10_000), True):
        with pytest.raises(ValueError, match="prefix_tokens"):
            refocusing(model, Q, R, prefix_tokens=bad)


def _bag_of_words(texts):
    """A deterministic embedder: counts of a few words (echo openings share the question's)."""
    vocab = ["tom", "apples", "buys", "how", "many", "first", "add", "numbers", "three", "seven"]
    return torch.tensor([[t.lower().count(w) for w in vocab] for t in texts], dtype=torch.float32)


def test_the_papers_echo_probe_learns_and_detects():
    from mechlens.studies.echoes import EchoProbe, opening_words

    echo = "<think>\nTom has 3 apples and buys 4 more apples. How many apples?"
    plain = "<think>\nFirst add the numbers. Three and four make seven."
    questions, responses = [Q] * 40, [echo, plain] * 20
    labels = [1, 0] * 20
    probe = EchoProbe(hidden=8, lr=0.05, seed=0).fit(questions, responses, labels, _bag_of_words)
    p = probe.predict_proba([Q, Q], [echo, plain], _bag_of_words)
    assert p[0] > 0.5 > p[1]
    again = EchoProbe(hidden=8, lr=0.05, seed=0).fit(questions, responses, labels, _bag_of_words)
    torch.testing.assert_close(again.predict_proba([Q], [echo], _bag_of_words), p[:1])  # seeded
    assert probe.detector(_bag_of_words)(Q, echo) and not probe.detector(_bag_of_words)(Q, plain)
    assert opening_words(echo, 3) == "Tom has 3"
    linear = EchoProbe(hidden=0, lr=0.05).fit(questions, responses, labels, _bag_of_words)
    assert isinstance(linear.net, torch.nn.Linear)
    with pytest.raises(ValueError, match="labels"):
        EchoProbe().fit(questions, responses, [1] * 40, _bag_of_words)
    with pytest.raises(ValueError, match="hidden"):
        EchoProbe(hidden=-1)
    with pytest.raises(ValueError, match="fit the probe"):
        EchoProbe().predict_proba([Q], [echo], _bag_of_words)
