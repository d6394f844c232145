"""Deep Self-Evolving Reasoning: parallel verify-and-refine chains on held-out word problems, their
transition estimates (p_up, p_down) and the stationary accuracy p_up / (p_up + p_down) they
predict, against the observed per-chain and majority-vote accuracy, by `mechlens.evolution`.

    python experiments/self_evolving.py [--quick] [--model organism|base|PATH]

Writes figures/evolution/ (each figure with provenance), results.json and summary.json.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch

from mechlens.ops.stats import format_estimate, format_rate, wilson
from mechlens.organism import held_out_problems, load_subject
from mechlens.plots import mean_ci_lines
from mechlens.rollouts import engine_for
from mechlens.runs import Run, parse_config
from mechlens.studies import evolution


@dataclass
class EvolutionConfig:
    model: str = "organism"  # the reasoning organism; "base": the plain embedded model; or a path
    backend: Literal["transformer_lens", "nnsight"] = "transformer_lens"
    device: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    engine: Literal["auto", "local", "shared-prefix"] = "auto"  # in-process sampling (`engine_for`):
    # "auto" is the shared-prefix engine (bf16 where the CPU is fast at it); the analyses stay in --dtype
    n_problems: int = 24  # held-out word problems with 2-3 steps (the ones it gets wrong more often)
    n_chains: int = 4
    iterations: int = 4
    max_new_tokens: int = 320  # the organism's thinking on a 2-3 step problem is ~200 tokens
    temperature: float = 0.6
    quick: bool = False
    out: str = "figures/evolution"
    seed: int = 0

    def __post_init__(self):
        if self.quick:
            self.n_problems, self.n_chains, self.iterations, self.max_new_tokens = 4, 2, 3, 256


def main(cfg: EvolutionConfig) -> dict:
    model = load_subject(cfg.model, cfg.backend, cfg.device, cfg.dtype)
    run = Run("self_evolving", cfg, cfg.out, model=model, seed=cfg.seed, images=not cfg.quick)
    sampling = evolution.EVOLVE_SAMPLING.replace(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed
    )
    problems = held_out_problems(cfg.n_problems, seed=cfg.seed, steps=(2, 3))

    engine = engine_for(model, local=cfg.engine)

    def compute() -> dict:
        c = evolution.evolve(model, problems, cfg.n_chains, cfg.iterations, sampling, engine=engine)
        return {"correct": c.correct.tolist(), "answers": c.answers, "texts": c.texts}

    stored = run.cached("chains", compute, engine=engine.describe())  # "auto" is bf16 or float32 by CPU
    chains = evolution.Chains(problems, np.array(stored["correct"]), stored["answers"], stored["texts"])
    correct, flat = chains.correct, chains.flat()  # [problems, chains, iterations], [chains, iterations]
    t = evolution.transition_estimates(flat, seed=cfg.seed)
    per_chain = [a[0] for a in t.accuracy_by_iteration]
    n = len(problems)
    votes = [round(a * n) for a in chains.majority_accuracy()]  # problems whose majority is right
    vote = [wilson(k, n) for k in votes]
    observed = {
        f"share of chains right (n={len(flat)})": tuple(np.array(t.accuracy_by_iteration).T),
        f"majority vote over each problem's {cfg.n_chains} chains (n={n})": tuple(np.array(vote).T),
    }
    x = list(range(cfg.iterations))
    stationary = (
        np.full(len(x), t.stationary),
        np.full(len(x), t.stationary_ci[0]),
        np.full(len(x), t.stationary_ci[1]),
    )
    fig = mean_ci_lines(
        x, {**observed, "predicted stationary accuracy": stationary}, "iteration (0: first solution)",
        "accuracy (95% Wilson / bootstrap interval)", title="Verify-and-refine chains: accuracy by iteration",
    )  # fmt: skip
    run.save_figure(
        fig, "accuracy_by_iteration", caption="Chain accuracy by iteration against the predicted limit."
    )
    lines = [
        f"p_up = P(right at k+1 | wrong at k): {format_rate(t.up, t.n_from_wrong)}",
        f"p_down = P(wrong at k+1 | right at k): {format_rate(t.down, t.n_from_right)}",
        f"predicted stationary accuracy {format_estimate(t.stationary, *t.stationary_ci, n=len(flat))} "
        "(bootstrap over chains); observed at the last iteration "
        f"{per_chain[-1]:.2f} of {len(flat)} chains; majority vote {format_rate(votes[-1], n)} of problems",
    ]
    results = {
        "transitions": asdict(t),
        "majority_accuracy": chains.majority_accuracy().tolist(),
        "correct": correct.tolist(),
        "problems": [p.id for p in problems],
    }
    run.save_json("results.json", results)
    run.summarize("Self-evolving chains", lines)
    return results


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main(parse_config(EvolutionConfig, description=__doc__))
