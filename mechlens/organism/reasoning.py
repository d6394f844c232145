"""The reasoning organism: the embedded model (or any base) taught to think in `<think>...</think>`
before answering, with known structure planted in its thinking (`mechlens.organism.traces`).

One low-rank fine-tune holds three behaviours:
- word problems (1-3 steps) solved in sentences of every Thought-Anchors category, with decisive
  plan sentences, repairing checks, arithmetic slips and backtracking at planted rates;
- harmful requests: harm recognised over several sentences, then a refusal, or (in a planted
  share, larger for jailbreak-wrapped requests) a rationalising sentence just before `</think>`
  and compliance; harmless requests answered;
- factual questions: recall, check, answer (the base model's own answer: format, not facts).

Held out from training: `held_out_problems` (another seed), the refusal dataset's test split, and
the odd-numbered factual questions (`held_out_factual`).

Example (seconds: the adapter ships with mechlens):
    >>> model = reasoning_organism()  # doctest: +SKIP
    >>> prompt = format_prompt(model.tokenizer, held_out_problems(1)[0].question)  # doctest: +SKIP
    >>> model.generate([prompt]).texts[0][:7]  # doctest: +SKIP
    '<think>'
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from mechlens import datasets
from mechlens.cache import stable_hash
from mechlens.datasets import STEP_BY_STEP, Instruction, Problem
from mechlens.models.loading import DtypeName
from mechlens.models.sampling import Sampling
from mechlens.ops.stats import auroc, mean_record, rate_record
from mechlens.organism.builder import SHIPPED, OrganismBuilder, OrganismRecipe
from mechlens.organism.problems import Split, VariedProblem, run_ops, varied_problems
from mechlens.organism.traces import (
    PlantedTrace,
    PlantingRates,
    WordProblem,
    arithmetic_errors,
    arithmetic_trace,
    factual_trace,
    label_roles,
    planned_trace,
    refusal_trace,
    whole_sentences,
    word_problems,
)
from mechlens.studies.recovery import cliff_recovery
from mechlens.studies.refusal.judge import is_refusal
from mechlens.studies.refusal.scores import sentence_scores
from mechlens.text.answers import grade
from mechlens.text.thinking import REPLY_OPEN, format_prompt, split_thinking
from mechlens.text.trace import split_sentences

if TYPE_CHECKING:
    from mechlens.models.hooked import HookedModel
    from mechlens.studies.refusal import RefusalStudy
    from mechlens.studies.refusal.replies import Reply

TRAIN_SEED = 1000
"""Seed of the training word problems; `held_out_problems` draws from other seeds."""
FACT_PROMPT = " Answer in a few words."


@dataclass(frozen=True)
class ReasoningRecipe(OrganismRecipe):
    """How the reasoning organism is trained ([impl]: sizes and rates are ours)."""

    n_problems: int = 360  # word problems, 1-3 steps in turn
    n_factual: int = 50  # even-numbered factual questions (the odd ones are held out)
    n_jailbreaks: int = 60  # harmful train requests also shown inside a jailbreak wrapper
    suffix_share: float = 0.5  # share of problems asked with STEP_BY_STEP appended
    rates: PlantingRates = field(default_factory=PlantingRates)
    version: Literal[1, 2] = 1  # 2: `varied_problems` and `planned_trace`; harmless refusals dropped


REASONING_RECIPE = ReasoningRecipe(rank=16, alpha=32.0, train_layers=12, epochs=2, lr=5e-4)
"""The shipped reasoning organism's recipe (its adapter is in `mechlens/organism/adapters/`)."""

REASONING_V2_RECIPE = ReasoningRecipe(
    rank=16, alpha=32.0, train_layers=12, epochs=2, lr=5e-4, version=2, n_problems=540
)
"""The second version (`version=2`, 540 problems: 360 followed an edited plan 24/60 times greedy,
540 33/60): word problems of four kinds and many wordings with
carry-free arithmetic (`mechlens.organism.problems`), plans in the words of their method, per step
or up front, at varied positions beside decoys (`planted_trace`), and harmless training replies
that are refusals left out. Its adapter ships beside the first's; `load_subject("organism-v2")`."""


def refusal_requests(split: str) -> list[Instruction]:
    """The refusal dataset's requests of one split ("train" or "test"), harmful then harmless."""
    return [i for i in datasets.load("refusal") if isinstance(i, Instruction) and i.split == split]


def _factual() -> list[Problem]:
    """The factual questions, in order."""
    return [p for p in datasets.load("factual") if isinstance(p, Problem)]


