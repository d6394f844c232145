"""Every figure kind, drawn on tiny data with the titles and labels the experiments give it, reads
cleanly: no title, axis title or legend runs into another (`plots.layout_problems`, from the
layout's sizes and positions). Where a Chromium is installed, the slow test renders each kind."""

from __future__ import annotations

import plotly.graph_objects as go
import pytest
import torch

from mechlens import plots

LONG_TITLE = "Planted decisive sentences (plan, repairing check) recovered: 10 traces, 100 rollouts each"
LONG_Y = "share of traces with a planted decisive sentence in the top 3"
NAMES = ["counterfactual KL", "resampling importance", "forced-answer importance", "receiver score",
         "baseline: sentence length", "baseline: position (earlier first)"]  # fmt: skip


def kinds() -> dict[str, go.Figure]:
    tokens = [f"tok{i}" for i in range(12)]
    cats = ["plan_generation", "active_computation", "self_checking"]
    sentences = [f"Sentence number {i} of the trace, quite long." for i in range(12)]
    curves = {n: ([0.5] * 5, [0.4] * 5, [0.6] * 5) for n in NAMES[:3]}
    curves["Monte Carlo prediction (accuracy difference)"] = ([0.4] * 5,) * 3
    rates = "rate (95% Wilson interval)"
    attack = "jailbreak: attack success"
    return {
        "lens_heatmap": plots.lens_heatmap(
            torch.rand(30, 12), [["a"] * 12] * 30, tokens, list(range(30)),
            title="Logit lens of smollm2-135m-instruct: entropy by layer and position (hover: top-1 token)",
        ),
        "attention_heatmap": plots.attention_heatmap(
            torch.eye(12), tokens, title="Attention of L4H2 (strongest previous-token head)"
        ),
        "mean_ci_lines": plots.mean_ci_lines(
            [8, 16, 32, 64, 100], curves, "rollouts per sentence", LONG_Y,
            title="Recovery against rollouts per sentence (10 traces, first n of 100)",
        ),
        "histograms_by_group": plots.histograms_by_group(
            {"hallucinated (n=50)": [0.1, 0.2], "correct (n=41)": [0.3]}, "mean Reasoning Score",
            title="Reasoning Score of hallucinated and correct traces (word problems and factual questions)",
        ),
        "roc_curves": plots.roc_curves(
            {n: ([0, 0.5, 1], [0, 0.7, 1], 0.6) for n in NAMES[:4]},
            title="Hallucination detection: ROC of the RHD detector and baselines",
        ),
        "head_heatmap": plots.head_heatmap(
            torch.rand(30, 9), "- direct write along the refusal direction", marked=[(3, 1)],
            title="Refusal-suppression score of each head (direct write, negated; top 8 boxed)",
        ),
        "grouped_bars": plots.grouped_bars(
            NAMES, {"method": [0.5] * 6, "random rankings": [0.2] * 6}, LONG_Y, title=LONG_TITLE,
            counts={"method": ["4/10"] * 6, "random rankings": ["2000 draws"] * 6},
            intervals={"method": [(0.2, 0.8)] * 6, "random rankings": [(0.1, 0.3)] * 6},
        ),
        "control_strip": plots.control_strip(
            [attack, "harmless: false refusal"], {attack: [0.1, 0.2, 0.3]},
            {"top 8 heads ablated": {attack: (0.5, 0.3, 0.7)}}, rates,
            title="Ablating the top heads against 20 random sets of as many heads",
        ),
        "category_scatter": plots.category_scatter(
            [0, 0.5, 1], [0.1, 0.2, 0.3], cats, ["a", "b", "c"],
            "position in the trace (0 = first sentence, 1 = last)", "counterfactual importance (KL)",
            title="Counterfactual importance per sentence (10 trace(s), n=100)",
        ),
        "sentence_heatmap": plots.sentence_heatmap(
            torch.rand(12, 12), sentences, "log KL",
            title="Attention suppression: effect of each sentence (column) on later ones (row), trace 0",
        ),
        "correlation_scatter": plots.correlation_scatter(
            {"counterfactual KL": [1, 2, 3], "receiver score": [3, 2, 1], "suppression effect": [0, 1, 0]},
            cats, ["s0", "s1", "s2"], title="Three attributions per sentence",
        ),
    }  # fmt: skip


FIGURE_FUNCTIONS = {
    name for name, f in vars(plots).items()
    if callable(f) and getattr(f, "__module__", "") == plots.__name__ and not name.startswith("_")
    and f.__annotations__.get("return") in (go.Figure, "go.Figure") and name != "fit_layout"
}  # fmt: skip


def test_every_figure_kind_is_checked():
    assert set(kinds()) == FIGURE_FUNCTIONS, FIGURE_FUNCTIONS ^ set(kinds())


@pytest.mark.parametrize("name", sorted(kinds()))
def test_figure_reads_cleanly(name):
    assert plots.layout_problems(kinds()[name]) == []


def test_the_check_sees_clashes():
    crowded = go.Figure(
        layout=dict(template=plots.TEMPLATE, height=300, yaxis_title=LONG_Y, title=LONG_TITLE * 2)
    )
    found = plots.layout_problems(crowded)
    assert any("y-axis title" in p for p in found) and any("wider than the figure" in p for p in found)
    legend = go.Figure(
        [go.Bar(name=n * 2, x=[1], y=[1]) for n in NAMES],
        layout=dict(
            template=plots.TEMPLATE, title="A<br>two-line title", legend=plots.LEGEND_ABOVE, margin=dict(t=60)
        ),
    )
    assert any("legend above the plot" in p for p in plots.layout_problems(legend))


def test_subplot_axes_are_checked_and_fitted():
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=3)
    fig.update_layout(template=plots.TEMPLATE, width=900, height=400)
    fig.update_xaxes(title_text=LONG_Y, row=1, col=2)  # the second panel's axis is a third as long
    assert [p.split(" (")[0] for p in plots.layout_problems(fig)] == ["the x-axis title"]
    assert plots.layout_problems(plots.fit_layout(fig)) == []
    assert "<br>" in fig.layout.xaxis2.title.text and not fig.layout.xaxis.title.text


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(kinds()))
def test_figure_renders(name, tmp_path):
    if not plots.image_export_available():
        pytest.skip("no Chromium for kaleido")
    path = tmp_path / f"{name}.png"
    kinds()[name].write_image(path)
    assert path.stat().st_size > 1000
