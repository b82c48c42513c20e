"""Aggregation of the ``trials`` table over repeats: means with their spread and n.

Floor: analysis (imports sweep.core and sweep.store only; reads results through
analysis.load).

Pure pandas on the DataFrame that :func:`analysis.load.load` returns; nothing here
reads the store. Every number a figure or table shows comes from here, with the
sample it rests on (``n``) and a 95% confidence interval from the t-distribution.

Vocabulary:

* a *cell* is one imbalanced-training-set configuration: ``CELL`` columns; its
  repeats are independent draws of the training set (minority classes redrawn);
* an *arm* is what was done on a training set and how it was evaluated: method,
  loss, re-sampling level and evaluation (``raw`` or ``threshold``); ``arm`` is its
  display label (``"oversampling + thresholding"``);
* a *pair* is one arm and the baseline on the same training set (same cell, same
  repeat): every method of a repeat shares the repeat's minority classes and seed,
  so differences within a pair cancel the training-set draw.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from sweep.core.spec import Method
from sweep.store.schema import Status

CELL = ["grid", "dataset", "model", "imbalance", "rho", "mu"]
PAIR_CELL = CELL + ["evaluation"]  # the brief's cell: arms compared within one evaluation
ARM = ["method", "loss", "resample_ratio", "evaluation"]
PAIR_KEY = ["repeat"]  # with CELL: one training set (methods of a repeat share its seed)
STATUSES = tuple(str(s) for s in Status)
BASELINE = "baseline"
BASELINE_LOSS = "ce"
CONFIDENCE = 0.95

_METHOD_NAMES = {
    "baseline": "baseline",
    "oversampling": "oversampling",
    "undersampling": "undersampling",
    "two_phase_over": "two-phase (oversampling)",
    "two_phase_under": "two-phase (undersampling)",
    "classifier_retraining": "classifier re-training",
}
_LOSS_NAMES = {"ce": "", "focal": "focal loss", "ldam": "LDAM-DRW"}
# The methods with a meaningful resample_ratio (grid expansion gives every other one 1.0).
_RESAMPLED = {str(m) for m in Method if m.takes_resample_ratio}


# -- labels --------------------------------------------------------------------
def method_label(method: str, evaluation: str = "raw", loss: str | None = "ce",
                 resample_ratio: float | None = 1.0) -> str:
    """The display name of an arm, e.g. ``"oversampling + thresholding"``.

    Thresholding the baseline is Buda's method 5 and is called ``"thresholding"``;
    other losses and partial re-sampling are appended so arms never share a label.
    """
    name = _METHOD_NAMES.get(str(method), str(method).replace("_", " "))
    if str(evaluation) == "threshold":
        name = "thresholding" if name == "baseline" else f"{name} + thresholding"
    elif str(evaluation) not in ("raw", "", "nan", "None"):
        name = f"{name} ({evaluation})"
    loss_name = _LOSS_NAMES.get(str(loss), str(loss)) if _present(loss) else ""
    if loss_name:
        name = f"{name}, {loss_name}"
    if str(method) in _RESAMPLED and _present(resample_ratio) and float(resample_ratio) != 1.0:
        name = f"{name} to ρ'={float(resample_ratio):g}"
    return name


def base_label(method: str, evaluation: str = "raw", loss: str | None = "ce") -> str:
    """The label without the re-sampling level: what decides an arm's colour."""
    return method_label(method, evaluation, loss, 1.0)


