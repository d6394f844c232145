"""Each method in bfloat16 agrees with float32 on a tiny model, within a stated tolerance.

The tolerances are about 3-4 times the differences observed on tiny-llama (both backends give
the same numbers); `benchmarks/bf16.py` measures the same methods on the embedded model, where
the docstrings state the differences.
"""

from __future__ import annotations

import random

import pytest
import torch

import mechlens as ml
from mechlens.ops.heads import direct_head_scores, head_ablation_effects
from mechlens.ops.probes import LinearProbe, collect_activations, probe_sweep
from mechlens.ops.stats import auroc, spearman
from mechlens.studies.anchors import suppression_matrix
from mechlens.studies.depth import reasoning_score

TEXT = (
    "First, add 2 and 3.\n\nThat gives 5. Then double it.\n\nSo 5 times 2 is 10.\n\n"
    "Wait, check: 10 is right.\n\nThe answer is 10."
)
PROMPTS = ["a short one", "and a longer second prompt", "third text here!"]  # left-padded


@pytest.fixture
def models(backend) -> dict[str, object]:
    pair = {
        "fp32": ml.load_model("tiny-llama", backend=backend, dtype=torch.float32),
        "bf16": ml.load_model("tiny-llama", backend=backend, dtype=torch.bfloat16),
    }
    assert pair["bf16"].dtype is torch.bfloat16 and pair["fp32"].dtype is torch.float32
    return pair


def both(models, fn) -> tuple[torch.Tensor, torch.Tensor]:
    return fn(models["fp32"]), fn(models["bf16"])


def max_diff(ref: torch.Tensor, low: torch.Tensor) -> float:
    """Largest absolute difference; both sides NaN at the same entries."""
    assert torch.equal(ref.isnan(), low.isnan())
    ok = ~ref.isnan()
    return float((ref[ok].double() - low[ok].double()).abs().max())


def rank_agreement(ref: torch.Tensor, low: torch.Tensor) -> float:
    return spearman(ref.flatten().numpy(), low.flatten().numpy())[0]


def test_direct_head_scores(models):
    direction = torch.linspace(-1, 1, models["fp32"].d_model)

    def scores(model):
        ids, mask = model.tokenize(PROMPTS)
        return direct_head_scores(model, ids, direction, attention_mask=mask)

    ref, low = both(models, scores)
    assert ref.abs().max() > 0.1  # the heads write along the direction at all
    assert max_diff(ref, low) < 0.01  # observed 0.0016 (scores up to 0.32)
    assert rank_agreement(ref, low) > 0.98  # observed 1.0


@pytest.mark.parametrize(
    ("method", "on", "tolerance", "min_rho"),
    [
        ("exact", "logits", 0.06, 0.95),  # observed 0.015 (effects up to 0.98), Spearman 0.984
        ("attribution", "logits", 0.04, 0.98),  # observed 0.0099 (up to 0.54), Spearman 1.0
        ("exact", "hidden", 0.02, 0.98),  # observed 0.0048 (up to 0.28), Spearman 1.0
    ],
)
def test_head_ablation_effects(models, method, on, tolerance, min_rho):
    direction = torch.linspace(-1, 1, models["fp32"].d_model)

    def metric(out: torch.Tensor) -> torch.Tensor:
        if on == "hidden":  # a probe-like read of the last two positions, as the refusal experiment
            return (out[:, -2:].float() @ direction).mean(-1) / 10
        return out[:, -1].float().log_softmax(-1)[:, 7]

    def effects(model):
        ids, mask = model.tokenize(PROMPTS)
        return head_ablation_effects(model, ids, metric, method, attention_mask=mask, on=on, progress=False)

    ref, low = both(models, effects)
    assert ref.abs().max() > 0.1
    assert max_diff(ref, low) < tolerance
    assert rank_agreement(ref, low) > min_rho


@pytest.mark.parametrize(
    ("kl", "tolerance"),
    [("full", 0.07), ("authors", 0.25)],  # observed 0.017 and 0.070 in log-KL (up to 4.1 and 18.7)
)
def test_suppression_matrix(models, kl, tolerance):
    def matrix(model):
        trace = ml.ReasoningTrace.from_text(model, "What is 2+3, doubled?", TEXT)
        return suppression_matrix(model, trace, kl=kl)

    ref, low = both(models, matrix)
    assert (~ref.isnan()).sum() == 10  # 5 sentences
    assert max_diff(ref, low) < tolerance
    assert rank_agreement(ref, low) > 0.9  # observed 0.976 (full: two neighbours swap) and 1.0


def test_probe_scores(models):
    rng = random.Random(0)
    words = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "rock", "fish"]
    texts = [" ".join(rng.choice(words) for _ in range(6)) for _ in range(80)]
    y = torch.tensor([int(t.count("cat") + t.count("dog") > t.count("sun") + t.count("moon")) for t in texts])
    ref, low = both(models, lambda m: collect_activations(m, texts, positions="mean", progress=False))
    assert low.dtype is torch.float32  # activations come back in float32 from either model
    assert float((ref - low).norm() / ref.norm()) < 0.03  # observed 0.0099
    sweeps = [probe_sweep(acts, y, seed=0).auroc for acts in (ref, low)]
    assert 0.6 < sweeps[0].max() < 0.95  # a task the probe neither fails nor saturates
    assert abs(sweeps[0] - sweeps[1]).max() <= 0.05  # observed 0 (AUROC 0.55, 0.77, 0.71 per layer)
    train = torch.arange(len(texts)) % 4 != 3
    probes = [LinearProbe(seed=0).fit(acts[-1, train], y[train]) for acts in (ref, low)]
    p_ref, p_low = (p.predict_proba(a[-1, ~train]) for p, a in zip(probes, (ref, low), strict=True))
    assert max_diff(p_ref, p_low) < 0.06  # observed 0.019
    held = y[~train].numpy()
    assert abs(auroc(p_ref.numpy(), held) - auroc(p_low.numpy(), held)) <= 0.05  # observed 0 (0.857)


def test_reasoning_score(models):
    def score(model):
        trace = ml.ReasoningTrace.from_text(model, "What is 2+3, doubled?", TEXT)
        return reasoning_score(model, trace)

    ref, low = both(models, score)
    assert len(ref.step_scores) == 5
    assert max_diff(ref.step_scores, low.step_scores) < 1e-3  # observed 1.8e-4 (scores up to 0.049)
    assert max_diff(ref.token_scores, low.token_scores) < 5e-3  # observed 9.8e-4 (up to 0.077)
    assert rank_agreement(ref.step_scores, low.step_scores) > 0.95  # observed 1.0
