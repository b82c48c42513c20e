"""Verdicts researchers trust: paired tests with corrected p-values, and method rankings.

Floor: analysis (imports sweep.core and sweep.store only; reads results through
analysis.load).

Pure pandas / scipy / statsmodels on the ``trials`` frame; no statistic is written by hand.

* :func:`paired_tests`: per group of cells (``by``) and arm, the arm against a reference
  arm (default: the baseline, raw outputs, cross-entropy) paired over training sets (the
  same cell and repeat: every method of a repeat trains on the same images). The
  Wilcoxon signed-rank test (``scipy.stats.wilcoxon``, exact for small n without ties)
  and the paired t-test (``scipy.stats.ttest_rel``), each with Holm and
  Benjamini-Hochberg adjusted p-values over every comparison of the table
  (``statsmodels.stats.multitest.multipletests``), and the effect: the mean and median
  paired difference with a 95 % bootstrap interval of the median (``scipy.stats.bootstrap``,
  percentile, seeded).
* :func:`ranking`: Demšar (JMLR 2006): arms ranked within each block (a cell, its repeats
  averaged; rank 1 = best), average ranks, the Friedman test
  (``scipy.stats.friedmanchisquare``) and the Nemenyi critical difference
  ``q_alpha * sqrt(k (k + 1) / (6 N))`` with ``q_alpha`` from the studentized range
  (``scipy.stats.studentized_range``) over ``sqrt(2)``.

Metrics: the ``trials`` columns ``roc_auc``, ``accuracy`` and ``balanced_accuracy``, and
the per-trial long-tail metrics ``macro_f1`` and ``g_mean`` (:mod:`analysis.longtail`;
:func:`trials_for` adds them from the ``confusion`` and ``class_metrics`` tables).

For ``roc_auc`` thresholded arms are left out of the tests and the ranking: thresholding
divides each class's scores by one constant, which leaves every one-vs-rest ROC AUC
unchanged (Buda et al. sec. 4.1), so a thresholded arm only repeats its raw arm's numbers
and would inflate the multiple-testing correction and tie the ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.multitest import multipletests

from analysis.aggregate import BASELINE, CELL, method_label, select_lr_runs, with_labels
from analysis.load import Results
from analysis.longtail import LONGTAIL_METRICS, read_class_tables, with_trial_metrics
from analysis.plotkit import AXIS_COLOR, MARK_COLOR, FigureResult
from sweep.core.errors import UserError
from sweep.store.schema import CLASS_METRICS, CONFUSION, TRIALS, Status

METRICS = ("roc_auc", "accuracy", "balanced_accuracy", *LONGTAIL_METRICS)
# Thresholding leaves ROC AUC unchanged (module doc): these metrics compare raw arms only.
RAW_ONLY = ("roc_auc",)
_SOURCE = {"macro_f1": CONFUSION, "g_mean": CLASS_METRICS}  # the table a long-tail metric needs
GROUPINGS = tuple(CELL)  # groups of cells; arms (method, loss, evaluation) are compared within them
CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000
REFERENCE = method_label(BASELINE)  # "baseline": raw outputs, cross-entropy


class CompareError(UserError, ValueError):
    """A metric, grouping or arm that the comparison cannot use; the message says which."""


def _check(trials: pd.DataFrame, metric: str, by: Sequence[str]) -> None:
    if metric not in METRICS:
        raise CompareError(f"unknown metric {metric!r} (allowed: {', '.join(METRICS)})")
    bad = [c for c in by if c not in GROUPINGS]
    if bad:
        raise CompareError(f"unknown grouping {', '.join(map(repr, bad))} (allowed: {', '.join(GROUPINGS)})")


def trials_for(root: str, metric: str) -> pd.DataFrame:
    """The store's ``trials``, with ``metric``'s column added when it is a long-tail metric."""
    if metric not in METRICS:
        raise CompareError(f"unknown metric {metric!r} (allowed: {', '.join(METRICS)})")
    results = Results(root)
    trials = results.table(TRIALS)
    if metric not in LONGTAIL_METRICS:
        return trials
    if not results.has(_SOURCE[metric]):
        raise CompareError(f"{metric} needs the {_SOURCE[metric]} table, which this store does not have "
                           "(written by an older version)")
    tables = read_class_tables(results, trials, names=(_SOURCE[metric],))
    return with_trial_metrics(trials, tables.class_metrics, tables.confusion)


def _values(trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One finite value per (cell, repeat, arm): ok rows, one network per lr search; for
    ``RAW_ONLY`` metrics raw evaluations only."""
    if metric not in trials.columns:
        raise CompareError(f"the trials have no {metric} column"
                           + (" (use trials_for to add it)" if metric in LONGTAIL_METRICS else ""))
    if metric in RAW_ONLY and "evaluation" in trials.columns:
        trials = trials[~trials["evaluation"].eq("threshold")]
    df = with_labels(select_lr_runs(trials, metric))
    df = df[df["status"].eq(Status.OK)].copy()
    df["value"] = pd.to_numeric(df[metric], errors="coerce")
    df = df[np.isfinite(df["value"])]
    for c in CELL:
        if c not in df.columns:
            df[c] = None
    df[["rho", "mu"]] = df[["rho", "mu"]].apply(pd.to_numeric, errors="coerce").fillna(-1.0)
    return df


