"""Sentence segmentation (Thought Anchors rules) and exact token spans of ReasoningTrace."""

from __future__ import annotations

import pytest
import torch

import mechlens as ml
from mechlens.text.trace import split_sentences


def texts(text, **kw):
    return [text[a:b] for a, b in split_sentences(text, **kw)]


def test_splitter_rules():
    assert texts("Pi is 3.14 roughly. Next we add 2.5 to it.") == [
        "Pi is 3.14 roughly.",
        "Next we add 2.5 to it.",
    ]
    # cut at blank lines, strip whitespace
    assert texts("First paragraph here\n\nSecond paragraph here") == [
        "First paragraph here",
        "Second paragraph here",
    ]
    assert texts("Windows line end\r\n\r\nand the next one") == ["Windows line end", "and the next one"]
    # ? and ! followed by newline cut too; no cut without the following space/newline
    assert texts("Is it twelve?\nYes it is!Right, twelve.") == ["Is it twelve?", "Yes it is!Right, twelve."]
    # fragments under 10 characters merge into the next sentence ...
    assert texts("Wait. Let me recompute this.") == ["Wait. Let me recompute this."]
    # ... and the last short one into the previous
    assert texts("The sum is 12 exactly. Done.") == ["The sum is 12 exactly. Done."]
    # a numbered list: the reference cuts after "1." and "2." too; short pieces merge forward
    assert texts("Steps:\n1. add\n2. multiply numbers.\n\nThen check the result.") == [
        "Steps:\n1. add\n2.",
        "multiply numbers.",
        "Then check the result.",
    ]
    assert texts("   ") == []
    assert texts("short") == ["short"]


def test_splitter_abbreviations():
    text = "Use a tool, e.g. a hammer for it. Then stop working."
    assert texts(text) == ["Use a tool, e.g.", "a hammer for it.", "Then stop working."]  # as the reference
    assert texts(text, protect_abbreviations=True) == [
        "Use a tool, e.g. a hammer for it.",
        "Then stop working.",
    ]


def test_splitter_max_chunks_warns():
    with pytest.warns(UserWarning, match="max_chunks"):
        assert len(split_sentences("This is a sentence. " * 5, max_chunks=3)) == 3


@pytest.fixture(scope="module")
def tiny():
    return ml.load_model("tiny-llama", backend="nnsight")


RESPONSE = (
    "<think>First, I add 2 and 3. That gives 5.\n\nWait, let me check: 2 + 3 = 5. "
    "That gives 5.</think>\nThe answer is 5."
)


def check_round_trip(model, trace):
    for s in trace.sentences:
        decoded = model.to_string(trace.tokens[0, s.start : s.end]).strip()
        assert decoded == s.text, (decoded, s.text)
        assert trace.text[s.char_start : s.char_end] == s.text


def test_trace_spans_round_trip(tiny):
    trace = ml.ReasoningTrace.from_text(tiny, "What is 2+3?", RESPONSE)
    assert [s.text for s in trace.sentences] == [
        "First, I add 2 and 3.",
        "That gives 5.",
        "Wait, let me check: 2 + 3 = 5.",
        "That gives 5.",
    ]
    check_round_trip(tiny, trace)
    # the repeated sentence keeps its own span
    assert trace.sentences[1].start != trace.sentences[3].start
    assert trace.answer == "The answer is 5."
    assert (
        trace.tokens[0, : trace.prompt_len].tolist()
        == tiny.to_tokens(ml.trace.format_prompt(tiny.tokenizer, "What is 2+3?"))[0].tolist()
    )
    assert all(a.end <= b.start for a, b in zip(trace.sentences, trace.sentences[1:], strict=False))
    assert trace.sentence_of(trace.sentences[2].start).index == 2


def test_trace_without_think_uses_whole_response(tiny):
    trace = ml.ReasoningTrace.from_text(tiny, "Hi?", "Hello there friend. How are you today?")
    assert trace.thinking is None
    assert [s.text for s in trace.sentences] == ["Hello there friend.", "How are you today?"]


def test_trace_template_opened_think(tiny):
    trace = ml.ReasoningTrace.from_text(tiny, "Q?", "Let me think about it.</think>Yes.")
    assert [s.text for s in trace.sentences] == ["Let me think about it."]


def test_trace_errors(tiny):
    with pytest.raises(ValueError, match="empty trace"):
        ml.ReasoningTrace.from_text(tiny, "Q?", "   ")
    with pytest.raises(ValueError, match="context window"):
        ml.ReasoningTrace.from_text(tiny, "Q?", "word " * 250)


def test_trace_save_load(tiny, tmp_path):
    trace = ml.ReasoningTrace.from_text(tiny, "What is 2+3?", RESPONSE)
    trace.save(tmp_path / "t.json")
    again = ml.ReasoningTrace.load(tiny, tmp_path / "t.json")
    assert torch.equal(again.tokens, trace.tokens) and again.sentences == trace.sentences


def test_from_generation_is_deterministic(tiny):
    a = ml.ReasoningTrace.from_generation(tiny, "Count: one. two.", max_new_tokens=12)
    b = ml.ReasoningTrace.from_generation(tiny, "Count: one. two.", max_new_tokens=12)
    assert a.response == b.response


@pytest.mark.slow
def test_round_trip_on_embedded_tokenizer(embedded_nnsight):
    response = (
        "<think>\nOkay, so the problem says Tom has 3 apples and buys 2.5 kg more. "
        "Hmm, e.g. a kilo is about 8 apples.\n\nWait, that's not right! Let me redo it: "
        "3 + 20 = 23.\n\nSo the total is 23 apples.\n</think>\n\nTom has 23 apples."
    )
    trace = ml.ReasoningTrace.from_text(embedded_nnsight, "How many apples?", response)
    assert [s.text for s in trace.sentences] == [
        "Okay, so the problem says Tom has 3 apples and buys 2.5 kg more.",
        "Hmm, e.g. a kilo is about 8 apples.",
        "Wait, that's not right!",
        "Let me redo it: 3 + 20 = 23.",
        "So the total is 23 apples.",
    ]
    check_round_trip(embedded_nnsight, trace)
