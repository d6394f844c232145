"""The Thought Anchors sentence taxonomy: eight functional categories plus "unknown".

The paper labels sentences with an LLM prompt; `classify_sentence` is a deterministic keyword
fallback, and `label_sentences` takes any labeller (a function from sentences to categories), for
instance `model_labeller(model)`, which asks a language model.

Example:
    >>> classify_sentence("Wait, that is not right.")
    'uncertainty_management'
    >>> classify_sentence("3 + 4 = 7.")
    'active_computation'
    >>> classify_sentence("Let me first find the total.")
    'plan_generation'
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mechlens.models.hooked import HookedModel

CATEGORIES = (
    "problem_setup",
    "plan_generation",
    "fact_retrieval",
    "active_computation",
    "result_consolidation",
    "uncertainty_management",
    "final_answer_emission",
    "self_checking",
    "unknown",
)

DESCRIPTIONS = {
    "problem_setup": "parsing or rephrasing the problem",
    "plan_generation": "stating a plan or deciding what to do next",
    "fact_retrieval": "recalling a fact, formula or definition",
    "active_computation": "doing algebra or arithmetic",
    "result_consolidation": "summarising or aggregating intermediate results",
    "uncertainty_management": "expressing confusion, re-evaluating, backtracking",
    "final_answer_emission": "stating the final answer",
    "self_checking": "verifying earlier steps",
    "unknown": "none of the above",
}

Labeller = Callable[[Sequence[str], str], list[str]]
"""(sentences, question) -> one category per sentence."""

# first matching rule wins; patterns are matched case-insensitively
_RULES: tuple[tuple[str, str], ...] = (
    ("final_answer_emission", r"(final answer|the answer is|answer\s*:|\\boxed)"),
    (
        "uncertainty_management",
        r"^(wait|hmm|hold on|but wait|actually|alternatively|oops|no,)\b|not sure|mistake|"
        r"reconsider|doesn'?t (seem|make)|that'?s (not|wrong)|\bretry\b",
    ),
    ("self_checking", r"\b(check|verify|double-check|confirm|make sure|sanity)\b"),
    (
        "plan_generation",
        r"^(let me|let's|let us|first|to (solve|find)|i need to|we need to|i will|i'll|next|then,? i|"
        r"now,? (let|i|we)|step \d|the (first|next) step|my plan|i should|we can)\b",
    ),
    ("active_computation", r"\d\s*[-+*/×x÷^]\s*\(?\d|=\s*-?\d|\d\s*="),
    (
        "result_consolidation",
        r"^(so|therefore|thus|hence|this means|that means|in total|altogether|overall|which means)\b",
    ),
    (
        "fact_retrieval",
        r"\b(recall|remember|formula|definition|defined as|by definition|we know|is known|"
        r"there are \d+|means that|equals)\b",
    ),
)


def classify_sentence(sentence: str, question: str = "") -> str:
    """Category of one sentence by keyword rules (deterministic; the paper uses an LLM).

    A sentence of four or more words, most of them from `question` (when given), is
    `problem_setup`, unless a rule before it (answer, uncertainty, checking, plan, computation,
    consolidation) already matched.
    """
    text = sentence.strip()
    for category, pattern in _RULES[:6]:
        if re.search(pattern, text, re.IGNORECASE):
            return category
    if question and len(re.findall(r"\w+", text)) >= 4 and _overlap(text, question) >= 0.6:
        return "problem_setup"
    for category, pattern in _RULES[6:]:
        if re.search(pattern, text, re.IGNORECASE):
            return category
    return "unknown"


def _overlap(text: str, question: str) -> float:
    """Share of `text`'s words that occur in `question`."""
    words = re.findall(r"\w+", text.lower())
    known = set(re.findall(r"\w+", question.lower()))
    return sum(w in known for w in words) / max(len(words), 1)


def keyword_labeller(sentences: Sequence[str], question: str = "") -> list[str]:
    """The keyword `Labeller`: `classify_sentence` on each sentence."""
    return [classify_sentence(s, question) for s in sentences]


def label_sentences(
    sentences: Sequence[str], question: str = "", labeller: Labeller | None = None
) -> list[str]:
    """One category per sentence from `labeller` (default: keywords), checked against CATEGORIES.

    >>> label_sentences(["Tom has 3 apples.", "So he has 7."], "Tom has 3 apples. He buys 4.")
    ['problem_setup', 'result_consolidation']
    """
    labels = list((labeller or keyword_labeller)(sentences, question))
    if len(labels) != len(sentences):
        raise ValueError(f"the labeller gave {len(labels)} labels for {len(sentences)} sentences")
    bad = sorted({l for l in labels if l not in CATEGORIES})
    if bad:
        raise ValueError(f"unknown categories {bad}: valid categories are {list(CATEGORIES)}")
    return labels


def model_labeller(model: HookedModel, max_new_tokens: int = 8) -> Labeller:
    """A `Labeller` that asks `model` (greedy) to name each sentence's category, as the paper's
    auto-labeller does with a larger model; an answer naming no category falls back to keywords.

    >>> labeller = model_labeller(ml.load_model())           # doctest: +SKIP
    >>> label_sentences(trace_sentences, question, labeller)  # doctest: +SKIP
    """
    from mechlens.text.thinking import format_prompt

    menu = "\n".join(f"- {c}: {d}" for c, d in DESCRIPTIONS.items())

    def label(sentences: Sequence[str], question: str = "") -> list[str]:
        prompts = [
            format_prompt(
                model.tokenizer,
                f"Problem: {question}\nSentence from a solution: {s}\n\nWhich category fits the "
                f"sentence best?\n{menu}\nReply with the category name only.",
            )
            for s in sentences
        ]
        replies = model.generate(prompts, max_new_tokens=max_new_tokens, temperature=0).texts
        out = []
        for s, reply in zip(sentences, replies, strict=True):
            named = [c for c in CATEGORIES if c in reply.lower().replace(" ", "_")]
            out.append(named[0] if named else classify_sentence(s, question))
        return out

    return label
