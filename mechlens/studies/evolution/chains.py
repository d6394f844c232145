"""Iterated verify-and-refine chains ("Deep Self-Evolving Reasoning", seed 004): each chain starts
from the model's own solution and, at every iteration, is shown its previous answer and asked to
verify and refine it. The paper gives no code; the refine prompt is ours (`REFINE`, a parameter).

Example (minutes with the reasoning organism):
    >>> chains = evolve(model, problems[:4], n_chains=3, iterations=3)   # doctest: +SKIP
    >>> transition_estimates(chains.correct).stationary                 # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from mechlens.datasets import Problem
from mechlens.models.sampling import Sampling
from mechlens.rollouts import Engine, LocalEngine
from mechlens.rollouts.engines import check_engine, prompt_seeds, token_prompts
from mechlens.studies.evolution.transitions import majority_vote
from mechlens.text.answers import after_thinking, answer_key
from mechlens.text.thinking import as_reply, format_prompt

if TYPE_CHECKING:
    from mechlens.models.hooked import HookedModel

REFINE = (
    "{question}\n\nA previous attempt ended with: {answer}\n"
    "Verify that attempt step by step. If it is wrong, solve the problem again. "
    "End with the final answer."
)
"""The refine turn: `{question}` and `{answer}` (the previous reply's answer part) are filled in."""
EVOLVE_SAMPLING = Sampling(max_new_tokens=320, temperature=0.6, top_p=0.95)
"""Each turn of a chain: T = 0.6, top-p 0.95 (the thought-anchors authors' rollout settings), up to
320 new tokens."""


@dataclass
class Chains:
    """`correct [problems, chains, iterations]` and `answers` (the answer keys, None when none
    was given) of every chain at every iteration; `texts` the replies."""

    problems: list[Problem]
    correct: np.ndarray
    answers: list[list[list[str | None]]]
    texts: list[list[list[str]]]

    def flat(self) -> np.ndarray:
        """`[problems x chains, iterations]`: one row per chain, for `transition_estimates`."""
        p, c, k = self.correct.shape
        return self.correct.reshape(p * c, k)

    def majority_accuracy(self) -> np.ndarray:
        """`[iterations]`: the share of problems whose chains' majority answer is right."""
        return np.array(
            [
                np.mean(
                    [
                        majority_vote([a[k] for a in per], p.answer_key())
                        for p, per in zip(self.problems, self.answers, strict=True)
                    ]
                )
                for k in range(self.correct.shape[2])
            ]
        )


def evolve(
    model: HookedModel,
    problems: Sequence[Problem],
    n_chains: int = 4,
    iterations: int = 4,
    sampling: Sampling = EVOLVE_SAMPLING,
    template: str = REFINE,
    engine: Engine | None = None,
    progress: bool = True,
) -> Chains:
    """`n_chains` chains per problem, `iterations` turns each (turn 0 solves; turn k > 0 refines
    turn k-1's answer with `template`). Turn k samples with seed `sampling.seed + k`, and each
    chain with its own seed from it (`prompt_seeds`), so chains with the same prompt differ and a
    re-run gives the same chains."""
    for name, value, low in (("n_chains", n_chains, 1), ("iterations", iterations, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if "{question}" not in template or "{answer}" not in template:
        raise ValueError("template must contain {question} and {answer}")
    problems = list(problems)
    if not problems:
        raise ValueError("problems is empty")
    engine = engine or LocalEngine(model, progress=progress)
    one = sampling.replace(n=1)
    questions = [p.question for p in problems for _ in range(n_chains)]
    texts: list[list[str]] = []  # [turn][chain]
    for k in range(iterations):
        if k == 0:
            turns = questions
        else:
            turns = [
                template.format(question=q, answer=after_thinking(t).strip() or "(no answer)")
                for q, t in zip(questions, texts[-1], strict=True)
            ]
        templated = [format_prompt(model.tokenizer, t) for t in turns]
        prompts = token_prompts(model, templated)
        turn = one.replace(seed=sampling.seed + k)
        # one seed per chain: chains that share a prompt (at turn 0, or after the same answer) still differ
        rows = check_engine(engine, model).sample(prompts, turn, seeds=prompt_seeds(turn, len(prompts)))
        texts.append(
            [as_reply(t, model.tokenizer.decode(r[0])) for t, r in zip(templated, rows, strict=True)]
        )
    shape = (len(problems), n_chains, iterations)
    correct = np.zeros(shape, dtype=int)
    answers: list[list[list[str | None]]] = [[[None] * iterations for _ in range(n_chains)] for _ in problems]
    by_chain: list[list[list[str]]] = [[[""] * iterations for _ in range(n_chains)] for _ in problems]
    for k, row in enumerate(texts):
        for j, text in enumerate(row):
            i, c = divmod(j, n_chains)
            correct[i, c, k] = int(problems[i].grade(text).correct)
            answers[i][c][k] = answer_key(text, numeric=problems[i].kind == "number")
            by_chain[i][c][k] = text
    return Chains(problems, correct, answers, by_chain)
