"""Datasets, answer grading, AUROC/ROC."""

from __future__ import annotations

import numpy as np
import pytest

from mechlens import datasets
from mechlens.ops.stats import auroc, roc_curve
from mechlens.text.answers import extract_answer, grade


def test_arithmetic_is_deterministic_and_correct():
    a = datasets.load("arithmetic", n=30, seed=4)
    assert a == datasets.load("arithmetic", n=30, seed=4)
    assert a != datasets.load("arithmetic", n=30, seed=5)
    assert {p.level for p in a} == {1, 2, 3} and len({p.id for p in a}) == 30
    for p in a:
        assert int(p.answer) == eval(p.expression.replace("/", "//"))  # our own expressions
        assert int(p.answer) >= 0 and p.kind == "number" and p.question.endswith("?")
    with pytest.raises(ValueError, match="levels"):
        datasets.load("arithmetic", levels=(4,))


def test_factual_and_unknown_names():
    f = datasets.load("factual")
    assert len(f) == 100 and len({p.id for p in f}) == 100 and all(p.answer for p in f)
    assert datasets.load("factual", n=5) == f[:5]
    with pytest.raises(ValueError, match=r"available datasets are \['arithmetic', 'factual', 'refusal'\]"):
        datasets.load("gsm8k")


@pytest.mark.parametrize(
    ("response", "gold", "aliases", "correct", "extracted"),
    [
        ("2 + 3 = 5\n\nThe answer is 5.", "5", (), True, "5."),
        ("So 12 * 10 = 120.\nAnswer: **1,200**", "1200", (), True, "1,200"),
        ("We get 7 apples.", "7", (), True, "We get 7 apples."),  # no marker: last line / last number
        ("The answer is 8, not 7.", "7", (), False, "8, not 7."),
        # unmarked: the last number, not a restated one ("gives away 10 ... = 18")
        (
            "He gives away 10 stickers, so 8 + 10 = 18 left.",
            "10",
            (),
            False,
            "He gives away 10 stickers, so 8 + 10 = 18 left.",
        ),
        (
            "He gives away 10 stickers, so 20 - 10 = 10 left.",
            "10",
            (),
            True,
            "He gives away 10 stickers, so 20 - 10 = 10 left.",
        ),
        ("<think>Maybe 3? No, 4.</think>Answer: 4", "4", (), True, "4"),
        ("The final answer is: Sydney", "Canberra", (), False, "Sydney"),
        ("Answer: The capital is Ottawa.", "Ottawa", (), True, "The capital is Ottawa."),
        ("The symbol is Au.\nAnswer: au", "Au", (), False, "au"),  # short aliases are case-sensitive
        (
            "Answer: Leonardo painted it",
            "Leonardo da Vinci",
            ("da Vinci", "Leonardo"),
            True,
            "Leonardo painted it",
        ),
        ("", "5", (), False, None),
    ],
)
def test_grading(response, gold, aliases, correct, extracted):
    g = grade(response, gold, aliases)
    assert (g.correct, g.extracted) == (correct, extracted)


def test_extract_answer_prefers_last_marker():
    assert extract_answer("Answer: 3\nWait.\nThe answer is 4") == ("4", True)


def test_auroc_and_roc():
    assert auroc([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1]) == 1.0
    assert auroc([0.1, 0.2, 0.3, 0.4], [1, 1, 0, 0]) == 0.0
    assert auroc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5  # ties count half
    assert np.isnan(auroc([0.1, 0.2], [1, 1]))
    rng = np.random.default_rng(0)
    s, y = rng.normal(size=200), rng.integers(0, 2, 200)
    s[y == 1] += 0.7
    fpr, tpr = roc_curve(s, y)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.trapezoid(tpr, fpr) == pytest.approx(auroc(s, y), abs=1e-9)
    with pytest.raises(ValueError, match="NaN"):
        auroc([np.nan, 1.0], [0, 1])


def test_auroc_interval_covers_and_matches_the_normal_approximation():
    from mechlens.ops.stats import auroc_interval, format_rate, stratified_auroc

    rng = np.random.default_rng(0)
    y = np.r_[np.ones(300), np.zeros(300)].astype(int)
    s = rng.normal(size=600) + 0.8 * y
    a = auroc(s, y)
    low, high = auroc_interval(s, y, draws=400)
    assert low < a < high
    # Hanley-McNeil standard error of an AUROC: the bootstrap width agrees within 25%
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    se = np.sqrt((a * (1 - a) + 299 * (q1 - a * a) + 299 * (q2 - a * a)) / (300 * 300))
    assert abs((high - low) / (2 * 1.96 * se) - 1) < 0.25
    assert auroc_interval(s, y, draws=50, seed=3) == auroc_interval(s, y, draws=50, seed=3)
    strata = ["a"] * 150 + ["b"] * 150 + ["a"] * 150 + ["b"] * 150
    lo_s, hi_s = auroc_interval(s, y, strata, draws=200)
    assert lo_s < stratified_auroc(s, y, strata) < hi_s
    assert np.isnan(auroc_interval([0.1, 0.2], [1, 1])).all()
    with pytest.raises(ValueError, match="level"):
        auroc_interval(s, y, level=1.5)
    with pytest.raises(ValueError, match="strata"):
        auroc_interval(s, y, strata=["a"])
    assert format_rate(0, 0) == "0/0 (undefined)" and format_rate(5, 5).startswith(
        "5/5 = 1.00 (95% CI 0.57-1.00"
    )
