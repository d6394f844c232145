"""Sentence segmentation (Thought Anchors rules) and exact token spans of ReasoningTrace."""

from __future__ import annotations

import pytest
import torch

import mechlens as ml
from mechlens.text.trace import split_sentences


def texts(text, **kw):
    return [text[a:b] for a, b in split_sentences(text, **kw)]


def reference_chunks(solution_text: str) -> list[str]:
    """A line-by-line port of the authors' splitter (thought-anchors `utils.py`,
    `split_solution_into_chunks`), the final-chunk append left commented out as there."""
    if "<think>" in solution_text:
        solution_text = solution_text.split("<think>")[1].strip()
    if "</think>" in solution_text:
        solution_text = solution_text.split("</think>")[0].strip()
    chunks, current = [], ""
    for i in range(len(solution_text)):
        current += solution_text[i]
        para = any(solution_text[i : i + len(b)] == b for b in ("\n\n", "\r\n\r\n"))
        sent = i < len(solution_text) - 1 and solution_text[i] in ".?!" and solution_text[i + 1] in " \n"
        if (para or sent) and current.strip():
            chunks.append(current.strip())
            current = ""
    i = 0
    while i < len(chunks):
        if len(chunks[i]) < 10:
            if i == len(chunks) - 1:
                if i > 0:
                    chunks[i - 1] = chunks[i - 1] + " " + chunks[i]
                    chunks.pop(i)
            else:
                chunks[i + 1] = chunks[i] + " " + chunks[i + 1]
                chunks.pop(i)
                continue
        i += 1
    return chunks


def squash(chunks):
    return [" ".join(c.split()) for c in chunks]


def test_splitter_rules():
    # the final chunk, which no boundary closes, is not a unit (as the authors' splitter)
    assert texts("Pi is 3.14 roughly. Next we add 2.5 to it. So it is 5.64.") == [
        "Pi is 3.14 roughly.",
        "Next we add 2.5 to it.",
    ]
    assert (
        texts("Pi is 3.14 roughly. Next we add 2.5 to it.", rule="thought-branches")[-1]
        == "Next we add 2.5 to it."
    )
    # cut at blank lines, strip whitespace
    assert texts("First paragraph here\n\nSecond paragraph here\n\nThird") == [
        "First paragraph here",
        "Second paragraph here",
    ]
    assert texts("Windows line end\r\n\r\nand the next one\r\n\r\nend") == [
        "Windows line end",
        "and the next one",
    ]
    # ? and ! followed by newline cut too; no cut without the following space/newline
    assert texts("Is it twelve?\nYes it is!Right, twelve. Ok then.") == [
        "Is it twelve?",
        "Yes it is!Right, twelve.",
    ]
    # fragments under 10 characters merge into the next sentence ...
    assert texts("Wait. Let me recompute this. And more.") == ["Wait. Let me recompute this."]
    # ... and, the final chunk gone, a short last one into the previous
    assert texts("The sum is 12 exactly. Done. So 12.") == ["The sum is 12 exactly. Done."]
    # a numbered list: the reference cuts after "1." and "2." too; short pieces merge forward
    assert texts(
        "Steps:\n1. add\n2. multiply numbers.\n\nThen check the result.", rule="thought-branches"
    ) == [
        "Steps:\n1. add\n2.",
        "multiply numbers.",
        "Then check the result.",
    ]
    assert (
        texts("   ") == [] and texts("short") == [] and texts("short", rule="thought-branches") == ["short"]
    )
    assert texts("One sentence, closed.\n") == []  # stripped first: the last period closes nothing


CASES = [
    "Pi is 3.14 roughly. Next we add 2.5 to it. So it is 5.64.",
    "Wait. Let me recompute this.\n\nOk. Hmm, 7 * 8 = 56. Right! Yes.\nSo 56.",
    "  Steps:\n1. add\n2. multiply numbers.\n\nThen check. Fine. a. b. c.  ",
    "Is it twelve?\nYes it is!Right, twelve.\r\n\r\nDone here. Ok.",
    "First, add. Then, multiply the two. Check: 3.5 + 1 = 4.5. Done. ",
]


@pytest.mark.parametrize("text", CASES)
def test_splitter_equals_the_authors(text):
    # their pipeline always passes the text after <think>, which the splitter strips
    assert squash(texts(text)) == squash(reference_chunks("<think>" + text))
    thinking = "<think>" + text + "</think>\nThe answer is 5."
    a, b = len("<think>"), len("<think>") + len(text)
    assert squash(texts(thinking[a:b])) == squash(reference_chunks(thinking))


def test_splitter_abbreviations():
    text = "Use a tool, e.g. a hammer for it. Then stop working. Ok."
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
    "That gives 5. So it is 5.</think>\nThe answer is 5."
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
        == tiny.to_tokens(ml.format_prompt(tiny.tokenizer, "What is 2+3?"))[0].tolist()
    )
    assert all(a.end <= b.start for a, b in zip(trace.sentences, trace.sentences[1:], strict=False))
    assert trace.sentence_of(trace.sentences[2].start).index == 2


def test_trace_without_think_uses_whole_response(tiny):
    trace = ml.ReasoningTrace.from_text(tiny, "Hi?", "Hello there friend. How are you today? Fine.")
    assert trace.thinking is None
    assert [s.text for s in trace.sentences] == ["Hello there friend.", "How are you today?"]


def test_trace_template_opened_think(tiny):
    trace = ml.ReasoningTrace.from_text(tiny, "Q?", "Let me think about it. Then say yes.</think>Yes.")
    assert [s.text for s in trace.sentences] == ["Let me think about it."]
    with pytest.raises(ValueError, match="thought-branches"):
        ml.ReasoningTrace.from_text(tiny, "Q?", "Only one.</think>Yes.").check_sentences()


def test_split_rules_are_named_after_their_sources(tiny):
    from mechlens.text.trace import SPLIT_RULES

    text = "First we add. Then we check it. Answer is 5"
    anchors_rule = split_sentences(text)
    assert split_sentences(text, rule="thought-anchors") == anchors_rule and len(anchors_rule) == 2
    assert split_sentences(text, rule="thought-branches")[:2] == anchors_rule
    assert len(split_sentences(text, rule="thought-branches")) == 3 and SPLIT_RULES == (
        "thought-anchors",
        "thought-branches",
    )
    for bad in ("keep_last", True, None):
        with pytest.raises(ValueError, match="rule must be one of"):
            split_sentences(text, rule=bad)
        with pytest.raises(ValueError, match="rule must be one of"):
            ml.ReasoningTrace.from_text(tiny, "Q?", text, rule=bad)


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
    trace = ml.ReasoningTrace.from_text(
        embedded_nnsight, "How many apples?", response, rule="thought-branches"
    )
    assert [s.text for s in trace.sentences] == [
        "Okay, so the problem says Tom has 3 apples and buys 2.5 kg more.",
        "Hmm, e.g. a kilo is about 8 apples.",
        "Wait, that's not right!",
        "Let me redo it: 3 + 20 = 23.",
        "So the total is 23 apples.",
    ]
    check_round_trip(embedded_nnsight, trace)
