"""ReasoningTrace: a prompt, a chain of thought and an answer, tokenised with the chat template,
with sentences as exact token spans.

Sentences follow the Thought Anchors splitter (`utils.py`, `split_solution_into_chunks`): the
text inside `<think>...</think>` when present (else the whole response), stripped, is cut after
`.`, `?` or `!` followed by a space or newline and at blank lines; chunks are stripped and
fragments under 10 characters merge into the next sentence (the last into the previous). As in
their code, the final chunk that no boundary closes is not a unit (their append of it is commented
out): the last sentence before `</think>` is left out, and a short chunk before it merges into the
previous one: `rule="thought-anchors"`, the default. thought-branches' splitter
(`faithfulness/utils.py`, `split_solution_into_chunks`) appends that final chunk, and so do its
released sentence lists of DeepSeek-R1 traces: `rule="thought-branches"` keeps it. Token spans
come from the tokenizer's offset mapping, never from string search, so a sentence that repeats
keeps its own span.

Example:
    >>> import mechlens as ml
    >>> model = ml.load_model("tiny-llama")
    >>> response = "<think>First, add 2 and 3. That gives 5. Done.</think>The answer is 5."
    >>> [s.text for s in ml.ReasoningTrace.from_text(model, "What is 2+3?", response).sentences]
    ['First, add 2 and 3.', 'That gives 5.']
    >>> trace = ml.ReasoningTrace.from_text(model, "What is 2+3?", response, rule="thought-branches")
    >>> [s.text for s in trace.sentences]
    ['First, add 2 and 3.', 'That gives 5. Done.']
    >>> s = trace.sentences[1]; model.to_string(trace.tokens[0, s.start:s.end]).strip()
    'That gives 5. Done.'
"""

from __future__ import annotations

import bisect
import json
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from torch import Tensor

from mechlens.models.sampling import Sampling
from mechlens.text.thinking import THINK_OPEN, format_prompt, reply_layout

if TYPE_CHECKING:
    from mechlens.models.hooked import HookedModel

TRACE_SAMPLING = Sampling(max_new_tokens=256, temperature=0.0)
"""How `ReasoningTrace.from_generation` samples by default: greedy, up to 256 new tokens."""

SplitRule = Literal["thought-anchors", "thought-branches"]
"""Where the sentences end (module docstring): "thought-anchors" drops the final chunk that no
boundary closes, as `utils.split_solution_into_chunks` of thought-anchors does; "thought-branches"
keeps it, as `faithfulness/utils.py` of thought-branches and its released sentence lists do."""
SPLIT_RULES: tuple[str, ...] = get_args(SplitRule)

TRACE_SETTINGS = ("system", "chat_template", "protect_abbreviations", "rule")
"""`ReasoningTrace.from_text` settings that a saved trace records."""

ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "cf.", "Dr.", "Mr.", "Mrs.", "Ms.", "approx.")


def split_sentences(
    text: str,
    min_chars: int = 10,
    max_chunks: int = 275,
    protect_abbreviations: bool = False,
    rule: SplitRule = "thought-anchors",
) -> list[tuple[int, int]]:
    """Character spans `[start, end)` of the sentences of `text` (Thought Anchors rules).

    The stripped text's final chunk, which no boundary closes, is dropped under
    `rule="thought-anchors"` and kept under `rule="thought-branches"` (`SplitRule`).
    `protect_abbreviations=True` (ours) does not cut after "e.g.", "i.e." and similar; the
    reference splitter does.

        >>> t = "Let x = 3.5. Then 2x = 7!\\n\\nOk. Done with it. So x = 3.5."
        >>> [t[a:b] for a, b in split_sentences(t)]
        ['Let x = 3.5.', 'Then 2x = 7!', 'Ok. Done with it.']
        >>> [t[a:b] for a, b in split_sentences(t, rule="thought-branches")][-1]
        'So x = 3.5.'
    """
    check_rule(rule)
    cuts: list[tuple[int, int]] = []  # raw chunks before stripping
    start = i = len(text) - len(text.lstrip())
    n = len(text.rstrip())
    while i < n:
        brk = next((b for b in ("\r\n\r\n", "\n\n") if text.startswith(b, i)), None)
        if brk:
            cuts.append((start, i))
            i += len(brk)
            start = i
            continue
        at_end = text[i] in ".?!" and i + 1 < n and text[i + 1] in " \n"
        if at_end and not (protect_abbreviations and _ends_with_abbreviation(text, i + 1)):
            cuts.append((start, i + 1))
            start = i + 1
        i += 1
    if rule == "thought-branches":
        cuts.append((start, n))
    spans = _merge_short(text, cuts, min_chars)
    if len(spans) > max_chunks:
        warnings.warn(f"{len(spans)} sentences; keeping the first max_chunks={max_chunks}", stacklevel=2)
        spans = spans[:max_chunks]
    return spans


