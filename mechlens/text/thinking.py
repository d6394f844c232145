"""The chat template and `<think>` markers: one place for how a reasoning reply is laid out.

A reasoning reply is `<think>` + chain of thought + `</think>` + answer. `format_reply` writes the
layout the organisms are trained on (`"<think>\\n" + thinking + "\\n</think>\\n\\n" + answer`);
`split_thinking` reads any reply back (the opening marker is optional: some chat templates open the
thinking themselves); `thinking_span` finds the chain of thought's characters inside a full text.

Example:
    >>> reply = format_reply("2 + 3 is 5.", "5")
    >>> reply
    '<think>\\n2 + 3 is 5.\\n</think>\\n\\n5'
    >>> split_thinking(reply)
    ('2 + 3 is 5.', '5', True)
    >>> after_thinking("<think>hmm</think> The answer is 4.")
    ' The answer is 4.'
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
REPLY_OPEN = THINK_OPEN + "\n"
"""What a reply starts with: the opening marker and a newline."""
REPLY_CLOSE = "\n" + THINK_CLOSE + "\n\n"
"""What separates the thinking from the answer in `format_reply`."""


def format_prompt(tokenizer, prompt: str, system: str | None = None) -> str:
    """The chat-templated prompt with the generation prompt (the assistant turn opener); the prompt
    itself when the tokenizer has no chat template."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    if system is not None and not isinstance(system, str):
        raise TypeError(f"system must be a string or None, got {type(system).__name__}")
    if not getattr(tokenizer, "chat_template", None):
        return prompt
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def format_reply(thinking: str, answer: str = "") -> str:
    """`<think>\\n{thinking}\\n</think>\\n\\n{answer}`; with no answer, the text right before it."""
    return REPLY_OPEN + thinking.strip("\n") + REPLY_CLOSE + answer


@dataclass(frozen=True)
class ReplyLayout:
    """Where the parts of a reply lie, as character spans of the text it was read from.

    thinking: the chain of thought, markers excluded (None: the reply does not think).
    answer: what follows the first `</think>` (empty while the thinking is unclosed; the whole
        reply when it does not think).
    closed: whether the thinking was closed by `</think>`.
    """

    thinking: tuple[int, int] | None
    answer: tuple[int, int]
    closed: bool


def reply_layout(text: str, start: int = 0, opened: bool = False) -> ReplyLayout:
    """The layout of the reply `text[start:]`; the one rule behind `split_thinking`,
    `thinking_span`, `after_thinking` and `ReasoningTrace.thinking` / `.answer`:

    - the reply thinks when it starts with `<think>` (after whitespace), when `opened` (the chat
      template wrote the opening marker before it), or when it holds a `</think>` (a template
      opened the thinking without showing it); else it is all answer;
    - the thinking ends at the first `</think>`; the answer is everything after it, markers
      included (a second `<think>` after the answer is answer text, never thinking);
    - unclosed thinking runs to the end, and the answer is empty.

        >>> t = "<think>a</think>b<think>c"
        >>> r = reply_layout(t); t[slice(*r.thinking)], t[slice(*r.answer)], r.closed
        ('a', 'b<think>c', True)
        >>> r = reply_layout("plain answer"); r.thinking, r.closed
        (None, False)
    """
    body = len(text) - len(text[start:].lstrip()) if text[start:].strip() else start
    close_at = text.find(THINK_CLOSE, start)
    if text.startswith(THINK_OPEN, body):
        think_start = body + len(THINK_OPEN)
        close_at = text.find(THINK_CLOSE, think_start)
    elif opened or close_at >= 0:
        think_start = start
    else:
        return ReplyLayout(None, (start, len(text)), False)
    if close_at < 0:
        return ReplyLayout((think_start, len(text)), (len(text), len(text)), False)
    return ReplyLayout((think_start, close_at), (close_at + len(THINK_CLOSE), len(text)), True)


def as_reply(prompt_text: str, continuation: str) -> str:
    """`continuation` as a whole reply: with `<think>` put back in front when the (templated)
    prompt itself opened the thinking, so that an unclosed thinking is not read as an answer.

        >>> as_reply("...assistant\\n<think>\\n", "3 + 4 = 7"), as_reply("...assistant\\n", "7")
        ('<think>3 + 4 = 7', '7')
    """
    return THINK_OPEN + continuation if prompt_text.rstrip().endswith(THINK_OPEN) else continuation


def split_thinking(text: str, opened: bool = False) -> tuple[str, str, bool]:
    """`(thinking, answer, closed)` of a reply (`reply_layout`'s rule), stripped of the newlines
    around them. A reply without markers is all answer, unless `opened` (the prompt already
    opened the thinking); unclosed thinking is all thinking with an empty answer."""
    layout = reply_layout(text, 0, opened)
    thinking = "" if layout.thinking is None else text[slice(*layout.thinking)].strip("\n")
    return thinking, text[slice(*layout.answer)].strip(), layout.closed


def after_thinking(response: str, opened: bool = False) -> str:
    """The answer part of a response (`reply_layout`): after its first `</think>`; all of it when
    it does not think; empty while its thinking is unclosed."""
    return response[slice(*reply_layout(response, 0, opened).answer)]


def thinking_span(text: str, response_start: int) -> tuple[int, int] | None:
    """Character span of the chain of thought in `text` whose response starts at `response_start`
    (`reply_layout`, opened when the prompt before it ends with `<think>`); None without thinking."""
    opened = text[:response_start].rstrip().endswith(THINK_OPEN)
    return reply_layout(text, response_start, opened).thinking