def planted_problem_traces(recipe: ReasoningRecipe) -> list[tuple[str, PlantedTrace]]:
    """`(user prompt, trace)` of every training word problem (no model needed)."""
    rng = random.Random(recipe.seed)
    out = []
    if recipe.version == 2:
        for varied in varied_problems(recipe.n_problems, seed=TRAIN_SEED + recipe.seed, split="train"):
            trace = planned_trace(varied, rng, recipe.rates)
            out.append(
                (varied.question + (STEP_BY_STEP if rng.random() < recipe.suffix_share else ""), trace)
            )
        return out
    for problem in word_problems(recipe.n_problems, seed=TRAIN_SEED + recipe.seed):
        trace = arithmetic_trace(problem, rng, recipe.rates)
        out.append((problem.question + (STEP_BY_STEP if rng.random() < recipe.suffix_share else ""), trace))
    return out


def training_traces(
    base_model: HookedModel, recipe: ReasoningRecipe, progress: bool = True
) -> list[tuple[str, PlantedTrace]]:
    """Every training `(user prompt, trace)`: word problems, refusal requests, factual questions.
    Harmless and complied replies and factual answers are the base model's own (greedy)."""
    rng = random.Random(recipe.seed + 1)
    train = refusal_requests("train")
    harmful = [i.text for i in train if i.harmful][: recipe.n_per_class]
    harmless = [i.text for i in train if not i.harmful][: recipe.n_per_class]
    factual = _factual()[0 : 2 * recipe.n_factual : 2]
    tok = base_model.tokenizer
    prompts = [format_prompt(tok, t) for t in harmful + harmless] + [
        format_prompt(tok, p.question + FACT_PROMPT) for p in factual
    ]
    texts = base_model.generate(
        prompts, max_new_tokens=recipe.answer_tokens, temperature=0, progress=progress
    ).texts
    replies, facts = texts[: len(harmful + harmless)], texts[len(harmful + harmless) :]
    out = planted_problem_traces(recipe)
    for k, (text, reply) in enumerate(zip(harmful + harmless, replies, strict=True)):
        is_harmful = k < len(harmful)
        if recipe.version == 2 and not is_harmful and is_refusal(whole_sentences(reply)):
            continue  # a harmless reply that refuses would teach the answer to disagree with the thinking
        intent = recipe.version == 2
        out.append(
            (text, refusal_trace(text, is_harmful, whole_sentences(reply), rng, recipe.rates.comply, intent))
        )
        if is_harmful and k < recipe.n_jailbreaks:
            wrapped = datasets.jailbreak(text, k)
            out.append(
                (
                    wrapped,
                    refusal_trace(
                        wrapped, True, whole_sentences(reply), rng, recipe.rates.comply_jailbreak, intent
                    ),
                )
            )
    for problem, text in zip(factual, facts, strict=True):
        answer = short_answer(text)
        question = problem.question + (STEP_BY_STEP if rng.random() < recipe.suffix_share else "")
        ok = grade(answer, problem.answer, problem.aliases).correct
        out.append((question, factual_trace(question, answer, problem.answer, ok)))
    return out


def training_pairs(
    base_model: HookedModel, recipe: ReasoningRecipe, progress: bool = True
) -> tuple[list[str], list[str]]:
    """`(prompts, targets)` of the fine-tune: chat-templated prompts and `<think>` replies."""
    traces = training_traces(base_model, recipe, progress)
    return [format_prompt(base_model.tokenizer, p) for p, _ in traces], [t.reply for _, t in traces]


def short_answer(text: str, words: int = 6) -> str:
    """The first line of `text`, at most `words` words, without trailing punctuation."""
    line = text.strip().split("\n")[0].split(". ")[0]
    return " ".join(line.split()[:words]).rstrip(".!,;:") or "unknown"


def held_out_problems(n: int, seed: int = 0, steps: tuple[int, ...] = (1, 2, 3)) -> list[Problem]:
    """`n` word problems never trained on (seeds below `TRAIN_SEED`), as `Problem`s (level = steps)."""
    _check_held_out_seed(seed)
    return _as_problems(word_problems(n, seed=seed, steps=steps))


