"""Figures and tables of Dablain et al.'s latent statistics, from the ``latent_stats`` table.

Floor: analysis (imports sweep.core and sweep.store only; reads results through
analysis.load).
It is longer than 400 lines because it holds one builder per figure and table of Dablain
et al. over one shared preparation step.

Input: the tidy frame written by :func:`workers.latent.statistics_table`
(``network_id, split, feature_scale, class, statistic, k, feature, value``), usually joined with
network-level columns of ``trials`` by :func:`join_trials` (dataset, method,
loss, imbalance, rho, class_counts, ...). Statistic keys and their definitions
are in :mod:`workers.latent` (``STATISTICS`` and the module docstring).

Feature scales: an LDAM network's cosine head normalises FE and W_C inside the last layer,
so its rows come on two scales (``feature_scale``: ``raw``, before normalisation, and
``normalised``, what the head multiplies; :mod:`workers.latent_tables`); every other
network has one, ``raw``. :func:`on_scale` picks one; :func:`dablain_figures` draws the
paper's, ``raw`` (Dablain et al. read the penultimate features of Cao et al.'s ResNet-32),
and its captions say so.

Every builder takes ``where`` (``{column: value or list of values}``) to pick a
subset of the store, averages each plotted quantity over the networks that
have it, and states that number of networks ``n`` in legends, hover text or
table columns. The aggregate behind each figure is available from the
matching ``*_data`` function, so a figure's traces can be checked against it.

Figure / table of the paper -> builder:

* Fig. 2 and Table 2 (per-class train vs test accuracy): :func:`class_accuracy_figure`,
  :func:`accuracy_table`;
* Fig. 3 (class top-K coverage): :func:`coverage_figure` (coverage vs K, one line
  per class) and :func:`coverage_by_class_figure` (coverage vs class, one line per K);
* Figs. 4, 5, 7, 8, 10a (the ten largest class ce / fe / W_C / member frequencies):
  :func:`ranked_figure`;
* Fig. 6 (top ce share of the logit): :func:`ranked_figure` with ``top_ce_logit_share``;
* Fig. 9 (class top-K features needed): :func:`features_needed_figure`;
* Tables 3 and 4 (majority vs other classes): :func:`magnitude_table`;
* §5.7 (train vs test TP / FP Frobenius norms): :func:`tp_fp_norms_figure`;
* Table 1 (classifier re-training BAC, from ``trials``): :func:`retraining_table`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.plotkit import PERCENT, SPLIT_COLORS, class_color
from sweep.store.schema import FEATURE_SCALE_NORMALISED, FEATURE_SCALE_RAW, feature_scale

__all__ = [
    "join_trials", "select", "on_scale", "complete_coverage", "coverage_data", "coverage_figure", "coverage_by_class_figure",
    "features_needed_data", "features_needed_figure", "ranked_data", "ranked_figure",
    "magnitude_table_data", "magnitude_table", "tp_fp_norms_data", "tp_fp_norms_figure",
    "class_accuracy_data", "class_accuracy_figure", "accuracy_table_data", "accuracy_table",
    "retraining_table_data", "retraining_table",
]

Where = Mapping[str, Any] | None

# Network-level columns of ``trials`` that analyses group latent statistics by.
TRIAL_COLUMNS = ("dataset", "model", "method", "loss", "imbalance", "rho", "repeat", "class_counts")

_UNITS = {
    "fe_mean_magnitude": "mean fe (activation units)",
    "ce_mean_magnitude": "mean ce (logit units)",
    "wc_magnitude": "W_C weight",
    "top_ce_logit_share": "share of the summed ce (fraction)",
    "class_topk_fe_frequency": "fraction of class instances",
    "class_topk_ce_frequency": "fraction of class instances",
    "fe_member_mean_train": "mean fe (activation units)",
    "fe_member_mean_tp": "mean fe (activation units)",
    "fe_member_mean_fp": "mean fe (activation units)",
}


# -- selection and aggregation ------------------------------------------------------------------
def join_trials(latent: pd.DataFrame, trials: pd.DataFrame,
                columns: Sequence[str] = TRIAL_COLUMNS) -> pd.DataFrame:
    """Latent rows with the network-level ``columns`` of ``trials`` (one trial row per network)."""
    cols = [c for c in columns if c in trials.columns and c not in latent.columns]
    nets = trials.drop_duplicates("network_id")[["network_id", *cols]]
    return latent.merge(nets, on="network_id", how="left")


def on_scale(latent: pd.DataFrame, trials: pd.DataFrame, scale: str = FEATURE_SCALE_RAW) -> pd.DataFrame:
    """The latent rows on one feature scale (``raw`` or ``normalised``).

    Rows of stores written before the ``feature_scale`` column hold the one scale those
    stores kept: normalised for a cosine head (LDAM), raw otherwise. The head comes from
    ``trials`` (its ``head`` column, or, where that is absent, LDAM = cosine).
    """
    if scale not in (FEATURE_SCALE_RAW, FEATURE_SCALE_NORMALISED):
        raise ValueError(f"unknown feature scale {scale!r} (allowed: {FEATURE_SCALE_RAW}, {FEATURE_SCALE_NORMALISED})")
    stored = latent["feature_scale"] if "feature_scale" in latent.columns else pd.Series(None, index=latent.index)
    if stored.notna().all():
        return latent[stored == scale]
    nets = trials.drop_duplicates("network_id").set_index("network_id")
    if "head" in nets.columns:
        heads = nets["head"]
    elif "loss" in nets.columns:
        heads = nets["loss"].map(lambda loss: "cosine" if loss == "ldam" else "linear")
    else:
        heads = pd.Series(dtype=object)
    head_of = latent["network_id"].map(heads)
    named = [feature_scale(s, h) for s, h in zip(stored, head_of)]
    return latent[np.asarray(named, dtype=object) == scale]


def select(df: pd.DataFrame, where: Where = None, **equal: Any) -> pd.DataFrame:
    """Rows where every ``where`` / keyword column equals the value (or is in the list)."""
    mask = pd.Series(True, index=df.index)
    for col, val in {**dict(where or {}), **equal}.items():
        if col not in df.columns:
            raise KeyError(f"column {col!r} not in the frame (join trial columns with join_trials)")
        if isinstance(val, (list, tuple, set, frozenset)):
            mask &= df[col].isin(list(val))
        else:
            mask &= df[col] == val
    return df[mask]


def _mean_n(df: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """Mean value over networks and the number of networks n, per ``by`` group.

    NaN values (e.g. a class with no correctly classified instance) are left
    out of both the mean and n.
    """
    out = (df.dropna(subset=["value"]).groupby(list(by), dropna=False, sort=True)
           .agg(value=("value", "mean"), n=("network_id", "nunique"))
           .reset_index())
    out["n"] = out["n"].astype(np.int64)
    return out


def _facet_column(df: pd.DataFrame, facet: str | None) -> pd.DataFrame:
    df = df.copy()
    df["_facet"] = "all" if facet is None else df[facet].astype(str)
    return df


def _n_text(n: pd.Series) -> str:
    lo, hi = int(n.min()), int(n.max())
    return f"n={lo}" if lo == hi else f"n={lo}-{hi}"


def _faceted(facets: list[str], title: str) -> go.Figure:
    fig = make_subplots(rows=1, cols=max(1, len(facets)), subplot_titles=facets or None, shared_yaxes=True)
    fig.update_layout(title=title, legend_title_text="class")
    return fig


def _class_name(c: int) -> str:
    return "all classes" if c == -1 else f"class {c}"


# -- Fig. 3: top-K coverage -------------------------------------------------------------------
def complete_coverage(cov: pd.DataFrame) -> pd.DataFrame:
    """``topk_coverage`` rows filled forward to the largest K any curve of ``cov`` stores.

    The worker stores each curve only up to the first K where it reaches its final
    value (it is constant after that; ``workers.latent_tables``), so curves end at
    different K. Every (network, split, class) curve is extended with its last value.
    """
    if cov.empty:
        return cov
    curve = ["network_id", "split", "class"]
    wide = cov.pivot_table(index=curve, columns="k", values="value", aggfunc="first")
    wide = wide.reindex(columns=range(1, int(cov["k"].max()) + 1)).ffill(axis=1)
    filled = wide.stack().rename("value").reset_index()
    others = [c for c in cov.columns if c not in (*curve, "k", "value")]
    if others:  # network-level columns (statistic, joined trial columns) come back by curve
        filled = filled.merge(cov.drop_duplicates(curve)[[*curve, *others]], on=curve, how="left")
    return filled[list(cov.columns)]


def coverage_data(df: pd.DataFrame, split: str = "train", facet: str | None = "loss",
                  where: Where = None) -> pd.DataFrame:
    """Mean top-K coverage per (facet, class, K) with n networks; class -1 = all classes."""
    d = complete_coverage(select(df, where, split=split, statistic="topk_coverage"))
    d = _facet_column(d, facet)
    return _mean_n(d, ["_facet", "class", "k"]).rename(columns={"_facet": "facet"})


def coverage_figure(df: pd.DataFrame, split: str = "train", facet: str | None = "loss", where: Where = None,
                    max_k: int | None = None) -> go.Figure:
    """Top-K coverage ratio vs K, one line per class, one panel per ``facet`` value (Fig. 3, §3.3)."""
    data = coverage_data(df, split, facet, where)
    if max_k is not None:
        data = data[data["k"] <= max_k]
    facets = sorted(data["facet"].unique())
    fig = _faceted(facets, f"Top-K coverage ratio by class ({split} set; mean over networks)")
    for col, fv in enumerate(facets, start=1):
        for c, d in data[data["facet"] == fv].groupby("class", sort=True):
            fig.add_trace(go.Scatter(
                x=d["k"].astype(int).tolist(), y=d["value"].tolist(), mode="lines",
                name=f"{_class_name(c)} ({_n_text(d['n'])})", legendgroup=str(c), showlegend=col == 1,
                line=dict(dash="dash" if c == -1 else "solid", color=class_color(c)), customdata=d["n"].tolist(),
                hovertemplate="K=%{x}<br>coverage=%{y:.3f}<br>n=%{customdata} networks",
            ), row=1, col=col)
        fig.update_xaxes(title_text="K (number of largest ce of the predicted class)", row=1, col=col)
    fig.update_yaxes(title_text="coverage (fraction of correctly classified instances)", range=[0, 1.02],
                     row=1, col=1)
    return fig


def coverage_by_class_figure(df: pd.DataFrame, ks: Sequence[int] = (2, 3, 5, 7), split: str = "train",
                             facet: str | None = "imbalance", where: Where = None) -> go.Figure:
    """Class top-K coverage ratio vs class, one line per K (the paper's Fig. 3 layout)."""
    data = coverage_data(df, split, facet, where)
    data = data[data["k"].isin(list(ks)) & (data["class"] >= 0)]
    facets = sorted(data["facet"].unique())
    fig = _faceted(facets, f"Class top-K coverage ratio ({split} set; mean over networks)")
    fig.update_layout(legend_title_text="K")
    for col, fv in enumerate(facets, start=1):
        for k, d in data[data["facet"] == fv].groupby("k", sort=True):
            fig.add_trace(go.Scatter(
                x=d["class"].astype(int).tolist(), y=d["value"].tolist(), mode="lines+markers",
                name=f"K={int(k)} ({_n_text(d['n'])})", legendgroup=str(k), showlegend=col == 1,
                customdata=d["n"].tolist(), hovertemplate="class %{x}<br>coverage=%{y:.3f}<br>n=%{customdata}",
            ), row=1, col=col)
        fig.update_xaxes(title_text="class", dtick=1, row=1, col=col)
    fig.update_yaxes(title_text="coverage (fraction of correctly classified instances)", range=[0, 1.02],
                     row=1, col=1)
    return fig


# -- Fig. 9: class top-K features needed ---------------------------------------------------------
def features_needed_data(df: pd.DataFrame, kind: str = "fe", split: str = "train", group: str | None = "loss",
                         where: Where = None) -> pd.DataFrame:
    """Mean number of class top-K fe (or ce) members needed per (group, class), with n."""
    d = _facet_column(select(df, where, split=split, statistic=f"class_topk_{kind}_needed"), group)
    return _mean_n(d, ["_facet", "class"]).rename(columns={"_facet": "group"})


def features_needed_figure(df: pd.DataFrame, kind: str = "fe", split: str = "train", group: str | None = "loss",
                           where: Where = None) -> go.Figure:
    """Class top-K features needed to describe every instance of a class, per class (Fig. 9)."""
    data = features_needed_data(df, kind, split, group, where)
    fig = go.Figure()
    for gv, d in data.groupby("group", sort=True):
        fig.add_trace(go.Bar(
            x=d["class"].astype(int).tolist(), y=d["value"].tolist(), name=f"{gv} ({_n_text(d['n'])})",
            customdata=d["n"].tolist(), hovertemplate="class %{x}<br>needed=%{y:.1f}<br>n=%{customdata}",
        ))
    fig.update_layout(
        barmode="group", title=f"Class top-K {kind} needed to describe all instances ({split} set; mean over networks)",
        xaxis_title="class", yaxis_title=f"number of {kind} features", legend_title_text=group or "",
    )
    fig.update_xaxes(dtick=1)
    return fig


# -- Figs. 4-8, 10a: ranked per-class values ---------------------------------------------------------
def ranked_data(df: pd.DataFrame, statistic: str, split: str = "train", where: Where = None,
                top: int = 10) -> pd.DataFrame:
    """Mean value of rank k (1 = largest) per (class, k), with n.

    Feature identities differ between networks, so ranks (not ids) are averaged.
    """
    d = select(df, where, split=split, statistic=statistic)
    d = d[(d["class"] >= 0) & (d["k"] <= top)]
    return _mean_n(d, ["class", "k"])


def ranked_figure(df: pd.DataFrame, statistic: str = "ce_mean_magnitude", split: str = "train",
                  where: Where = None, top: int = 10) -> go.Figure:
    """The ``top`` largest values per class, rank by rank (Figs. 4-5 ce, 7 W_C, 10a fe, 8, 6)."""
    data = ranked_data(df, statistic, split, where, top)
    fig = go.Figure()
    for k, d in data.groupby("k", sort=True):
        fig.add_trace(go.Bar(
            x=d["class"].astype(int).tolist(), y=d["value"].tolist(), name=f"rank {int(k)} ({_n_text(d['n'])})",
            customdata=d["n"].tolist(), hovertemplate="class %{x}<br>%{y:.3f}<br>n=%{customdata}",
        ))
    fig.update_layout(
        barmode="group", title=f"{statistic}: {top} largest per class ({split} set; mean over networks by rank)",
        xaxis_title="class", yaxis_title=_UNITS.get(statistic, statistic), legend_title_text="rank",
    )
    fig.update_xaxes(dtick=1)
    return fig


# -- Tables 3-4: majority class vs the others -------------------------------------------------------
def _extreme_class(df: pd.DataFrame, which: str, default: int | None) -> pd.Series:
    """Per network: the class with the most (``max``) or fewest (``min``) training examples.

    Taken from ``class_counts`` when the frame has it (ties: the lower class),
    else ``default`` (or the largest class id for ``min``).
    """
    nets = df.drop_duplicates("network_id").set_index("network_id")
    if "class_counts" in nets.columns:
        counts = nets["class_counts"].map(np.asarray)
        return counts.map(lambda a: int(np.argmax(a) if which == "max" else np.argmin(a)))
    if default is not None:
        return pd.Series(default, index=nets.index)
    last = df.groupby("network_id")["class"].max()
    return last if which == "min" else pd.Series(0, index=nets.index)


def magnitude_table_data(df: pd.DataFrame, statistic: str = "ce_mean_magnitude", rank: int = 1,
                         split: str = "train", group: Sequence[str] = ("dataset", "loss"), where: Where = None,
                         majority: int | None = None) -> pd.DataFrame:
    """Per group: rank-``rank`` value for the majority class and averaged over the other classes.

    For each network the majority is the class with the most training examples
    (``class_counts``; else ``majority``, default 0); "other" is the mean over
    its other classes. Returned: the means over networks, ratio = other /
    majority (the paper's Tables 3-4), and n networks.
    """
    d = select(df, where, split=split, statistic=statistic)
    d = d[(d["class"] >= 0) & (d["k"] == rank)]
    group = [g for g in group if g in d.columns]
    maj = _extreme_class(d, "max", majority)
    is_maj = d["class"].to_numpy() == d["network_id"].map(maj).to_numpy()
    keys = group or ["_g"]
    d = d.assign(_role=np.where(is_maj, "majority", "other"), _g="all")
    # Per network: its majority value and the mean over its other classes.
    per_net = (d.groupby([*keys, "network_id", "_role"], dropna=False)["value"].mean()
               .unstack("_role").reindex(columns=["majority", "other"]).reset_index())
    res = (per_net.groupby(keys, dropna=False, sort=True)
           .agg(majority=("majority", "mean"), other=("other", "mean"), n=("network_id", "nunique"))
           .reset_index())
    res["ratio"] = res["other"] / res["majority"]
    return res.drop(columns=["_g"], errors="ignore")


def _table(columns: list[str], cells: list[list[Any]], title: str) -> go.Figure:
    fig = go.Figure(go.Table(header=dict(values=columns), cells=dict(values=cells)))
    rows = len(cells[0]) if cells else 0
    fig.update_layout(title=title, height=190 + 40 * rows)  # a table, not a page of white
    return fig


def _fmt(values: Sequence[float], digits: int = 4) -> list[str]:
    return ["" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{digits}f}" for v in values]


def magnitude_table(df: pd.DataFrame, statistic: str = "ce_mean_magnitude", rank: int = 1, split: str = "train",
                    group: Sequence[str] = ("dataset", "loss"), where: Where = None,
                    majority: int | None = None) -> go.Figure:
    """Tables 3 (``ce_mean_magnitude``) and 4 (``top_ce_logit_share``) as a plotly table.

    Also serves ``fe_mean_magnitude`` and ``wc_magnitude`` (§5.5-5.6).
    """
    data = magnitude_table_data(df, statistic, rank, split, group, where, majority)
    keys = [g for g in group if g in data.columns]
    label = [" / ".join(str(r[g]) for g in keys) or "all" for _, r in data.iterrows()]
    unit = _UNITS.get(statistic, statistic)
    return _table(
        [" / ".join(keys) or "networks", f"majority class ({unit})", f"avg. other classes ({unit})",
         "ratio other / majority", "n networks"],
        [label, _fmt(data["majority"]), _fmt(data["other"]), _fmt(data["ratio"], 2), data["n"].tolist()],
        f"{statistic}, rank {rank} ({split} set; mean over networks)",
    )


# -- §5.7: TP / FP Frobenius norms ---------------------------------------------------------------------
def tp_fp_norms_data(df: pd.DataFrame, statistic: str = "fe_frobenius", group: str | None = "loss",
                     cls: int = -1, where: Where = None) -> pd.DataFrame:
    """Mean ``{statistic}_tp`` and ``{statistic}_fp`` per group (class ``cls``; -1 = Frobenius over classes)."""
    d = select(df, where, statistic=[f"{statistic}_tp", f"{statistic}_fp"])
    d = _facet_column(d[d["class"] == cls], group)
    d = d.assign(set=d["statistic"].str.rsplit("_", n=1).str[-1].str.upper())
    return _mean_n(d.dropna(subset=["value"]), ["_facet", "set"]).rename(columns={"_facet": "group"})


def tp_fp_norms_figure(df: pd.DataFrame, statistic: str = "fe_frobenius", group: str | None = "loss",
                       cls: int = -1, where: Where = None) -> go.Figure:
    """FB[μ(Train_FE) - μ(Test_TP-FE)] vs FB[μ(Train_FE) - μ(Test_FP-FE)] per group (§5.7)."""
    data = tp_fp_norms_data(df, statistic, group, cls, where)
    fig = go.Figure()
    for s in ("TP", "FP"):
        d = data[data["set"] == s]
        if d.empty:
            continue
        fig.add_trace(go.Bar(
            x=d["group"].tolist(), y=d["value"].tolist(), name=f"test {s} ({_n_text(d['n'])})",
            customdata=d["n"].tolist(), hovertemplate="%{x}<br>norm=%{y:.3f}<br>n=%{customdata}",
        ))
    which = "all classes (Frobenius norm)" if cls == -1 else f"class {cls} (L2 norm)"
    fig.update_layout(
        barmode="group", title=f"Train vs test TP / FP mean fe difference, {which}; mean over networks",
        xaxis_title=group or "", yaxis_title="norm of the mean fe difference (activation units)",
        legend_title_text="test set",
    )
    return fig


# -- Fig. 2 / Table 2: per-class train vs test accuracy ----------------------------------------------
def class_accuracy_data(df: pd.DataFrame, facet: str | None = "imbalance", where: Where = None) -> pd.DataFrame:
    """Mean per-class accuracy (recall) per (facet, split, class), with n."""
    d = select(df, where, statistic="accuracy")
    d = _facet_column(d[d["class"] >= 0], facet)
    return _mean_n(d, ["_facet", "split", "class"]).rename(columns={"_facet": "facet"})


def class_accuracy_figure(df: pd.DataFrame, facet: str | None = "imbalance", where: Where = None) -> go.Figure:
    """Per-class training and test accuracy, one panel per ``facet`` value (Fig. 2)."""
    data = class_accuracy_data(df, facet, where)
    facets = sorted(data["facet"].unique())
    fig = _faceted(facets, "Per-class accuracy, train vs test (mean over networks)")
    fig.update_layout(legend_title_text="split")
    for col, fv in enumerate(facets, start=1):
        for s, d in data[data["facet"] == fv].groupby("split", sort=True):
            fig.add_trace(go.Scatter(
                x=d["class"].astype(int).tolist(), y=(PERCENT * d["value"]).tolist(), mode="lines+markers",
                name=f"{s} ({_n_text(d['n'])})", legendgroup=str(s), showlegend=col == 1,
                line=dict(color=SPLIT_COLORS.get(s)),
                customdata=d["n"].tolist(), hovertemplate="class %{x}<br>%{y:.2f}%<br>n=%{customdata}",
            ), row=1, col=col)
        fig.update_xaxes(title_text="class", dtick=1, row=1, col=col)
    fig.update_yaxes(title_text="accuracy (% of the class's instances)", row=1, col=1)
    return fig


def accuracy_table_data(df: pd.DataFrame, group: Sequence[str] = ("dataset", "loss"), where: Where = None,
                        majority: int | None = None, minority: int | None = None) -> pd.DataFrame:
    """Table 2: mean train / test accuracy of the majority and the minority class per group, with n.

    Majority / minority: the class with the most / fewest training examples per
    network (``class_counts``), else ``majority`` (default 0) / ``minority``
    (default the last class).
    """
    d = select(df, where, statistic="accuracy")
    d = d[d["class"] >= 0]
    group = [g for g in group if g in d.columns]
    roles = {"majority": _extreme_class(d, "max", majority), "minority": _extreme_class(d, "min", minority)}
    parts = []
    for role, which in roles.items():
        sel = d[d["class"].to_numpy() == d["network_id"].map(which).to_numpy()]
        parts.append(sel.assign(column=sel["split"] + " " + role))
    long = pd.concat(parts)
    keys = group or ["_g"]
    if not group:
        long = long.assign(_g="all")
    wide = long.pivot_table(index=keys, columns="column", values="value", aggfunc="mean")
    wide["n"] = long.groupby(keys)["network_id"].nunique()
    return wide.reset_index().rename_axis(columns=None).drop(columns=["_g"], errors="ignore")


def accuracy_table(df: pd.DataFrame, group: Sequence[str] = ("dataset", "loss"), where: Where = None,
                   majority: int | None = None, minority: int | None = None) -> go.Figure:
    """Table 2 (effect of imbalance on generalisation) as a plotly table, in %."""
    data = accuracy_table_data(df, group, where, majority, minority)
    keys = [g for g in group if g in data.columns]
    cols = ["train majority", "test majority", "train minority", "test minority"]
    label = [" / ".join(str(r[g]) for g in keys) or "all" for _, r in data.iterrows()]
    cells = [label] + [_fmt(PERCENT * data[c] if c in data else [np.nan] * len(data), 2) for c in cols]
    return _table([" / ".join(keys) or "networks", *[f"{c} (%)" for c in cols], "n networks"],
                  cells + [data["n"].tolist()], "Per-class accuracy, majority vs minority class (mean over networks)")


# -- Table 1: classifier re-training (from trials) ------------------------------------------------------
def retraining_table_data(trials: pd.DataFrame, group: Sequence[str] = ("dataset", "loss"),
                          where: Where = None, metric: str = "balanced_accuracy") -> pd.DataFrame:
    """Table 1: mean BAC of balanced training, imbalanced training and classifier re-training.

    Rows of ``trials`` (raw evaluation when the column exists): "balanced" =
    baseline with imbalance ``none``; "imbalanced" = baseline on an imbalanced
    set; "retrained" = method ``classifier_retraining``. n = networks per cell.
    """
    d = select(trials, where)
    if "evaluation" in d.columns:
        d = d[d["evaluation"] == "raw"]
    role = np.select(
        [(d["method"] == "baseline") & (d["imbalance"] == "none"),
         (d["method"] == "baseline") & (d["imbalance"] != "none"),
         d["method"] == "classifier_retraining"],
        ["balanced", "imbalanced", "retrained"], default="")
    d = d.assign(role=role, value=d[metric], _g="all")
    d = d[d["role"] != ""]
    keys = [g for g in group if g in d.columns] or ["_g"]
    agg = _mean_n(d, [*keys, "role"])
    mean = agg.pivot_table(index=keys, columns="role", values="value", aggfunc="first")
    n = agg.pivot_table(index=keys, columns="role", values="n", aggfunc="first").add_prefix("n ")
    return mean.join(n).reset_index().rename_axis(columns=None).drop(columns=["_g"], errors="ignore")


def retraining_table(trials: pd.DataFrame, group: Sequence[str] = ("dataset", "loss"), where: Where = None,
                     metric: str = "balanced_accuracy") -> go.Figure:
    """Table 1 (re-trained classifier BAC) as a plotly table, in %."""
    data = retraining_table_data(trials, group, where, metric)
    keys = [g for g in group if g in data.columns]
    label = [" / ".join(str(r[g]) for g in keys) or "all" for _, r in data.iterrows()]
    roles = [("balanced", "Bal. train"), ("imbalanced", "Imb. train"), ("retrained", "Classifier re-train")]
    cells: list[list[Any]] = [label]
    header = [" / ".join(keys) or "networks"]
    for role, title in roles:
        vals = data[role] if role in data else pd.Series(np.nan, index=data.index)
        ns = data[f"n {role}"] if f"n {role}" in data else pd.Series(np.nan, index=data.index)
        cells.append(_fmt(PERCENT * vals, 2))
        cells.append(["" if pd.isna(x) else int(x) for x in ns])
        header += [f"{title} ({metric}, %)", "n"]
    return _table(header, cells, f"Classifier re-training: {metric} (mean over networks)")


# -- all of them, for the report ---------------------------------------------------------------------
# (figure id, title, caption, statistic it needs (None: trials only),
#  builder(latent joined with trials, trials, facet column or None) -> figure)
_REPORT_FIGURES: list[tuple[str, str, str, str | None, Any]] = [
    ("dablain-fig2", "Dablain Fig. 2 · per-class accuracy, train vs test",
     "Recall of each class on the network's own imbalanced training subset and on the balanced test set.",
     "accuracy", lambda d, t, f: class_accuracy_figure(d, facet=f)),
    ("dablain-table2", "Dablain Table 2 · majority vs minority accuracy",
     "Majority / minority = the class with the most / fewest training images of each network.",
     "accuracy", lambda d, t, f: accuracy_table(d, group=("dataset", f) if f else ("dataset",))),
    ("dablain-fig3", "Dablain Fig. 3 · top-K coverage",
     "Fraction of correctly classified training instances whose predicted-class logit is exceeded "
     "by its K largest ce (a dashed line: all classes).",
     "topk_coverage", lambda d, t, f: coverage_figure(
         d, facet=f, max_k=min(50, int(d.loc[d["statistic"] == "topk_coverage", "k"].max())))),
    ("dablain-fig4", "Dablain Figs. 4-5 · largest class mean ce",
     "The ten largest class mean ce per class, averaged rank by rank over networks.",
     "ce_mean_magnitude", lambda d, t, f: ranked_figure(d, "ce_mean_magnitude")),
    ("dablain-fig6", "Dablain Fig. 6 · top ce share of the logit",
     "Mean share of each of the ten largest ce in the sum of the predicted class's ce.",
     "top_ce_logit_share", lambda d, t, f: ranked_figure(d, "top_ce_logit_share")),
    ("dablain-fig7", "Dablain Fig. 7 · largest W_C weights",
     "The ten largest classifier weights of each class.",
     "wc_magnitude", lambda d, t, f: ranked_figure(d, "wc_magnitude")),
    ("dablain-fig8", "Dablain Fig. 8 · class top-K fe members",
     "How often the most frequent features occur in the instances' top-K fe sets, with K = 7 for "
     "every instance as the paper (stores that record class_topk_k; older ones used each instance's "
     "own top-K).",
     "class_topk_fe_frequency", lambda d, t, f: ranked_figure(d, "class_topk_fe_frequency")),
    ("dablain-fig9", "Dablain Fig. 9 · class top-K fe needed",
     "Number of class top-K fe members needed to describe every instance of a class.",
     "class_topk_fe_needed", lambda d, t, f: features_needed_figure(d, group=f)),
    ("dablain-fig10", "Dablain Fig. 10 · train vs test TP / FP fe norms",
     "Frobenius norm of the difference between the training class mean fe and the test "
     "true-positive / misclassified class mean fe (§5.7).",
     "fe_frobenius_tp", lambda d, t, f: tp_fp_norms_figure(d, group=f)),
    ("dablain-table3", "Dablain Table 3 · largest class mean ce, majority vs others",
     "Rank-1 class mean ce of the majority class against the mean over the other classes.",
     "ce_mean_magnitude", lambda d, t, f: magnitude_table(d, "ce_mean_magnitude",
                                                          group=("dataset", f) if f else ("dataset",))),
    ("dablain-table4", "Dablain Table 4 · top ce share of the logit, majority vs others",
     "Rank-1 share of the logit of the majority class against the mean over the other classes.",
     "top_ce_logit_share", lambda d, t, f: magnitude_table(d, "top_ce_logit_share",
                                                           group=("dataset", f) if f else ("dataset",))),
    ("dablain-table1", "Dablain Table 1 · classifier re-training",
     "Balanced accuracy of networks trained on balanced data, on imbalanced data, and with the "
     "classifier re-trained on balanced features.",
     None, lambda d, t, f: retraining_table(t)),
]
# What the figures compare, in order of preference: the first that varies in the data
# (Dablain compare losses; a Buda-style grid compares methods).
FACETS = ("loss", "method", "imbalance")


_SCALE_CAPTIONS = {
    FEATURE_SCALE_RAW: " Features on the paper's scale: the penultimate features after ReLU and W_C as "
                       "the network holds them (for LDAM's normalised head, before it normalises them; "
                       "LDAM networks of stores that kept only normalised features are left out).",
    FEATURE_SCALE_NORMALISED: " Features as the heads multiply them: for LDAM's cosine head unit-length FE "
                              "and s times unit-length W_C columns; other networks' raw features.",
}


def dablain_figures(latent: pd.DataFrame, trials: pd.DataFrame,
                    scale: str = FEATURE_SCALE_RAW) -> list[tuple[str, str, str, go.Figure]]:
    """Every Dablain figure and table the data supports: ``(id, title, caption, figure)``.

    ``latent`` is the ``latent_stats`` table, ``trials`` the ``trials`` table (network
    columns are joined on ``network_id``). A figure whose statistics are absent is left
    out; Table 1 needs classifier re-training networks in ``trials``. ``scale``: the
    feature scale drawn (:func:`on_scale`), by default the paper's (``raw``); every
    caption says which. With ``normalised``, networks with a linear head show their raw
    rows (their only scale).
    """
    if scale == FEATURE_SCALE_NORMALISED:
        normalised = on_scale(latent, trials, FEATURE_SCALE_NORMALISED)
        raw = on_scale(latent, trials, FEATURE_SCALE_RAW)
        latent = pd.concat([normalised, raw[~raw["network_id"].isin(set(normalised["network_id"]))]])
    else:
        latent = on_scale(latent, trials, scale)
    joined = join_trials(latent, trials)
    have = set(joined["statistic"].unique())
    facet = next((c for c in FACETS if c in joined.columns and joined[c].nunique() > 1), None)
    out = []
    for fig_id, title, caption, needs, build in _REPORT_FIGURES:
        if needs is None:  # Table 1: classifier re-training networks in trials
            if "method" not in trials.columns or not (trials["method"] == "classifier_retraining").any():
                continue
        elif needs not in have:
            continue
        out.append((fig_id, title, caption + ("" if needs is None else _SCALE_CAPTIONS[scale]),
                    build(joined, trials, facet)))
    return out
