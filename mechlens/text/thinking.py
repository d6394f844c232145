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


def split_thinking(text: str) -> tuple[str, str, bool]:
    """`(thinking, answer, closed)` of a reply; the opening `<think>` is optional. Unclosed
    thinking is all thinking (`closed=False`, empty answer)."""
    body = text.lstrip()
    body = body[len(THINK_OPEN) :] if body.startswith(THINK_OPEN) else body
    if THINK_CLOSE not in body:
        return body.strip("\n"), "", False
    thinking, answer = body.split(THINK_CLOSE, 1)
    return thinking.strip("\n"), answer.strip(), True


def after_thinking(response: str) -> str:
    """The part of a response after its first `</think>` (all of it when there is none)."""
    return response.split(THINK_CLOSE, 1)[1] if THINK_CLOSE in response else response


def thinking_span(text: str, response_start: int) -> tuple[int, int] | None:
    """Character span of the chain of thought in `text` whose response starts at `response_start`:
    after `<think>` (or from the response start when the chat template already opened it, or when
    only `</think>` appears) up to `</think>` (or the end); None without thinking."""
    open_at = text.find(THINK_OPEN, response_start)
    if open_at >= 0:
        start = open_at + len(THINK_OPEN)
    elif text[:response_start].rstrip().endswith(THINK_OPEN) or THINK_CLOSE in text[response_start:]:
        start = response_start
    else:
        return None
    close_at = text.find(THINK_CLOSE, start)
    return start, close_at if close_at >= 0 else len(text)
