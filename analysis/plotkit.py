"""The plot kit every analysis figure draws with: colours, units and titles, panel layout,
interval drawing, and the figure-or-why-not result a report shows.

Floor: analysis (imports sweep.core and sweep.store only; reads no results itself).
figures (Buda), latent_figures (Dablain), compare (critical differences), longtail and
report all take their colours, layout and intervals from here, so an arm has one colour
and an interval one look in every figure of a report.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go

log = logging.getLogger(__name__)

# -- colours -------------------------------------------------------------------------------
# One colour per arm label (without the re-sampling level), in every figure. Okabe-Ito
# colours first (distinguishable with the common colour-vision deficiencies); the
# thresholded variant of a method is drawn dashed as well, so colour is not the only cue.
COLORS: dict[str, str] = {
    "baseline": "#4D4D4D",
    "oversampling": "#0072B2",
    "undersampling": "#D55E00",
    "two-phase (oversampling)": "#56B4E9",
    "two-phase (undersampling)": "#E69F00",
    "thresholding": "#009E73",
    "oversampling + thresholding": "#CC79A7",
    "undersampling + thresholding": "#8C510A",
    "two-phase (oversampling) + thresholding": "#7570B3",
    "two-phase (undersampling) + thresholding": "#B2182B",
    "classifier re-training": "#66A61E",
    "baseline, focal loss": "#1B7837",
    "baseline, LDAM-DRW": "#762A83",
}
# Labels not listed above (new methods, losses) get a colour from their name's hash:
# still one colour per label across all figures and reports.
_FALLBACK = ["#E7298A", "#1F78B4", "#33A02C", "#FB9A99", "#6A3D9A", "#B15928", "#A6CEE3",
             "#FDBF6F", "#CAB2D6", "#B2DF8A", "#666666", "#17BECF"]
# Preferred legend order: the paper's list of methods.
ORDER = list(COLORS)
# Dablain's figures: one colour per class and per split in every panel and figure.
SPLIT_COLORS = {"train": "#d62728", "test": "#1f77b4"}
_CLASS_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                 "#bcbd22", "#17becf")
ALL_CLASSES_COLOR = "#222222"  # class -1: all classes together
AXIS_COLOR = "#555555"  # a drawn axis or connector that is no data (critical-difference diagrams)
MARK_COLOR = "#c0392b"  # a reference mark drawn over the data (the critical difference)


def color_of(arm_base: str) -> str:
    """The colour of an arm (its label without the re-sampling level)."""
    if arm_base in COLORS:
        return COLORS[arm_base]
    digest = hashlib.sha256(arm_base.encode()).digest()
    return _FALLBACK[digest[0] % len(_FALLBACK)]


def class_color(c: int) -> str:
    """The colour of class ``c`` (-1: all classes)."""
    return ALL_CLASSES_COLOR if c == -1 else _CLASS_COLORS[c % len(_CLASS_COLORS)]


def rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    r, g, b = (int(h[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def arm_rank(label: str) -> tuple[int, str]:
    """Legend order: the paper's methods first, in its order, then the rest by name."""
    return (ORDER.index(label) if label in ORDER else len(ORDER), label)


# -- units and titles ----------------------------------------------------------------------
PERCENT = 100.0  # metrics are stored as fractions; the papers plot percentages
METRIC_TITLES = {
    "roc_auc": "multi-class ROC AUC (%)",
    "accuracy": "accuracy (%)",
    "balanced_accuracy": "balanced accuracy (%)",
}
X_TITLES = {
    "rho": "imbalance ratio ρ (log scale)",
    "n_minority": "number of minority classes",
    "mu": "fraction of minority classes μ",
    "resample_ratio": "imbalance ratio left after re-sampling ρ' (log scale)",
    "iter": "iteration",
}


def metric_name(metric: str) -> str:
    return METRIC_TITLES.get(metric, metric).replace(" (%)", "")


