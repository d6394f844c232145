"""Echoes as Anchors: how often the thinking restates the question, the Echo Likelihood Gap and
the attention refocusing onto the echo, right vs wrong replies, and Echoic Prompting on the
failed problems, by `mechlens.echoes.analyze`. The default model is the reasoning organism on
held-out word problems (its thinking restates the problem by design).

    python experiments/echoes.py [--quick] [--model organism|base|PATH] [--trim authors|echo-span]

Writes figures/echoes/ (each figure with provenance), results.json and summary.json.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch

from mechlens.ops.stats import mean_ci, wilson
from mechlens.organism import held_out_problems, load_subject
from mechlens.plots import grouped_bars, histograms_by_group, mean_ci_lines
from mechlens.rollouts import engine_for
from mechlens.runs import Run, parse_config
from mechlens.studies import echoes


@dataclass
class EchoConfig:
    model: str = "organism"  # the reasoning organism; "base": the plain embedded model; or a path
    backend: Literal["transformer_lens", "nnsight"] = "transformer_lens"
    device: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    engine: Literal["auto", "local", "shared-prefix"] = "auto"  # in-process sampling (`engine_for`):
    # "auto" is the shared-prefix engine (bf16 where the CPU is fast at it); the analyses stay in --dtype
    n_problems: int = 45  # held-out word problems, 1-3 steps
    max_new_tokens: int = 256
    trim: Literal["authors", "echo-span"] = "authors"  # the authors' trimmed answer, or the echo only
    prefix_tokens: int = 32  # the authors' echo region for attention: the first 32 reply tokens
    echoic: bool = True
    quick: bool = False
    out: str = "figures/echoes"
    seed: int = 0

    def __post_init__(self):
        if self.quick:
            self.n_problems, self.max_new_tokens = 8, 224


def main(cfg: EchoConfig) -> dict:
    model = load_subject(cfg.model, cfg.backend, cfg.device, cfg.dtype)
    run = Run("echoes", cfg, cfg.out, model=model, seed=cfg.seed, images=not cfg.quick)
    sampling = echoes.ECHO_SAMPLING.replace(max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    problems = held_out_problems(cfg.n_problems, seed=cfg.seed)
    study = echoes.analyze(
        model, problems, sampling, trim=cfg.trim, prefix_tokens=cfg.prefix_tokens, echoic=cfg.echoic,
        cache=run.cache, engine=engine_for(model, local=cfg.engine),
    )  # fmt: skip
    groups = study.groups()
    bands = {}
    for name, rows in groups.items():
        if rows:
            m, lo, hi, _ = mean_ci([100 * r.refocusing.to_prefix for r in rows], model.n_layers)
            bands[f"{name} (n={len(rows)})"] = (m, lo, hi)
    fig = mean_ci_lines(
        list(range(model.n_layers)), bands, "layer", "attention to the echo region (% of attention mass)",
        title=f"Attention from reply tokens to the first {cfg.prefix_tokens} reply tokens, right vs wrong",
    )  # fmt: skip
    run.save_figure(
        fig, "refocusing_by_layer", caption="Attention refocusing onto the echo region per layer."
    )
    fig = histograms_by_group(
        {f"{k} (n={len(g)})": g for k, v in groups.items() if (g := [r.gap.delta_mean for r in v if r.gap])},
        f"Delta-L = mean log p(raw) - mean log p(trimmed, {cfg.trim} rule), nats/token",
        title="Echo Likelihood Gap per reply",
    )
    run.save_figure(fig, "likelihood_gap", caption="Echo Likelihood Gap of right and wrong replies.")
    k, n = study.echo_rate()
    echo_rate = wilson(k, n)
    if study.prompting is not None:
        p, name = study.prompting, "right on previously failed problems"
        arms = {"question re-inserted": p.echo, "nothing inserted": p.control}
        rates = {arm: wilson(sum(v), len(v)) for arm, v in arms.items()}
        fig = grouped_bars(
            list(arms),
            {name: [r[0] for r in rates.values()]},
            "rate (95% Wilson interval)",
            title=f"Echoic Prompting after {p.first_tokens} tokens ({len(p.echo)} failed problems)",
            counts={name: [f"{sum(v)}/{len(v)}" for v in arms.values()]},
            intervals={name: [(r[1], r[2]) for r in rates.values()]},
        )
        run.save_figure(fig, "echoic_prompting", caption="Re-inserting the question mid-trace vs continuing.")
    results = {
        "echo_rate": {"count": k, "n": n, "rate": echo_rate[0], "low": echo_rate[1], "high": echo_rate[2]},
        "gap_by_outcome": study.gap_by_outcome(),
        "refocusing_by_outcome": study.refocusing_by_outcome(),
        "layer_groups": study.layer_groups,
        "echoic_prompting": None
        if study.prompting is None
        else {**asdict(study.prompting), "paired": study.prompting.paired},
        "replies": [
            {
                "id": r.problem.id,
                "correct": r.correct,
                "echo": r.echo,
                "gap": asdict(r.gap) if r.gap else None,
                "to_prefix": r.refocusing.to_prefix.tolist(),
                "to_question": r.refocusing.to_question.tolist(),
            }
            for r in study.replies
        ],  # fmt: skip
        "paper": {
            "delta_l_right_vs_wrong": [2.5231, 2.4421],
            "attention_layers_7_18": [0.1445, 0.1158],
            "d": 0.82,
        },
    }
    run.save_json("results.json", results)
    run.summarize("Echoes as Anchors", study.summary_lines())
    return results


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    np.seterr(all="ignore")
    main(parse_config(EchoConfig, description=__doc__))
