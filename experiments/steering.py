"""Steering reasoning behaviours (Venhoff et al. 2025) on the reasoning organism: difference-of-means
directions for its planted backtracking ("Wait, ... not ...") and hesitation ("Hmm, let me
re-check that step.") sentences, the layer chosen by attribution patching, then the behaviour's
rate and the accuracy when the direction is added at each scale, against 20 random directions of
the same norm at the largest scales (`mechlens.studies.steering`).

    python experiments/steering.py [--quick] [--behaviours backtrack,hesitate]

Writes figures/steering/: attribution_by_layer, curve_<behaviour>, control_<behaviour> (each with
provenance), results.json and summary.json. Steps are cached, so a rerun resumes.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from mechlens import ReasoningTrace, format_prompt
from mechlens.models.sampling import Sampling
from mechlens.ops.stats import format_rate
from mechlens.organism import PlantingRates, held_out_problems, load_subject
from mechlens.organism.traces import arithmetic_trace, word_problems
from mechlens.plots import control_strip, mean_ci_lines
from mechlens.rollouts import engine_for
from mechlens.runs import Run, parse_config
from mechlens.studies import steering
from mechlens.text.answers import grade

DIRECTION_SEED = 4242
"""Seed of the generator problems whose traces give the directions (not the training seed)."""
DIRECTION_RATES = PlantingRates(slip=0.3, backtrack=1.0, hesitate=0.4)
"""Richer in the behaviours than the organism's own rates, so each label has enough sentences."""


def is_backtrack(sentence: str) -> bool:
    """A "Wait, ..." sentence: the correction of a slip, or the restart after a repaired plan."""
    return sentence.strip().startswith("Wait,")


def is_hesitate(sentence: str) -> bool:
    return sentence.strip().startswith("Hmm, let me re-check")


BEHAVIOURS = {"backtrack": is_backtrack, "hesitate": is_hesitate}


@dataclass
class SteeringConfig:
    model: str = "organism"  # the reasoning organism (its behaviours are planted and labelled)
    backend: Literal["transformer_lens", "nnsight"] = "transformer_lens"
    device: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # the directions and attribution
    engine: Literal["auto", "local", "shared-prefix"] = "auto"  # what samples under the steering
    # (`engine_for`): "auto" is the shared-prefix engine (bf16 where the CPU is fast at it), which
    # adds the direction itself; "local" samples with the hooked generate in --dtype
    behaviours: str = "backtrack,hesitate"
    n_direction_traces: int = 60
    n_prompts: int = 32  # held-out word problems steered
    n_samples: int = 1  # samples per prompt and scale
    scales: str = "-1.5,-1,-0.5,0,0.5,1,1.5"  # multiples of the difference-of-means direction (at
    # 4 the organism no longer writes sentences: the direction is 15-40% of the residual's norm)
    control_scales: str = "-1,1"  # where the random directions of the same norm are sampled
    n_random: int = 20
    max_new_tokens: int = 200
    temperature: float = 0.6
    top_p: float = 0.95
    batch_size: int = 48
    quick: bool = False
    out: str = "figures/steering"
    seed: int = 0

    def __post_init__(self):
        if self.quick:
            self.n_direction_traces, self.n_prompts, self.n_random = 24, 8, 5
            self.scales, self.max_new_tokens = "-1,0,1", 160
        if not set(float(x) for x in self.control_scales.split(",")) <= set(self.scale_list):
            raise ValueError(f"control_scales {self.control_scales} must be among scales {self.scales}")
        unknown = [b for b in self.behaviour_list if b not in BEHAVIOURS]
        if unknown:
            raise ValueError(f"behaviours must be among {list(BEHAVIOURS)}, got {unknown}")

    @property
    def behaviour_list(self) -> list[str]:
        return [b for b in self.behaviours.split(",") if b]

    @property
    def scale_list(self) -> list[float]:
        return [float(s) for s in self.scales.split(",")]


def direction_traces(model, cfg: SteeringConfig) -> tuple[list[ReasoningTrace], list[list[str]]]:
    """Generator traces of unseen problems, read by the model, with each sentence's behaviour."""
    rng = random.Random(cfg.seed)
    traces, labels = [], []
    for problem in word_problems(cfg.n_direction_traces, seed=DIRECTION_SEED + cfg.seed):
        planted = arithmetic_trace(problem, rng, DIRECTION_RATES)
        trace = ReasoningTrace.from_text(model, problem.question, planted.reply)
        texts = [s.text for s in trace.sentences]
        traces.append(trace)
        labels.append([next((b for b, test in BEHAVIOURS.items() if test(t)), "") for t in texts])
    return traces, labels


def curve_rows(curve: steering.SteeringCurve) -> dict:
    """The curve's counts and intervals, JSON-able (the texts left out)."""
    return {k: v for k, v in asdict(curve).items() if k != "texts"}


