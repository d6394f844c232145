"""The Echoes-as-Anchors study of one model on a set of problems, as the experiment runs it.

`analyze` samples one reply per problem, finds the echo of the question in each (`echo_span`),
scores the Echo Likelihood Gap against the echo-trimmed reply (`likelihood_gap`) and the attention
refocusing onto the reply's opening (`refocusing`), compares right with wrong replies, and
re-inserts the question mid-trace on the failed problems (Echoic Prompting, `echoic_prompting`)
against a continuation without it. It returns an `EchoStudy`.

Example (minutes with the reasoning organism):
    >>> from mechlens.organism import held_out_problems, load_subject     # doctest: +SKIP
    >>> study = analyze(load_subject("organism"), held_out_problems(20))  # doctest: +SKIP
    >>> print("\\n".join(study.summary_lines()))                           # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mechlens.cache import DiskCache, model_fingerprint
from mechlens.datasets import Problem
from mechlens.models.sampling import Sampling
from mechlens.ops.stats import (
    auroc,
    auroc_interval,
    cohens_d,
    format_estimate,
    format_rate,
    mcnemar,
    mean_difference,
    mean_record,
)
from mechlens.rollouts import Engine, LocalEngine
from mechlens.rollouts.engines import token_prompts
from mechlens.studies.echoes.echo import THRESHOLD, TRIM_RULES, TrimRule, echo_span, trim_echo
from mechlens.studies.echoes.measures import (
    PREFIX_TOKENS,
    LikelihoodGap,
    Refocusing,
    likelihood_gap,
    refocusing,
)
from mechlens.text.thinking import format_prompt

if TYPE_CHECKING:
    from mechlens.models.hooked import HookedModel

ECHO_SAMPLING = Sampling(max_new_tokens=256, temperature=0.0)
"""Greedy replies, as the authors' two-stage evaluation decodes (`"decoding": {"do_sample": False}`)."""
INJECTION = "Look back again: {question}\nSo now I know that "
"""The authors' Echoic Prompting text (`two_stage_common.DEFAULT_INJECTION_TEMPLATE`)."""
CONTINUATION = ""
"""Their control (`two_stage_continue`): the same two stages with nothing inserted."""


@dataclass
class EchoReply:
    """One problem's reply and its echo measures."""

    problem: Problem
    text: str
    correct: bool
    echo: tuple[int, int] | None  # character span of the leading echo in `text` (word overlap)
    echoes: bool  # whether the thinking opens with an echo: the detector's verdict, or `echo` found
    gap: LikelihoodGap | None  # None: nothing is left once the echo is trimmed (undefined)
    refocusing: Refocusing


@dataclass
class EchoicPrompting:
    """Two-stage continuations of the failed problems: `first_tokens` of the reply, then the
    question re-inserted (`echo`) or nothing (`control`), then up to `second_tokens` more (the
    second stage is graded, as the authors grade it); right or not."""

    problems: list[str]  # ids of the previously failed problems
    echo: list[bool]
    control: list[bool]
    first_tokens: int
    second_tokens: int

    @property
    def paired(self) -> dict:
        """McNemar of right with the question re-inserted vs without, on the same problems."""
        return mcnemar(self.echo, self.control)