def with_labels(trials: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``trials`` with ``arm`` (display label) and ``arm_base`` columns.

    Labels are computed once per distinct arm, not per row: 36,000 rows have a
    few dozen arms.
    """
    out = trials.copy()
    cols = [c for c in ARM if c in out.columns]
    if out.empty:
        out["arm"] = pd.Series(dtype=object)
        out["arm_base"] = pd.Series(dtype=object)
        return out
    codes = out.groupby(cols, dropna=False, sort=False).ngroup().to_numpy()
    firsts = out[cols].drop_duplicates()  # same order as ngroup with sort=False
    arm, base = [], []
    for row in firsts.itertuples(index=False):
        d = {c: (v if _present(v) else None) for c, v in zip(cols, row)}
        args = (d.get("method"), d.get("evaluation") or "raw", d.get("loss") or "ce")
        arm.append(method_label(*args, d.get("resample_ratio")))
        base.append(base_label(*args))
    out["arm"] = np.asarray(arm, dtype=object)[codes]
    out["arm_base"] = np.asarray(base, dtype=object)[codes]
    return out


def _present(v: object) -> bool:
    if v is None or v is pd.NA:
        return False
    try:
        return not bool(pd.isna(v))
    except (TypeError, ValueError):
        return True


# -- statistics ----------------------------------------------------------------
def t_halfwidth(std: pd.Series | np.ndarray, n: pd.Series | np.ndarray,
                confidence: float = CONFIDENCE) -> np.ndarray:
    """Half-width of the t confidence interval of a mean: t_{n-1} * std / sqrt(n).

    NaN where n < 2: one value says nothing about its spread.
    """
    n = np.asarray(n, dtype=float)
    std = np.asarray(std, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = stats.t.ppf(0.5 + confidence / 2, np.where(n >= 2, n - 1, np.nan))
        return np.where(n >= 2, q * std / np.sqrt(n), np.nan)


RANGE_BELOW_N = 3  # with fewer repeats a t-interval says little (t = 12.7 at n = 2): show the range
INTERVALS = ("95 % t-interval of the mean where a point has 3 or more repeats (kept within the metric's "
             "range), the range of the repeats (lowest to highest) where it has 2")


def _mean_ci(df: pd.DataFrame, keys: list[str], value: str,
             bounds: tuple[float, float] | None = None) -> pd.DataFrame:
    """n, mean, std, ci_low, ci_high and ``interval`` of ``value`` (non-null) per ``keys``.

    ``interval`` says what ci_low / ci_high are: ``"t95"``, the 95 % t-interval of the mean
    (clipped to ``bounds``, the metric's possible values), for n >= RANGE_BELOW_N;
    ``"range"``, the lowest and highest value, for 2 <= n < RANGE_BELOW_N; ``""`` (NaN
    bounds) for a single value.
    """
    g = df.groupby(keys, dropna=False, sort=True)[value]
    out = pd.DataFrame({"n": g.count(), "mean": g.mean(), "std": g.std(ddof=1)})
    half = t_halfwidth(out["std"], out["n"])
    low, high = out["mean"] - half, out["mean"] + half
    if bounds is not None:
        low, high = low.clip(lower=bounds[0]), high.clip(upper=bounds[1])
    few = (out["n"] >= 2) & (out["n"] < RANGE_BELOW_N)
    out["ci_low"] = low.where(~few, g.min())
    out["ci_high"] = high.where(~few, g.max())
    out["interval"] = np.where(out["n"] >= RANGE_BELOW_N, "t95", np.where(few, "range", ""))
    return out


def _ok_values(trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Rows that count for a mean: status ok and a finite metric."""
    if metric not in trials.columns:
        raise KeyError(f"trials have no column {metric!r}")
    ok = trials["status"].eq(Status.OK) & np.isfinite(pd.to_numeric(trials[metric], errors="coerce"))
    return trials.loc[ok.fillna(False)]


def summarize(trials: pd.DataFrame, by: Sequence[str], metric: str = "roc_auc") -> pd.DataFrame:
    """Mean, std and interval of ``metric`` over repeats, per ``by`` cell (``_mean_ci``: a 95 %
    t-interval within the metric's 0-1 range from 3 repeats, the repeats' range at 2).

    Only ``status == "ok"`` rows with a finite metric enter ``n``/``mean``; every row
    is counted in ``n_rows`` and by status in ``n_ok``/``n_diverged``/``n_failed``.
    ``n_missing`` is how many rows a cell lacks compared to the fullest cell of its
    grid (or of the whole frame when ``grid`` is not a column): while a sweep is
    running, cells with fewer repeats than the others show up here. One row per
    cell, ``by`` as columns, sorted by them.
    """
    by = list(by)
    if trials.empty:
        return pd.DataFrame(columns=by + ["n", "mean", "std", "ci_low", "ci_high", "interval", "n_rows",
                                          "n_ok", "n_diverged", "n_failed", "n_missing"])
    df = trials.assign(
        _value=pd.to_numeric(trials[metric], errors="coerce").where(trials["status"].eq(Status.OK)),
        **{f"_{s}": trials["status"].eq(s) for s in STATUSES},
    )
    df["_value"] = df["_value"].where(np.isfinite(df["_value"]))
    out = _mean_ci(df, by, "_value", bounds=(0.0, 1.0))  # every metric summarized is a rate in [0, 1]
    g = df.groupby(by, dropna=False, sort=True)
    out["n_rows"] = g.size()
    for s in STATUSES:
        out[f"n_{s}"] = g[f"_{s}"].sum().astype(int)
    out = out.reset_index()
    if "grid" in out.columns:
        expected = out.groupby("grid", dropna=False)["n_rows"].transform("max")
    else:
        expected = out["n_rows"].max()
    out["n_missing"] = (expected - out["n_rows"]).astype(int)
    return out


# -- learning-rate search --------------------------------------------------------
def select_lr_runs(trials: pd.DataFrame, metric: str = "roc_auc") -> pd.DataFrame:
    """Keep one network per training set and arm when a grid searched learning rates.

    Buda's CIFAR-10 recipe trains each configuration at several base lrs, twice each,
    and reports the best run. Averaging over the runs would blur the methods, so per
    (cell, method, loss, resample_ratio, repeat) the network with the best validation
    balanced accuracy wins (``selection == "validation"``), else the best ``metric``
    on the test set (close to their way: they took the best of all runs and snapshots on
    the test set at once; here each run's point was already chosen by its worker). The choice is made on the raw evaluation and keeps
    all evaluations of the winning network. Frames without a search pass unchanged. Networks that
    a search with early stopping left at a rung (status ``stopped``) are never chosen: their metrics
    are of a network trained part of the way (:func:`stopped_by_rung` says how many stopped where).
    """
    group = [c for c in CELL + ["method", "loss", "resample_ratio", "repeat"] if c in trials.columns]
    if trials.empty or "network_id" not in trials.columns:
        return trials
    nets = trials.groupby(group, dropna=False)["network_id"].nunique()
    if (nets <= 1).all():
        return trials
    raw = trials[trials["evaluation"].eq("raw")] if "evaluation" in trials.columns else trials
    crit = pd.to_numeric(raw[metric], errors="coerce")
    if "val_balanced_accuracy" in raw.columns and "selection" in raw.columns:
        val = pd.to_numeric(raw["val_balanced_accuracy"], errors="coerce")
        crit = val.where(raw["selection"].eq("validation") & val.notna(), crit)
    survivors = ~raw["status"].eq(Status.STOPPED)
    if "stopped_at_iter" in raw.columns:  # a diverged network a rung dropped keeps its status
        survivors &= pd.to_numeric(raw["stopped_at_iter"], errors="coerce").isna()
    raw, crit = raw[survivors], crit[survivors]
    ranked = raw.assign(_ok=raw["status"].eq(Status.OK), _crit=crit.fillna(-np.inf))
    ranked = ranked.sort_values(["_ok", "_crit"], ascending=False, kind="stable")
    winners = ranked.drop_duplicates(group, keep="first")["network_id"]
    return trials[trials["network_id"].isin(set(winners))]


def stopped_by_rung(trials: pd.DataFrame) -> pd.DataFrame:
    """How many networks a search with early stopping stopped where: per grid, method, rung and
    iteration (raw evaluations; empty for stores without such a search)."""
    cols = ["grid", "method", "rung", "stopped_at_iter", "networks"]
    if trials.empty or "stopped_at_iter" not in trials.columns:
        return pd.DataFrame(columns=cols)
    raw = trials[trials["evaluation"].eq("raw")] if "evaluation" in trials.columns else trials
    stopped = raw[raw["status"].eq(Status.STOPPED)]
    keys = [c for c in cols[:-1] if c in stopped.columns]
    return (stopped.groupby(keys, dropna=False)["network_id"].nunique().rename("networks").reset_index()
            if not stopped.empty else pd.DataFrame(columns=cols))


# -- paired comparisons ----------------------------------------------------------
def _one_per_training_set(values: pd.DataFrame, metric: str, keys: list[str]) -> pd.DataFrame:
    # Normally already one row per key; a store with left-over lr runs gets averaged
    # rather than paired many-to-many (which would over-count n).
    return values.groupby(keys, dropna=False, sort=False)[metric].mean().rename("value").reset_index()


def paired_vs_baseline(trials: pd.DataFrame, metric: str = "roc_auc",
                       baseline: str = BASELINE) -> pd.DataFrame:
    """Per cell and arm: the difference to the baseline on the same training sets.

    The cell is ``PAIR_CELL`` (grid, dataset, model, imbalance, rho, mu, evaluation):
    an arm is compared with the baseline network evaluated the same way (for
    ``threshold``, Buda's "thresholding"). Pairs are (cell, repeat) with a finite
    ``metric`` and status ok on both sides; the baseline is the ``baseline`` method
    trained with cross-entropy. Columns: PAIR_CELL, ``arm``, ``method``, ``loss``,
    ``resample_ratio``, ``n`` (pairs), ``mean_method``, ``mean_baseline``, ``mean``
    (the mean difference), ``std``, ``ci_low``, ``ci_high``, ``interval`` (see ``_mean_ci``).
    """
    cols = PAIR_CELL + ["arm", "method", "loss", "resample_ratio", "n", "mean_method",
                        "mean_baseline", "mean", "std", "ci_low", "ci_high", "interval"]
    labelled = _labelled(trials)
    ok = _ok_values(labelled, metric)
    if ok.empty:
        return pd.DataFrame(columns=cols)
    ok = _fill_keys(ok)
    is_base = ok["method"].eq(baseline) & ok["loss"].eq(BASELINE_LOSS)
    base = _one_per_training_set(ok[is_base], metric, PAIR_CELL + PAIR_KEY)
    arm_keys = PAIR_CELL + ["arm", "method", "loss", "resample_ratio"]
    arms = _one_per_training_set(ok[~is_base], metric, arm_keys + PAIR_KEY)
    pairs = arms.merge(base, on=PAIR_CELL + PAIR_KEY, suffixes=("", "_baseline"))
    if pairs.empty:
        return pd.DataFrame(columns=cols)
    pairs["diff"] = pairs["value"] - pairs["value_baseline"]
    out = _mean_ci(pairs, arm_keys, "diff", bounds=(-1.0, 1.0))  # a difference of two rates
    g = pairs.groupby(arm_keys, dropna=False, sort=True)
    out["mean_method"] = g["value"].mean()
    out["mean_baseline"] = g["value_baseline"].mean()
    return _unfill_keys(out.reset_index())[cols]


def best_methods(trials: pd.DataFrame, metric: str = "roc_auc",
                 baseline: str = BASELINE) -> pd.DataFrame:
    """Per cell (``PAIR_CELL``): the arm with the highest mean and how sure that is.

    Columns: PAIR_CELL, ``best`` (label), ``best_mean``, ``best_n`` (networks),
    ``baseline_mean``, ``baseline_n``, and the best arm's paired difference to the
    baseline: ``diff_mean``, ``diff_ci_low``, ``diff_ci_high``, ``n_pairs``.
    When the baseline itself is best the difference is 0 with no interval.
    ``significant``: the 95% t-interval excludes 0 (never with fewer than RANGE_BELOW_N pairs).
    """
    cols = PAIR_CELL + ["best", "best_mean", "best_n", "baseline_mean", "baseline_n",
                        "diff_mean", "diff_ci_low", "diff_ci_high", "n_pairs", "significant"]
    labelled = _labelled(trials)
    if labelled.empty:
        return pd.DataFrame(columns=cols)
    means = summarize(_fill_keys(labelled), PAIR_CELL + ["arm", "method", "loss"], metric)
    means = means[means["n"] > 0]
    if means.empty:
        return pd.DataFrame(columns=cols)
    # Highest mean wins; ties go to the arm with more networks, then alphabetically.
    ranked = means.sort_values(["mean", "n", "arm"], ascending=[False, False, True], kind="stable")
    best = ranked.drop_duplicates(PAIR_CELL, keep="first")
    base_rows = means[means["method"].eq(baseline) & means["loss"].eq(BASELINE_LOSS)]
    best = best.merge(base_rows[PAIR_CELL + ["mean", "n"]].rename(
        columns={"mean": "baseline_mean", "n": "baseline_n"}), on=PAIR_CELL, how="left")
    paired = _fill_keys(paired_vs_baseline(trials, metric, baseline))
    best = best.merge(paired[PAIR_CELL + ["arm", "mean", "ci_low", "ci_high", "n"]].rename(
        columns={"mean": "diff_mean", "ci_low": "diff_ci_low", "ci_high": "diff_ci_high",
                 "n": "n_pairs"}), on=PAIR_CELL + ["arm"], how="left", suffixes=("", "_pair"))
    is_base = best["method"].eq(baseline) & best["loss"].eq(BASELINE_LOSS)
    best.loc[is_base, "diff_mean"] = 0.0
    best.loc[is_base, "n_pairs"] = best.loc[is_base, "n"]
    best = best.rename(columns={"arm": "best", "mean": "best_mean", "n": "best_n"})
    best["n_pairs"] = best["n_pairs"].fillna(0).astype(int)
    best["baseline_n"] = best["baseline_n"].fillna(0).astype(int)
    # From 3 pairs the interval is a t-interval; below, the range of the pairs, which is no test.
    best["significant"] = ((best["diff_ci_low"] > 0) | (best["diff_ci_high"] < 0)) & (best["n_pairs"] >= RANGE_BELOW_N)
    best = _unfill_keys(best)
    return best.sort_values(PAIR_CELL, kind="stable", na_position="first").reset_index(drop=True)[cols]


def _labelled(trials: pd.DataFrame) -> pd.DataFrame:
    return trials if "arm" in trials.columns else with_labels(trials)


# Missing keys (mu of linear imbalance, loss of hand-written rows) would make merges
# drop rows (NaN never equals NaN in a join key): use a sentinel while joining.
_SENTINEL = "∅"
_FILLED = {"mu": -1.0, "rho": -1.0, "resample_ratio": 1.0}


def _fill_keys(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    for c in PAIR_CELL + ["method", "loss", "arm"]:
        if c not in df.columns:
            df[c] = BASELINE_LOSS if c == "loss" else (_SENTINEL if c not in _FILLED else np.nan)
    for c in ("rho", "mu", "resample_ratio"):
        if c in df.columns:
            df[c] = pd.to_numeric(df[c], errors="coerce").fillna(_FILLED[c])
    for c in ("grid", "dataset", "model", "imbalance", "evaluation", "method", "arm"):
        df[c] = df[c].astype(object).where(df[c].notna(), _SENTINEL)
    df["loss"] = df["loss"].astype(object).where(df["loss"].notna(), BASELINE_LOSS)
    return df


def _unfill_keys(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    for c in ("mu", "rho"):
        if c in df.columns:
            df[c] = df[c].where(df[c] != _FILLED[c], np.nan)
    for c in ("grid", "dataset", "model", "imbalance", "evaluation", "method", "arm"):
        if c in df.columns:
            df[c] = df[c].where(df[c] != _SENTINEL, None)
    return df
