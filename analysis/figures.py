"""Buda et al.'s figures (Figs. 3-8), drawn with plotly from the results store's tables.

Floor: analysis (imports sweep.core and sweep.store only; reads results through
analysis.load).
It is longer than 400 lines because it holds one builder per figure of Buda et al.
(Figs. 3-8) over one shared preparation step.

Each figure shows, per point, the mean over repeats with a 95% t-interval (a band,
or error bars where a line has a single point) and says in its hover how many
networks the point rests on. An arm (method x evaluation) has one colour in every
figure: ``analysis.plotkit``'s, which also draws the intervals and lays out the panels.

Numbering follows the paper's text (Sec. 4): Fig. 3 fixes the number of minority
classes (x = ρ), Fig. 4 fixes ρ (x = number of minority classes), Fig. 5 is linear
imbalance, Fig. 6 accuracy with and without thresholding, Fig. 7 partial
re-sampling, Fig. 8 training curves.

:func:`buda_figure` draws one figure by its number and returns ``None`` when the store has
nothing for it; :func:`buda_figures` returns every figure with a note saying why one is absent.
None of them raises on missing data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.aggregate import CELL, INTERVALS, select_lr_runs, summarize, with_labels
from analysis.plotkit import (
    METRIC_TITLES,
    PERCENT,
    X_TITLES,
    Absent,
    FigureResult,
    arm_rank,
    color_of,
    figure_result,
    interval_band,
    interval_error_bars,
    layout_panels,
    metric_name,
    title_and_legend_on_top,
)
from sweep.core.spec import Method
from sweep.store.schema import Status

log = logging.getLogger(__name__)

# -- selection -----------------------------------------------------------------
def prepare(trials: pd.DataFrame, metric: str = "roc_auc") -> pd.DataFrame:
    """Labels arms and keeps one network per lr search (idempotent, cheap on reuse)."""
    if "arm" in trials.columns:
        return trials
    return with_labels(select_lr_runs(trials, metric))


def filter_trials(trials: pd.DataFrame, dataset: str | None = None, model: str | None = None,
                  grid: str | None = None) -> pd.DataFrame:
    """Rows of one dataset / model / grid (None: all)."""
    mask = pd.Series(True, index=trials.index)
    for col, value in (("dataset", dataset), ("model", model), ("grid", grid)):
        if value is not None and col in trials.columns:
            mask &= trials[col].eq(value).fillna(False)
    return trials[mask]


def _experiments(df: pd.DataFrame) -> pd.Series:
    """Row label of the experiment (dataset · model, and the grid when there are several)."""
    parts = df["dataset"].astype(str) + " · " + df["model"].astype(str)
    if df["grid"].nunique(dropna=False) > 1:
        parts = parts + " · " + df["grid"].astype(str)
    return parts


def _base_rows(trials: pd.DataFrame, dataset: str | None, model: str | None, grid: str | None,
               metric: str, imbalance: str | None) -> pd.DataFrame:
    df = filter_trials(trials, dataset, model, grid)
    if df.empty:
        raise Absent("no trials for this selection")
    if metric not in df.columns or df[metric].isna().all():
        raise Absent(f"no {metric} values")
    if imbalance is not None:
        df = df[df["imbalance"].eq(imbalance).fillna(False)]
        if df.empty:
            raise Absent(f"no {imbalance}-imbalance trials")
    df = prepare(df, metric)
    return df.assign(experiment=_experiments(df))


def _full_resampling(df: pd.DataFrame) -> pd.DataFrame:
    """Drop partial re-sampling arms (those are Fig. 7's)."""
    ratio = pd.to_numeric(df.get("resample_ratio", pd.Series(1.0, index=df.index)), errors="coerce")
    return df[ratio.isna() | ratio.eq(1.0)]


# -- drawing -------------------------------------------------------------------
@dataclass(frozen=True)
class _Axes:
    x: str
    y_metric: str
    log_x: bool
    panel: str | None  # column that splits panels (besides the experiment)
    panel_label: Callable[[object], str]


def _sort_key(v: object) -> tuple[int, object]:
    if isinstance(v, (int, float, np.integer, np.floating)) and not pd.isna(v):
        return (0, float(v))
    return (1, str(v))


def _panel_figure(stats: pd.DataFrame, axes: _Axes, fig_id: str, title: str,
                  extra: Callable[[go.Figure, pd.DataFrame, int, int, bool], None] | None = None) -> go.Figure:
    """Lines of mean ± 95% CI per arm, one panel per (experiment, panel value)."""
    if axes.panel is None:
        stats = stats.assign(_panel="")
        panel_col = "_panel"
    else:
        panel_col = axes.panel
    keys = sorted({(e, p) for e, p in zip(stats["experiment"], stats[panel_col])},
                  key=lambda k: (k[0], _sort_key(k[1])))
    experiments = {k[0] for k in keys}
    rows, cols, pos = layout_panels(keys)
    titles = [""] * (rows * cols)
    for k, (r, c) in pos.items():
        label = axes.panel_label(k[1]) if axes.panel else ""
        titles[(r - 1) * cols + (c - 1)] = " · ".join(p for p in (
            k[0] if len(experiments) > 1 or not label else "", label) if p)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, shared_yaxes=True,
                        horizontal_spacing=0.04, vertical_spacing=0.12 if rows > 1 else 0.1)
    shown: set[str] = set()
    for k in keys:
        r, c = pos[k]
        panel = stats[(stats["experiment"] == k[0]) & (stats[panel_col] == k[1])]
        panel_name = titles[(r - 1) * cols + (c - 1)]
        for arm in sorted(panel["arm"].unique(), key=arm_rank):
            line = panel[panel["arm"] == arm].sort_values(axes.x)
            _add_mean_ci(fig, line, axes, fig_id, panel_name, r, c, show_legend=arm not in shown)
            shown.add(arm)
        if extra is not None:
            extra(fig, panel, r, c, "baseline (no re-sampling)" not in shown)
            shown.add("baseline (no re-sampling)")
    _finish(fig, title, axes, rows, cols, set(pos.values()))
    return fig