@dataclass
class EchoStudy:
    """Every echo measure of one model on one set of problems."""

    replies: list[EchoReply]
    trim: str
    layer_groups: dict[str, tuple[int, int]]  # name -> layers [start, end)
    prompting: EchoicPrompting | None

    def groups(self) -> dict[str, list[EchoReply]]:
        return {
            "right": [r for r in self.replies if r.correct],
            "wrong": [r for r in self.replies if not r.correct],
        }

    def echo_rate(self) -> tuple[int, int]:
        return sum(r.echoes for r in self.replies), len(self.replies)

    def gap_by_outcome(self) -> dict:
        """Delta-L per token, right vs wrong: each group's mean with its 95% interval and n, the
        difference (bootstrap interval), and the AUROC of Delta-L for right vs wrong (interval)."""
        g = self.groups()
        values = {k: [r.gap.delta_mean for r in v if r.gap is not None] for k, v in g.items()}
        out: dict = {k: mean_record(v) for k, v in values.items()}
        out["difference"] = mean_difference(values["right"], values["wrong"])
        scores = values["right"] + values["wrong"]
        labels = [1] * len(values["right"]) + [0] * len(values["wrong"])
        out["auroc"] = (
            (auroc(scores, labels), *auroc_interval(scores, labels))
            if values["right"] and values["wrong"]
            else None
        )
        return out

    def refocusing_by_outcome(self) -> dict:
        """Per layer group: the share of attention on the echo region, right vs wrong (mean over
        the group's layers per reply), and Cohen's d (right - wrong) with its interval."""
        g = self.groups()
        out = {}
        for name, (a, b) in self.layer_groups.items():
            share = {k: [float(r.refocusing.to_prefix[a:b].mean()) for r in v] for k, v in g.items()}
            question = {
                k: [float(np.nanmean(r.refocusing.to_question[a:b])) for r in v] for k, v in g.items()
            }
            out[name] = {
                "right": float(np.mean(share["right"])) if share["right"] else float("nan"),
                "wrong": float(np.mean(share["wrong"])) if share["wrong"] else float("nan"),
                "d": cohens_d(share["right"], share["wrong"]),
                "d_question": cohens_d(*_finite(question["right"], question["wrong"])),
            }
        return out

    def summary_lines(self) -> list[str]:
        k, n = self.echo_rate()
        lines = [f"echo of the question opens the thinking: {format_rate(k, n)} of replies"]
        undefined = sum(r.gap is None for r in self.replies)
        if undefined:
            lines.append(f"Delta-L undefined for {undefined} replies (nothing left once the echo is trimmed)")
        gap = self.gap_by_outcome()
        r, w, diff = gap["right"], gap["wrong"], gap["difference"]
        right, wrong = (format_estimate(g["mean"], g["low"], g["high"], g["n"]) for g in (r, w))
        lines.append(
            f"Delta-L ({self.trim} trim, nats/token), right: {right}; wrong: {wrong}; "
            f"difference {format_estimate(*diff)}"
        )
        for name, v in self.refocusing_by_outcome().items():
            lines.append(
                f"attention to the echo region, {name}: right {_share(v['right'])} "
                f"vs wrong {_share(v['wrong'])}; Cohen's d {format_estimate(*v['d'])}"
            )
        if self.prompting is not None:
            p = self.prompting
            m = p.paired
            test = (
                f"exact McNemar p = {m['p']:.2g}"
                if m["only_a"] + m["only_b"]
                else "no discordant problem: no test"
            )
            echo, control = format_rate(sum(p.echo), len(p.echo)), format_rate(sum(p.control), len(p.control))
            lines.append(
                f"Echoic Prompting on {len(p.problems)} failed problems: right with the question re-inserted "
                f"{echo}, without it {control} ({test})"
            )
        return lines


def _share(x: float) -> str:
    return f"{100 * x:.1f}%" if np.isfinite(x) else "undefined (no replies)"


def _finite(a: Sequence[float], b: Sequence[float]) -> tuple[list[float], list[float]]:
    return [x for x in a if np.isfinite(x)], [x for x in b if np.isfinite(x)]


def default_layer_groups(n_layers: int) -> dict[str, tuple[int, int]]:
    """Early, middle and late thirds of the layers, and the last layer ([impl]: the paper's groups
    are for 32-layer models, "layers 7-18" and the last).

        >>> default_layer_groups(30)
        {'early': (0, 10), 'middle': (10, 20), 'late': (20, 30), 'last layer': (29, 30)}
    """
    a, b = n_layers // 3, 2 * n_layers // 3
    return {"early": (0, a), "middle": (a, b), "late": (b, n_layers), "last layer": (n_layers - 1, n_layers)}