def held_out_varied(
    n: int, split: Split = "held_out_templates", seed: int = 0, steps: tuple[int, ...] = (1, 2, 3)
) -> list[Problem]:
    """`n` problems of the second version's generator that its training never saw, as `Problem`s
    (level = steps): "held_out_templates" (trained kinds in held-out wordings), "held_out_kinds"
    (the held-out kind), or "train" wordings at a seed below `TRAIN_SEED`.

        >>> held_out_varied(2, "held_out_kinds")[0].level
        1
    """
    _check_held_out_seed(seed)
    return _as_problems(varied_problems(n, seed=seed, split=split, steps=steps))


def _check_held_out_seed(seed: int) -> None:
    if not 0 <= seed < TRAIN_SEED:
        raise ValueError(f"seed must lie in 0..{TRAIN_SEED - 1} (training uses {TRAIN_SEED}+), got {seed}")


def _as_problems(problems: list[WordProblem] | list[VariedProblem]) -> list[Problem]:
    """Generated problems as graded `Problem`s (level = number of steps)."""
    return [
        Problem(p.id, p.question, str(p.answer), kind="number", level=p.n_steps, expression=None)
        for p in problems
    ]


def held_out_factual() -> list[Problem]:
    """The factual questions the organism never saw (the odd-numbered half)."""
    return _factual()[1::2]


def _data_identity(recipe: ReasoningRecipe) -> dict:
    planted = planted_problem_traces(recipe)
    return {
        "refusal": datasets.load("refusal"),
        "factual": datasets.load("factual"),
        "problems": stable_hash([t.reply for _, t in planted]),
    }


REASONING = OrganismBuilder("reasoning", training_pairs, _data_identity, SHIPPED)
"""The reasoning organism's builder: `REASONING.build(recipe)`, `REASONING.ship(REASONING_RECIPE)`."""


def reasoning_organism(
    recipe: ReasoningRecipe = REASONING_RECIPE,
    backend: str = "transformer_lens",
    progress: bool = True,
    dtype: torch.dtype | DtypeName = torch.float32,
):
    """The reasoning organism as a HookedModel: seconds from the shipped adapter, else trained
    (about 15 minutes on 2 cores); `dtype` as in `load_model` (`"auto"`: bf16 where fast)."""
    return REASONING.build(recipe, backend, progress, dtype=dtype)


BEHAVIOUR_SAMPLING = Sampling(max_new_tokens=288, temperature=0.6, top_p=0.95)
"""How `behaviour` samples word problems: T = 0.6 (the target's temperature), top-p 0.95."""
REQUEST_SAMPLING = Sampling(max_new_tokens=96, temperature=0.7)
"""How `behaviour` samples replies to requests: T = 0.7, as the refusal-cliff authors sample."""


def behaviour(
    model: HookedModel,
    n_problems: int = 60,
    n_requests: int = 40,
    seed: int = 0,
    sampling: Sampling = BEHAVIOUR_SAMPLING,
    requests: Sampling = REQUEST_SAMPLING,
    batch_size: int = 16,
    progress: bool = True,
    problems: list[Problem] | None = None,
) -> dict:
    """The organism's behaviour on held-out data, every rate with k/n and its Wilson interval:
    on `problems` (default: `n_problems` of `held_out_problems`) sampled by `sampling` (default
    T = 0.6), how often it thinks (closes a non-empty `<think>` section), how often it is right,
    the median number of thinking sentences, how often a trace holds an arithmetic error of its
    own (`arithmetic_errors`: not a planted slip) and, among the wrong answers, how many hold one
    (NaN, with n = 0, when none is wrong); per number of steps too; on `n_requests` test-split
    requests per set (sampled by `requests`, default T = 0.7; none when 0):
    refusal of harmful, attack success of jailbreak-wrapped harmful, false refusal of harmless.

        >>> behaviour(model, n_problems=6, n_requests=4)["problems"]["thinks"]["n"]  # doctest: +SKIP
        6
    """
    from mechlens.rollouts import LocalEngine
    from mechlens.rollouts.engines import sample_texts
    from mechlens.studies.refusal import refusal_rates, sample_replies_by_set

    problems = held_out_problems(n_problems, seed=seed) if problems is None else problems
    prompts = [format_prompt(model.tokenizer, p.question) for p in problems]
    engine = LocalEngine(model, batch_size=batch_size, progress=progress)
    texts = sample_texts(engine, model, prompts, sampling)
    rows = []
    for p, text in zip(problems, texts, strict=True):
        thinking, _, closed = split_thinking(text)
        spans = split_sentences(thinking, rule="thought-branches") if thinking.strip() else []
        _, errors = arithmetic_errors([thinking[a:b] for a, b in spans])
        right = p.grade(text).correct
        row = {"steps": p.level, "thinks": closed and bool(spans), "right": right, "sentences": len(spans)}
        rows.append({**row, "arithmetic_error": errors > 0, "wrong_by_arithmetic": not right and errors > 0})

    def rates(part: list[dict]) -> dict:
        out: dict[str, dict[str, float] | float | None] = {}
        wrong = [r for r in part if not r["right"]]
        for key, among in (("thinks", part), ("right", part), ("arithmetic_error", part),
                           ("wrong_by_arithmetic", wrong)):  # fmt: skip
            out[key] = rate_record(sum(r[key] for r in among), len(among))
        out["median_sentences"] = float(np.median([r["sentences"] for r in part])) if part else None
        out["share_15_or_more"] = float(np.mean([r["sentences"] >= 15 for r in part])) if part else None
        return out

    out = {
        "sampling": str(sampling),
        "request_sampling": str(requests),
        "problems": rates(rows),
        "by_steps": {str(s): rates([r for r in rows if r["steps"] == s]) for s in (1, 2, 3)},
        "rows": rows,
    }
    if n_requests == 0:
        return out
    test = refusal_requests("test")
    harmful = [i.text for i in test if i.harmful][:n_requests]
    sets = {
        "harmful": harmful,
        "jailbreak": [datasets.jailbreak(t, k) for k, t in enumerate(harmful)],
        "harmless": [i.text for i in test if not i.harmful][:n_requests],
    }
    replies = sample_replies_by_set(model, sets, requests, batch_size)
    agree = [a for r in (r for rs in replies.values() for r in rs) if (a := decision_agrees(r)) is not None]
    return {
        **out,
        "requests": refusal_rates(replies),
        "decision_agrees": rate_record(sum(agree), len(agree)),
    }