def _add_mean_ci(fig: go.Figure, line: pd.DataFrame, axes: _Axes, fig_id: str, panel: str,
                 row: int, col: int, show_legend: bool, name: str | None = None,
                 dash: str | None = None, band: bool = True, group: str | None = None) -> None:
    """One arm in one panel: a translucent CI band and the mean line with hover."""
    arm = str(line["arm"].iloc[0])
    base = str(line["arm_base"].iloc[0]) if "arm_base" in line.columns else arm
    color = color_of(base)
    if dash is None:
        dash = "dash" if "thresholding" in base else "solid"  # every thresholded evaluation
    x = line[axes.x].astype(float).tolist()
    mean = (line["mean"] * PERCENT).tolist()
    lo = (line["ci_low"] * PERCENT).tolist()
    hi = (line["ci_high"] * PERCENT).tolist()
    n = line["n"].astype(int).tolist()
    finite = [i for i in range(len(x)) if np.isfinite(lo[i]) and np.isfinite(hi[i])]
    meta = {"fig": fig_id, "arm": name or arm, "arm_base": base, "panel": panel}
    group = group or name or arm
    # Intervals come within the metric's range (aggregate._mean_ci); drawn as they are.
    lo_drawn, hi_drawn = lo, hi
    if band and len(finite) >= 2:
        fig.add_trace(interval_band([x[i] for i in finite], [lo_drawn[i] for i in finite],
                                    [hi_drawn[i] for i in finite], color, group, meta), row=row, col=col)
    error = None
    if len(x) == 1 or (band and len(finite) < 2):
        # A band needs two points: show the interval as error bars instead.
        error = interval_error_bars(mean, lo_drawn, hi_drawn, color)
    y_title = metric_name(axes.y_metric)
    x_title = X_TITLES.get(axes.x, axes.x).replace(" (log scale)", "")
    fig.add_trace(go.Scatter(
        x=x, y=mean, mode="lines+markers", name=name or arm, legendgroup=group,
        showlegend=show_legend, line={"color": color, "dash": dash, "width": 2},
        marker={"color": color, "size": 6}, error_y=error,
        customdata=[[n_i, l_i, h_i] for n_i, l_i, h_i in zip(n, lo, hi)],
        hovertemplate=(f"<b>{name or arm}</b><br>{x_title} = %{{x:.4g}}<br>{y_title} = %{{y:.2f}}%"
                       "<br>interval %{customdata[1]:.2f} – %{customdata[2]:.2f}"
                       "<br>n = %{customdata[0]} networks<extra></extra>"),
        meta={**meta, "role": "mean"}), row=row, col=col)