def paired_tests(trials: pd.DataFrame, metric: str = "roc_auc", by: Sequence[str] = ("rho", "mu"),
                 reference: str = REFERENCE, arms: Sequence[str] | None = None,
                 seed: int = 0) -> pd.DataFrame:
    """Every arm (or those in ``arms``) against ``reference`` per ``by`` group; see module doc.

    A pair is one training set: the same cell (``CELL``) and repeat. Groups in ``by`` may
    hold several cells (``by=("mu",)`` pools every rho); the cell is always part of the
    pairing. Rows are sorted by group and arm.
    """
    by = list(by)
    _check(trials, metric, by)
    cols = by + ["arm", "reference", "n", "mean_reference", "mean_arm", "mean_diff", "median_diff",
                 "median_ci_low", "median_ci_high", "p_wilcoxon", "wilcoxon_method", "p_ttest",
                 "p_wilcoxon_holm", "p_wilcoxon_bh", "p_ttest_holm", "p_ttest_bh"]
    df = _values(trials, metric)
    if df.empty:
        return pd.DataFrame(columns=cols)
    known = set(df["arm"])
    for a in [reference, *(arms or [])]:
        if a not in known:
            left_out = f"; thresholded arms are left out for {metric}" if metric in RAW_ONLY else ""
            raise CompareError(f"no arm {a!r} in the store (arms: {', '.join(sorted(known))}{left_out})")
    pair_key = CELL + ["repeat"]  # ``by`` holds cell columns only: they are part of it
    one = df.groupby(pair_key + ["arm"], dropna=False)["value"].mean().rename("value").reset_index()
    ref = one[one["arm"] == reference].drop(columns="arm")
    rest = one[(one["arm"] != reference) & (one["arm"].isin(arms) if arms else True)]
    pairs = rest.merge(ref, on=pair_key, suffixes=("", "_ref"))
    rows = []
    for key, g in pairs.groupby(by + ["arm"], dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        d = (g["value"] - g["value_ref"]).to_numpy()
        rows.append({**dict(zip(by + ["arm"], key)), "reference": reference, "n": len(d),
                     "mean_reference": g["value_ref"].mean(), "mean_arm": g["value"].mean(),
                     "mean_diff": d.mean(), "median_diff": float(np.median(d)),
                     **median_ci(d, seed), **dict(zip(("p_wilcoxon", "wilcoxon_method"), wilcoxon(d))),
                     "p_ttest": _ttest(g)})
    out = pd.DataFrame(rows, columns=[c for c in cols if not c.endswith(("_holm", "_bh"))])
    for test in ("wilcoxon", "ttest"):
        out[f"p_{test}_holm"] = _adjust(out[f"p_{test}"], "holm")
        out[f"p_{test}_bh"] = _adjust(out[f"p_{test}"], "fdr_bh")
    for c in ("rho", "mu"):
        if c in out.columns:
            out[c] = out[c].where(out[c] != -1.0, np.nan)
    return out[cols].reset_index(drop=True)


def median_ci(d: np.ndarray, seed: int) -> dict[str, float]:
    if len(d) < 2 or np.all(d == d[0]):
        v = float(d[0]) if len(d) and np.all(d == d[0]) else np.nan
        return {"median_ci_low": v, "median_ci_high": v}
    res = stats.bootstrap((d,), np.median, confidence_level=CONFIDENCE, n_resamples=BOOTSTRAP_RESAMPLES,
                          method="percentile", rng=np.random.default_rng(seed))
    return {"median_ci_low": float(res.confidence_interval.low), "median_ci_high": float(res.confidence_interval.high)}


EXACT_MAX_N = 50  # exact null distribution up to this many non-zero differences (scipy's own limit)


def wilcoxon(d: np.ndarray) -> tuple[float, str]:
    """The two-sided Wilcoxon signed-rank p of paired differences ``d``, and the method used.

    Zero differences are dropped (scipy's ``zero_method="wilcox"``). Up to ``EXACT_MAX_N``
    remaining pairs the p is exact: the null distribution of the positive rank sum over
    every sign assignment, with midranks where absolute differences tie (where none tie it
    is scipy's exact table). Beyond, the normal approximation with continuity correction.
    scipy's own ``method="auto"`` falls back to the approximation as soon as one difference
    is zero or two tie, which is what gave the slice's p = 0.15 for an exact 0.168.
    """
    d = np.asarray(d, dtype=float)
    nz = d[d != 0]
    if len(nz) < 1:
        return np.nan, "Wilcoxon signed-rank: no non-zero difference"
    zeros = f", {len(d) - len(nz)} zero difference(s) dropped" if len(nz) < len(d) else ""
    if len(nz) > EXACT_MAX_N:
        return float(stats.wilcoxon(nz, method="approx", correction=True).pvalue), \
            f"Wilcoxon signed-rank, normal approximation{zeros}"
    ties = len(np.unique(np.abs(nz))) < len(nz)
    return _exact_signed_rank_p(nz), f"Wilcoxon signed-rank, exact{' (midranks for ties)' if ties else ''}{zeros}"


def _exact_signed_rank_p(nz: np.ndarray) -> float:
    """P(|W+ - E W+| >= |w+ - E W+|) over the 2^n equally likely sign assignments, counted by
    dynamic programming over twice the (mid)ranks, which are integers."""
    twice = np.rint(2 * stats.rankdata(np.abs(nz))).astype(int)
    total = int(twice.sum())
    counts = np.zeros(total + 1)
    counts[0] = 1.0
    for r in twice:  # add rank r to the positive sum or not
        counts[r:] = counts[r:] + counts[: total + 1 - r].copy()
    observed = int(twice[nz > 0].sum())
    distance = np.abs(np.arange(total + 1) - total / 2)
    return float(min(1.0, counts[distance >= abs(observed - total / 2) - 1e-9].sum() / 2.0 ** len(nz)))


def _ttest(g: pd.DataFrame) -> float:
    if len(g) < 2:
        return np.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(stats.ttest_rel(g["value"], g["value_ref"]).pvalue)


def _adjust(p: pd.Series, method: str) -> np.ndarray:
    """Adjusted p-values over the finite ones (NaN stays NaN)."""
    out = np.full(len(p), np.nan)
    ok = np.isfinite(p.to_numpy(dtype=float))
    if ok.any():
        out[ok] = multipletests(p.to_numpy(dtype=float)[ok], method=method)[1]
    return out


@dataclass(frozen=True)
class Ranking:
    """Average ranks of arms over blocks (cells), with Friedman's test and Nemenyi's CD."""

    ranks: pd.DataFrame  # arm, average_rank, mean (metric over blocks), sorted best first
    blocks: int  # N: cells where every arm has a value
    statistic: float  # Friedman chi-square
    p_value: float
    critical_difference: float  # Nemenyi, at ``alpha``
    alpha: float


def ranking(trials: pd.DataFrame, metric: str = "roc_auc", arms: Sequence[str] | None = None,
            alpha: float = 0.05) -> Ranking:
    """Demšar's ranking of ``arms`` (default: every arm) over the cells that have all of them."""
    _check(trials, metric, [])
    df = _values(trials, metric)
    if arms:
        df = df[df["arm"].isin(arms)]
    table = df.groupby(CELL + ["arm"], dropna=False)["value"].mean().unstack("arm").dropna()
    k, n = table.shape[1], table.shape[0]
    if k < 3 or n < 2:
        raise CompareError(f"a ranking needs at least 3 arms over at least 2 cells that have them all "
                           f"(found {k} arms over {n} cells)")
    ranks = table.rank(axis=1, ascending=False)  # 1 = best; ties share the average rank
    statistic, p_value = stats.friedmanchisquare(*[table[c].to_numpy() for c in table.columns])
    q = stats.studentized_range.ppf(1 - alpha, k, np.inf) / np.sqrt(2)
    cd = float(q * np.sqrt(k * (k + 1) / (6.0 * n)))
    out = pd.DataFrame({"arm": table.columns, "average_rank": ranks.mean().to_numpy(),
                        "mean": table.mean().to_numpy()}).sort_values("average_rank", kind="stable")
    return Ranking(out.reset_index(drop=True), n, float(statistic), float(p_value), cd, alpha)


def cd_diagram(r: Ranking, metric: str = "roc_auc"):
    """Demšar's critical-difference diagram: arms on the average-rank axis, with bars joining
    arms whose ranks differ by less than the CD (not significantly different)."""
    import plotly.graph_objects as go

    ranks = r.ranks
    k = len(ranks)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=ranks["average_rank"], y=[0] * k, mode="markers+text", text=ranks["arm"],
                             textposition=["top center" if i % 2 else "bottom center" for i in range(k)],
                             marker={"size": 10}, name="average rank",
                             hovertemplate="%{text}: average rank %{x:.2f}<extra></extra>"))
    level, reach = 0.15, -1
    values = ranks["average_rank"].to_numpy()
    for i in range(k):  # maximal runs of arms within one CD of the run's best
        j = max(m for m in range(i, k) if values[m] - values[i] < r.critical_difference)
        if j > i and j > reach:
            fig.add_trace(go.Scatter(x=[values[i], values[j]], y=[level, level], mode="lines",
                                     line={"width": 5, "color": AXIS_COLOR}, showlegend=False, hoverinfo="skip"))
            level, reach = level + 0.08, j
    fig.add_trace(go.Scatter(x=[1, 1 + r.critical_difference], y=[-0.3, -0.3], mode="lines+text",
                             text=["", f"CD = {r.critical_difference:.2f}"], textposition="middle right",
                             line={"width": 3, "color": MARK_COLOR}, name=f"Nemenyi CD (alpha {r.alpha:g})"))
    fig.update_layout(
        title=f"Average rank by {metric} over {r.blocks} cells (1 = best); Friedman chi2 = {r.statistic:.1f}, "
              f"p = {r.p_value:.2g}", xaxis={"title": "average rank", "range": [k + 0.5, 0.5]},
        yaxis={"visible": False, "range": [-0.6, level + 0.3]}, height=320 + 12 * k)
    return fig


