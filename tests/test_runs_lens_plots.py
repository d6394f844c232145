"""Runner (seeds, cache, provenance, config) and plots."""

from __future__ import annotations

import dataclasses
import json

import plotly.graph_objects as go
import pytest
import torch

import mechlens as ml
from mechlens.plots import attention_heatmap, lens_heatmap, save_figure
from mechlens.runs import Run, parse_config, provenance


def test_provenance_fields():
    model = ml.load_model("tiny-llama")
    info = provenance({"k": 1}, model, 1.5)
    assert info["packages"]["torch"] and info["config"] == {"k": 1} and info["wall_time_s"] == 1.5
    assert info["model"]["model"] == "tiny-llama" and len(info["model"]["weights_sha256"]) == 16


def test_run_seeds_caches_and_saves(tmp_path):
    run = Run("t", {"n": 1}, tmp_path / "figs", cache_root=tmp_path / "cache", seed=3)
    first = torch.rand(1)
    Run("t", {"n": 1}, tmp_path / "figs", cache_root=tmp_path / "cache", seed=3)
    assert torch.equal(first, torch.rand(1))  # seeded identically
    assert run.cached("sq", lambda: 4) == 4 and run.cached("sq", lambda: 5) == 4
    other = Run("t", {"n": 2}, tmp_path / "figs", cache_root=tmp_path / "cache", seed=3)
    assert other.cached("sq", lambda: 6) == 6  # the config is part of the key by default
    assert run.cached("gen", lambda: 7, config=False, k=1) == 7
    assert other.cached("gen", lambda: 8, config=False, k=1) == 7  # keyed by k only
    assert other.cached("gen", lambda: 9, config=False, k=2) == 9
    paths = run.save_figure(
        go.Figure(go.Scatter(x=[1], y=[2])),
        "fig",
        caption="c",
    )
    assert (tmp_path / "figs" / "fig.html").exists() and paths[0].suffix == ".html"
    assert (tmp_path / "figs" / "plotly.min.js").exists()
    meta = json.loads((tmp_path / "figs" / "fig.provenance.json").read_text())
    assert meta["caption"] == "c" and meta["config"] == {"n": 1}


def test_parse_config():
    @dataclasses.dataclass
    class C:
        model: str = "m"
        n: int = 2
        lr: float = 0.1
        quick: bool = False

    assert parse_config(C, []) == C()
    assert parse_config(C, ["--n", "3", "--lr", "0.5", "--quick", "--model", "x"]) == C("x", 3, 0.5, True)


def test_plots_have_expected_traces(tmp_path):
    fig = lens_heatmap(torch.rand(3, 4), [["a"] * 4] * 3, ["w", "x", "y", "z"], [0, 1, 2])
    assert fig.data[0].type == "heatmap" and fig.layout.yaxis.title.text == "Layer"
    assert "top-1 next: a" in fig.data[0].hovertext[0][0]
    fig = attention_heatmap(torch.eye(2), [" a", "\n"])
    assert list(fig.data[0].x) == ["0:·a", "1:\\n"]
    assert list(attention_heatmap(torch.eye(2), ["\x00", "\ufffd"]).data[0].x) == ["0:\\x00", "1:\ufffd"]
    paths = save_figure(fig, tmp_path / "att", images=False)
    assert [p.name for p in paths] == ["att.html"]


def test_method_plots_have_expected_traces():
    from mechlens.plots import histograms_by_group, mean_ci_lines, roc_curves

    fig = lens_heatmap(
        torch.rand(2, 2), [["a", "b"]] * 2, ["x", "y"], [0, 1], extra_hover=[["top-3: q"] * 2] * 2
    )
    assert fig.data[0].hovertext[1][1].endswith("top-3: q")
    fig = mean_ci_lines([1, 2], {"g": ([1, 2], [0, 1], [2, 3])}, "step", "score", hover={"g": ["n=3", "n=2"]})
    assert [t.type for t in fig.data] == ["scatter", "scatter"] and fig.layout.xaxis.title.text == "step"
    assert list(fig.data[1].text) == ["n=3", "n=2"]
    fig = histograms_by_group({"a": [1, 2], "b": [3]}, "cv")
    assert [t.name for t in fig.data] == ["a (n=2)", "b (n=1)"]
    fig = roc_curves({"det": ([0, 0.5, 1], [0, 1, 1], 0.75)})
    assert fig.data[1].name == "det (AUROC 0.75)" and fig.layout.xaxis.title.text == "false-positive rate"