def _finish(fig: go.Figure, title: str, axes: _Axes, rows: int, cols: int,
            used: set[tuple[int, int]]) -> None:
    title_and_legend_on_top(fig, title, rows)
    for r, c in used:
        below = (r + 1, c) in used
        fig.update_xaxes(type="log" if axes.log_x else "linear",
                         title_text="" if below else X_TITLES.get(axes.x, axes.x),
                         showticklabels=True, row=r, col=c)
        if c == 1:
            fig.update_yaxes(title_text=METRIC_TITLES.get(axes.y_metric, axes.y_metric), row=r, col=c)


def _rho_label(v: object) -> str:
    return f"ρ = {float(v):g}"


def _mu_label(v: object) -> str:
    return f"μ = {float(v):g}"


def _stats(df: pd.DataFrame, by: list[str], metric: str) -> pd.DataFrame:
    out = summarize(df, ["experiment"] + by + ["arm", "arm_base"], metric)
    return out[out["n"] > 0]


def _minority_axis(df: pd.DataFrame) -> str:
    if "n_minority" in df.columns and df["n_minority"].notna().any():
        return "n_minority"
    return "mu"


# -- the figures -----------------------------------------------------------------
def _fig3(trials: pd.DataFrame, dataset: str | None, model: str | None, grid: str | None,
          metric: str = "roc_auc") -> go.Figure:
    df = _full_resampling(_base_rows(trials, dataset, model, grid, metric, "step"))
    df = df[df["evaluation"].eq("raw")]
    by = ["mu", "n_minority"] if "n_minority" in df.columns else ["mu"]
    stats = _stats(df, by + ["rho"], metric)
    if stats.empty:
        raise Absent("no finished step-imbalance networks")
    if "n_minority" in stats.columns and stats["n_minority"].notna().all():
        label = _minority_panel_label(stats)
    else:
        label = _mu_label
    axes = _Axes("rho", metric, True, "mu", label)
    return _panel_figure(stats, axes, "buda-fig3",
                         "Fig. 3 · step imbalance, fixed number of minority classes: "
                         f"{metric_name(metric)} vs ρ")


def _minority_panel_label(stats: pd.DataFrame) -> Callable[[object], str]:
    counts = stats.dropna(subset=["n_minority"]).groupby("mu")["n_minority"].first().to_dict()

    def label(mu: object) -> str:
        k = counts.get(mu)
        return _mu_label(mu) + (f" ({int(k)} minority classes)" if k is not None else "")
    return label


def _fig4(trials: pd.DataFrame, dataset: str | None, model: str | None, grid: str | None,
          metric: str = "roc_auc") -> go.Figure:
    df = _full_resampling(_base_rows(trials, dataset, model, grid, metric, "step"))
    df = df[df["evaluation"].eq("raw")]
    x = _minority_axis(df)
    stats = _stats(df, ["rho", x], metric)
    if stats.empty:
        raise Absent("no finished step-imbalance networks")
    axes = _Axes(x, metric, False, "rho", _rho_label)
    return _panel_figure(stats, axes, "buda-fig4",
                         f"Fig. 4 · step imbalance, fixed ratio ρ: {metric_name(metric)} "
                         "vs number of minority classes")


def _fig5(trials: pd.DataFrame, dataset: str | None, model: str | None, grid: str | None,
          metric: str = "roc_auc") -> go.Figure:
    df = _full_resampling(_base_rows(trials, dataset, model, grid, metric, "linear"))
    df = df[df["evaluation"].eq("raw")]
    stats = _stats(df, ["rho"], metric)
    if stats.empty:
        raise Absent("no finished linear-imbalance networks")
    axes = _Axes("rho", metric, True, None, str)
    return _panel_figure(stats, axes, "buda-fig5",
                         f"Fig. 5 · linear imbalance: {metric_name(metric)} vs ρ")


