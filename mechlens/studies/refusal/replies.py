"""Replies of a (reasoning) model to instructions, split into thinking and answer, and judged.

A reply is `chat prompt + "<think>\\n" + thinking + "\\n</think>\\n\\n" + answer`
(`mechlens.text.thinking.format_reply`).

Example:
    >>> r = Reply("Hi", "<prompt>", "Harmless.", "Hello!", True)
    >>> r.refused, r.probe_text
    (False, '<prompt><think>\\nHarmless.\\n</think>\\n\\n')
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mechlens.models.sampling import Sampling
from mechlens.ops.stats import rate_record
from mechlens.rollouts import Engine, LocalEngine
from mechlens.rollouts.engines import sample_texts
from mechlens.studies.refusal.judge import is_refusal
from mechlens.text.thinking import format_prompt, format_reply, split_thinking

if TYPE_CHECKING:
    from mechlens.models.hooked import HookedModel


@dataclass
class Reply:
    """One generated reply to an instruction, split at the thinking close marker."""

    instruction: str
    prompt: str  # the chat prompt (`format_prompt`)
    thinking: str  # text after "<think>" up to "</think>" (everything, when never closed)
    answer: str  # text after "</think>"
    closed: bool  # whether the model closed its thinking

    @property
    def refused(self) -> bool:
        return is_refusal(self.answer)

    @property
    def probe_text(self) -> str:
        """Prompt + thinking + close marker: the probe's input, its last token right before the answer."""
        return self.prompt + format_reply(self.thinking)


REPLY_SAMPLING = Sampling(max_new_tokens=64, temperature=0.0)
"""Greedy replies of up to 64 tokens: the default of `sample_replies`."""


def sample_replies(
    model: HookedModel,
    instructions: str | Sequence[str],
    sampling: Sampling = REPLY_SAMPLING,
    batch_size: int = 16,
    progress: bool = True,
    engine: Engine | None = None,
) -> list[Reply]:
    """One reply per instruction (greedy by default; `sampling.n` replies each otherwise) under the
    model's active interventions, split into thinking and answer; `engine` samples (default:
    `LocalEngine(model)`, `mechlens.rollouts`)."""
    instructions = [instructions] if isinstance(instructions, str) else list(instructions)
    prompts = [format_prompt(model.tokenizer, i) for i in instructions]
    texts = sample_texts(engine or LocalEngine(model, batch_size, progress), model, prompts, sampling)
    out = []
    for k, text in enumerate(texts):
        thinking, answer, closed = split_thinking(text)
        i = k // sampling.n
        out.append(Reply(instructions[i], prompts[i], thinking, answer, closed))
    return out


def sample_replies_by_set(
    model: HookedModel,
    sets: dict[str, list[str]],
    sampling: Sampling = REPLY_SAMPLING,
    batch_size: int = 16,
    engine: Engine | None = None,
) -> dict[str, list[Reply]]:
    """`sample_replies` of several instruction sets in one batched call -> `{set name: [Reply]}`."""
    rows = sample_replies(model, [t for ts in sets.values() for t in ts], sampling, batch_size, engine=engine)
    out, start = {}, 0
    for name, items in sets.items():
        n = len(items) * sampling.n
        out[name], start = rows[start : start + n], start + n
    return out


RATES = {
    "harmful: refusal rate": ("harmful", True),
    "jailbreak: attack success": ("jailbreak", False),
    "harmless: false refusal": ("harmless", True),
}
"""Each reported rate: `name -> (reply set, counts refusals?)`."""


def refusal_rates(replies: dict[str, list[Reply]]) -> dict[str, dict[str, float]]:
    """Refusal rate on "harmful", attack success on "jailbreak", false refusals on "harmless"
    (each for the sets present), each as `{"rate", "low", "high", "count", "n"}` with its 95%
    Wilson interval.

        >>> r = Reply("x", "", "", "I cannot help with that.", True)
        >>> rates = refusal_rates({"harmful": [r, r]})["harmful: refusal rate"]
        >>> rates["rate"], rates["n"], round(rates["low"], 3)
        (1.0, 2, 0.342)
    """
    out = {}
    for name, (group, refusals) in RATES.items():
        if group in replies:
            out[name] = rate_record(sum(r.refused == refusals for r in replies[group]), len(replies[group]))
    return out
