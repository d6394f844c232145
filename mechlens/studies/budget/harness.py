"""Sequential vs parallel reasoning at a fixed token budget ("To Backtrack or Not to Backtrack",
seed 003): one long trace (which may backtrack) against a vote over short ones, at equal total
generated tokens. The paper gives no code; the accounting is ours ([impl]).

- Sequential at budget B: the first B tokens of one long trace, sampled once at the largest
  budget: with the same seed, a run capped at B samples exactly those tokens. Its answer is read
  from them (`answers_at`): a trace that has not closed its thinking and answered by then has
  none.
- Parallel at budget B: short traces taken in their sampled order while their generated tokens
  (each counted in full) add up to at most B; the majority answer scores (`vote="majority"`), or
  any right answer (`vote="oracle"`: best-of-n with a perfect verifier, an upper bound).

Example:
    >>> par = [Sample(40, "5"), Sample(40, "7"), Sample(40, "7")]
    >>> parallel_used(par, 100), parallel_right(par, "7", 80), parallel_right(par, "7", 120)
    (2, False, True)
    >>> parallel_right(par, "7", 80, vote="oracle")
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from mechlens.studies.evolution.transitions import majority_vote
from mechlens.text.answers import answer_key
from mechlens.text.thinking import as_reply

Vote = Literal["majority", "oracle"]


@dataclass(frozen=True)
class Sample:
    """One short trace: the tokens it generated and its answer key (None: no answer)."""

    tokens: int
    answer: str | None


def answers_at(
    tokenizer, ids: Sequence[int], budgets: Sequence[int], numeric: bool, prompt_text: str = ""
) -> list[str | None]:
    """The answer key (`answer_key`) of the first B tokens of `ids`, for each B of `budgets`;
    `prompt_text` is the templated prompt they continue (`as_reply`: a prompt that opens the
    thinking makes an unclosed thinking answerless)."""
    for b in budgets:
        _check_budget(b)
    return [answer_key(as_reply(prompt_text, tokenizer.decode(list(ids[:b]))), numeric) for b in budgets]


def parallel_used(samples: Sequence[Sample], budget: int) -> int:
    """How many of `samples`, in order, fit in `budget` generated tokens together."""
    _check_budget(budget)
    used = total = 0
    for s in samples:
        if total + s.tokens > budget:
            break
        total, used = total + s.tokens, used + 1
    return used


def parallel_right(samples: Sequence[Sample], truth: str, budget: int, vote: Vote = "majority") -> bool:
    """Whether the short traces that fit in `budget` find `truth` by `vote` (ties: the answer
    seen first; no answer at all is wrong)."""
    if vote not in ("majority", "oracle"):
        raise ValueError(f"vote must be 'majority' or 'oracle', got {vote!r}")
    answers = [s.answer for s in samples[: parallel_used(samples, budget)]]
    return truth in answers if vote == "oracle" else majority_vote(answers, truth)


def _check_budget(budget: int) -> None:
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be an int >= 1, got {budget!r}")