def _fig6(trials: pd.DataFrame, dataset: str | None, model: str | None, grid: str | None,
          metric: str = "accuracy") -> go.Figure:
    df = _full_resampling(_base_rows(trials, dataset, model, grid, metric, "step"))
    thresholded = set(df.loc[df["evaluation"].eq("threshold"), "method"].dropna())
    if not thresholded:
        raise Absent("no thresholded evaluations (grid key `thresholding`)")
    df = df[df["method"].isin(thresholded)]
    x = _minority_axis(df)
    stats = _stats(df, ["rho", x], metric)
    if stats.empty:
        raise Absent("no finished step-imbalance networks")
    axes = _Axes(x, metric, False, "rho", _rho_label)
    return _panel_figure(stats, axes, "buda-fig6",
                         f"Fig. 6 · step imbalance: {metric_name(metric)} with (dashed) and "
                         "without thresholding vs number of minority classes")


def _fig7(trials: pd.DataFrame, dataset: str | None, model: str | None, grid: str | None,
          metric: str = "roc_auc") -> go.Figure:
    df = _base_rows(trials, dataset, model, grid, metric, None)
    df = df[df["evaluation"].eq("raw")]
    sampled = df[df["method"].isin([str(m) for m in Method if m.resamples])]
    levels = sampled.groupby(["experiment", "imbalance", "rho"], dropna=False)["resample_ratio"].nunique()
    partial = levels[levels > 1].reset_index()[["experiment", "imbalance", "rho"]]
    if partial.empty:
        raise Absent("no partial re-sampling (grid key `resample_ratios` with more than one level)")
    sampled = sampled.merge(partial, on=["experiment", "imbalance", "rho"])
    # Colour by method: the partial levels are points of the method's line.
    sampled = sampled.assign(arm=sampled["arm_base"])
    panel = _fig7_panels(sampled)
    stats = _stats(sampled.assign(panel=panel), ["panel", "resample_ratio"], metric)
    base = df[df["method"].eq("baseline") & df["loss"].fillna("ce").eq("ce")]
    base = base.merge(partial, on=["experiment", "imbalance", "rho"])
    # No re-sampling leaves ratio ρ: the baseline is each line's right-hand end.
    base_stats = _stats(base.assign(panel=_fig7_panels(base), resample_ratio=base["rho"]),
                        ["panel", "resample_ratio"], metric)
    if stats.empty:
        raise Absent("no finished partially re-sampled networks")

    def add_baseline(fig: go.Figure, panel_stats: pd.DataFrame, r: int, c: int, legend: bool) -> None:
        key = panel_stats[["experiment", "panel"]].iloc[0]
        b = base_stats[(base_stats["experiment"] == key["experiment"]) & (base_stats["panel"] == key["panel"])]
        if not b.empty:
            _add_mean_ci(fig, b, axes, "buda-fig7", str(key["panel"]), r, c, legend,
                         name="baseline (no re-sampling)", dash="dot", band=False)

    axes = _Axes("resample_ratio", metric, True, "panel", str)
    return _panel_figure(stats, axes, "buda-fig7",
                         f"Fig. 7 · partial re-sampling: {metric_name(metric)} vs imbalance "
                         "left after over-/under-sampling", extra=add_baseline)


def _fig7_panels(df: pd.DataFrame) -> pd.Series:
    rho = df["rho"].map(lambda v: f"ρ = {float(v):g}")
    kind = df["imbalance"].astype(str)
    if "n_minority" in df.columns and df["n_minority"].notna().any():
        k = df["n_minority"].map(lambda v: f", {int(v)} minority" if pd.notna(v) else "")
    else:
        k = pd.Series("", index=df.index)
    return kind + " " + rho + k


