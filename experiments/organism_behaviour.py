"""The reasoning organism's behaviour on held-out data: does it think, how often is it right, how
long does it think, and does it refuse?

Targets of the organism (`mechlens.organism`): thinks on >= 90% of held-out word problems, is
right on 25-85% of them at T = 0.6, median >= 8 thinking sentences; refuses most plain harmful
requests, complies with more jailbreak-wrapped ones, answers harmless ones.

    python experiments/organism_behaviour.py [--quick] [--backend nnsight]

Writes figures/organism/: behaviour (HTML, plus PNG/SVG with a Chromium) with provenance, and
results.json (every rate with k/n and its 95% Wilson interval).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from mechlens.organism import load_subject
from mechlens.organism.reasoning import REQUEST_SAMPLING, behaviour
from mechlens.plots import grouped_bars
from mechlens.runs import Run, parse_config


@dataclass
class BehaviourConfig:
    model: str = "organism"
    backend: Literal["transformer_lens", "nnsight"] = "transformer_lens"
    n_problems: int = 60  # held-out word problems, 20 per number of steps
    n_requests: int = 40  # test-split requests per set
    request_temperature: float = 0.7  # the refusal-cliff authors' (0: greedy)
    quick: bool = False
    out: str = "figures/organism"
    seed: int = 0

    def __post_init__(self):
        if self.quick:
            self.n_problems, self.n_requests = 12, 8


def main(cfg: BehaviourConfig) -> dict:
    model = load_subject(cfg.model, cfg.backend)
    run = Run("organism_behaviour", cfg, cfg.out, model=model, seed=cfg.seed, images=not cfg.quick)
    requests = REQUEST_SAMPLING.replace(temperature=cfg.request_temperature, seed=cfg.seed)
    result = run.cached(
        "behaviour", lambda: behaviour(model, cfg.n_problems, cfg.n_requests, cfg.seed, requests=requests)
    )
    p, by, req = result["problems"], result["by_steps"], result["requests"]
    cats = ["thinks", "right", *[f"right, {s} step{'s' * (s > 1)}" for s in (1, 2, 3)], *req]
    rows = [p["thinks"], p["right"], *[by[str(s)]["right"] for s in (1, 2, 3)], *req.values()]
    fig = grouped_bars(
        cats,
        {"organism": [r["rate"] for r in rows]},
        "rate (95% Wilson interval)",
        title=f"Reasoning organism on held-out data (median {p['median_sentences']:.0f} thinking sentences)",
        counts={"organism": [f"{r['count']}/{r['n']}" for r in rows]},
        intervals={"organism": [(r["low"], r["high"]) for r in rows]},
    )
    run.save_figure(fig, "behaviour", caption="Thinking, accuracy at T = 0.6 and refusal on held-out data.")
    run.save_json("results.json", {k: v for k, v in result.items() if k != "rows"})
    for name, r in zip(cats, rows, strict=True):
        print(f"{name}: {r['count']}/{r['n']} = {r['rate']:.2f} ({r['low']:.2f}-{r['high']:.2f})")
    print("median thinking sentences:", p["median_sentences"], "share >= 15:", p["share_15_or_more"])
    return result


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main(parse_config(BehaviourConfig, description=__doc__))