def main(cfg: SteeringConfig) -> dict:
    model = load_subject(cfg.model, cfg.backend, cfg.device, cfg.dtype)
    run = Run("steering", cfg, cfg.out, model=model, seed=cfg.seed, images=not cfg.quick)
    traces, labels = direction_traces(model, cfg)
    engine = engine_for(model, local=cfg.engine, batch_size=cfg.batch_size)

    def find() -> dict:
        found = steering.behaviour_directions(model, traces, labels)
        return {"labels": found.labels, "layers": found.layers, "directions": found.directions.tolist(),
                "counts": found.counts, "n_sentences": found.n_sentences,
                "attribution": found.attribution.tolist()}  # fmt: skip

    stored = run.cached("directions", find)
    found = steering.BehaviourDirections(
        stored["labels"], stored["layers"], torch.tensor(stored["directions"]), stored["counts"],
        stored["n_sentences"], torch.tensor(stored["attribution"]),
    )  # fmt: skip
    problems = held_out_problems(cfg.n_prompts, seed=cfg.seed)
    prompts = [format_prompt(model.tokenizer, p.question) for p in problems]
    sampling = Sampling(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                        n=cfg.n_samples, seed=cfg.seed)  # fmt: skip

    def graded(k: int, text: str) -> bool:
        return grade(text, problems[k].answer, problems[k].aliases).correct

    results: dict = {"counts": found.counts, "n_sentences": found.n_sentences, "behaviours": {}}
    attribution = {}
    for behaviour in cfg.behaviour_list:
        if behaviour not in found.labels:
            continue
        layer = found.best_layer(behaviour)
        direction = found.direction(behaviour, layer)
        attribution[behaviour] = found.attribution[found.labels.index(behaviour)].tolist()

        def measure(vector: torch.Tensor, scales: list[float], layer=layer, behaviour=behaviour) -> dict:
            test = BEHAVIOURS[behaviour]
            curve = steering.steering_curve(model, prompts, vector, layer, scales, test, grade=graded,
                                            sampling=sampling, batch_size=cfg.batch_size,
                                            engine=engine)  # fmt: skip
            return curve_rows(curve)

        curve = run.cached(
            f"curve_{behaviour}", lambda d=direction: measure(d, cfg.scale_list), behaviour=behaviour
        )
        ends = [float(x) for x in cfg.control_scales.split(",")]
        controls = []
        randoms = steering.random_directions(direction, cfg.n_random, seed=cfg.seed)
        for k in tqdm(range(cfg.n_random), desc=f"random directions ({behaviour})"):
            controls.append(
                run.cached(
                    f"random_{behaviour}",
                    lambda d=randoms[k], e=ends: measure(d, e),
                    behaviour=behaviour,
                    k=k,
                )
            )
        results["behaviours"][behaviour] = {
            "layer": layer, "direction_norm": float(direction.norm()), "curve": curve, "random": controls,
        }  # fmt: skip
        rates = {
            "with_behaviour": [100 * r[0] for r in curve["rate"]],
            "low": [100 * r[1] for r in curve["rate"]],
            "high": [100 * r[2] for r in curve["rate"]],
        }
        acc = [[100 * a[i] for a in curve["accuracy"]] for i in range(3)]
        fig = mean_ci_lines(
            curve["scales"],
            {f"replies with a {behaviour} sentence": (rates["with_behaviour"], rates["low"], rates["high"]),
             "right answers": (acc[0], acc[1], acc[2])},
            "steering scale (multiples of the difference-of-means direction)",
            "% of replies (95% Wilson interval)",
            title=f"Steering the {behaviour} direction at layer {layer} "
            f"({len(prompts)} problems x {cfg.n_samples} samples per scale)",
        )  # fmt: skip
        run.save_figure(
            fig, f"curve_{behaviour}", caption=f"Rate of {behaviour} sentences and accuracy by scale."
        )
        metrics = [f"scale {s:g}" for s in ends]
        control_values = {
            m: [100 * c["rate"][i][0] for c in controls] for i, m in enumerate(metrics)
        }  # fmt: skip
        observed = {
            f"{behaviour} direction": {
                m: tuple(100 * v for v in curve["rate"][curve["scales"].index(s)])
                for m, s in zip(metrics, ends, strict=True)
            },
            "no steering": {m: tuple(100 * v for v in curve["rate"][curve["scales"].index(0.0)])
                            for m in metrics} if 0.0 in curve["scales"] else {},
        }  # fmt: skip
        fig = control_strip(
            metrics, control_values, observed, f"% of replies with a {behaviour} sentence",
            title=f"The {behaviour} direction against {cfg.n_random} random directions of its norm",
        )  # fmt: skip
        run.save_figure(fig, f"control_{behaviour}", caption="Steering direction vs random directions.")
    fig = mean_ci_lines(
        found.layers,
        {b: (v, v, v) for b, v in attribution.items()},
        "layer", "d log p(behaviour sentences) / d scale, per sentence",
        title="Attribution patching of each direction: the layer is the maximum",
    )  # fmt: skip
    run.save_figure(
        fig, "attribution_by_layer", caption="Attribution score of each behaviour direction per layer."
    )
    results["attribution"] = attribution
    run.save_json("results.json", results)
    lines = [f"directions from {len(traces)} traces, {found.n_sentences} sentences: {found.counts}"]
    for behaviour, r in results["behaviours"].items():
        c = r["curve"]
        for s, k, n, right in zip(c["scales"], c["with_behaviour"], c["replies"], c["correct"], strict=True):
            lines.append(f"{behaviour} (layer {r['layer']}) scale {s:+g}: replies with it "
                         f"{format_rate(k, n)}; right {format_rate(right, n)}")  # fmt: skip
        for i, s in enumerate(float(x) for x in cfg.control_scales.split(",")):
            values = sorted(x["rate"][i][0] for x in r["random"])
            lines.append(f"  random directions at scale {s:+g}: rate median {np.median(values):.2f}, "
                         f"range {values[0]:.2f}-{values[-1]:.2f} (n={len(values)})")  # fmt: skip
    run.summarize("Steering reasoning behaviours", lines)
    return results


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    np.seterr(all="ignore")
    main(parse_config(SteeringConfig, description=__doc__))
