"""Plotly figures, one function per figure kind, one shared style; saving to HTML (+ PNG/SVG).

Example:
    >>> import torch
    >>> fig = attention_heatmap(torch.eye(3), ["a", "b", "c"], title="toy")
    >>> fig.layout.xaxis.title.text
    'Key token'
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from torch import Tensor

# Okabe-Ito: distinguishable with the common colour-vision deficiencies.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
SEQUENTIAL = "Viridis"
DIVERGING = "RdBu_r"
GREY = "#999999"

_AXIS = dict(
    showline=True, linecolor="#444", ticks="outside", gridcolor="#eee", zeroline=False, automargin=True
)
pio.templates["mechlens"] = go.layout.Template(
    layout=dict(
        font=dict(family="Helvetica, Arial, sans-serif", size=14, color="#222"),
        title=dict(font=dict(size=17), x=0.02, xanchor="left"),
        colorway=PALETTE,
        paper_bgcolor="white",
        plot_bgcolor="white",
        xaxis=_AXIS,
        yaxis=_AXIS,
        margin=dict(l=70, r=30, t=60, b=60),
        hoverlabel=dict(font=dict(family="monospace", size=12)),
    )
)
TEMPLATE = "mechlens"
# a horizontal legend between the title and the plot, clear of the data
LEGEND_ABOVE = dict(orientation="h", x=0, xanchor="left", y=1.02, yanchor="bottom")


def _label(token: str) -> str:
    """A token as readable text in a label or hover: visible whitespace, escaped control bytes."""
    token = token.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "·")
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in token) or "∅"


def lens_heatmap(
    values: Tensor,
    top_tokens: Sequence[Sequence[str]],
    str_tokens: Sequence[str],
    layers: Sequence[int],
    stat: str = "entropy (nats)",
    title: str = "Logit lens",
    extra_hover: Sequence[Sequence[str]] | None = None,
) -> go.Figure:
    """Layers x positions heatmap of a lens statistic; hover shows the input and top token.

    values: [layers, pos]; top_tokens[l][p]: the layer's top next-token string at p;
    extra_hover[l][p]: more hover text (e.g. `LensResult.top_k_text`).
    """
    n_layers, n_pos = values.shape
    hover = [
        [
            f"layer {layers[l]}<br>pos {p}: {_label(str_tokens[p])!s}<br>top-1 next: "
            f"{_label(top_tokens[l][p])}<br>{stat}: {float(values[l, p]):.3f}"
            + (f"<br>{extra_hover[l][p]}" if extra_hover is not None else "")
            for p in range(n_pos)
        ]
        for l in range(n_layers)
    ]
    fig = go.Figure(
        go.Heatmap(
            z=values.numpy(),
            x=list(range(n_pos)),
            y=list(layers),
            text=[[_label(top_tokens[l][p])[:8] for p in range(n_pos)] for l in range(n_layers)],
            texttemplate="%{text}" if n_pos * n_layers <= 600 else None,
            textfont=dict(size=9),
            hovertext=hover,
            hoverinfo="text",
            colorscale=SEQUENTIAL,
            colorbar=dict(title=stat),
        )
    )
    fig.update_layout(
        template=TEMPLATE,
        title=title,
        xaxis=dict(
            title="Input token",
            tickmode="array",
            tickvals=list(range(n_pos)),
            ticktext=[_label(t) for t in str_tokens],
            tickangle=-60,
            automargin=True,
        ),
        yaxis=dict(title="Layer", automargin=True),
        height=max(380, 22 * n_layers + 160),
        width=max(600, 34 * n_pos + 200),
    )
    return fit_layout(fig)


def attention_heatmap(
    pattern: Tensor, str_tokens: Sequence[str], title: str = "Attention pattern"
) -> go.Figure:
    """Query x key heatmap of one head's attention `pattern [q, k]`, token strings on both axes."""
    labels = [f"{i}:{_label(t)}" for i, t in enumerate(str_tokens)]
    fig = go.Figure(
        go.Heatmap(
            z=pattern.float().numpy(),
            x=labels,
            y=labels,
            colorscale="Blues",
            zmin=0,
            colorbar=dict(title="attention"),
            hovertemplate="query %{y}<br>key %{x}<br>weight %{z:.3f}<extra></extra>",
        )
    )
    fig.update_layout(
        template=TEMPLATE,
        title=title,
        xaxis=dict(title="Key token", tickangle=-60, automargin=True),
        yaxis=dict(title="Query token", autorange="reversed", automargin=True),
        height=max(420, 18 * len(labels) + 200),
        width=max(520, 18 * len(labels) + 260),
    )
    return fit_layout(fig)


