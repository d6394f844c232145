"""The compute-matched curve of one model: accuracy of one long trace against votes over short
traces, at each token budget (`harness` holds the accounting).

Example (minutes with the reasoning organism):
    >>> curve = budget_curve(model, problems, budgets=(256, 512, 1024), short_tokens=256)  # doctest: +SKIP
    >>> print("\\n".join(curve.summary_lines()))                                          # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mechlens.cache import DiskCache, model_fingerprint
from mechlens.datasets import Problem
from mechlens.models.sampling import Sampling
from mechlens.ops.stats import format_rate, mcnemar
from mechlens.rollouts import Engine, LocalEngine
from mechlens.rollouts.engines import check_engine, prompt_seeds, token_prompts
from mechlens.studies.budget.harness import Sample, answers_at, parallel_right, parallel_used
from mechlens.text.answers import answer_key
from mechlens.text.thinking import as_reply, format_prompt

if TYPE_CHECKING:
    from mechlens.models.hooked import HookedModel

BUDGET_SAMPLING = Sampling(max_new_tokens=1024, temperature=0.6, top_p=0.95)
"""Both arms sample at T = 0.6, top-p 0.95; `max_new_tokens` is replaced by each arm's cap."""


@dataclass
class BudgetCurve:
    """Right (0/1) per problem and budget for each arm: `sequential`, `majority` and `oracle`
    (parallel votes), `[problems, budgets]`; `mean_tokens` the tokens each arm used on average;
    `long_texts` the long traces, decoded."""

    budgets: list[int]
    short_tokens: int
    sequential: np.ndarray
    majority: np.ndarray
    oracle: np.ndarray
    mean_tokens: dict[str, list[float]]
    long_texts: list[str]

    def paired(self, budget: int) -> dict:
        """McNemar of sequential vs parallel majority at `budget`, on the same problems."""
        k = self.budgets.index(budget)
        return mcnemar(self.sequential[:, k].astype(bool).tolist(), self.majority[:, k].astype(bool).tolist())

    def summary_lines(self) -> list[str]:
        n = len(self.sequential)
        lines = []
        for k, b in enumerate(self.budgets):
            m = self.paired(b)
            test = f"McNemar p = {m['p']:.2g}" if m["only_a"] + m["only_b"] else "no discordant problem"
            seq, maj, orc = (
                format_rate(int(a[:, k].sum()), n) for a in (self.sequential, self.majority, self.oracle)
            )
            lines.append(
                f"budget {b} tokens: one long trace {seq}; vote over {self.short_tokens}-token traces {maj} "
                f"({test}); any right {orc}"
            )
        return lines


def budget_curve(
    model: HookedModel,
    problems: Sequence[Problem],
    budgets: Sequence[int] = (256, 512, 1024),
    short_tokens: int = 256,
    sampling: Sampling = BUDGET_SAMPLING,
    cache: DiskCache | str | Path | bool | None = True,
    engine: Engine | None = None,
    progress: bool = True,
) -> BudgetCurve:
    """One long trace per problem, sampled once at `max(budgets)` tokens and cut at each budget,
    against `max(budgets) // short_tokens` short traces of at most `short_tokens` tokens each,
    voted over as many as fit in each budget (`harness`). The long arm is seeded from
    `sampling.seed`, the short arm from `sampling.seed + 1`, one seed per problem.

    With a chat template that opens the thinking in the prompt, the replies are read as thinking
    first (an unclosed thinking has no answer)."""
    problems = list(problems)
    budgets = sorted({int(b) for b in budgets})
    if not problems:
        raise ValueError("problems is empty")
    if not budgets or budgets[0] < 1:
        raise ValueError(f"budgets must be ints >= 1, got {budgets}")
    if (
        isinstance(short_tokens, bool)
        or not isinstance(short_tokens, int)
        or not 1 <= short_tokens <= budgets[-1]
    ):
        raise ValueError(f"short_tokens must be an int in 1..{budgets[-1]}, got {short_tokens!r}")
    store = DiskCache.of(cache, "budget")
    key = {"model": model_fingerprint(model), "engine": engine.describe() if engine else None}
    engine = engine or LocalEngine(model, progress=progress)
    texts = [format_prompt(model.tokenizer, p.question) for p in problems]
    prompts = token_prompts(model, texts)
    long_s = sampling.replace(max_new_tokens=budgets[-1], n=1)
    short_s = sampling.replace(max_new_tokens=short_tokens, n=max(1, budgets[-1] // short_tokens))

    def sample(step: str, how: Sampling) -> list[list[list[int]]]:
        # each arm its own seeds (the short arm from seed + 1): with shared ones, a short trace
        # would be the long trace's opening, and the arms would agree by construction
        def compute() -> list[list[list[int]]]:
            return check_engine(engine, model).sample(prompts, how, seeds=prompt_seeds(how, len(prompts)))

        return store.cached(step, compute, **key, prompts=prompts, how=how) if store else compute()

    long_ids, short_ids = sample("long", long_s), sample("short", short_s.replace(seed=sampling.seed + 1))
    shape = (len(problems), len(budgets))
    seq, maj, orc = np.zeros(shape, int), np.zeros(shape, int), np.zeros(shape, int)
    used = {"sequential": np.zeros(shape), "parallel": np.zeros(shape)}
    for i, p in enumerate(problems):
        numeric = p.kind == "number"
        truth = p.answer_key()
        ids = long_ids[i][0]
        for k, got in enumerate(answers_at(model.tokenizer, ids, budgets, numeric, texts[i])):
            seq[i, k] = got == truth
            used["sequential"][i, k] = min(len(ids), budgets[k])
        shorts = [
            Sample(len(s), answer_key(as_reply(texts[i], model.tokenizer.decode(s)), numeric))
            for s in short_ids[i]
        ]
        for k, b in enumerate(budgets):
            maj[i, k] = parallel_right(shorts, truth, b)
            orc[i, k] = parallel_right(shorts, truth, b, vote="oracle")
            used["parallel"][i, k] = sum(s.tokens for s in shorts[: parallel_used(shorts, b)])
    mean_tokens = {arm: v.mean(0).tolist() for arm, v in used.items()}
    texts = [model.tokenizer.decode(rows[0]) for rows in long_ids]
    return BudgetCurve(budgets, short_tokens, seq, maj, orc, mean_tokens, texts)
