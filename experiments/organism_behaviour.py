"""The reasoning organism's behaviour on held-out data: does it think, how often is it right, how
long does it think, and does it refuse?

Targets of the organism (`mechlens.organism`): thinks on >= 90% of held-out word problems, is
right on 25-85% of them at T = 0.6, median >= 8 thinking sentences; refuses most plain harmful
requests, complies with more jailbreak-wrapped ones, answers harmless ones.

    python experiments/organism_behaviour.py [--quick] [--backend nnsight] [--model organism-v2]

Writes figures/organism/ (figures/organism-v2/ for the second version): behaviour (HTML, plus
PNG/SVG with a Chromium) with provenance, and results.json (every rate with k/n and its 95% Wilson
interval). The second version is measured on held-out templates and on the held-out kind, and by
its acceptance test (`forced_edits`: the answer follows an edited plan or slip, greedy), in the
figure "edits".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from mechlens.ops.stats import format_rate
from mechlens.organism import held_out_varied, load_subject
from mechlens.organism.reasoning import EDITS, REQUEST_SAMPLING, behaviour, forced_edits
from mechlens.plots import grouped_bars
from mechlens.runs import Run, parse_config


@dataclass
class BehaviourConfig:
    model: str = "organism"  # or "organism-v2", "base", a local folder
    backend: Literal["transformer_lens", "nnsight"] = "transformer_lens"
    n_problems: int = 60  # held-out word problems per set, a third per number of steps
    n_requests: int = 40  # test-split requests per set
    n_edits: int = 60  # organism-v2: held-out problems of the forced-edit acceptance test
    request_temperature: float = 0.7  # the refusal-cliff authors' (0: greedy)
    request_tokens: int = 0  # 0: 96 (the organism thinks ~70 tokens), 160 for organism-v2 (~110)
    quick: bool = False
    out: str = ""  # default figures/organism, or figures/organism-v2
    seed: int = 0

    def __post_init__(self):
        if self.quick:
            self.n_problems, self.n_requests, self.n_edits = 12, 8, 6
        self.out = self.out or ("figures/organism-v2" if self.model == "organism-v2" else "figures/organism")
        self.request_tokens = self.request_tokens or (160 if self.model == "organism-v2" else 96)


def main(cfg: BehaviourConfig) -> dict:
    model = load_subject(cfg.model, cfg.backend)
    run = Run("organism_behaviour", cfg, cfg.out, model=model, seed=cfg.seed, images=not cfg.quick)
    requests = REQUEST_SAMPLING.replace(
        temperature=cfg.request_temperature, seed=cfg.seed, max_new_tokens=cfg.request_tokens
    )
    v2 = cfg.model == "organism-v2"
    splits = ("held_out_templates", "held_out_kinds") if v2 else ("generator",)
    results = {}
    for k, split in enumerate(splits):
        problems = held_out_varied(cfg.n_problems, split, cfg.seed) if v2 else None  # type: ignore[arg-type]
        results[split] = run.cached(
            f"behaviour-{split}",
            lambda problems=problems, k=k: behaviour(
                model, cfg.n_problems, cfg.n_requests if k == 0 else 0, cfg.seed, requests=requests,
                problems=problems,
            ),
        )  # fmt: skip
    first = results[splits[0]]
    cats = ["thinks", "right", *[f"right, {s} step{'s' * (s > 1)}" for s in (1, 2, 3)]]
    series, counts, intervals = {}, {}, {}
    for split, r in results.items():
        rows = [
            r["problems"]["thinks"],
            r["problems"]["right"],
            *[r["by_steps"][str(s)]["right"] for s in (1, 2, 3)],
        ]
        name = split.replace("_", " ") if v2 else "organism"
        _add(series, counts, intervals, name, rows)
        for c, r_ in zip(cats, rows, strict=True):
            _print(f"{name}, {c}", r_)
        print(f"{name}: median thinking sentences", r["problems"]["median_sentences"])
        _print(
            f"{name}, traces with an arithmetic error of the model's own", r["problems"]["arithmetic_error"]
        )
        _print(f"{name}, wrong answers with one", r["problems"]["wrong_by_arithmetic"])
    medians = ", ".join(f"{r['problems']['median_sentences']:.0f}" for r in results.values())
    title = f"Reasoning organism on held-out word problems (median {medians} thinking sentences)"
    fig = grouped_bars(cats, series, "rate (95% Wilson interval)", title, counts=counts, intervals=intervals)
    run.save_figure(fig, "behaviour", caption="Thinking and accuracy at T = 0.6 on held-out word problems.")
    requests = {**first["requests"], "thinking and answer agree": first["decision_agrees"]}
    series, counts, intervals = {}, {}, {}
    _add(series, counts, intervals, "organism", list(requests.values()))
    title = f"Refusal on held-out requests (T = {cfg.request_temperature})"
    fig = grouped_bars(
        list(requests), series, "rate (95% Wilson interval)", title, counts=counts, intervals=intervals
    )
    run.save_figure(
        fig, "requests", caption="Refusal, attack success, false refusal and decision-answer agreement."
    )
    for name, r_ in requests.items():
        _print(name, r_)
    out = {split: {k: v for k, v in r.items() if k != "rows"} for split, r in results.items()}
    if v2:
        edits = run.cached("edits", lambda: forced_edits(model, cfg.n_edits, seed=cfg.seed))
        series, counts, intervals = {}, {}, {}
        _add(series, counts, intervals, "answer follows the edit", [edits[e] for e in EDITS])
        title = "Acceptance test: greedy continuation of edited held-out traces"
        fig = grouped_bars(
            list(EDITS), series, "rate (95% Wilson interval)", title, counts=counts, intervals=intervals
        )
        run.save_figure(
            fig, "edits", caption="How often the answer follows an edited plan or slip (target >= 80%)."
        )
        for e in EDITS:
            _print(f"edit: {e}", edits[e])
        out["edits"] = edits
    run.save_json("results.json", out)
    return out


def _add(series: dict, counts: dict, intervals: dict, name: str, rows: list[dict]) -> None:
    """One bar series of rates with their k/n and Wilson intervals."""
    series[name] = [r["rate"] for r in rows]
    counts[name] = [f"{r['count']}/{r['n']}" for r in rows]
    intervals[name] = [(r["low"], r["high"]) for r in rows]


def _print(name: str, r: dict) -> None:
    print(f"{name}: {format_rate(r['count'], r['n'])}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main(parse_config(BehaviourConfig, description=__doc__))