def mean_ci_lines(
    x: Sequence[float],
    groups: dict[str, tuple[Sequence[float], Sequence[float], Sequence[float]]],
    x_title: str,
    y_title: str,
    title: str = "",
    hover: dict[str, Sequence[str]] | None = None,
) -> go.Figure:
    """One line per group with a shaded band: `groups[name] = (mean, low, high)`, each `[len(x)]`."""
    fig = go.Figure()
    for k, (name, (mean, low, high)) in enumerate(groups.items()):
        colour = PALETTE[k % len(PALETTE)]
        band = list(x) + list(x)[::-1]
        fig.add_trace(
            go.Scatter(
                x=band,
                y=list(high) + list(low)[::-1],
                fill="toself",
                fillcolor=colour,
                opacity=0.18,
                line=dict(width=0),
                hoverinfo="skip",
                showlegend=False,
            )
        )
        fig.add_trace(
            go.Scatter(
                x=list(x),
                y=list(mean),
                name=name,
                mode="lines+markers",
                line=dict(color=colour, width=2.5),
                text=None if hover is None else list(hover[name]),
                hovertemplate=f"{name}<br>{x_title}: %{{x}}<br>{y_title}: %{{y:.4f}}"
                + ("<br>%{text}" if hover else "")
                + "<extra></extra>",
            )
        )
    fig.update_layout(
        template=TEMPLATE,
        title=title,
        xaxis_title=x_title,
        yaxis_title=y_title,
        width=760,
        height=460,
        legend=LEGEND_ABOVE,
        margin=dict(t=100),
    )
    return fit_layout(fig)


def histograms_by_group(
    values: dict[str, Sequence[float]], x_title: str, title: str = "", bins: int = 20
) -> go.Figure:
    """Overlaid, normalised histograms, one per group (probability density on y)."""
    fig = go.Figure()
    for k, (name, vals) in enumerate(values.items()):
        fig.add_trace(
            go.Histogram(
                x=list(vals),
                name=f"{name} (n={len(vals)})",
                histnorm="probability density",
                nbinsx=bins,
                opacity=0.6,
                marker_color=PALETTE[k % len(PALETTE)],
            )
        )
    fig.update_layout(
        template=TEMPLATE,
        title=title,
        barmode="overlay",
        xaxis_title=x_title,
        yaxis_title="density",
        width=760,
        height=460,
    )
    return fit_layout(fig)


def roc_curves(
    curves: dict[str, tuple[Sequence[float], Sequence[float], float]], title: str = ""
) -> go.Figure:
    """ROC curves `curves[name] = (fpr, tpr, auroc)`, with the chance diagonal."""
    fig = go.Figure(
        go.Scatter(
            x=[0, 1],
            y=[0, 1],
            mode="lines",
            line=dict(color="#999", dash="dot"),
            name="chance",
            hoverinfo="skip",
        )
    )
    for k, (name, (fpr, tpr, auc)) in enumerate(curves.items()):
        fig.add_trace(
            go.Scatter(
                x=list(fpr),
                y=list(tpr),
                mode="lines",
                name=f"{name} (AUROC {auc:.2f})",
                line=dict(color=PALETTE[k % len(PALETTE)], width=3 if k == 0 else 2, shape="hv"),
                hovertemplate=f"{name}<br>FPR %{{x:.2f}}<br>TPR %{{y:.2f}}<extra></extra>",
            )
        )
    fig.update_layout(
        template=TEMPLATE,
        title=title,
        xaxis_title="false-positive rate",
        yaxis_title="true-positive rate",
        width=640,
        height=560,
        xaxis=dict(range=[0, 1]),
        yaxis=dict(range=[0, 1.02]),
        legend=dict(x=0.98, xanchor="right", y=0.02, yanchor="bottom"),
    )
    return fit_layout(fig)


