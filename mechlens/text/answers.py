"""Answer extraction and checking for free-text model responses.

The final answer is read after the last "answer is" / "Answer:" marker of the response (after
`</think>` when present), else from its last non-empty line. Numbers compare as values (the
first number after a marker, else the last number of the response); text answers match any
accepted alias as a whole word (short aliases such as chemical symbols case-sensitively).

Example:
    >>> grade("2 + 3 = 5.\\n\\nThe answer is: 5 apples.", "5").correct
    True
    >>> grade("The capital is Sydney.", "Canberra").correct
    False
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from mechlens.text.thinking import after_thinking

_MARKER = re.compile(r"(?:final answer|answer)\s*(?:is|:|=)\s*:?", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclass(frozen=True)
class Grade:
    """correct: the extracted answer matches; extracted: the answer text found (None: nothing);
    marked: whether it followed an explicit answer marker."""

    correct: bool
    extracted: str | None
    marked: bool


def extract_answer(response: str) -> tuple[str | None, bool]:
    """`(answer text, marked)`: the rest of the line after the last answer marker, else the
    last non-empty line; `(None, False)` for an empty response."""
    text = after_thinking(response)
    found = list(_MARKER.finditer(text))
    if found:
        rest = text[found[-1].end() :].strip()
        line = rest.splitlines()[0] if rest else ""
        return _clean(line) or None, True
    lines = [l for l in text.splitlines() if l.strip()]
    return (_clean(lines[-1]) if lines else None), False


def _clean(text: str) -> str:
    return text.strip().strip("*\"'`").strip()


def parse_number(text: str) -> float | None:
    """The first number in `text` ("1,200" -> 1200.0), or None."""
    match = _NUMBER.search(text)
    return float(match.group().replace(",", "")) if match else None


def final_number(response: str) -> float | None:
    """The numeric answer of `response`: the first number after the last answer marker, else the
    last number after `</think>` (an unmarked answer usually ends with its result: "3 + 4 = 7");
    None without any.

    >>> final_number("The answer is 7 apples, not 8."), final_number("So 3 + 4 = 7."), final_number("No.")
    (7.0, 7.0, None)
    """
    extracted, marked = extract_answer(response)
    if marked:
        value = parse_number(extracted or "")
        if value is not None:
            return value
    numbers = _NUMBER.findall(after_thinking(response))
    return float(numbers[-1].replace(",", "")) if numbers else None


def answer_key(response: str, numeric: bool) -> str | None:
    """The final answer as a category for answer distributions: the number's value written
    canonically ("1,200.0" -> "1200") when `numeric`, else the extracted text in lower case.

    >>> answer_key("So the answer is: 1,200.0 apples", numeric=True)
    '1200'
    """
    if numeric:
        value = final_number(response)
        if value is None:
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    extracted = extract_answer(response)[0]
    return extracted.lower() if extracted else None


def grade(response: str, answer: str, aliases: Sequence[str] = ()) -> Grade:
    """Check `response` against the gold `answer` (a number or a text with `aliases`).

    A numeric gold answer compares with `final_number(response)`: the first number after an
    answer marker, else the last number of the response.
    """
    extracted, marked = extract_answer(response)
    gold = parse_number(answer) if _NUMBER.fullmatch(answer.strip()) else None
    if gold is not None:
        value = final_number(response)
        return Grade(value is not None and abs(value - gold) < 1e-9, extracted, marked)
    if extracted is None:
        return Grade(False, None, marked)
    return Grade(any(_mentions(extracted, a) for a in (answer, *aliases)), extracted, marked)


def _mentions(text: str, alias: str) -> bool:
    flags = 0 if len(alias) <= 2 else re.IGNORECASE
    return re.search(rf"(?<!\w){re.escape(alias)}(?!\w)", text, flags) is not None