def test_anchor_plots_have_expected_traces():
    from mechlens.plots import category_scatter, correlation_scatter, grouped_bars, sentence_heatmap

    fig = category_scatter([0, 1, 2], [0.1, 0.2, 0.3], ["plan", "check", "plan"], ["a", "b", "c"], "i", "kl")
    assert [t.name for t in fig.data] == ["plan", "check"] and list(fig.data[0].text) == ["a", "c"]
    m = torch.tensor([[float("nan"), float("nan")], [0.5, float("nan")]])
    fig = sentence_heatmap(m, ["First sentence here.", "A second, much longer sentence " * 3], "log KL")
    assert fig.data[0].type == "heatmap" and fig.data[0].x[0] == "0: First sentence here."
    assert fig.data[0].customdata[1][0][1] == "First sentence here." and fig.data[0].x[1].endswith("…")
    vectors = {"a": [1, 2, 3], "b": [3, 2, 1], "c": [0, 1, 0]}
    fig = correlation_scatter(vectors, ["x", "y", "x"], ["s0", "s1", "s2"], rho={("a", "b"): -1.0})
    assert len(fig.layout.annotations) == 3 and "Spearman -1.00" in fig.layout.annotations[0].text
    assert sum(t.showlegend for t in fig.data) == 2  # one legend entry per category
    fig = grouped_bars(["p", "q"], {"s": [1.0, 2.0]}, "y", errors={"s": [0.1, 0.2]})
    assert list(fig.data[0].error_y.array) == [0.1, 0.2]


def test_gallery_from_fake_outputs(tmp_path):
    from mechlens.gallery import write_gallery

    for folder, stem, png in [("demo", "a", True), ("depth", "b", True), ("depth", "c", False)]:
        (tmp_path / folder).mkdir(exist_ok=True)
        if png:
            (tmp_path / folder / f"{stem}.png").write_bytes(b"")
        info = {
            "caption": f"Caption {stem}.",
            "command": f"experiments/{folder}.py --quick",
            "git_commit": "0123456789ab",
        }
        (tmp_path / folder / f"{stem}.provenance.json").write_text(json.dumps(info))
    text = write_gallery(tmp_path).read_text()
    assert text.index("## demo") < text.index("## depth")
    assert "![Caption a.](demo/a.png)" in text and "![Caption b.](depth/b.png)" in text
    assert "[c (interactive HTML)](depth/c.html)" in text  # no PNG without a Chromium
    assert "`python experiments/depth.py --quick`, commit 0123456789" in text
    with pytest.raises(ValueError, match="no figures"):
        write_gallery(tmp_path / "empty")


def test_summaries_and_index_page_make_the_report(tmp_path, capsys):
    import plotly.graph_objects as go

    from mechlens.gallery import report
    from mechlens.runs import Run

    for name in ("depth", "anchors"):
        run = Run(name, {"n": 1}, tmp_path / name, cache_root=tmp_path / "cache", images=False)
        run.save_figure(go.Figure(), f"{name}_fig", caption=f"The {name} figure.")
        run.summarize(f"{name} study", [f"{name}: 3/10 = 0.30 (95% CI 0.11-0.60)"])
        with pytest.raises(TypeError, match="lines"):
            run.summarize(name, [1, 2])
    Run("gen", {}, tmp_path / "gen", cache_root=tmp_path / "cache").summarize(
        "gen", (f"line {i}" for i in range(2))
    )
    assert json.loads((tmp_path / "gen" / "summary.json").read_text())["lines"] == ["line 0", "line 1"]
    printed = capsys.readouterr().out
    assert "depth study\n  depth: 3/10" in printed and "{" not in printed
    summary = json.loads((tmp_path / "depth" / "summary.json").read_text())
    assert summary["figures"] == [(tmp_path / "depth" / "depth_fig.html").as_posix()]
    text = report(tmp_path)
    assert text.index("anchors study") < text.index("depth study") < text.index("Figures:")
    assert f"{(tmp_path / 'depth' / 'depth_fig').as_posix()}.html  The depth figure." in text
    page = (tmp_path / "index.html").read_text()
    assert '<a href="depth/depth_fig.html">' in page and "The anchors figure." in page
    assert text.endswith(f"Open {(tmp_path / 'index.html').as_posix()} for every figure with its caption.")


def test_control_strip_shows_draws_and_intervals():
    from mechlens.plots import control_strip

    fig = control_strip(
        ["attack success", "false refusal"],
        {"attack success": [0.1, 0.2, 0.3]},
        {"top heads": {"attack success": (0.05, 0.0, 0.2), "false refusal": (0.5, 0.3, 0.7)}},
        "rate",
    )
    box, marker = fig.data
    assert list(box.y) == [0.1, 0.2, 0.3] and "n=3" in box.name
    assert list(marker.x) == ["attack success", "false refusal"]
    assert list(marker.error_y.array) == pytest.approx([0.15, 0.2]) and list(
        marker.error_y.arrayminus
    ) == pytest.approx([0.05, 0.2])