# -- layout --------------------------------------------------------------------------------
PANELS_PER_ROW = 3
PANEL_HEIGHT_PX = 300
TOP_PX = 130  # title + up to two legend rows


def layout_panels(keys: list[tuple[str, object]]) -> tuple[int, int, dict[tuple[str, object], tuple[int, int]]]:
    """Rows/cols for (experiment, panel value) keys: one experiment wraps, several are rows."""
    experiments = list(dict.fromkeys(k[0] for k in keys))
    if len(experiments) == 1:
        cols = min(PANELS_PER_ROW, len(keys))
        pos = {k: (i // cols + 1, i % cols + 1) for i, k in enumerate(keys)}
        return math.ceil(len(keys) / cols), cols, pos
    values = list(dict.fromkeys(k[1] for k in keys))
    pos = {k: (experiments.index(k[0]) + 1, values.index(k[1]) + 1) for k in keys}
    return len(experiments), len(values), pos


def title_and_legend_on_top(fig: go.Figure, title: str, rows: int) -> None:
    """A page-wide title with the legend below it, both in the top margin (container
    coordinates), so a long legend wraps below the title instead of over it."""
    height = TOP_PX + rows * PANEL_HEIGHT_PX
    fig.update_layout(
        title={"text": title, "x": 0.01, "xanchor": "left", "yref": "container",
               "y": 1 - 12 / height, "yanchor": "top"},
        template="plotly_white", height=height,
        margin={"l": 70, "r": 20, "t": TOP_PX, "b": 60},
        legend={"orientation": "h", "yref": "container", "y": 1 - 44 / height, "yanchor": "top",
                "x": 0, "xanchor": "left", "groupclick": "togglegroup"},
        hovermode="closest",
    )
    fig.update_annotations(font_size=12)


# -- intervals -----------------------------------------------------------------------------
def interval_error_bars(mean: Sequence[float], low: Sequence[float], high: Sequence[float],
                        color: str | None = None) -> dict:
    """An interval drawn as asymmetric error bars (an unknown end draws as none)."""
    up = [h - m if pd.notna(h) and math.isfinite(h) else 0 for h, m in zip(high, mean)]
    down = [m - lo if pd.notna(lo) and math.isfinite(lo) else 0 for lo, m in zip(low, mean)]
    bars = {"type": "data", "symmetric": False, "array": up, "arrayminus": down}
    if color is not None:
        bars |= {"color": color, "thickness": 1.2}
    return bars


def interval_band(x: Sequence[float], low: Sequence[float], high: Sequence[float], color: str,
                  group: str, meta: dict) -> go.Scatter:
    """An interval drawn as a translucent band between ``low`` and ``high`` over ``x``."""
    return go.Scatter(
        x=list(x) + list(reversed(x)), y=list(high) + list(reversed(low)), mode="lines", fill="toself",
        fillcolor=rgba(color, 0.15), line={"width": 0}, hoverinfo="skip", showlegend=False, legendgroup=group,
        meta={**meta, "role": "band"})


# -- a figure or why not -------------------------------------------------------------------
class Absent(Exception):
    """The store has no data for a figure; the message says what is missing."""


@dataclass
class FigureResult:
    """One figure of the report: ``figure`` is None when ``note`` says why it is absent."""

    fig_id: str
    title: str
    caption: str
    figure: go.Figure | None
    note: str = ""


def figure_result(fig_id: str, title: str, caption: str, build: Callable[[], go.Figure],
                  expected: tuple[type[Exception], ...] = (Absent,)) -> FigureResult:
    """The figure ``build`` draws, or why not: the message of an ``expected`` exception
    (nothing to draw), or, for a bug, its type and message (logged): a report shows what it
    can rather than nothing."""
    try:
        return FigureResult(fig_id, title, caption, build())
    except expected as why:
        return FigureResult(fig_id, title, caption, None, str(why))
    except Exception as exc:
        log.exception("figure %s failed", fig_id)
        return FigureResult(fig_id, title, caption, None, f"could not be drawn: {type(exc).__name__}: {exc}")
