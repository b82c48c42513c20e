"""Long-tail views: accuracy by shot group, macro-F1, G-mean, per-class recall, confusion.

Floor: analysis (imports sweep.core and sweep.store only; reads results through
analysis.load).

Pure pandas / numpy on the frames :class:`analysis.load.Results` returns; sklearn is only
a test dependency (tests check these numbers against it).

* **Shot groups** (Liu et al., ImageNet-LT, CVPR 2019): a class of a network's imbalanced
  training set is *many-shot* with more than ``many`` training images, *few-shot* with
  fewer than ``few``, *medium-shot* in between (``many`` and ``few`` included); defaults
  100 and 20. A group's accuracy is the accuracy on the test images of its classes.
* **Macro-F1** (from ``confusion``): the mean over classes of 2 TP / (2 TP + FP + FN),
  over the classes that occur as a label or a prediction (``sklearn.metrics.f1_score``'s
  ``average="macro"``; a class with TP = 0 scores 0).
* **G-mean** (from ``class_metrics.accuracy``, the per-class recall): the geometric mean
  of the per-class recalls; one class never recognised makes it 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.aggregate import INTERVALS, summarize
from analysis.load import Results
from analysis.plotkit import PERCENT, FigureResult, arm_rank, color_of, figure_result, interval_error_bars
from sweep.store.schema import CLASS_METRICS, CONFUSION, Status

LONGTAIL_METRICS = ("macro_f1", "g_mean")  # per-trial metrics computed here, not stored in trials
SHOTS = ("many", "medium", "few")
_NO_CONFUSION = ("the store has no confusion table (it was written before the worker stored "
                 "confusion counts); macro-F1 and the confusion matrix need it")
_NO_CLASS_METRICS = "the store has no class_metrics table"


@dataclass(frozen=True)
class ShotThresholds:
    """Training-image counts that split classes into many-, medium- and few-shot."""

    many: int = 100  # more than this: many-shot
    few: int = 20  # fewer than this: few-shot

    def __post_init__(self) -> None:
        if not 0 <= self.few <= self.many:
            raise ValueError(f"need 0 <= few <= many, got few={self.few}, many={self.many}")

    def describe(self) -> str:
        return (f"many-shot: > {self.many} training images, medium-shot: {self.few}–{self.many}, "
                f"few-shot: < {self.few}")

    def shot(self, train_count: pd.Series) -> pd.Series:
        counts = pd.to_numeric(train_count, errors="coerce")
        return pd.Series(np.select([counts > self.many, counts < self.few], ["many", "few"], "medium"),
                         index=train_count.index)


# -- per-trial metrics ------------------------------------------------------------------
def _trial_key(df: pd.DataFrame) -> list[str]:
    """What names one trial's rows: the same trial stored under two grids is two trials
    (each grid's rows are complete on their own, docs/store.md)."""
    return ["grid", "trial_id"] if "grid" in df.columns else ["trial_id"]


def macro_f1(confusion: pd.DataFrame) -> pd.Series:
    """Macro-F1 per trial (index: ``_trial_key``) from its confusion rows (see module doc)."""
    key = _trial_key(confusion)
    if confusion.empty:
        return pd.Series(dtype=float, name="macro_f1")
    c = confusion[key + ["true_class", "predicted_class", "count"]]
    by_true = c.rename(columns={"true_class": "class"}).groupby(key + ["class"])["count"]
    by_pred = c.rename(columns={"predicted_class": "class"}).groupby(key + ["class"])["count"]
    tp = c[c["true_class"] == c["predicted_class"]].rename(columns={"true_class": "class"}) \
        .groupby(key + ["class"])["count"].sum()
    per_class = pd.concat({"tp": tp, "support": by_true.sum(), "predicted": by_pred.sum()}, axis=1).fillna(0)
    # 2 TP + FP + FN = support + predicted; every listed class has one of them > 0.
    f1 = 2 * per_class["tp"] / (per_class["support"] + per_class["predicted"])
    return f1.groupby(level=key).mean().rename("macro_f1")


def g_mean(class_metrics: pd.DataFrame) -> pd.Series:
    """G-mean per trial (index: ``_trial_key``): geometric mean of the finite per-class recalls."""
    key = _trial_key(class_metrics)
    recall = pd.to_numeric(class_metrics["accuracy"], errors="coerce")
    df = class_metrics[np.isfinite(recall)]
    if df.empty:
        return pd.Series(dtype=float, name="g_mean")
    # exp(mean(log r)), with log 0 = -inf giving exp(-inf) = 0 as it should.
    with np.errstate(divide="ignore"):
        logs = df[key].assign(_log=np.log(recall[np.isfinite(recall)].to_numpy()))
    return np.exp(logs.groupby(key)["_log"].mean()).rename("g_mean")


def shot_accuracy(class_metrics: pd.DataFrame, thresholds: ShotThresholds = ShotThresholds()) -> pd.DataFrame:
    """Per trial (``_trial_key``) and shot group: ``accuracy`` on the group's test images and
    its number of ``classes``."""
    df = class_metrics.assign(shot=thresholds.shot(class_metrics["train_count"]),
                              _recall=pd.to_numeric(class_metrics["accuracy"], errors="coerce"))
    df = df[np.isfinite(df["_recall"])]
    weight = (pd.to_numeric(df["test_count"], errors="coerce").fillna(1.0) if "test_count" in df.columns
              else pd.Series(1.0, index=df.index))
    df = df.assign(_hits=df["_recall"] * weight, _n=weight)
    g = df.groupby(_trial_key(df) + ["shot"])
    out = pd.DataFrame({"accuracy": g["_hits"].sum() / g["_n"].sum(), "classes": g.size()})
    return out.reset_index()


def with_trial_metrics(trials: pd.DataFrame, class_metrics: pd.DataFrame | None,
                       confusion: pd.DataFrame | None) -> pd.DataFrame:
    """``trials`` with ``macro_f1`` and ``g_mean`` columns (NaN where their table is absent)."""
    out = trials.copy()
    for name, values in (("macro_f1", macro_f1(confusion) if confusion is not None else None),
                         ("g_mean", g_mean(class_metrics) if class_metrics is not None else None)):
        if values is None:
            out[name] = np.nan
            continue
        key = [k for k in values.index.names if k in out.columns]
        if len(key) < values.index.nlevels:  # tables with a grid column, trials without one
            values = values.groupby(level=key).mean()
        joined = out[key].merge(values.reset_index(), on=key, how="left")
        out[name] = joined[name].to_numpy()
    return out


@dataclass(frozen=True)
class ClassTables:
    """The per-class tables of some trials; None where the store lacks the table."""

    class_metrics: pd.DataFrame | None
    confusion: pd.DataFrame | None


def read_class_tables(results: Results, trials: pd.DataFrame, grid: str | None = None,
                      names: Sequence[str] = (CLASS_METRICS, CONFUSION)) -> ClassTables:
    """The ``class_metrics`` and ``confusion`` rows of ``trials`` (committed packs only); only
    the tables in ``names`` are read (confusion is the large one), the others are None."""
    ids = set(trials["trial_id"])
    filters = [("grid", "==", grid)] if grid is not None else None

    def read(name: str) -> pd.DataFrame | None:
        if name not in names or not results.has(name):
            return None
        df = results.table(name, filters=filters)
        return df[df["trial_id"].isin(ids)]

    return ClassTables(read(CLASS_METRICS), read(CONFUSION))


# -- figures -----------------------------------------------------------------------------
def _cell_label(df: pd.DataFrame) -> pd.Series:
    """"ρ = 100, μ = 0.5" (step) or "linear, ρ = 100", prefixed by dataset · model (and grid)
    when the frame holds several."""
    rho = pd.to_numeric(df["rho"], errors="coerce").map(lambda v: f"ρ = {v:g}")
    mu = pd.to_numeric(df["mu"], errors="coerce").map(lambda v: f", μ = {v:g}" if np.isfinite(v) else "")
    kind = df["imbalance"].astype(str).map(lambda k: "" if k == "step" else f"{k}, ")
    label = kind + rho + mu
    experiment = [c for c in ("grid", "dataset", "model") if c in df.columns]
    if df[experiment].drop_duplicates().shape[0] > 1:
        label = df["dataset"].astype(str) + " · " + df["model"].astype(str) + " · " + label
        if "grid" in df.columns and df["grid"].nunique() > 1:
            label = df["grid"].astype(str) + " · " + label
    return label


def _ordered(df: pd.DataFrame) -> tuple[list[str], list[str]]:
    """Cell labels sorted by grid, dataset, model, imbalance, rho, mu; arms in the paper's order."""
    order = [c for c in ("grid", "dataset", "model", "imbalance") if c in df.columns] + ["_rho", "_mu"]
    cells = (df.assign(_rho=pd.to_numeric(df["rho"], errors="coerce"), _mu=pd.to_numeric(df["mu"], errors="coerce"))
             .sort_values(order)["cell"].drop_duplicates().tolist())
    bases = df.drop_duplicates("arm").set_index("arm")["arm_base"]
    arms = sorted(bases.index, key=lambda a: (arm_rank(bases[a])[0], a))
    return cells, arms


def _mean_traces(fig: go.Figure, stats: pd.DataFrame, col: int, cells: list[str], arms: list[str],
                 bases: pd.Series, first: bool) -> None:
    """One line per arm over the cells (one panel's ``summarize`` rows): mean x 100 with its
    interval (aggregate._mean_ci) as error bars; the legend once, from the first panel."""
    for arm in arms:
        s = stats[stats["arm"] == arm].set_index("cell").reindex(cells)
        fig.add_trace(go.Scatter(
            x=cells, y=s["mean"] * PERCENT, mode="lines+markers", name=arm, legendgroup=arm, showlegend=first,
            line={"color": color_of(bases[arm])},
            error_y=interval_error_bars((s["mean"] * PERCENT).tolist(), (s["ci_low"] * PERCENT).tolist(),
                                        (s["ci_high"] * PERCENT).tolist()),
            customdata=s[["n"]].fillna(0).to_numpy(),
            hovertemplate=f"{arm}<br>%{{x}}: %{{y:.2f}} (n = %{{customdata[0]}})<extra></extra>"), row=1, col=col)


def _labelled_values(trials: pd.DataFrame, values: pd.DataFrame) -> pd.DataFrame:
    """``values`` (per-trial rows) joined to the labelled trials, with their cell label."""
    key = [c for c in _trial_key(values) if c in trials.columns]
    df = trials.merge(values, on=key, how="inner", suffixes=("_trial", ""))
    return df.assign(cell=_cell_label(df))


def shot_figure(trials: pd.DataFrame, class_metrics: pd.DataFrame,
                thresholds: ShotThresholds = ShotThresholds()) -> go.Figure:
    """Accuracy on many-, medium- and few-shot classes per cell and arm (one panel each)."""
    shots = shot_accuracy(class_metrics, thresholds).rename(columns={"accuracy": "shot_accuracy"})
    df = _labelled_values(trials, shots)
    present = [s for s in SHOTS if (df["shot"] == s).any()]
    if df.empty or not present:
        raise ValueError("no per-class accuracy of these trials")
    stats = summarize(df, ["shot", "cell", "arm"], "shot_accuracy")
    cells, arms = _ordered(df)
    bases = df.drop_duplicates("arm").set_index("arm")["arm_base"]
    fig = make_subplots(rows=1, cols=len(present), shared_yaxes=True,
                        subplot_titles=[f"{s}-shot classes" for s in present])
    for col, shot in enumerate(present, start=1):
        _mean_traces(fig, stats[stats["shot"] == shot], col, cells, arms, bases, col == 1)
    fig.update_yaxes(title_text="accuracy (%)", row=1, col=1)
    fig.update_layout(title=f"Accuracy by shot group ({thresholds.describe()})", height=460)
    return fig


def f1_gmean_figure(trials: pd.DataFrame) -> go.Figure:
    """Macro-F1 and G-mean per cell and arm, from :func:`with_trial_metrics`'s columns."""
    present = [m for m in LONGTAIL_METRICS if m in trials.columns and trials[m].notna().any()]
    if not present:
        raise ValueError("no macro-F1 or G-mean values")
    df = trials.assign(cell=_cell_label(trials))
    cells, arms = _ordered(df)
    bases = df.drop_duplicates("arm").set_index("arm")["arm_base"]
    titles = {"macro_f1": "macro-F1 (%)", "g_mean": "G-mean of per-class recall (%)"}
    fig = make_subplots(rows=1, cols=len(present), subplot_titles=[titles[m] for m in present])
    for col, metric in enumerate(present, start=1):
        _mean_traces(fig, summarize(df, ["cell", "arm"], metric), col, cells, arms, bases, col == 1)
    fig.update_layout(title="Macro-F1 and G-mean (mean over repeats with its interval, see the caption)", height=460)
    return fig


def recall_heatmap(trials: pd.DataFrame, class_metrics: pd.DataFrame) -> go.Figure:
    """Per-class recall per cell and arm: one heat map per cell (a menu picks the cell).

    Columns are classes ranked by their training count in each network (most to fewest,
    ties by label): in a step imbalance each repeat draws other minority labels, so
    averaging by label would mix majority and minority classes.
    """
    cm = class_metrics.assign(_recall=pd.to_numeric(class_metrics["accuracy"], errors="coerce"))
    key = _trial_key(cm)
    cm = cm.sort_values(key + ["train_count", "class"], ascending=[True] * len(key) + [False, True],
                        kind="stable")
    cm["position"] = cm.groupby(key).cumcount()
    df = _labelled_values(trials[trials["status"].eq(Status.OK)], cm[key + ["position", "train_count", "_recall"]])
    if df.empty:
        raise ValueError("no per-class recall of finished trials")
    cells, arms = _ordered(df)
    fig = go.Figure()
    for i, cell in enumerate(cells):
        g = df[df["cell"] == cell].groupby(["arm", "position"])
        recall = g["_recall"].mean().unstack("position")
        rows = [a for a in arms if a in recall.index]
        counts = g["train_count"].mean().unstack("position").reindex(rows)
        fig.add_trace(go.Heatmap(
            z=recall.reindex(rows).to_numpy() * PERCENT, x=list(recall.columns), y=rows, zmin=0, zmax=100,
            colorscale="Viridis", visible=i == 0, name=cell, colorbar={"title": "recall (%)"},
            customdata=counts.to_numpy(),
            hovertemplate="%{y}<br>class rank %{x} (mean training count %{customdata:.0f})"
                          "<br>recall %{z:.1f}%<extra></extra>"))
    buttons = [{"label": cell, "method": "update",
                "args": [{"visible": [j == i for j in range(len(cells))]}, {"title": f"Per-class recall · {cell}"}]}
               for i, cell in enumerate(cells)]
    fig.update_layout(title=f"Per-class recall · {cells[0]}", height=220 + 28 * len(arms),
                      xaxis={"title": "class, ranked by training count in each network (0 = most images)",
                             "dtick": max(1, int(df["position"].max()) // 10)},  # whole ranks only
                      updatemenus=[{"buttons": buttons, "x": 1.0, "xanchor": "right", "y": 1.18}]
                      if len(cells) > 1 else [], margin={"l": 220})
    return fig


def default_confusion_trial(trials: pd.DataFrame, confusion: pd.DataFrame) -> str:
    """The baseline's raw evaluation in the most imbalanced cell (first repeat) that has
    confusion rows; else the first trial that has them."""
    have = trials[trials["trial_id"].isin(set(confusion["trial_id"]))]
    if have.empty:
        raise ValueError("no confusion rows of these trials")
    order = have.assign(_base=~have["arm"].eq("baseline"), _rho=-pd.to_numeric(have["rho"], errors="coerce"))
    return str(order.sort_values(["_base", "_rho", "repeat", "trial_id"], kind="stable")["trial_id"].iloc[0])


def confusion_figure(confusion: pd.DataFrame, trial_id: str, title: str = "", grid: str | None = None) -> go.Figure:
    """One trial's confusion matrix (of ``grid`` when given): colour = share of the true
    class's test images (rows sum to 100 %), hover = the count."""
    c = confusion[confusion["trial_id"].eq(trial_id) & (confusion["grid"].eq(grid) if grid is not None else True)]
    if c.empty:
        raise ValueError(f"no confusion rows for trial {trial_id}")
    k = int(max(c["true_class"].max(), c["predicted_class"].max())) + 1
    counts = np.zeros((k, k), dtype=np.int64)
    counts[c["true_class"].to_numpy(), c["predicted_class"].to_numpy()] = c["count"].to_numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        share = counts / counts.sum(axis=1, keepdims=True) * PERCENT
    # 4-byte values: a 1000-class matrix is a million cells of the page's JSON.
    fig = go.Figure(go.Heatmap(z=share.astype(np.float32), customdata=counts.astype(np.int32), x=list(range(k)), y=list(range(k)),
                               colorscale="Blues", zmin=0, zmax=100, colorbar={"title": "% of true class"},
                               hovertemplate="true %{y} → predicted %{x}: %{customdata} images "
                                             "(%{z:.1f}%)<extra></extra>"))
    side = min(900, 300 + 30 * k)
    fig.update_layout(title=title or f"Confusion matrix of trial {trial_id}", height=side, width=side + 120,
                      xaxis={"title": "predicted class"}, yaxis={"title": "true class", "autorange": "reversed"})
    return fig


def longtail_figures(trials: pd.DataFrame, tables: ClassTables,
                     thresholds: ShotThresholds = ShotThresholds()) -> list[FigureResult]:
    """The report's long-tail views, each with its figure or the reason it is absent.

    ``trials`` are labelled (``analysis.figures.prepare``); ``tables`` hold their rows.
    """
    cm, conf = tables.class_metrics, tables.confusion
    with_metrics = with_trial_metrics(trials, cm, conf)
    shot_caption = (f"Shot groups by each network's training count ({thresholds.describe()}; the usual "
                    f"ImageNet-LT thresholds). Mean over repeats; the bars are the {INTERVALS}.")
    builds = [
        ("longtail-shots", "Accuracy on many-, medium- and few-shot classes", shot_caption,
         _NO_CLASS_METRICS if cm is None else "", lambda: shot_figure(trials, cm, thresholds)),
        ("longtail-f1-gmean", "Macro-F1 and G-mean",
         "Macro-F1 from the test-set confusion counts; G-mean: the geometric mean of the per-class recalls "
         f"(0 when one class is never recognised). Mean over repeats; the bars are the {INTERVALS}."
         + ("" if conf is not None else f" Macro-F1: {_NO_CONFUSION}."),
         "the store has neither class_metrics nor confusion tables" if cm is None and conf is None else "",
         lambda: f1_gmean_figure(with_metrics)),
        ("longtail-recall", "Per-class recall by cell and method",
         "Mean recall over repeats; classes ranked by training count within each network. The menu picks "
         "the cell.", _NO_CLASS_METRICS if cm is None else "", lambda: recall_heatmap(trials, cm)),
    ]
    out = [_build(*b) for b in builds]
    if conf is None:
        return out + [FigureResult("longtail-confusion", "Confusion matrix", "", None, _NO_CONFUSION)]
    try:
        tid = default_confusion_trial(trials, conf)
    except ValueError as why:
        return out + [FigureResult("longtail-confusion", "Confusion matrix", "", None, str(why))]
    rows = trials[trials["trial_id"] == tid].iloc[:1]
    row = rows.iloc[0]
    name = f"{row['arm']}, {_cell_label(rows).iloc[0]}, repeat {row['repeat']}"
    grid = row["grid"] if "grid" in rows.columns and "grid" in conf.columns else None
    return out + [_build("longtail-confusion", "Confusion matrix", f"Test-set confusion of one network: {name} "
                         "(the baseline in the most imbalanced cell). Rows are true classes.", "",
                         lambda: confusion_figure(conf, tid, f"Confusion matrix · {name}", grid))]


def _build(fig_id: str, title: str, caption: str, absent: str, make: Callable[[], go.Figure]) -> FigureResult:
    """The figure ``make`` draws, or why not: ``absent`` (a table the store lacks) or its ValueError."""
    if absent:
        return FigureResult(fig_id, title, caption, None, absent)
    return figure_result(fig_id, title, caption, make, expected=(ValueError,))  # ValueError: nothing to draw