def head_heatmap(
    values: Tensor, colorbar: str, title: str = "", marked: Sequence[tuple[int, int]] = ()
) -> go.Figure:
    """Layer x head heatmap of `values [layers, heads]` (diverging around 0, NaN blank); `marked`
    heads get a box."""
    finite = values[values.isfinite()].abs()
    bound = max(float(finite.max()) if finite.numel() else 1.0, 1e-12)
    z = values.float().numpy()
    layers, heads = z.shape
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(range(heads)),
            y=list(range(layers)),
            colorscale=DIVERGING,
            zmin=-bound,
            zmax=bound,
            colorbar=dict(title=colorbar),
            hovertemplate="layer %{y}, head %{x}<br>" + colorbar + ": %{z:.4f}<extra></extra>",
        )
    )
    for layer, head in marked:
        fig.add_shape(type="rect", x0=head - 0.5, x1=head + 0.5, y0=layer - 0.5, y1=layer + 0.5,
                      line=dict(color="black", width=2))  # fmt: skip
    fig.update_layout(
        template=TEMPLATE,
        title=title,
        xaxis=dict(title="head", dtick=1),
        yaxis=dict(title="layer"),
        width=max(420, 36 * heads + 260),
        height=max(420, 16 * layers + 160),
    )
    return fit_layout(fig)


def grouped_bars(
    categories: Sequence[str],
    series: dict[str, Sequence[float]],
    y_title: str,
    title: str = "",
    counts: dict[str, Sequence[str]] | None = None,
    errors: dict[str, Sequence[float]] | None = None,
    intervals: dict[str, Sequence[tuple[float, float]]] | None = None,
) -> go.Figure:
    """Bars per category, one colour per series (`series[name] = [len(categories)]` values);
    `counts[name]` adds hover text such as "12/40"; `errors[name]` draws symmetric error bars
    (e.g. SE), `intervals[name]` asymmetric ones from `(low, high)` (e.g. a Wilson interval)."""
    fig = go.Figure()
    for k, (name, vals) in enumerate(series.items()):
        error_y = None
        if errors is not None:
            error_y = dict(type="data", array=list(errors[name]), visible=True)
        elif intervals is not None:
            lows, highs = zip(*intervals[name], strict=True)
            error_y = dict(type="data", symmetric=False, visible=True,
                           array=[h - v for v, h in zip(vals, highs, strict=True)],
                           arrayminus=[v - lo for v, lo in zip(vals, lows, strict=True)])  # fmt: skip
        fig.add_trace(
            go.Bar(
                x=list(categories),
                y=list(vals),
                name=name,
                marker_color=PALETTE[k % len(PALETTE)],
                error_y=error_y,
                text=None if counts is None else list(counts[name]),
                hovertemplate=f"{name}<br>%{{x}}: %{{y:.3f}}"
                + ("<br>%{text}" if counts else "")
                + "<extra></extra>",
            )
        )
    fig.update_layout(
        template=TEMPLATE,
        title=title,
        barmode="group",
        yaxis_title=y_title,
        width=760,
        height=460,
        legend=LEGEND_ABOVE,
        margin=dict(t=100),
    )
    return fit_layout(fig)


def control_strip(
    metrics: Sequence[str],
    controls: dict[str, Sequence[float]],
    observed: dict[str, dict[str, tuple[float, float, float]]],
    y_title: str,
    title: str = "",
) -> go.Figure:
    """A control distribution against observed values, per metric: `controls[metric]` holds one
    value per random draw (box and points; a metric without controls shows the markers only);
    `observed[name][metric] = (value, low, high)` is a marker with its interval (e.g. a rate and
    its Wilson interval)."""
    fig = go.Figure()
    with_controls = [m for m in metrics if m in controls]
    for metric in with_controls:
        values = list(controls[metric])
        fig.add_trace(
            go.Box(
                y=values, x=[metric] * len(values), name=f"random draws (n={len(values)})",
                boxpoints="all", jitter=0.4, pointpos=0, marker_color=GREY, line_color=GREY,
                showlegend=metric == with_controls[0], legendgroup="control",
            )
        )  # fmt: skip
    for k, (name, by_metric) in enumerate(observed.items()):
        shown = [m for m in metrics if m in by_metric]
        points = [by_metric[m] for m in shown]
        fig.add_trace(
            go.Scatter(
                x=shown, y=[v[0] for v in points], mode="markers", name=name,
                marker=dict(size=13, symbol="diamond", color=PALETTE[(k + 1) % len(PALETTE)]),
                error_y=dict(type="data", symmetric=False, array=[v[2] - v[0] for v in points],
                             arrayminus=[v[0] - v[1] for v in points]),
            )
        )  # fmt: skip
    fig.update_layout(
        template=TEMPLATE, title=title, yaxis_title=y_title, width=760, height=480, legend=LEGEND_ABOVE,
        margin=dict(t=110), boxmode="overlay",
    )  # fmt: skip
    return fit_layout(fig)


