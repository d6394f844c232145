"""Controls: the permutation null of the resampling KL against the exact small-sample bias, the
bias-corrected KL, and McNemar's test against scipy on fixed tables."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from scipy.stats import binom, binomtest, sem

from mechlens.ops.stats import mcnemar, mean_record, permutation_null
from mechlens.studies.anchors.resampling import Resampling, Rollout, answer_kl


def exact_mean_kl(n: int, accuracy: float, alpha: float = 1.0) -> float:
    """E[answer_kl] of two independent samples of n answers, right ("7") with prob. `accuracy` else
    one wrong value ("8"): every pair of counts enumerated."""
    total = 0.0
    for ka in range(n + 1):
        for kb in range(n + 1):
            a = {k: v for k, v in {"7": ka, "8": n - ka}.items() if v}
            b = {k: v for k, v in {"7": kb, "8": n - kb}.items() if v}
            total += binom.pmf(ka, n, accuracy) * binom.pmf(kb, n, accuracy) * answer_kl(a, b, alpha)
    return total


def test_the_bias_of_the_smoothed_kl_at_8_rollouts():
    # two samples of one distribution, alpha = 1: 0.09, 0.09, 0.08, 0.05 nats at these accuracies
    got = [round(exact_mean_kl(8, acc), 2) for acc in (0.5, 0.6, 0.75, 0.9)]
    assert got == [0.09, 0.09, 0.08, 0.05]


@pytest.mark.parametrize("accuracy", [0.5, 0.75])
def test_permutation_null_equals_the_exact_bias(accuracy):
    rng = np.random.default_rng(0)
    kl = lambda x, y: answer_kl(Counter(x), Counter(y), 1.0)  # noqa: E731
    means = []
    for d in range(300):  # datasets drawn with no change between the two sides
        a = ["7" if u < accuracy else "8" for u in rng.random(8)]
        b = ["7" if u < accuracy else "8" for u in rng.random(8)]
        means.append(permutation_null(a, b, kl, draws=60, seed=d).mean())
    exact = exact_mean_kl(8, accuracy)
    assert abs(np.mean(means) - exact) < 4 * np.std(means) / np.sqrt(len(means)) + 0.005


def rollouts(position: int, answers: list[str]) -> list[Rollout]:
    return [Rollout(position, "", f"T{position}", a, a == "7") for a in answers]


def test_bias_corrected_kl_is_near_zero_without_change_and_positive_with_one():
    rng = np.random.default_rng(1)
    raw, same, shifted = [], [], []
    for t in range(40):  # accuracy 0.6 at positions 0 and 1, then 0.05 at position 2
        a, b, c = (["7" if u < p else "8" for u in rng.random(8)] for p in (0.6, 0.6, 0.05))
        res = Resampling(
            ["S0", "S1"], [rollouts(0, a), rollouts(1, b), rollouts(2, c)], np.ones((2, 8)), alpha=1.0
        )
        excess = res.resampling_kl_excess(draws=80, seed=t)
        raw.append(res.resampling_kl[0])
        same.append(excess[0])
        shifted.append(excess[1])
    assert np.mean(raw) > 0.05  # the plain estimator reports a change where there is none
    assert abs(np.mean(same)) < 0.03 and np.mean(shifted) > 0.3


def test_bias_corrected_kl_is_undefined_without_answers():
    res = Resampling(["S0"], [rollouts(0, ["7", "8"]), []], np.ones((1, 2)), alpha=1.0)
    assert np.isnan(res.resampling_kl_excess(draws=5)).all()


@pytest.mark.parametrize(
    "a, b",
    [
        ([1, 1, 1, 1, 0, 0, 1, 0, 1, 1], [0, 1, 0, 0, 0, 0, 1, 0, 0, 1]),
        ([0] * 12 + [1] * 3, [1] * 9 + [0] * 6),
        ([1, 0, 1], [1, 0, 1]),
    ],
)
def test_mcnemar_against_scipy(a, b):
    got = mcnemar(a, b)
    only_a = sum(x and not y for x, y in zip(a, b, strict=True))
    only_b = sum(y and not x for x, y in zip(a, b, strict=True))
    assert (got["only_a"], got["only_b"], got["n"]) == (only_a, only_b, len(a))
    if only_a + only_b:
        assert got["p"] == pytest.approx(binomtest(only_a, only_a + only_b, 0.5).pvalue)
    else:
        assert np.isnan(got["p"])
    with pytest.raises(ValueError, match="paired"):
        mcnemar(a, b[:-1])
    for bad in ([float("nan"), 1], [None, 1], [2, 1]):
        with pytest.raises(ValueError, match="0/1"):
            mcnemar(bad, [0, 1])


def test_pooled_importance_is_the_plain_one_at_window_1_and_counts_pooled_rollouts():
    rng = np.random.default_rng(3)
    answers = [["7" if u < p else "8" for u in rng.random(6)] for p in (0.2, 0.3, 0.9, 0.8, 0.85)]
    res = Resampling(
        [f"S{i}" for i in range(4)],
        [rollouts(p, a) for p, a in enumerate(answers)],
        np.ones((4, 6)),
        alpha=1.0,
    )
    np.testing.assert_allclose(res.pooled_importance(1), res.resampling_importance)
    np.testing.assert_allclose(res.pooled_kl(1), res.resampling_kl)
    acc = lambda rows: np.mean([a == "7" for r in rows for a in r])  # noqa: E731
    # sentence 1 at window 2: positions 0-1 resample it, positions 2-3 keep it
    assert res.pooled_importance(2)[1] == pytest.approx(acc(answers[2:4]) - acc(answers[0:2]))
    # the last sentence: only position 4 keeps it; the first: only position 0 resamples it
    assert res.pooled_importance(3)[3] == pytest.approx(acc(answers[4:5]) - acc(answers[1:4]))
    assert res.pooled_importance(3)[0] == pytest.approx(acc(answers[1:4]) - acc(answers[0:1]))
    for bad in (0, 1.5, True, "2"):
        with pytest.raises(ValueError, match="window must be"):
            res.pooled_importance(bad)


def test_pooled_importance_finds_a_step_more_often_than_one_position_at_few_rollouts():
    """A planted step (accuracy 0.3 -> 0.8 across sentence 5 of 10) with 8 rollouts per position:
    pooling two positions per side ranks it first more often than the plain difference (seeded:
    321 against 285 of 400 draws)."""
    rng = np.random.default_rng(0)
    hits = {1: 0, 2: 0}
    for _ in range(400):
        acc = [0.3] * 6 + [0.8] * 5  # positions 0..10; sentence 5 decides
        rows = [rollouts(p, ["7" if u < a else "8" for u in rng.random(8)]) for p, a in enumerate(acc)]
        res = Resampling([f"S{i}" for i in range(10)], rows, np.ones((10, 8)))
        for w in hits:
            hits[w] += int(np.argmax(res.pooled_importance(w)) == 5)
    assert hits[2] > hits[1] + 20, hits  # 0.80 vs 0.71 of draws


def test_mean_record_against_scipy_and_undefined_below_two_values():
    x = [0.2, 0.9, 0.4, 0.7, 0.1]
    got = mean_record(x)
    half = 1.96 * sem(x)
    assert got["n"] == 5 and got["mean"] == pytest.approx(np.mean(x))
    assert (got["low"], got["high"]) == (pytest.approx(np.mean(x) - half), pytest.approx(np.mean(x) + half))
    one, none = mean_record([0.5]), mean_record([])
    assert one["mean"] == 0.5 and np.isnan(one["low"]) and np.isnan(one["high"]) and one["n"] == 1
    assert np.isnan(none["mean"]) and none["n"] == 0
    with pytest.raises(ValueError, match="finite"):
        mean_record([0.1, float("nan")])