def _fig8(curves: pd.DataFrame, trials: pd.DataFrame, dataset: str | None, model: str | None,
          grid: str | None, cell: dict | None = None, metric: str = "accuracy") -> go.Figure:
    if curves is None or curves.empty or "network_id" not in curves.columns:
        raise Absent("no training curves (recipe `eval_every` was 0)")
    if metric not in curves.columns:
        raise Absent(f"curves have no {metric}")
    nets = _base_rows(trials, dataset, model, grid, "roc_auc" if "roc_auc" in trials.columns else metric, None)
    nets = nets[nets["evaluation"].eq("raw") & nets["status"].eq(Status.OK)]
    nets = _full_resampling(nets)
    cols = ["network_id", "experiment", "arm", "arm_base"] + CELL
    nets = nets[[c for c in cols if c in nets.columns]].drop_duplicates("network_id")
    nets = nets[nets["network_id"].isin(set(curves["network_id"]))]
    if nets.empty:
        raise Absent("no curves of finished networks in this selection")
    nets = _fig8_cells(nets, cell)
    data = curves[curves["split"].isin(["test", "train"])].merge(nets, on="network_id")
    data = data[np.isfinite(pd.to_numeric(data[metric], errors="coerce"))]
    if data.empty:
        raise Absent(f"no finite {metric} in the curves")
    stats = summarize(data.assign(status=str(Status.OK)), ["experiment", "cell_label", "arm", "arm_base", "split", "iter"],
                      metric)
    return _fig8_draw(stats, metric)


def _fig8_cells(nets: pd.DataFrame, cell: dict | None) -> pd.DataFrame:
    """Keep one imbalance cell per experiment: the given one, else the best covered.

    Averaging curves across cells would mix imbalance levels; by default the cell with
    the most networks with curves is drawn (ties: the strongest imbalance).
    """
    if cell:
        for k, v in cell.items():
            nets = nets[nets[k].eq(v).fillna(False)] if k in nets.columns else nets
        if nets.empty:
            raise Absent(f"no curves for cell {cell}")
    keys = [c for c in ["imbalance", "rho", "mu"] if c in nets.columns]
    counts = nets.groupby(["experiment"] + keys, dropna=False).size().rename("count").reset_index()
    counts = counts.sort_values(["count", "rho", "mu"], ascending=False, na_position="last")
    chosen = counts.drop_duplicates("experiment")
    nets = nets.merge(chosen[["experiment"] + keys], on=["experiment"] + keys)
    label = nets["imbalance"].astype(str) + " ρ = " + nets["rho"].map(lambda v: f"{float(v):g}")
    label = label + nets["mu"].map(lambda v: f", μ = {float(v):g}" if pd.notna(v) else "")
    return nets.assign(cell_label=label)


def _fig8_draw(stats: pd.DataFrame, metric: str) -> go.Figure:
    stats = stats[stats["n"] > 0]
    arms = sorted(stats["arm"].unique(), key=arm_rank)
    experiments = sorted(stats["experiment"].unique())
    keys = [(e, a) for e in experiments for a in arms if ((stats["experiment"] == e) & (stats["arm"] == a)).any()]
    rows, cols, pos = len(experiments), len(arms), {}
    for e, a in keys:
        pos[(e, a)] = (experiments.index(e) + 1, arms.index(a) + 1)
    titles = [""] * (rows * cols)
    for (e, a), (r, c) in pos.items():
        cell = stats.loc[stats["experiment"] == e, "cell_label"].iloc[0]
        titles[(r - 1) * cols + c - 1] = f"{a} · {e} · {cell}" if c == 1 else a
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, shared_yaxes=True,
                        horizontal_spacing=0.04, vertical_spacing=0.15)
    axes = _Axes("iter", metric, False, None, str)
    for (e, a), (r, c) in pos.items():
        for split, dash in (("test", "solid"), ("train", "dot")):
            line = stats[(stats["experiment"] == e) & (stats["arm"] == a) & (stats["split"] == split)]
            if line.empty:
                continue
            _add_mean_ci(fig, line.sort_values("iter"), axes, "buda-fig8", titles[(r - 1) * cols + c - 1],
                         r, c, show_legend=split == "test" and r == 1, name=f"{a} ({split})" if split == "train"
                         else a, dash=dash, band=True, group=a)
    _finish(fig, f"Fig. 8 · training curves: {metric_name(metric)} on the test set (solid) and "
                 "the training set (dotted)", axes, rows, cols, set(pos.values()))
    return fig