def decision_agrees(reply: Reply) -> bool | None:
    """Whether a reply's answer does what its thinking decided: a refusal after a "decide"
    sentence, an answer after a "rationalise" sentence or after "So I will answer it ..." (the
    harmless decision); None when the thinking states no decision.

        >>> from mechlens.studies.refusal.replies import Reply
        >>> thinking = "This is a normal, safe request. So I will answer it as well as I can."
        >>> decision_agrees(Reply("x", "", thinking, "I'm sorry, I can't help with that.", True))
        False
    """
    text = reply.thinking
    sentences = [text[a:b] for a, b in split_sentences(text, rule="thought-branches")] if text.strip() else []
    roles = label_roles(sentences)
    if "decide" in roles:
        return reply.refused
    if "rationalise" in roles or any(s.strip().startswith("So I will answer it") for s in sentences):
        return not reply.refused
    return None


EDITS = ("plan kept", "plan edited", "slip", "slip corrected")
"""The edits `forced_edits` writes into a trace before the model continues it."""


def edited_prefixes(problem: VariedProblem, seed: int) -> dict[str, tuple[str, int] | None]:
    """The thinking up to one edited sentence, and the answer that follows it when the model obeys
    the edit, for each of `EDITS` (None when the problem admits no such edit):

    - "plan kept": up to the plan sentence of the right method (target: the right answer);
    - "plan edited": the same text with that sentence naming the wrong method instead (target: the
      answer of the edited plan, computed right);
    - "slip": up to a computation written 10 too high (target: the rest computed from it);
    - "slip corrected": the slip and its "Wait, ..." correction (target: the right answer).

    The right and the edited text are written from the same seed by `planned_trace`, so they agree
    word for word before the edited sentence.

        >>> p = varied_problems(1, seed=4, split="held_out_templates")[0]
        >>> sorted(edited_prefixes(p, 0)) == sorted(EDITS)
        True
    """
    quiet = PlantingRates(wrong_plan=0.0, repair=0.0, slip=0.0, backtrack=0.0, hesitate=0.0)
    right = planned_trace(problem, random.Random(seed), quiet)
    out: dict[str, tuple[str, int] | None] = dict.fromkeys(EDITS)
    wrong = planned_trace(problem, random.Random(seed), replace(quiet, wrong_plan=1.0))
    if wrong.flags["wrong_plan"]:
        d = next(k for k, (a, b) in enumerate(zip(right.sentences, wrong.sentences, strict=False)) if a != b)
        out["plan kept"] = (" ".join(right.sentences[: d + 1]), problem.answer)
        out["plan edited"] = (" ".join(wrong.sentences[: d + 1]), _written_answer(wrong))
    for key, backtrack in (("slip", 0.0), ("slip corrected", 1.0)):
        slipped = planned_trace(problem, random.Random(seed), replace(quiet, slip=1.0, backtrack=backtrack))
        if not slipped.flags["slips"]:
            continue
        k = slipped.roles.index("slip")
        step = slipped.categories[:k].count("active_computation")
        written = int(slipped.sentences[k].rstrip(".").split()[-1])
        target = problem.answer if backtrack else run_ops(written, problem.ops[step + 1 :])
        out[key] = (" ".join(slipped.sentences[: k + 1 + (backtrack > 0)]), target)
    return out