def _short(text: str, n: int = 48) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def category_scatter(
    x: Sequence[float],
    y: Sequence[float],
    categories: Sequence[str],
    hover: Sequence[str],
    x_title: str,
    y_title: str,
    title: str = "",
) -> go.Figure:
    """Points coloured by category (one legend entry each), `hover` text per point (wrapped).

    >>> fig = category_scatter([0, 1], [0.5, 0.2], ["plan", "check"], ["Let me plan.", "Check."], "i", "v")
    >>> [t.name for t in fig.data]
    ['plan', 'check']
    """
    fig = go.Figure()
    for k, cat in enumerate(dict.fromkeys(categories)):
        idx = [i for i, c in enumerate(categories) if c == cat]
        fig.add_trace(
            go.Scatter(
                x=[x[i] for i in idx],
                y=[y[i] for i in idx],
                mode="markers",
                name=cat,
                marker=dict(color=PALETTE[k % len(PALETTE)], size=9, line=dict(width=0.5, color="#333")),
                text=["<br>".join(_wrap(hover[i])) for i in idx],
                hovertemplate=f"{cat}<br>{x_title}: %{{x:.3g}}<br>{y_title}: %{{y:.4g}}"
                "<br>%{text}<extra></extra>",
            )
        )
    fig.update_layout(template=TEMPLATE, title=title, xaxis_title=x_title, yaxis_title=y_title,
                      width=820, height=480)  # fmt: skip
    return fit_layout(fig)


def _wrap(text: str, width: int = 70) -> list[str]:
    import textwrap

    return textwrap.wrap(" ".join(text.split()), width) or [""]


def sentence_heatmap(
    matrix: Tensor,
    sentences: Sequence[str],
    colorbar: str,
    title: str = "",
    diverging: bool = False,
    center_rows: bool = False,
) -> go.Figure:
    """Sentence x sentence heatmap `matrix [rows, columns]` (NaN blank) with "index: start of the
    sentence" on the axes and both sentences in full in the hover. `center_rows=True` subtracts
    each row's NaN-aware mean first, as the Thought Anchors suppression plots
    (`plot_suppression_matrix.py`, `--normalize-rows`), and uses a diverging scale."""
    z = matrix.float().numpy() if isinstance(matrix, Tensor) else np.asarray(matrix, dtype=float)
    if center_rows:
        finite_rows = np.isfinite(z).any(1)
        z = z.copy()
        z[finite_rows] -= np.nanmean(z[finite_rows], 1, keepdims=True)
        diverging = True
    labels = [f"{i}: {_short(s, 28)}" for i, s in enumerate(sentences)]
    full = ["<br>".join(_wrap(s, 60)) for s in sentences]
    custom = [[[full[r], full[c]] for c in range(len(sentences))] for r in range(len(sentences))]
    finite = abs(z[z == z]) if (z == z).any() else [1.0]
    bound = max(float(max(finite)), 1e-12)
    scale = dict(colorscale=DIVERGING, zmin=-bound, zmax=bound) if diverging else dict(colorscale=SEQUENTIAL)
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=labels,
            y=labels,
            customdata=custom,
            colorbar=dict(title=colorbar),
            hovertemplate="row: %{customdata[0]}<br>column: %{customdata[1]}<br>"
            + colorbar
            + ": %{z:.4f}<extra></extra>",
            **scale,
        )
    )
    side = max(520, 22 * len(sentences) + 300)
    fig.update_layout(
        template=TEMPLATE,
        title=title,
        xaxis=dict(tickangle=-50, automargin=True),
        yaxis=dict(autorange="reversed", automargin=True),
        width=side + 120,
        height=side,
    )
    return fit_layout(fig)