def check_rule(rule: object) -> None:
    """`ValueError` naming `rule` unless it is one of `SPLIT_RULES`."""
    if not isinstance(rule, str) or rule not in SPLIT_RULES:
        raise ValueError(f"rule must be one of {SPLIT_RULES}, got {rule!r}")


def split_blocks(text: str, unit: str = "paragraph", min_chars: int = 10) -> list[tuple[int, int]]:
    """Character spans of paragraphs (cut at blank lines) or lines (cut at every newline) of
    `text`, stripped, with fragments under `min_chars` merged as in `split_sentences`.

        >>> t = "1. Add 2 and 3.\\n2. That is 5.\\n\\nSo the answer is 5."
        >>> [t[a:b] for a, b in split_blocks(t, "line")]
        ['1. Add 2 and 3.', '2. That is 5.', 'So the answer is 5.']
        >>> len(split_blocks(t, "paragraph"))
        2
    """
    pattern = {"paragraph": r"\n[ \t\r]*\n", "line": r"\n"}.get(unit)
    if pattern is None:
        raise ValueError(f"unit must be 'paragraph' or 'line', got {unit!r}")
    cuts, start = [], 0
    for match in re.finditer(pattern, text):
        cuts.append((start, match.start()))
        start = match.end()
    cuts.append((start, len(text)))
    return _merge_short(text, cuts, min_chars)


def _merge_short(text: str, cuts: list[tuple[int, int]], min_chars: int) -> list[tuple[int, int]]:
    """Strip each span; merge spans under `min_chars` into the next (the last into the previous)."""
    spans = [s for s in (_strip_span(text, a, b) for a, b in cuts) if s is not None]
    i = 0
    while i < len(spans):
        a, b = spans[i]
        if b - a < min_chars and len(spans) > 1:
            if i + 1 < len(spans):
                spans[i + 1] = (a, spans[i + 1][1])
            else:
                spans[i - 1] = (spans[i - 1][0], b)
            del spans[i]
            continue
        i += 1
    return spans


def _ends_with_abbreviation(text: str, end: int) -> bool:
    word = text[:end].rsplit(None, 1)[-1] if text[:end].strip() else ""
    return word.lower() in {a.lower() for a in ABBREVIATIONS}


def _strip_span(text: str, a: int, b: int) -> tuple[int, int] | None:
    while a < b and text[a].isspace():
        a += 1
    while b > a and text[b - 1].isspace():
        b -= 1
    return (a, b) if b > a else None


@dataclass(frozen=True)
class Sentence:
    """One sentence: its text and token span `[start, end)` in `trace.tokens`."""

    index: int
    text: str
    start: int
    end: int
    char_start: int
    char_end: int