def analyze(
    model: HookedModel,
    problems: Sequence[Problem],
    sampling: Sampling = ECHO_SAMPLING,
    trim: TrimRule = "authors",
    threshold: float = THRESHOLD,
    prefix_tokens: int = PREFIX_TOKENS,
    layer_groups: dict[str, tuple[int, int]] | None = None,
    echoic: bool = True,
    first_tokens: int | None = None,
    injection: str = INJECTION,
    detector: Callable[[str, str], bool] | None = None,
    cache: DiskCache | str | Path | bool | None = True,
    engine: Engine | None = None,
    progress: bool = True,
) -> EchoStudy:
    """The echo study of `model` on `problems` (`Problem`s with gold answers): one reply each
    sampled with `sampling` (greedy by default), echoes by word overlap (`threshold`), the gap
    against the `trim`-trimmed reply, refocusing onto the first `prefix_tokens` reply tokens per
    `layer_groups` (default `default_layer_groups`), and, with `echoic`, Echoic Prompting on the
    failed problems. `detector(question, reply) -> bool` decides echo presence instead of the word
    overlap (e.g. the paper's MLP probe, `EchoProbe.detector`). Echoic Prompting: the first
    `first_tokens` of the reply (default half of `sampling.max_new_tokens`), then `injection` or
    nothing, then a second stage of `sampling.max_new_tokens` (the authors run two stages of equal
    size: 2048 + 2048)."""
    problems = list(problems)
    if not problems:
        raise ValueError("problems is empty")
    if not isinstance(injection, str) or injection.count("{question}") != 1:
        raise ValueError("injection must contain {question} exactly once (the authors' check)")
    if trim not in TRIM_RULES:
        raise ValueError(f"trim must be one of {list(TRIM_RULES)}, got {trim!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 < threshold <= 1:
        raise ValueError(f"threshold must be a number in (0, 1], got {threshold!r}")
    if isinstance(prefix_tokens, bool) or not isinstance(prefix_tokens, int) or prefix_tokens < 1:
        raise ValueError(f"prefix_tokens must be an int >= 1, got {prefix_tokens!r}")
    first = sampling.max_new_tokens // 2 if first_tokens is None else first_tokens
    if isinstance(first, bool) or not isinstance(first, int) or not 1 <= first < sampling.max_new_tokens:
        raise ValueError(f"first_tokens must be an int in 1..{sampling.max_new_tokens - 1}, got {first!r}")
    if layer_groups is not None and not layer_groups:
        raise ValueError(
            "layer_groups is empty: give at least one (name -> (start, end)), or None for the defaults"
        )
    groups = layer_groups or default_layer_groups(model.n_layers)
    for name, (a, b) in groups.items():
        if not 0 <= a < b <= model.n_layers:
            raise ValueError(
                f"layer_groups[{name!r}] = {(a, b)} must be a layer range inside 0..{model.n_layers}"
            )
    store = DiskCache.of(cache, "echoes")
    key = {
        "model": model_fingerprint(model),
        "sampling": sampling,
        "engine": engine.describe() if engine else None,
    }
    engine = engine or LocalEngine(model, progress=progress)
    prompts = token_prompts(model, [format_prompt(model.tokenizer, p.question) for p in problems])

    def sample(step: str, rows: list[list[int]], how: Sampling) -> list[list[int]]:
        def compute():
            return [per[0] for per in engine.sample(rows, how.replace(n=1))]

        return store.cached(step, compute, **key, prompts=rows, how=how) if store else compute()

    ids = sample("replies", prompts, sampling)
    replies = []
    for p, row in zip(problems, ids, strict=True):
        text = model.tokenizer.decode(row)
        trimmed = trim_echo(p.question, text, rule=trim, threshold=threshold)
        gap = likelihood_gap(model, p.question, text, trimmed) if trimmed.strip() else None
        focus = refocusing(model, p.question, text, prefix_tokens)
        span = echo_span(p.question, text, threshold)
        echoes = detector(p.question, text) if detector is not None else span is not None
        replies.append(EchoReply(p, text, p.grade(text).correct, span, bool(echoes), gap, focus))
    prompting = None
    failed = [i for i, r in enumerate(replies) if not r.correct]
    if echoic and failed:
        rest = sampling  # the second stage: a full budget again, as in the authors' two stages
        results = {}
        for name, text in (("echo", injection), ("control", CONTINUATION)):
            rows = []
            for i in failed:
                head = ids[i][:first]
                decoded = model.tokenizer.decode(head)
                inserted = text.replace("{question}", problems[i].question)
                connector = "" if decoded.endswith("\n") or inserted.startswith("\n") else "\n"
                extra = model.tokenizer(connector + inserted, add_special_tokens=False)["input_ids"]
                rows.append(prompts[i] + head + list(extra))
            second = sample(f"echoic {name}", rows, rest)
            results[name] = [
                problems[i].grade(model.tokenizer.decode(s)).correct
                for i, s in zip(failed, second, strict=True)
            ]
        prompting = EchoicPrompting(
            [problems[i].id for i in failed], results["echo"], results["control"], first, rest.max_new_tokens
        )
    return EchoStudy(replies, trim, groups, prompting)