def correlation_scatter(
    vectors: dict[str, Sequence[float]],
    categories: Sequence[str],
    hover: Sequence[str],
    title: str = "",
    rho: dict[tuple[str, str], float] | None = None,
) -> go.Figure:
    """One panel per pair of the named per-point vectors, points coloured by category; `rho[(a,
    b)]` goes in the panel title."""
    from plotly.subplots import make_subplots

    names = list(vectors)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    titles = [
        f"{b} vs {a}" + (f" (Spearman {rho[(a, b)]:.2f})" if rho and (a, b) in rho else "") for a, b in pairs
    ]
    fig = make_subplots(rows=1, cols=len(pairs), subplot_titles=titles, horizontal_spacing=0.08)
    cats = list(dict.fromkeys(categories))
    for p, (a, b) in enumerate(pairs):
        for k, cat in enumerate(cats):
            idx = [i for i, c in enumerate(categories) if c == cat]
            fig.add_trace(
                go.Scatter(
                    x=[vectors[a][i] for i in idx],
                    y=[vectors[b][i] for i in idx],
                    mode="markers",
                    name=cat,
                    legendgroup=cat,
                    showlegend=p == 0,
                    marker=dict(color=PALETTE[k % len(PALETTE)], size=8),
                    text=["<br>".join(_wrap(hover[i])) for i in idx],
                    hovertemplate=f"{cat}<br>{a}: %{{x:.3g}}<br>{b}: %{{y:.3g}}<br>%{{text}}<extra></extra>",
                ),
                row=1,
                col=p + 1,
            )
        fig.update_xaxes(title_text=a, row=1, col=p + 1)
        fig.update_yaxes(title_text=b, row=1, col=p + 1)
    fig.update_layout(template=TEMPLATE, title=title, width=430 * len(pairs) + 120, height=470)
    fig.update_annotations(font_size=12)
    return fit_layout(fig)


CHAR_WIDTH = 0.58
"""Width of an average character in units of the font size (Helvetica/Arial, mixed text: a
slight overestimate, so that the layout check errs towards reporting a clash)."""
LINE_HEIGHT = 1.3
"""Height of a line of text in units of the font size."""
TITLE_GAP = 8
"""Pixels between the top of the figure and its title (`fit_layout` anchors the title there)."""


def _lines(text: str | None) -> list[str]:
    return [re.sub(r"<[^>]+>", "", line) for line in text.split("<br>")] if text else []


def _text_px(text: str, font: float) -> float:
    """The estimated width of one line of `text` at `font` px."""
    return len(text) * font * CHAR_WIDTH


def _wrap_px(text: str, width_px: float, font: float) -> str:
    """`text` broken at spaces (`<br>`) into lines of at most `width_px` at `font` px."""
    per_line = max(8, int(width_px / _text_px("x", font)))
    return "<br>".join("<br>".join(_wrap(line, per_line)) for line in text.split("<br>"))


class _Geometry:
    """The sizes a figure's layout implies, in pixels (defaults: plotly's and the template's)."""

    def __init__(self, fig: go.Figure):
        lay = fig.layout
        template = pio.templates[TEMPLATE].layout
        self.width = lay.width or 700
        self.height = lay.height or 450
        self.font = lay.font.size or template.font.size or 12
        self.title_font = lay.title.font.size or template.title.font.size or self.font * 1.2

        def side(name: str, default: int) -> float:
            value = getattr(lay.margin, name)
            value = getattr(template.margin, name) if value is None else value
            return float(default if value is None else value)

        self.top, self.bottom = side("t", 100), side("b", 80)
        self.left, self.right = side("l", 80), side("r", 80)
        self.plot_h = self.height - self.top - self.bottom
        self.plot_w = self.width - self.left - self.right
        self.title_lines = _lines(lay.title.text)
        self.title_h = len(self.title_lines) * self.title_font * LINE_HEIGHT
        shown = [t.name for t in fig.data if t.showlegend is not False and t.name]
        legend = lay.legend
        self.legend_above = bool(shown) and legend.orientation == "h" and (legend.y or 0) >= 1
        rows, used = 1, 0.0
        for name in shown:
            w = _text_px(name, self.font) + 50  # symbol and padding
            if used + w > self.width - 20 and used > 0:
                rows, used = rows + 1, 0.0
            used += w
        self.legend_h = rows * self.font * 1.6 + 6 if self.legend_above else 0.0
        self.legend_rows = rows
        self.legend_lift = ((legend.y or 1) - 1) * self.plot_h if self.legend_above else 0.0

    def axes(self, fig: go.Figure) -> list[tuple[str, str, float]]:
        """`(layout key, "x" or "y", length in px)` of every axis, subplots' included (an axis
        spans its domain's share of the plot area)."""
        out = []
        for key in fig.layout:
            match = re.fullmatch(r"([xy])axis\d*", key)
            if match:
                domain = fig.layout[key].domain or (0.0, 1.0)
                full = self.plot_w if match.group(1) == "x" else self.plot_h
                out.append((key, match.group(1), full * (domain[1] - domain[0])))
        return out

    def top_needed(self) -> float:
        """The top margin that holds the title and, when it sits above the plot, the legend."""
        legend = self.legend_h + self.legend_lift + 6 if self.legend_above else 0.0
        return TITLE_GAP + self.title_h + 10 + legend