@dataclass
class ReasoningTrace:
    """Prompt + response, chat-templated and tokenised, with sentence token spans.

    Attributes:
        text: the full templated string; `tokens` [1, pos] its token ids.
        prompt_len: number of prompt tokens (the response starts there).
        thinking: character span of the chain of thought inside `text` (None without one).
        sentences: sentences of the chain of thought (or of the whole response).
        system, chat_template, protect_abbreviations, rule: how it was built (`from_text`);
            `save` writes them and `load` rebuilds the trace with them.

    Thinking and answer follow `mechlens.text.thinking.reply_layout`: the chain of thought ends at
    the first `</think>` (a later `<think>` is answer text), and unclosed thinking has no answer.
    """

    prompt: str
    response: str
    text: str
    tokens: Tensor  # [1, pos]
    offsets: list[tuple[int, int]]
    prompt_len: int
    thinking: tuple[int, int] | None
    sentences: list[Sentence]
    system: str | None = None
    chat_template: bool = True
    protect_abbreviations: bool = False
    rule: SplitRule = "thought-anchors"

    @classmethod
    def from_text(
        cls,
        model: HookedModel,
        prompt: str,
        response: str,
        system: str | None = None,
        chat_template: bool = True,
        protect_abbreviations: bool = False,
        rule: SplitRule = "thought-anchors",
    ) -> ReasoningTrace:
        """Build a trace from a prompt and a response string (as a model produced it).

        `rule` says where the sentences end (`SplitRule`: "thought-branches" keeps the final
        unclosed chunk as a sentence). A response with no closed sentence gives a trace without sentences: the
        sentence analyses then raise (`check_sentences`)."""
        for arg, value in (("prompt", prompt), ("response", response)):
            if not isinstance(value, str):
                raise TypeError(f"{arg} must be a string, got {type(value).__name__}")
        for arg, flag in (("chat_template", chat_template), ("protect_abbreviations", protect_abbreviations)):
            if not isinstance(flag, bool):
                raise TypeError(f"{arg} must be True or False, got {flag!r}")
        check_rule(rule)
        if not prompt.strip() or not response.strip():
            raise ValueError("empty trace: both prompt and response must be non-empty")
        prompt_text = format_prompt(model.tokenizer, prompt, system) if chat_template else prompt
        text = prompt_text + response
        enc = model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = [tuple(o) for o in enc["offset_mapping"]]
        prompt_len = sum(1 for a, _ in offsets if a < len(prompt_text))
        settings = (system, chat_template, protect_abbreviations, rule)
        return cls._build(
            model, prompt, response, prompt_text, enc["input_ids"], offsets, prompt_len, settings
        )

    @classmethod
    def from_token_ids(
        cls,
        model: HookedModel,
        prompt: str,
        response_ids: Sequence[int] | Tensor,
        system: str | None = None,
        chat_template: bool = True,
        protect_abbreviations: bool = False,
        rule: SplitRule = "thought-anchors",
    ) -> ReasoningTrace:
        """Build a trace from the response token ids exactly as a model produced them after the
        templated prompt: `trace.tokens` are those ids (never a re-tokenisation of their decoded
        text, which can differ), `trace.response` their decoded text; each token spans the
        characters its decoding adds (a token that ends inside a character spans nothing)."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        ids = response_ids.reshape(-1).tolist() if isinstance(response_ids, Tensor) else list(response_ids)
        if not ids:
            raise ValueError("empty trace: response_ids holds no token")
        model.check_tokens(torch.tensor([ids]))
        prompt_text = format_prompt(model.tokenizer, prompt, system) if chat_template else prompt
        enc = model.tokenizer(prompt_text, add_special_tokens=False, return_offsets_mapping=True)
        response, response_offsets = _decoded_offsets(model.tokenizer, ids, len(prompt_text))
        if not prompt.strip() or not response.strip():
            raise ValueError("empty trace: both prompt and response must be non-empty")
        offsets = [tuple(o) for o in enc["offset_mapping"]] + response_offsets
        settings = (system, chat_template, protect_abbreviations, rule)
        return cls._build(model, prompt, response, prompt_text, [*enc["input_ids"], *ids], offsets,
                          len(enc["input_ids"]), settings)  # fmt: skip

    @classmethod
    def _build(
        cls,
        model: HookedModel,
        prompt: str,
        response: str,
        prompt_text: str,
        ids: list[int],
        offsets: list[tuple[int, int]],
        prompt_len: int,
        settings: tuple[str | None, bool, bool, SplitRule],
    ) -> ReasoningTrace:
        """The trace of `prompt_text + response` tokenised as `ids` with character `offsets`."""
        system, chat_template, protect_abbreviations, rule = settings
        text = prompt_text + response
        tokens = torch.tensor([ids])
        model.check_tokens(tokens)
        opened = prompt_text.rstrip().endswith(THINK_OPEN)
        thinking = reply_layout(text, len(prompt_text), opened).thinking
        seg_start, seg_end = thinking or (len(prompt_text), len(text))
        spans = split_sentences(
            text[seg_start:seg_end], protect_abbreviations=protect_abbreviations, rule=rule
        )
        sentences = _token_spans(text, offsets, [(a + seg_start, b + seg_start) for a, b in spans])
        return cls(prompt, response, text, tokens.to(model.device), offsets, prompt_len, thinking, sentences,
                   system, chat_template, protect_abbreviations, rule)  # fmt: skip

    @classmethod
    def from_generation(
        cls,
        model: HookedModel,
        prompt: str,
        sampling: Sampling = TRACE_SAMPLING,
        system: str | None = None,
        **settings: Any,
    ) -> ReasoningTrace:
        """Let `model` answer `prompt` and build the trace of its response: greedy, up to 256 new
        tokens by default (`TRACE_SAMPLING`); keyword `settings` override `sampling`'s fields."""
        gen = model.generate(
            format_prompt(model.tokenizer, prompt, system), sampling.replace(n=1, **settings)
        )
        return cls.from_token_ids(model, prompt, gen.tokens[0], system)

    # ------------------------------------------------------------------ views
    @property
    def n_tokens(self) -> int:
        return self.tokens.shape[1]

    @property
    def answer(self) -> str:
        """The response after its first `</think>`: the whole response when it does not think,
        empty while its thinking is unclosed (`reply_layout`)."""
        start = len(self.text) - len(self.response)
        opened = self.text[:start].rstrip().endswith(THINK_OPEN)
        return self.text[slice(*reply_layout(self.text, start, opened).answer)].strip()

    def segments(self, unit: str = "sentence") -> list[Sentence]:
        """Steps of the chain of thought as token spans: "sentence" (the Thought Anchors
        splitter, `self.sentences`), "paragraph" (blank lines) or "line" (newlines)."""
        if unit == "sentence":
            return self.sentences
        start, end = self.thinking or (len(self.text) - len(self.response), len(self.text))
        spans = split_blocks(self.text[start:end], unit)
        return _token_spans(self.text, self.offsets, [(a + start, b + start) for a, b in spans])

    def check_sentences(self, minimum: int = 1) -> list[Sentence]:
        """`self.sentences`, or a ValueError when there are fewer than `minimum`."""
        if len(self.sentences) < minimum:
            raise ValueError(
                f"the trace has {len(self.sentences)} sentence(s), the analysis needs {minimum}: the "
                "splitter drops the final chunk that no boundary closes (rule='thought-branches' keeps it)"
            )
        return self.sentences

    def sentence_of(self, position: int) -> Sentence | None:
        """The sentence that contains token `position`, if any."""
        return next((s for s in self.sentences if s.start <= position < s.end), None)

    def str_tokens(self, tokenizer) -> list[str]:
        return [tokenizer.decode([t]) for t in self.tokens[0].tolist()]

    # ------------------------------------------------------------------ io
    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "response": self.response, "text": self.text,
                "tokens": self.tokens[0].tolist(), "prompt_len": self.prompt_len,
                "thinking": self.thinking, "sentences": [asdict(s) for s in self.sentences],
                "settings": {name: getattr(self, name) for name in TRACE_SETTINGS}}  # fmt: skip

    def save(self, path: str | Path) -> None:
        """Write the trace as JSON, with the settings it was built with (`load` reads them)."""
        from mechlens.cache import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, model: HookedModel, path: str | Path) -> ReasoningTrace:
        """Rebuild a saved trace with `model`'s tokenizer and the saved settings (`system=`,
        `rule=`, ...); `ValueError` naming the field when the file is malformed, and when
        the tokens no longer match (another tokenizer or chat template)."""
        try:
            data = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
            raise ValueError(f"{path} is not a saved trace (JSON): {type(err).__name__}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} is not a saved trace: expected a JSON object")
        for name, kind in (("prompt", str), ("response", str), ("tokens", list)):
            if not isinstance(data.get(name), kind):
                raise ValueError(
                    f"{path}: field {name!r} must be a {kind.__name__}, got {data.get(name)!r:.60}"
                )
        settings = data.get("settings", {})
        if not isinstance(settings, dict) or set(settings) - set(TRACE_SETTINGS):
            raise ValueError(f"{path}: field 'settings' must hold only {list(TRACE_SETTINGS)}")
        try:
            trace = cls.from_text(model, data["prompt"], data["response"], **settings)
            if trace.tokens[0].tolist() != data["tokens"]:  # a generated trace keeps the model's own ids
                start = data.get("prompt_len")
                if isinstance(start, int) and 0 < start < len(data["tokens"]):
                    trace = cls.from_token_ids(model, data["prompt"], data["tokens"][start:], **settings)
        except TypeError as err:
            raise ValueError(f"{path}: field 'settings' or 'tokens' is malformed ({err})") from None
        if trace.tokens[0].tolist() != data["tokens"] or trace.response != data["response"]:
            raise ValueError(
                f"{path} was tokenised differently: was it saved with another model or chat template?"
            )
        return trace


def _decoded_offsets(tokenizer, ids: list[int], base: int) -> tuple[str, list[tuple[int, int]]]:
    """`(text, offsets)` of token ids decoded: token i spans the characters of the final text that
    decoding `ids[: i + 1]` settles beyond token i - 1 (starting at character `base`)."""
    text = tokenizer.decode(ids)
    offsets, end = [], 0
    for i in range(len(ids)):
        settled = len(os.path.commonprefix([tokenizer.decode(ids[: i + 1]), text]))
        offsets.append((base + end, base + max(end, settled)))
        end = max(end, settled)
    return text, offsets


def _token_spans(text: str, offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[Sentence]:
    """Map character spans to token spans: a token belongs to the sentence holding its first
    non-space character."""
    anchors = []  # non-decreasing character anchor of each token
    for a, b in offsets:
        m = re.search(r"\S", text[a:b])
        anchors.append(a + m.start() if m else a)
    sentences: list[Sentence] = []
    for cs, ce in spans:
        first, stop = bisect.bisect_left(anchors, cs), bisect.bisect_left(anchors, ce)
        if stop > first:
            sentences.append(Sentence(len(sentences), text[cs:ce], first, stop, cs, ce))
    return sentences
