"""To Backtrack or Not to Backtrack: at equal generated tokens, one long trace (which may
backtrack) against a majority vote over short traces, on held-out word problems, by
`mechlens.budget.budget_curve`. The organism backtracks by design ("Wait, ..." after a planted
slip); the run also counts how often its long traces do.

    python experiments/budget.py [--quick] [--model organism|base|PATH] [--budgets 256,512,1024]

Writes figures/budget/ (each figure with provenance), results.json and summary.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from mechlens.ops.stats import format_rate, wilson
from mechlens.organism import held_out_problems, load_subject
from mechlens.plots import mean_ci_lines
from mechlens.runs import Run, parse_config
from mechlens.studies import budget


@dataclass
class BudgetConfig:
    model: str = "organism"  # the reasoning organism; "base": the plain embedded model; or a path
    backend: Literal["transformer_lens", "nnsight"] = "transformer_lens"
    device: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    n_problems: int = 30  # held-out word problems with 2-3 steps
    budgets: str = "256,512,1024"  # total generated tokens per problem (comma-separated)
    short_tokens: int = 256  # the cap of each parallel trace (the organism thinks ~200 tokens)
    temperature: float = 0.6
    quick: bool = False
    out: str = "figures/budget"
    seed: int = 0

    def __post_init__(self):
        if self.quick:
            self.n_problems, self.budgets, self.short_tokens = 6, "256,512", 256


def main(cfg: BudgetConfig) -> dict:
    model = load_subject(cfg.model, cfg.backend, cfg.device, cfg.dtype)
    run = Run("budget", cfg, cfg.out, model=model, seed=cfg.seed, images=not cfg.quick)
    budgets = [int(b) for b in cfg.budgets.split(",")]
    sampling = budget.BUDGET_SAMPLING.replace(temperature=cfg.temperature, seed=cfg.seed)
    problems = held_out_problems(cfg.n_problems, seed=cfg.seed, steps=(2, 3))
    curve = budget.budget_curve(model, problems, budgets, cfg.short_tokens, sampling, cache=run.cache)
    n = len(problems)
    arms = {
        "one long trace": curve.sequential,
        f"majority vote over {cfg.short_tokens}-token traces": curve.majority,
        "any short trace right (perfect verifier)": curve.oracle,
    }
    bands = {}
    for name, right in arms.items():
        rates = np.array([wilson(int(right[:, k].sum()), n) for k in range(len(curve.budgets))])
        bands[f"{name} (n={n})"] = (rates[:, 0], rates[:, 1], rates[:, 2])
    fig = mean_ci_lines(
        curve.budgets, bands, "generated tokens per problem", "accuracy (95% Wilson interval)",
        title="Sequential vs parallel reasoning at a fixed token budget",
    )  # fmt: skip
    run.save_figure(fig, "accuracy_by_budget", caption="Accuracy of each arm at equal generated tokens.")
    backtracks = sum("Wait" in t for t in curve.long_texts)
    results = {
        "budgets": curve.budgets,
        "short_tokens": curve.short_tokens,
        "sequential": curve.sequential.tolist(),
        "majority": curve.majority.tolist(),
        "oracle": curve.oracle.tolist(),
        "mean_tokens": curve.mean_tokens,
        "paired": {b: curve.paired(b) for b in curve.budgets},
        "problems": [p.id for p in problems],
        "long_traces_backtracking": backtracks,
    }
    run.save_json("results.json", results)
    lines = [*curve.summary_lines(), f'long traces that backtrack ("Wait"): {format_rate(backtracks, n)}']
    run.summarize("Sequential vs parallel at a fixed budget", lines)
    return results


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main(parse_config(BudgetConfig, description=__doc__))
