"""The refusal-cliff study of one model, as the experiment runs it ("Refusal Falls off a Cliff").

`prompt_sets` draws the instruction sets from the bundled refusal dataset. `analyze` samples the
model's replies to them and trains the refusal probe on its own replies (harmful refused = 1,
harmless answered = 0). It scores every position of every trace, measures the cliffs, ranks the
refusal-suppression heads and ablates them against random head sets of the same size. Given
`judge`, it also runs Cliff-as-a-Judge. It returns a `RefusalStudy`.

Example (minutes on 2 cores with the reasoning organism; a model that never refuses raises):
    >>> import mechlens as ml
    >>> model = ml.organism.load_subject("organism")                        # doctest: +SKIP
    >>> study = ml.refusal.analyze(model, ml.refusal.prompt_sets(12, 8, 8))  # doctest: +SKIP
    >>> print("\\n".join(study.summary_lines()))                            # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from scipy.stats import binomtest
from torch import Tensor
from tqdm.auto import tqdm

from mechlens import datasets
from mechlens.cache import DiskCache, model_fingerprint
from mechlens.models.sampling import Sampling
from mechlens.ops.heads import direct_head_scores, head_ablation_effects
from mechlens.ops.probes import LinearProbe, ProbeSweep, probe_sweep
from mechlens.ops.stats import auroc, auroc_interval, format_rate, mcnemar, spearman
from mechlens.rollouts import Engine
from mechlens.studies.recovery import head_recovery
from mechlens.studies.refusal import cliff_as_judge
from mechlens.studies.refusal.cliffs import Cliff, cliff_metrics
from mechlens.studies.refusal.heads import answer_perplexity, random_head_sets, top_heads
from mechlens.studies.refusal.replies import REPLY_SAMPLING, Reply, refusal_rates, sample_replies_by_set
from mechlens.studies.refusal.scores import refusal_features, refusal_scores, thinking_span

if TYPE_CHECKING:
    from mechlens.models.hooked import HookedModel

PROMPT_SETS = ("probe harmful", "probe harmless", "harmful", "harmless", "jailbreak", "candidates")
"""The instruction sets `analyze` needs: the probe's training sets (train split), the test sets
(test split; "jailbreak" wraps the harmful test requests), and the Cliff-as-a-Judge pool
("candidates": jailbreak-wrapped harmful train-split requests)."""

GROUPS = ("harmful, refused", "harmful, complied", "harmless")
"""The trace groups whose refusal-score curves and cliffs are compared."""

HeadRanking = Literal["direct", "exact", "attribution"]
EVAL_SETS = ("harmful", "jailbreak", "harmless")


def prompt_sets(n_probe: int = 60, n_test: int = 40, n_candidates: int = 120) -> dict[str, list[str]]:
    """The six instruction sets of `PROMPT_SETS` from `datasets.load("refusal")`: `n_probe` per
    class for the probe, `n_test` per class (and as many jailbreak-wrapped) for the tests, and
    `n_candidates` jailbreak-wrapped harmful requests (cycling through the train split).

        >>> sets = prompt_sets(2, 3, 4)
        >>> [len(v) for v in sets.values()]
        [2, 2, 3, 3, 3, 4]
    """
    for name, n in (("n_probe", n_probe), ("n_test", n_test), ("n_candidates", n_candidates)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be an int >= 1, got {n!r}")
    data = [i for i in datasets.load("refusal") if isinstance(i, datasets.Instruction)]

    def pick(harmful: bool, split: str, n: int | None = None) -> list[str]:
        return [i.text for i in data if i.harmful == harmful and i.split == split][:n]

    train_harmful = pick(True, "train")
    return {
        "probe harmful": pick(True, "train", n_probe),
        "probe harmless": pick(False, "train", n_probe),
        "harmful": pick(True, "test", n_test),
        "harmless": pick(False, "test", n_test),
        "jailbreak": [datasets.jailbreak(t, i) for i, t in enumerate(pick(True, "test", n_test))],
        "candidates": [
            datasets.jailbreak(train_harmful[i % len(train_harmful)], i) for i in range(n_candidates)
        ],
    }


@dataclass(frozen=True)
class JudgeSettings:
    """Cliff-as-a-Judge's fine-tunes: each selection (cliff, random, all) is fine-tuned `draws`
    times from a fresh copy of the model at `model_path`, fine-tune seed k for draw k (the random
    selection is redrawn with it too), so that each selection's rate is a distribution.
    The paper's selection keeps the `fraction` of complied candidates with the lowest final
    refusal score (`cliff_as_judge.selections`)."""

    model_path: str | Path
    fraction: float = 0.25
    epochs: int = 3
    train_layers: int = 8
    lr: float = 1e-4
    draws: int = 5
    backend: str = "transformer_lens"

    def __post_init__(self):
        if not isinstance(self.model_path, str | Path) or not str(self.model_path):
            raise TypeError(f"model_path must be a folder (str or Path), got {self.model_path!r}")
        if (
            isinstance(self.fraction, bool)
            or not isinstance(self.fraction, int | float)
            or not 0 < self.fraction <= 1
        ):
            raise ValueError(f"fraction must be a number in (0, 1], got {self.fraction!r}")
        for name in ("epochs", "train_layers", "draws"):
            _count(name, getattr(self, name))
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")


@dataclass
class HeadStudy:
    """Refusal-suppression heads: scores `[layers, heads]` by each ranking (larger = more
    suppressing), the `top` heads by the chosen one, and the ablation of those heads against
    `random_sets` of as many heads (the control distribution)."""

    scores: dict[str, Tensor]
    ranking: str
    rescale: str | None  # the ablation: "norm" keeps each sequence's attention-output norm
    top: list[tuple[int, int]]
    top_by_method: dict[str, list[tuple[int, int]]]
    agreement: dict[str, dict[str, float]]  # "a vs b" -> top-k overlap and Spearman over heads
    rates: dict[str, dict]  # refusal_rates with the top heads ablated
    random_sets: list[list[tuple[int, int]]]
    random_rates: dict[str, list[float]]  # rate name -> one value per random set
    percentile: dict[str, float]  # where the top heads' rate falls among the random sets (0-100, ties half)
    paired: dict[str, dict]  # set -> McNemar of refused without vs with the ablation, same prompts
    perplexity: dict[str, Any]  # harmless replies' perplexity: none, top heads, random heads
    sweep_examples: int
    # `known_heads` (e.g. planted ones): each ranking's recovery of them (`head_recovery`), and
    # their own ablation: rates, percentile among the random sets, McNemar against none
    known: dict[str, Any] | None = None


@dataclass
class RefusalStudy:
    """Everything the refusal-cliff study measures on one model."""

    replies: dict[str, list[Reply]]  # prompt set -> one reply per instruction
    rates: dict[str, dict]  # `refusal_rates(replies)`, each with its n and Wilson interval
    probe: LinearProbe  # fitted on the last layer
    probe_by_layer: ProbeSweep
    probe_per_class: int
    probe_auroc: dict[str, float] | None  # held out: auroc, low, high, n_refused, n_answered; None: one class
    jailbreak_auroc: dict[str, float] | None  # out of distribution; None unless both outcomes occur
    groups: dict[str, list[Reply]]  # GROUPS -> replies
    curves: dict[str, list[Tensor]]  # GROUPS -> the refusal score at every position, [pos_i] each
    cliffs: dict[str, list[Cliff]]
    heads: HeadStudy
    judge: dict[str, list[dict]] = field(default_factory=dict)  # selection -> one result per draw

    def judge_comparison(self, a: str = "cliff", b: str = "random") -> dict | None:
        """Cliff-as-a-Judge's selection `a` against `b` (name prefixes) on jailbreak attack
        success: the draws where `a` is lower, tied or higher, the exact sign test over the draws,
        and per draw the McNemar test on the same prompts. None without both selections."""
        names = {p: next((k for k in self.judge if k.startswith(p)), None) for p in (a, b)}
        if None in names.values():
            return None
        runs_a, runs_b = self.judge[names[a]], self.judge[names[b]]  # type: ignore[index]
        rate = lambda r: r["rates"]["jailbreak: attack success"]["rate"]  # noqa: E731
        diff = np.array([rate(x) - rate(y) for x, y in zip(runs_a, runs_b, strict=True)])
        lower, higher = int((diff < 0).sum()), int((diff > 0).sum())
        return {
            "a": names[a],
            "b": names[b],
            "draws": len(diff),
            "lower": lower,
            "tied": int((diff == 0).sum()),
            "higher": higher,
            "mean_difference": float(diff.mean()),
            "sign_p": float(binomtest(lower, lower + higher).pvalue) if lower + higher else float("nan"),
            "mcnemar": [
                mcnemar(x["refused"]["jailbreak"], y["refused"]["jailbreak"])
                for x, y in zip(runs_a, runs_b, strict=True)
            ],
        }

    def summary_lines(self) -> list[str]:
        """The headline results, one line each with its n and interval."""
        lines = [f"model, {k}: {format_rate(int(v['count']), int(v['n']))}" for k, v in self.rates.items()]
        for name, a in (
            ("held-out", self.probe_auroc),
            ("jailbreak (out of distribution)", self.jailbreak_auroc),
        ):
            if a is not None:
                lines.append(
                    f"refusal probe, {name} AUROC {a['auroc']:.2f} (95% CI {a['low']:.2f}-{a['high']:.2f}; "
                    f"{a['n_refused']:.0f} refused vs {a['n_answered']:.0f} not)"
                )
        h, k = self.heads, len(self.heads.top)
        for c, values in h.random_rates.items():
            lines.append(
                f"top {k} heads ablated, {c}: {format_rate(int(h.rates[c]['count']), int(h.rates[c]['n']))}; "
                f"percentile {h.percentile[c]:.0f} among {len(values)} random sets of as many heads"
            )
        for name, m in h.paired.items():
            test = (
                f"exact McNemar p = {m['p']:.2g}"
                if m["only_a"] + m["only_b"]
                else "no discordant prompt: no test"
            )
            lines.append(
                f"top {k} heads ablated, {name}: of {m['n']} prompts, {m['only_a']} refused only without the "
                f"ablation, {m['only_b']} only with it ({test})"
            )
        if h.known is not None:
            for method, r in h.known["recovery"].items():
                lines.append(
                    f"known heads among the top {r['top']} by {method}: {r['found']} of {r['planted']} "
                    f"(chance {r['chance']:.2f}, hypergeometric p = {r['p']:.2g}; {r['in_pool']} of the top "
                    f"in their layers, where chance is {r['chance_in_pool']:.2f}, p = {r['p_in_pool']:.2g}); "
                    f"ranks {r['ranks']}"
                )
            for c, rate in h.known["rates"].items():
                where = (
                    f"percentile {h.known['percentile'][c]:.0f} among {len(h.random_rates[c])} random sets"
                    if h.known["percentile"] is not None and c in h.random_rates
                    else "no random sets of its size"
                )
                lines.append(
                    f"known {len(h.known['heads'])} heads ablated, {c}: "
                    f"{format_rate(int(rate['count']), int(rate['n']))}; {where}"
                )
        c = "jailbreak: attack success"
        for name, runs in self.judge.items():
            values = [r["rates"][c]["rate"] for r in runs]
            first = format_rate(int(runs[0]["rates"][c]["count"]), int(runs[0]["rates"][c]["n"]))
            lines.append(
                f"Cliff-as-a-Judge, {name}, {c}: mean {np.mean(values):.2f} over {len(runs)} draw(s) "
                f"(range {min(values):.2f}-{max(values):.2f}; draw 0: {first})"
            )
        cmp = self.judge_comparison()
        if cmp:
            test = f"sign test p = {cmp['sign_p']:.2g}" if cmp["lower"] + cmp["higher"] else "no test"
            lines.append(
                f"Cliff-as-a-Judge, cliff vs random: lower attack success in {cmp['lower']}, "
                f"tied {cmp['tied']}, higher {cmp['higher']} of {cmp['draws']} paired draws ({test})"
            )
        return lines

    def to_json(self) -> dict:
        """The results as a JSON-able dict (the replies and curves left out)."""
        summary = {
            g: {
                "n": len(c),
                **{
                    f"{m}_mean": float(np.mean([getattr(x, m) for x in c])) if c else None
                    for m in ("cliff", "plateau", "final")
                },
                "cliff_sd": float(np.std([x.cliff for x in c])) if c else None,
            }
            for g, c in self.cliffs.items()
        }
        heads = {k: v for k, v in asdict(self.heads).items() if k != "scores"}
        heads["scores"] = {k: v.tolist() for k, v in self.heads.scores.items()}
        heads["n_ablated"] = len(self.heads.top)
        return {
            "rates": self.rates,
            "probe": {
                "train_per_class": self.probe_per_class,
                "auroc_by_layer": self.probe_by_layer.auroc.tolist(),
                "best_layer": self.probe_by_layer.best_layer,
                "held_out": self.probe_auroc,
                "jailbreak_ood": self.jailbreak_auroc,
            },
            "cliffs": summary,
            "heads": heads,
            "cliff_as_a_judge": {
                name: [{k: v for k, v in r.items() if k != "refused"} for r in runs]
                for name, runs in self.judge.items()
            },
            "cliff_as_a_judge_cliff_vs_random": self.judge_comparison(),
        }


def _auroc_with_ci(scores: Sequence[float], labels: Sequence[int], seed: int) -> dict[str, float] | None:
    """The AUROC with its bootstrap interval and n; None (undefined) unless both labels occur."""
    if not 0 < sum(labels) < len(labels):
        return None
    low, high = auroc_interval(scores, labels, seed=seed)
    n_pos = int(sum(labels))
    return {
        "auroc": auroc(scores, labels),
        "low": low,
        "high": high,
        "n_refused": n_pos,
        "n_answered": len(labels) - n_pos,
    }


def _count(name: str, value: object, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _check_options(
    prompts, head_ranking, rescale, control_sets, head_fraction, counts: dict[str, int]
) -> None:
    if not isinstance(prompts, dict) or set(PROMPT_SETS) - set(prompts):
        raise ValueError(f"prompts must be a dict with the sets {list(PROMPT_SETS)} (see prompt_sets)")
    for name in PROMPT_SETS:
        texts = prompts[name]
        if isinstance(texts, str) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ValueError(f"prompts[{name!r}] must be a non-empty list of non-empty strings")
    if head_ranking not in ("direct", "exact", "attribution"):
        raise ValueError(f"head_ranking must be 'direct', 'exact' or 'attribution', got {head_ranking!r}")
    if rescale not in ("norm", None):
        raise ValueError(f"rescale must be 'norm' or None, got {rescale!r}")
    unknown = set(control_sets) - set(EVAL_SETS)
    if isinstance(control_sets, str) or unknown or not control_sets:
        raise ValueError(f"control_sets must be a non-empty list of {list(EVAL_SETS)}, got {control_sets!r}")
    if (
        isinstance(head_fraction, bool)
        or not isinstance(head_fraction, int | float)
        or not 0 < head_fraction <= 1
    ):
        raise ValueError(f"head_fraction must be a number in (0, 1], got {head_fraction!r}")
    for name, value in counts.items():
        _count(name, value)


def analyze(
    model: HookedModel,
    prompts: dict[str, list[str]],
    sampling: Sampling = REPLY_SAMPLING,
    k_end: int = 5,
    sweep_examples: int = 6,
    head_fraction: float = 0.03,
    head_ranking: HeadRanking = "direct",
    rescale: Literal["norm"] | None = "norm",
    random_sets: int = 20,
    control_sets: Sequence[str] = ("jailbreak",),
    known_heads: Sequence[tuple[int, int]] | None = None,
    judge: JudgeSettings | None = None,
    batch_size: int = 16,
    seed: int = 0,
    cache: DiskCache | str | Path | bool | None = True,
    engine: Engine | None = None,
    progress: bool = True,
) -> RefusalStudy:
    """The refusal-cliff study of `model` on `prompts` (`prompt_sets`).

    Defaults follow the authors' code (MikaStars39/RefusalCliff): heads are ranked by their direct
    write against the refusal direction at the last thinking token (`head_ranking="direct"`; the
    exact ablation effect and attribution patching on the rise of the refusal score over the last
    `k_end` tokens are computed beside it), `head_fraction` 3% of all heads are ablated with their
    output norm kept (`rescale="norm"`). The replies use `sampling` (the experiment passes the
    authors' temperature 0.7), seeded per prompt; `engine` samples them (default `LocalEngine`),
    except the replies with heads ablated: only the model's own engine samples through its hooks.

    `random_sets` random head sets of the same size, sampled on `control_sets`, are the null of
    the ablation; the same prompts with and without the ablation give a paired McNemar test.
    `known_heads` (a set planted or hypothesised) is ablated the same way, and each ranking's top
    heads are scored against it (`studies.recovery.head_recovery`). `judge` runs Cliff-as-a-Judge
    (`JudgeSettings`; None skips it). `cache` stores every expensive step under its inputs and the
    model's weights (True: the mechlens cache folder).
    Raises `ValueError` when fewer than 4 harmful probe requests are refused, or as many harmless
    ones answered: the probe needs both classes.
    """
    counts = {
        "k_end": k_end,
        "random_sets": random_sets,
        "sweep_examples": sweep_examples,
        "batch_size": batch_size,
    }
    _check_options(prompts, head_ranking, rescale, control_sets, head_fraction, counts)
    if known_heads is not None:
        known_heads = list(known_heads)  # an iterator is read once
        model.check_heads(known_heads)  # raises naming a malformed or out-of-range head
    store = DiskCache.of(cache, "refusal")
    base_key = {"model": model_fingerprint(model), "seed": seed}
    engine_key = engine.describe() if engine is not None else None

    def cached(step: str, compute, **key):
        return store.cached(step, compute, **base_key, **key) if store else compute()

    def replies(
        sets: dict[str, list[str]], heads: Sequence[tuple[int, int]] = (), local: bool = False
    ) -> dict[str, list[Reply]]:
        use = None if heads or local else engine  # ablated replies need the model's own hooks

        def compute():
            with model.ablate_heads(list(heads), rescale=rescale) if heads else contextlib.nullcontext():
                rows = sample_replies_by_set(model, sets, sampling, batch_size, use)
            return {k: [asdict(r) for r in v] for k, v in rows.items()}

        rows = cached(
            "replies",
            compute,
            sets=sets,
            sampling=sampling,
            heads=list(heads),
            rescale=rescale if heads else None,
            engine=engine_key if use is not None else None,
        )
        return {k: [Reply(**r) for r in v] for k, v in rows.items()}

    rolls = replies({k: list(prompts[k]) for k in PROMPT_SETS})
    rates = refusal_rates(rolls)

    # ---- the probe: the model's own replies, harmful refused = 1, harmless answered = 0, balanced
    pos = [r for r in rolls["probe harmful"] if r.refused]
    neg = [r for r in rolls["probe harmless"] if not r.refused]
    n = min(len(pos), len(neg))
    if n < 4:
        raise ValueError(
            f"too few labelled replies for the probe: {len(pos)} harmful refused, {len(neg)} harmless "
            "answered (need 4 each); give more prompts or a model that refuses"
        )
    texts = [r.probe_text for r in pos[:n] + neg[:n]]
    labels = [1] * n + [0] * n
    layers = list(range(model.n_layers))
    feats = cached(
        "probe features", lambda: refusal_features(model, texts, layers, progress=False), texts=texts
    )
    sweep = probe_sweep(feats, labels, seed=seed)  # feats [layers, 2n, d]
    probe = LinearProbe(seed=seed).fit(feats[-1], torch.tensor(labels))
    final: dict[str, float] = {}  # probe text -> refusal score at its last token

    def final_scores(rows: list[Reply]) -> list[float]:
        missing = list(dict.fromkeys(r.probe_text for r in rows if r.probe_text not in final))
        if missing:
            scores = probe.predict_proba(refusal_features(model, missing, progress=False)[0])
            final.update(zip(missing, scores.tolist(), strict=True))
        return [final[r.probe_text] for r in rows]

    test = [r for r in rolls["harmful"] if r.refused] + [r for r in rolls["harmless"] if not r.refused]
    test_y = [int(r.refused) for r in test]
    probe_auroc = _auroc_with_ci(final_scores(test), test_y, seed)
    jb_y = [int(r.refused) for r in rolls["jailbreak"]]
    jailbreak_auroc = (
        _auroc_with_ci(final_scores(rolls["jailbreak"]), jb_y, seed) if 0 < sum(jb_y) < len(jb_y) else None
    )

    # ---- the refusal score at every position, and the cliffs
    harmful = rolls["harmful"] + rolls["jailbreak"]
    groups = {
        "harmful, refused": [r for r in harmful if r.refused],
        "harmful, complied": [r for r in harmful if not r.refused],
        "harmless": [r for r in rolls["harmless"] if not r.refused],
    }
    curves: dict[str, list[Tensor]] = {}
    cliffs: dict[str, list[Cliff]] = {}
    for group, rows in groups.items():
        group_texts = [r.probe_text for r in rows]
        curves[group] = (
            cached(
                "scores", lambda t=group_texts: refusal_scores(model, probe, t, progress=False),
                texts=group_texts, probe=probe.direction,
            )
            if rows
            else []
        )  # fmt: skip
        spans = [thinking_span(model.tokenizer, r) for r in rows]
        cliffs[group] = [cliff_metrics(s, t, k_end) for s, t in zip(curves[group], spans, strict=True)]

    heads = _head_study(
        model, rolls, groups, probe, replies, cached, k_end, sweep_examples, head_fraction, head_ranking,
        rescale, random_sets, control_sets, {s: list(prompts[s]) for s in EVAL_SETS}, seed, progress,
        engine is not None, known_heads,
    )  # fmt: skip
    study = RefusalStudy(
        rolls, rates, probe, sweep, n, probe_auroc, jailbreak_auroc, groups, curves, cliffs, heads
    )
    if judge is not None:
        candidates = [r for r in rolls["candidates"] if not r.refused]
        if len(candidates) >= 2:
            study.judge = _judge(
                judge, candidates, final_scores(candidates), rolls, prompts, sampling, cached, seed
            )
        else:
            warnings.warn(
                f"Cliff-as-a-Judge skipped: {len(candidates)} of {len(rolls['candidates'])} candidates "
                "complied (it needs 2); give more candidates",
                stacklevel=2,
            )
    return study


def _head_study(
    model, rolls, groups, probe, replies, cached, k_end, sweep_examples, head_fraction, ranking, rescale,
    random_sets, control_sets, eval_sets, seed, progress, external, known_heads,
) -> HeadStudy:  # fmt: skip
    """Rank heads on complied replies (refused ones when none complied), ablate the top ones
    against random sets of as many heads (and the known heads, when given)."""
    complied = [r for r in rolls["candidates"] + rolls["jailbreak"] if not r.refused]
    rows = complied[:sweep_examples] or groups["harmful, refused"][:sweep_examples]
    toks, mask = model.tokenize([r.probe_text for r in rows])

    def metric(hidden: Tensor) -> Tensor:  # [batch, pos, d] -> [batch]
        return probe.decision_function(hidden[:, -k_end:]).mean(-1)

    key = dict(texts=[r.probe_text for r in rows], probe=probe.direction, k=k_end)
    scores = {
        method: cached(
            f"head {method}",
            lambda method=method: head_ablation_effects(
                model, toks, metric, method=method, attention_mask=mask, on="hidden"
            ),
            **key,
        )
        for method in ("exact", "attribution")
    }
    scores["direct"] = cached(
        "head direct",
        lambda: -direct_head_scores(model, toks, probe.direction, positions=(-1,), attention_mask=mask),
        **key,
    )  # negated: larger = more refusal-suppressing, as the other two
    n_heads = max(1, round(head_fraction * model.n_layers * model.n_heads))
    ranked = {method: top_heads(s, n_heads) for method, s in scores.items()}
    top = ranked[ranking]
    agreement = {
        f"{a} vs {b}": {
            f"top{n_heads}_overlap": len(set(ranked[a]) & set(ranked[b])),
            "spearman": spearman(scores[a].flatten().numpy(), scores[b].flatten().numpy())[0],
        }
        for a, b in (("direct", "exact"), ("direct", "attribution"), ("exact", "attribution"))
    }
    controls = random_head_sets(scores["exact"].shape, n_heads, random_sets, exclude=top, seed=seed)
    top_replies = replies(eval_sets, top)
    top_rates = refusal_rates(top_replies)
    # the paired test compares one sampler with and without the ablation: the model's own engine
    # (when the study samples elsewhere, the un-ablated sets are sampled here once more)
    base = replies(eval_sets, local=True) if external else rolls
    paired = {
        s: mcnemar([r.refused for r in base[s]], [r.refused for r in top_replies[s]]) for s in eval_sets
    }
    control_eval = {s: eval_sets[s] for s in control_sets}
    drawn = [
        refusal_rates(replies(control_eval, h))
        for h in tqdm(controls, desc="random heads", disable=not progress)
    ]
    random_rates = {c: [r[c]["rate"] for r in drawn] for c in drawn[0]}
    percentile = {c: _percentile(v, top_rates[c]["rate"]) for c, v in random_rates.items()}
    harmless = groups["harmless"]

    def perplexity(heads) -> float:
        if not harmless:
            return float("nan")
        return cached(
            "perplexity", lambda: answer_perplexity(model, harmless, heads, rescale=rescale),
            heads=list(heads), rescale=rescale if heads else None, texts=[r.probe_text for r in harmless],
        )  # fmt: skip

    ppl = {
        "none": perplexity(()),
        "top heads": perplexity(top),
        "random heads": [perplexity(h) for h in controls],
    }
    known = None
    if known_heads is not None:
        heads_known = sorted({(int(a), int(b)) for a, b in known_heads})
        known_replies = replies(eval_sets, heads_known)
        known_rates = refusal_rates(known_replies)
        span = range(heads_known[0][0], max(a for a, _ in heads_known) + 1)  # the layers they occupy
        known = {
            "heads": heads_known,
            "recovery": {
                m: head_recovery(v.numpy(), heads_known, n_heads, pool_layers=span) for m, v in scores.items()
            },
            "rates": known_rates,
            # the random sets are the null only for a known set of their size
            "percentile": {c: _percentile(v, known_rates[c]["rate"]) for c, v in random_rates.items()}
            if len(heads_known) == n_heads
            else None,
            "paired": {
                s: mcnemar([r.refused for r in base[s]], [r.refused for r in known_replies[s]])
                for s in eval_sets
            },
        }
    return HeadStudy(
        scores,
        ranking,
        rescale,
        top,
        ranked,
        agreement,
        top_rates,
        controls,
        random_rates,
        percentile,
        paired,
        ppl,
        len(rows),
        known,
    )


def _percentile(values: Sequence[float], rate: float) -> float:
    """Mid-rank percentile of `rate` among `values` (0-100): values below count fully, ties half."""
    v = np.asarray(values, dtype=float)
    return 100 * float(np.mean(v < rate) + np.mean(v == rate) / 2)


def _judge(
    settings: JudgeSettings, candidates, finals, rolls, prompts, sampling, cached, seed
) -> dict[str, list[dict]]:
    """Each Cliff-as-a-Judge selection fine-tuned `settings.draws` times (draw k: seed + k)."""
    replay = [r for r in rolls["probe harmless"] if not r.refused]  # keeps the answers to harmless requests
    eval_sets = {s: list(prompts[s]) for s in ("jailbreak", "harmless")}
    out: dict[str, list[dict]] = {}
    for k in range(settings.draws):
        for name, chosen in cliff_as_judge.selections(
            candidates, finals, settings.fraction, seed + k
        ).items():
            out.setdefault(name, []).append(
                cached(
                    "judge",
                    lambda chosen=chosen, k=k: cliff_as_judge.safety_finetune(
                        settings.model_path,
                        chosen,
                        replay,
                        eval_sets,
                        settings.backend,
                        settings.train_layers,
                        settings.epochs,
                        settings.lr,
                        seed + k,
                        sampling,
                    ),
                    chosen=[r.probe_text for r in chosen],
                    replay=[r.probe_text for r in replay],
                    settings={**asdict(settings), "model_path": str(settings.model_path), "draws": None},
                    sampling=sampling,
                    eval=eval_sets,
                    draw=k,
                )  # fmt: skip
            )
    return out
