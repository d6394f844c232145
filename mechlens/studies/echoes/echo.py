"""Echo of the prompt: thinking that restates the question ("Echoes as Anchors").

The authors detect echoes by word overlap with the question
(hhh2210/echoes-as-anchors, `src/data_processing/mlp_pipeline/inference.py`,
`_remove_repetitive_content`): a sentence (split at `.`, `!`, `?`) whose words are at least 60%
question words, or that has 3 words or fewer, is removed. `trim_echo(rule="authors")` is that
function: it keeps the last two remaining sentences of everything after `<think>` and appends a
transition sentence, which is the "trimmed answer" their Echo Likelihood Gap scores.
`rule="echo-span"` (ours) removes only the leading echo sentences and keeps the rest verbatim, so
that the raw and trimmed responses share their whole suffix.

Example:
    >>> q = "Tom has 3 apples and buys 4 more apples. How many apples does Tom have?"
    >>> r = "<think>\\nTom has 3 apples and buys 4 more apples. So 3 + 4 = 7 apples in total.\\n</think>\\n7"
    >>> overlap(q, "Tom has 3 apples and buys 4 more apples")
    1.0
    >>> echo_span(q, r) is not None, trim_echo(q, r, rule="echo-span")
    (True, '<think>\\nSo 3 + 4 = 7 apples in total.\\n</think>\\n7')
"""

from __future__ import annotations

import re
from typing import Literal

from mechlens.text.trace import split_sentences

TrimRule = Literal["authors", "echo-span"]
TRIM_RULES: tuple[TrimRule, ...] = ("authors", "echo-span")
THRESHOLD = 0.6
"""The authors' overlap threshold: a sentence with at least this share of question words echoes."""
MIN_WORDS = 4
"""Fewer words than this and the authors' filter drops a sentence whatever its overlap."""


def _words(text: str) -> set[str]:
    return set(re.sub(r"[^\w\s]", "", text.lower()).split())


def overlap(question: str, sentence: str) -> float:
    """The share of `sentence`'s distinct words that are question words (punctuation removed,
    lower case: the authors' measure); 0 for a sentence without words."""
    words = _words(sentence)
    return len(_words(question) & words) / len(words) if words else 0.0


def is_echo(question: str, sentence: str, threshold: float = THRESHOLD) -> bool:
    """Whether `sentence` restates the question: overlap >= `threshold` and at least `MIN_WORDS`
    distinct words."""
    return len(_words(sentence)) >= MIN_WORDS and overlap(question, sentence) >= threshold


def _thinking_start(response: str) -> int:
    """Where the text after the last `<think>` (and its whitespace) starts; after the leading
    whitespace without one (the authors' prompt ends with `<think>`, whose `\\s*` takes it)."""
    match = re.search(r"(.*<think>\s*)", response, re.DOTALL)
    return match.end(1) if match else len(response) - len(response.lstrip())


def echo_span(question: str, response: str, threshold: float = THRESHOLD) -> tuple[int, int] | None:
    """Character span `(start, end)` in `response` of its leading echo: the run of echo sentences
    (`is_echo`) from the start of the thinking, skipping short opening sentences ("Okay."); None
    when the thinking does not open with one. Sentences end as the thought-branches splitter
    ends them."""
    _check(question, response, threshold)
    start = _thinking_start(response)
    close = response.find("</think>", start)
    body = response[start : close if close >= 0 else len(response)]
    span: tuple[int, int] | None = None
    for a, b in split_sentences(body, rule="thought-branches"):
        sentence = body[a:b]
        if is_echo(question, sentence, threshold):
            span = (start + a if span is None else span[0], start + b)
        elif span is not None or len(_words(sentence)) >= MIN_WORDS:
            break
    return span


def trim_echo(question: str, response: str, rule: TrimRule = "authors", threshold: float = THRESHOLD) -> str:
    """`response` with its echo removed (`rule`: "authors", their filter and continuation text, or
    "echo-span", ours: the leading echo only). A response without an echo comes back unchanged
    under "echo-span"."""
    _check(question, response, threshold)
    if rule not in TRIM_RULES:
        raise ValueError(f"rule must be one of {list(TRIM_RULES)}, got {rule!r}")
    if rule == "echo-span":
        span = echo_span(question, response, threshold)
        if span is None:
            return response
        rest = response[span[1] :]
        return response[: span[0]] + rest.lstrip(" ")
    start = _thinking_start(response)
    kept = []
    for sentence in re.split(r"[.!?]", response[start:].strip()):
        sentence = sentence.strip()
        words = _words(sentence)
        if words and overlap(question, sentence) < threshold and len(words) > MIN_WORDS - 1:
            kept.append(sentence)
    if not kept:
        body = "Now I need to solve this step by step."
    elif len(kept) < 2:
        body = kept[0] + ". Now let me continue solving this."
    else:
        body = ". ".join(kept[-2:])
        body = (body if body.endswith(".") else body + ".") + " Let me work through this systematically."
    return response[:start] + body


def _check(question: str, response: str, threshold: float) -> None:
    for name, value in (("question", question), ("response", response)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a string, got {type(value).__name__}")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must lie in (0, 1], got {threshold!r}")