REPORT_RANKINGS = ("roc_auc", "accuracy")  # the report's CD diagrams


def cd_figures(trials: pd.DataFrame, metrics: Sequence[str] = REPORT_RANKINGS) -> list[FigureResult]:
    """The report's critical-difference diagrams, one per metric, over every arm (raw and
    thresholded where present; raw only for ROC AUC), or why one cannot be drawn."""
    out = []
    for metric in metrics:
        fig_id, title = f"cd-{metric}", f"Critical-difference diagram · {metric}"
        try:
            r = ranking(trials, metric)
        except CompareError as why:
            out.append(FigureResult(fig_id, title, "", None, str(why)))
            continue
        left_out = (" Thresholded arms are left out: thresholding leaves ROC AUC unchanged."
                    if metric in RAW_ONLY else " Raw and thresholded evaluations are separate arms.")
        caption = (f"Demšar's ranking: arms ranked within each of the {r.blocks} cells that have them all "
                   f"(repeats averaged; 1 = best). Arms joined by a bar are within the Nemenyi critical "
                   f"difference (alpha {r.alpha:g}) of each other.{left_out} `sweep compare --ranking "
                   f"--metric {metric}` prints the numbers.")
        out.append(FigureResult(fig_id, title, caption, cd_diagram(r, metric)))
    return out