def fit_layout(fig: go.Figure) -> go.Figure:
    """Make room for `fig`'s texts: wrap the title and the axis titles to the figure's size,
    anchor the title at the top, and grow the top margin (and the height with it, so the plot
    keeps its size) to hold the title and a legend placed above the plot. Every figure function
    here ends with it; `layout_problems` checks the result."""
    g = _Geometry(fig)
    lay = fig.layout
    if lay.title.text:
        lay.title.text = _wrap_px(lay.title.text, g.width - 40, g.title_font)
        lay.title.update(y=1 - TITLE_GAP / g.height, yanchor="top", yref="container")
    for key, _, length in g.axes(fig):
        ax = lay[key]
        if ax.title.text:
            ax.title.text = _wrap_px(ax.title.text, length, ax.title.font.size or g.font)
    g = _Geometry(fig)
    need = g.top_needed()
    if need > g.top:
        lay.margin.t = need
        lay.height = g.height + need - g.top
        if lay.title.text:
            lay.title.y = 1 - TITLE_GAP / lay.height
    return fig


def layout_problems(fig: go.Figure) -> list[str]:
    """Clashes a reader would see in `fig`, read from its layout (sizes, margins, positions and
    the length of its texts) rather than from a rendering: a title line wider than the figure, a
    title and a legend above the plot that do not fit in the top margin together, and an axis
    title line longer than its axis, subplots' axes included (a y-axis title then runs into the
    plot title). Empty when it reads well.

        >>> layout_problems(go.Figure(layout=dict(title="A short title", yaxis_title="y")))
        []
        >>> crowded = go.Figure(layout=dict(height=300, yaxis_title="long " * 30))
        >>> [p.split(" (")[0] for p in layout_problems(crowded)], layout_problems(fit_layout(crowded))
        (['the y-axis title'], [])
    """
    g = _Geometry(fig)
    lay = fig.layout
    problems = []
    for line in g.title_lines:
        w = _text_px(line, g.title_font)
        if w > g.width - 20:
            problems.append(
                f"a title line ({w:.0f} px) is wider than the figure ({g.width} px): {line[:40]!r}"
            )
    if g.top_needed() > g.top + 1:
        what = f"the title ({len(g.title_lines)} line(s))" + (
            f" and the legend above the plot ({g.legend_rows} row(s))" if g.legend_above else ""
        )
        problems.append(f"{what} need {g.top_needed():.0f} px, the top margin is {g.top:.0f}")
    for key, axis, length in g.axes(fig):
        ax = lay[key]
        for line in _lines(ax.title.text):
            w = _text_px(line, ax.title.font.size or g.font)
            if w > length:
                problems.append(
                    f"the {axis}-axis title ({w:.0f} px) is longer than its axis ({length:.0f} px): "
                    f"{line[:40]!r}"
                )
    return problems


@functools.cache
def image_export_available() -> bool:
    """Whether kaleido can find a Chromium to render PNG/SVG (Debian: apt-get install chromium)."""
    try:
        import kaleido  # noqa: F401

        fig = go.Figure(go.Scatter(x=[0], y=[0]))
        fig.to_image(format="png", width=10, height=10)
        return True
    except Exception as err:  # kaleido raises many kinds when no browser is found
        warnings.warn(
            f"PNG/SVG export disabled (no Chromium for kaleido: {type(err).__name__}); "
            "figures are written as HTML only. Install one with: apt-get install chromium",
            stacklevel=2,
        )
        return False


def save_figure(fig: go.Figure, stem: str | Path, images: bool = True) -> list[Path]:
    """Write `stem.html` (plotly.js shared in the folder) and, when possible, `stem.png`/`.svg`."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    html = stem.with_suffix(".html")
    fig.write_html(html, include_plotlyjs="directory", full_html=True)
    paths = [html]
    if images and image_export_available():
        for fmt in ("png", "svg"):
            path = stem.with_suffix(f".{fmt}")
            fig.write_image(path, format=fmt, scale=2 if fmt == "png" else 1)
            paths.append(path)
    return paths
