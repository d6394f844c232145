"""Text: reasoning traces with sentence token spans, the chat template and `<think>` layout, answers."""

from mechlens.text.answers import Grade, answer_key, extract_answer, grade
from mechlens.text.thinking import (
    THINK_CLOSE,
    THINK_OPEN,
    after_thinking,
    format_prompt,
    format_reply,
    split_thinking,
)
from mechlens.text.trace import ReasoningTrace, Sentence, SplitRule, split_blocks, split_sentences

__all__ = [
    "THINK_CLOSE",
    "THINK_OPEN",
    "Grade",
    "ReasoningTrace",
    "Sentence",
    "after_thinking",
    "answer_key",
    "extract_answer",
    "format_prompt",
    "format_reply",
    "grade",
    "split_blocks",
    "SplitRule",
    "split_sentences",
    "split_thinking",
]