# -- public API ----------------------------------------------------------------
_CAPTIONS = {
    "buda-fig3": f"Mean over repeats; the band is the {INTERVALS}. Thresholding is left out: "
                 "dividing each class's scores by one prior leaves one-vs-rest ROC AUC unchanged "
                 "(Fig. 6 shows its effect on accuracy).",
    "buda-fig4": "Undersampling trains on the same number of images at a fixed ρ, whatever the "
                 "number of minority classes.",
    "buda-fig5": "Class counts interpolated linearly between the largest class and the largest/ρ.",
    "buda-fig6": "Thresholding divides the outputs by the imbalanced training set's class priors.",
    "buda-fig7": "ρ' = 1 is full re-sampling; the baseline (no re-sampling) sits at ρ' = ρ.",
    "buda-fig8": f"Mean accuracy of the networks of one imbalance cell; the band is the {INTERVALS}.",
}
# Buda's figure number -> (report title, the metric it plots by default)
_FIGURES: dict[int, tuple[str, str]] = {
    3: ("Fig. 3 · ROC AUC vs imbalance ratio", "roc_auc"),
    4: ("Fig. 4 · ROC AUC vs number of minority classes", "roc_auc"),
    5: ("Fig. 5 · linear imbalance", "roc_auc"),
    6: ("Fig. 6 · accuracy and thresholding", "accuracy"),
    7: ("Fig. 7 · partial re-sampling", "roc_auc"),
    8: ("Fig. 8 · training curves", "accuracy"),
}


def _draw(number: int, trials: pd.DataFrame, curves: pd.DataFrame | None, dataset: str | None,
          model: str | None, grid: str | None, metric: str | None, cell: dict | None) -> go.Figure:
    metric = metric or _FIGURES[number][1]
    if number == 8:
        return _fig8(curves, trials, dataset, model, grid, cell, metric)
    build = {3: _fig3, 4: _fig4, 5: _fig5, 6: _fig6, 7: _fig7}[number]
    return build(trials, dataset, model, grid, metric)


def buda_figure(number: int, trials: pd.DataFrame, curves: pd.DataFrame | None = None, *,
                dataset: str | None = None, model: str | None = None, grid: str | None = None,
                metric: str | None = None, cell: dict | None = None) -> go.Figure | None:
    """Buda's Fig. ``number`` (3-8; Fig. 8 from ``curves``, one imbalance ``cell`` of them),
    or None when the store has nothing for it (logged)."""
    if number not in _FIGURES:
        raise ValueError(f"Buda et al. have no figure {number} here (figures: {', '.join(map(str, _FIGURES))})")
    try:
        return _draw(number, trials, curves, dataset, model, grid, metric, cell)
    except Absent as why:
        log.info("figure skipped: %s", why)
        return None


def buda_figures(trials: pd.DataFrame, curves: pd.DataFrame | None = None, *,
                 dataset: str | None = None, model: str | None = None,
                 grid: str | None = None) -> list[FigureResult]:
    """Figs. 3-8 in order, each with its figure or the reason it is absent."""
    prepared = prepare(filter_trials(trials, dataset, model, grid)) if not trials.empty else trials
    return [figure_result(f"buda-fig{n}", title, _CAPTIONS.get(f"buda-fig{n}", ""),
                          lambda n=n: _draw(n, prepared, curves, None, None, None, None, None))
            for n, (title, _) in _FIGURES.items()]


def figure_points(fig: go.Figure) -> list[dict]:
    """The plotted means as records (fig, panel, arm, x, y, n): for tests and tables."""
    out = []
    for tr in fig.data:
        meta = tr.meta or {}
        if not isinstance(meta, dict) or meta.get("role") != "mean":
            continue
        for x, y, cd in zip(tr.x, tr.y, tr.customdata):
            out.append({"fig": meta.get("fig"), "panel": meta.get("panel"), "arm": meta.get("arm"),
                        "x": x, "y": y, "n": int(cd[0]), "ci_low": cd[1], "ci_high": cd[2],
                        "color": tr.line.color})
    return out