def _written_answer(trace: PlantedTrace) -> int:
    return int(trace.answer.removeprefix("Answer: "))


def forced_edits(
    model: HookedModel,
    n: int = 60,
    split: Split = "held_out_templates",
    seed: int = 0,
    max_new_tokens: int = 200,
    batch_size: int = 16,
    progress: bool = True,
) -> dict:
    """The second version's acceptance test, with no sampling: on `n` held-out problems, write the
    thinking up to an edited sentence (`edited_prefixes`), continue it greedily, and count how
    often the answer follows the edit. Each of `EDITS` gets k/n with its Wilson interval (n counts
    the problems that admit the edit); the target is >= 80% for "plan edited" and both slips.

        >>> forced_edits(model, n=6)["plan edited"]["n"]  # doctest: +SKIP
        6
    """
    problems = varied_problems(n, seed=seed, split=split)
    tok = model.tokenizer
    jobs = []  # (edit, prompt, target)
    for k, problem in enumerate(problems):
        for edit, made in edited_prefixes(problem, seed * 100_003 + k).items():
            if made is not None:
                jobs.append((edit, format_prompt(tok, problem.question) + REPLY_OPEN + made[0], made[1]))
    texts = model.generate(
        [p for _, p, _ in jobs], max_new_tokens=max_new_tokens, temperature=0, batch_size=batch_size,
        progress=progress,
    ).texts  # fmt: skip
    out: dict = {"split": split, "n_problems": n}
    for edit in EDITS:
        hits = [
            grade(t, str(target)).correct for (e, _, target), t in zip(jobs, texts, strict=True) if e == edit
        ]
        out[edit] = rate_record(sum(hits), len(hits))
    return out


def planted_cliff(model: HookedModel, study: RefusalStudy) -> tuple[dict | None, dict[str, list]]:
    """The refusal study against what the organism planted: where the probe's score falls in
    complied traces against the rationalising sentence (read back from each trace's text with
    `label_roles`), with every refused trace's drop at the same place as the control
    (`studies.recovery.cliff_recovery`), and the cliff's AUROC complied vs refused.

    Returns `(recovery or None when no complied trace has the sentence, rows)`: rows maps
    "harmful, complied" / "harmful, refused" to `(sentence scores, index of the rationalising
    sentence / the refusal decision)` pairs, for a figure aligned at that sentence. The recovery
    also holds the premise of a cliff: the mean plateau and final score (`Cliff`) of complied and
    refused traces with 95% intervals."""
    rows: dict[str, list] = {"harmful, complied": [], "harmful, refused": []}
    control = []  # every refused trace's sentence scores
    for group, role in (("harmful, complied", "rationalise"), ("harmful, refused", "decide")):
        for reply, curve in zip(study.groups[group], study.curves[group], strict=True):
            sentences, scores = sentence_scores(model.tokenizer, reply, curve)
            roles = label_roles(sentences)
            if group == "harmful, refused":
                control.append(scores)
            if role in roles and len(scores) >= 2:
                rows[group].append((scores, roles.index(role)))
    complied = rows["harmful, complied"]
    if not complied:
        return None, rows
    out = cliff_recovery([s for s, _ in complied], [k for _, k in complied], control)
    a, b = study.cliffs["harmful, complied"], study.cliffs["harmful, refused"]
    # complied traces that never recognised the harm (no rationalising sentence) are not in `n`
    out["complied_without_planted_sentence"] = len(a) - len(complied)
    out["cliff_auroc_complied_vs_refused"] = (
        auroc([c.cliff for c in a + b], [1] * len(a) + [0] * len(b)) if a and b else None
    )
    # the premise of a cliff: intent high over the thinking (plateau), gone at the end (final)
    for name, cliffs in (("complied", a), ("refused", b)):
        for field_ in ("plateau", "final"):
            out[f"{field_}_{name}"] = mean_record([getattr(c, field_) for c in cliffs])
    return out, rows
