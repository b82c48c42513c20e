"""Aggregation, figures and the HTML report, on synthetic stores with known values.

Metrics are chosen so every mean, interval and paired difference can be computed by
hand: ``roc_auc = level(rho, mu) + METHOD[m] + REPEAT[r] + NOISE[m][r]``. The repeat
term is shared by all methods of a training set, so it cancels in paired differences
while it widens the unpaired intervals.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import re
import statistics
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch
from plotly.offline import get_plotlyjs

from analysis import figures as F, plotkit as P
from analysis.aggregate import best_methods, method_label, paired_vs_baseline, select_lr_runs, summarize, with_labels
from analysis.compare import ranking
from analysis.report import ReportSummary, write_report
from sweep.store.results import ResultStore

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
# t quantiles 0.975 in closed form: df=1 is Cauchy, df=2 has t = a*sqrt(2/(1-a^2)), a = 2p-1
T_975_DF1 = math.tan(math.pi * 0.475)
T_975_DF2 = 0.95 * math.sqrt(2 / (1 - 0.95 ** 2))
METHOD = {"baseline": 0.0, "oversampling": 0.02, "undersampling": -0.01}
REPEAT = [0.0, 0.01, 0.03]  # training-set effect, shared by all methods of a repeat
NOISE = {"baseline": [0.0, 0.0, 0.0], "oversampling": [0.0, 0.004, 0.002],
         "undersampling": [0.003, 0.0, 0.0]}
THRESHOLDED = ("baseline", "oversampling")
STEP = [(10.0, 0.2), (10.0, 0.5), (100.0, 0.2), (100.0, 0.5)]
LINEAR = [10.0, 100.0]


def level(rho: float, mu: float | None) -> float:
    return 0.95 - 0.01 * math.log10(rho) - 0.02 * (mu or 0.0)


def auc(method: str, rho: float, mu: float | None, repeat: int) -> float:
    return level(rho, mu) + METHOD[method] + REPEAT[repeat] + NOISE[method][repeat]


def accuracy(method: str, evaluation: str, rho: float, mu: float | None, repeat: int) -> float:
    return auc(method, rho, mu, repeat) - 0.1 + (0.05 if evaluation == "threshold" else 0.0)


def row(method: str, evaluation: str, imbalance: str, rho: float, mu: float | None, repeat: int,
        status: str = "ok", grid: str = "g1", dataset: str = "mnist", model: str = "lenet5",
        resample_ratio: float = 1.0, value: float | None = None, **extra) -> dict:
    net = f"{grid}|{dataset}|{model}|{imbalance}|{rho:g}|{mu}|{method}|{resample_ratio:g}|{repeat}"
    a = auc(method, rho, mu, repeat) if value is None else value
    ok = status == "ok"
    return {
        "trial_id": f"{net}|{evaluation}", "network_id": net, "pack_id": f"p-{imbalance}",
        "evaluation": evaluation, "dataset": dataset, "model": model, "method": method, "loss": "ce",
        "imbalance": imbalance, "rho": rho, "mu": mu,
        "n_minority": int(round(mu * 10)) if mu is not None else None,
        "resample_ratio": resample_ratio, "repeat": repeat, "seed": 1000 + repeat, "lr_run": 0,
        "selection": "final", "status": status, "error": None if ok else status,
        "roc_auc": a if ok else float("nan"),
        "accuracy": (a - 0.1 + (0.05 if evaluation == "threshold" else 0.0)) if ok else float("nan"),
        "balanced_accuracy": a if ok else float("nan"), "created_at": T0, **extra,
    }


def known_rows(skip: set[tuple] = frozenset(), status: dict[tuple, str] | None = None) -> list[dict]:
    """Every (method, evaluation, cell, repeat) of grid g1; ``skip`` leaves some out."""
    status = status or {}
    rows = []
    cells = [("step", r, m) for r, m in STEP] + [("linear", r, None) for r in LINEAR]
    for imbalance, rho, mu in cells:
        for method in METHOD:
            for repeat in range(3):
                for ev in ("raw", "threshold") if method in THRESHOLDED else ("raw",):
                    key = (method, ev, imbalance, rho, mu, repeat)
                    if key in skip:
                        continue
                    rows.append(row(method, ev, imbalance, rho, mu, repeat, status=status.get(key, "ok")))
    return rows


def curve_rows(trials: list[dict]) -> list[dict]:
    """Test/train accuracy at iterations 100, 200: acc = iter/1000 + method offset + repeat/100."""
    out = []
    for t in trials:
        if t["evaluation"] != "raw" or t["imbalance"] != "step" or (t["rho"], t["mu"]) != (100.0, 0.5):
            continue
        for it in (100, 200):
            for split, gap in (("test", 0.0), ("train", 0.1)):
                out.append({"network_id": t["network_id"], "iter": it, "split": split, "loss": 1.0,
                            "accuracy": it / 1000 + METHOD[t["method"]] + t["repeat"] / 100 + gap,
                            "balanced_accuracy": 0.5})
    return out


def write_store(root: Path, rows: list[dict], curves: list[dict] | None = None,
                extra: dict[str, list[dict]] | None = None) -> ResultStore:
    """One pack per imbalance kind, as a sweep would write them (``extra``: more tables, each
    row stored with its network's pack)."""
    store = ResultStore(str(root))
    by_pack: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        by_pack.setdefault((r["pack_id"], r.get("grid_name", "g1")), []).append(r)
    for (pack, grid), trials in sorted(by_pack.items()):
        nets = {t["network_id"] for t in trials}
        tables = {"trials": trials}
        if curves:
            tables["curves"] = [c for c in curves if c["network_id"] in nets]
        for name, table in (extra or {}).items():
            tables[name] = [r for r in table if r["network_id"] in nets]
        store.write_pack(pack, grid, tables)
    return store


@pytest.fixture
def trials() -> pd.DataFrame:
    df = pd.DataFrame(known_rows())
    df["grid"] = "g1"
    return df


def fig_json(fig: go.Figure) -> dict:
    """The figure as the browser gets it (plain JSON)."""
    return json.loads(fig.to_json())


def values(v: object) -> object:
    """A JSON array as a list, also in plotly's typed-array form ({dtype, bdata, shape})."""
    if isinstance(v, dict) and "bdata" in v:
        a = np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"])
        return a.reshape([int(x) for x in v["shape"].split(",")]).tolist() if "shape" in v else a.tolist()
    return v


def mean_traces(fig: go.Figure) -> list[dict]:
    return [t for t in fig_json(fig)["data"] if (t.get("meta") or {}).get("role") == "mean"]


def points(fig: go.Figure) -> dict[tuple[str, str, float], tuple[float, int, float, float]]:
    """(panel, arm, x) -> (y, n, ci_low, ci_high) parsed from the figure JSON."""
    out = {}
    for t in mean_traces(fig):
        for x, y, cd in zip(t["x"], t["y"], t["customdata"]):
            out[(t["meta"]["panel"], t["meta"]["arm"], float(x))] = (y, cd[0], cd[1], cd[2])
    return out


def hand_mean_ci(values: list[float]) -> tuple[float, float, float]:
    m = statistics.mean(values)
    half = {3: T_975_DF2, 2: T_975_DF1}[len(values)] * statistics.stdev(values) / math.sqrt(len(values))
    return m, m - half, m + half


# -- labels and aggregation ----------------------------------------------------------------
def test_method_label_names_arms_like_the_paper():
    assert method_label("oversampling", "threshold") == "oversampling + thresholding"
    assert method_label("baseline", "threshold") == "thresholding"
    assert method_label("baseline", "raw") == "baseline"
    assert method_label("two_phase_under") == "two-phase (undersampling)"
    assert method_label("baseline", "raw", "focal") == "baseline, focal loss"
    assert method_label("undersampling", "raw", "ce", 10.0) == "undersampling to ρ'=10"
    assert method_label("baseline", "raw", "ce", 10.0) == "baseline"  # only re-sampling has levels


def test_summarize_means_cis_and_n_match_hand_computation(trials):
    s = summarize(with_labels(trials), ["imbalance", "rho", "mu", "arm"], "roc_auc")
    got = s[(s["imbalance"] == "step") & (s["rho"] == 100) & (s["mu"] == 0.5) & (s["arm"] == "oversampling")]
    assert len(got) == 1
    values = [auc("oversampling", 100, 0.5, r) for r in range(3)]
    m, lo, hi = hand_mean_ci(values)
    assert got["n"].item() == 3
    assert got["mean"].item() == pytest.approx(m, abs=1e-12)
    assert got["std"].item() == pytest.approx(statistics.stdev(values), abs=1e-12)
    assert got["ci_low"].item() == pytest.approx(lo, abs=1e-12)
    assert got["ci_high"].item() == pytest.approx(hi, abs=1e-12)
    # linear cells have no mu: they must still be their own cells, not dropped
    lin = s[(s["imbalance"] == "linear") & (s["arm"] == "baseline")]
    assert sorted(lin["rho"]) == [10.0, 100.0] and lin["mu"].isna().all()


def test_summarize_counts_failed_diverged_and_missing():
    bad = ("undersampling", "raw", "step", 100.0, 0.5, 2)
    failed = ("oversampling", "raw", "linear", 100.0, None, 1)
    gone = ("baseline", "raw", "step", 10.0, 0.2, 2)
    df = pd.DataFrame(known_rows(skip={gone}, status={bad: "diverged", failed: "failed"}))
    df["grid"] = "g1"
    s = summarize(with_labels(df), ["grid", "imbalance", "rho", "mu", "arm"], "roc_auc")
    s = s.set_index(["imbalance", "rho", "mu", "arm"])
    d = s.loc[("step", 100.0, 0.5, "undersampling")]
    assert (d["n"], d["n_rows"], d["n_ok"], d["n_diverged"], d["n_failed"], d["n_missing"]) == (2, 3, 2, 1, 0, 0)
    assert d["mean"] == pytest.approx(statistics.mean(auc("undersampling", 100, 0.5, r) for r in (0, 1)))
    f = s.xs(("linear", 100.0, "oversampling"), level=["imbalance", "rho", "arm"]).iloc[0]  # mu is NaN
    assert (f["n"], f["n_failed"], f["n_missing"]) == (2, 1, 0)
    g = s.loc[("step", 10.0, 0.2, "baseline")]
    assert (g["n"], g["n_rows"], g["n_missing"]) == (2, 2, 1)


def test_paired_difference_to_baseline_matches_hand_computation(trials):
    p = paired_vs_baseline(trials, "roc_auc")
    one = p[(p["imbalance"] == "step") & (p["rho"] == 10) & (p["mu"] == 0.2) & (p["evaluation"] == "raw")
            & (p["arm"] == "oversampling")]
    diffs = [auc("oversampling", 10, 0.2, r) - auc("baseline", 10, 0.2, r) for r in range(3)]
    m, lo, hi = hand_mean_ci(diffs)  # = 0.02 + mean(0, .004, .002): the repeat term cancels
    assert one["n"].item() == 3
    assert one["mean"].item() == pytest.approx(0.022, abs=1e-12)
    assert one["mean"].item() == pytest.approx(m, abs=1e-12)
    assert one["ci_low"].item() == pytest.approx(lo, abs=1e-12)
    assert one["ci_high"].item() == pytest.approx(hi, abs=1e-12)
    # the paired interval is much narrower than the unpaired one (repeat effect cancels)
    assert hi - lo < 0.02
    # thresholded arms are compared with thresholded baseline ("thresholding")
    thr = p[(p["evaluation"] == "threshold") & (p["imbalance"] == "linear") & (p["rho"] == 100)]
    assert list(thr["arm"]) == ["oversampling + thresholding"]
    assert thr["mean"].item() == pytest.approx(0.022, abs=1e-12)
    # undersampling has no thresholded evaluation: no row there; linear cells kept
    assert not ((p["evaluation"] == "threshold") & (p["method"] == "undersampling")).any()
    assert len(p) == 6 * 2 + 6  # raw: over & under per cell; threshold: over per cell
    assert "baseline" not in set(p["arm"])


def test_paired_difference_uses_only_pairs_where_both_are_ok():
    bad = ("baseline", "raw", "step", 100.0, 0.2, 1)
    df = pd.DataFrame(known_rows(status={bad: "diverged"}))
    df["grid"] = "g1"
    p = paired_vs_baseline(df, "roc_auc")
    one = p[(p["rho"] == 100) & (p["mu"] == 0.2) & (p["evaluation"] == "raw") & (p["arm"] == "undersampling")]
    diffs = [auc("undersampling", 100, 0.2, r) - auc("baseline", 100, 0.2, r) for r in (0, 2)]
    m, _, _ = hand_mean_ci(diffs)
    assert one["n"].item() == 2
    assert one["mean"].item() == pytest.approx(m, abs=1e-12)
    # Two pairs: the interval is their range, not a t-interval (t = 12.7 at n = 2).
    assert one["interval"].item() == "range"
    assert one["ci_low"].item() == pytest.approx(min(diffs), abs=1e-12)
    assert one["ci_high"].item() == pytest.approx(max(diffs), abs=1e-12)


def test_intervals_of_a_rate_stay_within_zero_and_one():
    values = [0.999, 0.05, 0.998]
    df = pd.DataFrame({"status": "ok", "cell": "c", "roc_auc": values})
    s = summarize(df, ["cell"], "roc_auc").iloc[0]
    m, lo, hi = hand_mean_ci(values)
    assert hi > 1 and lo < 0  # the plain t-interval leaves the metric's range
    assert (s["ci_low"], s["ci_high"], s["interval"]) == (0.0, 1.0, "t95")
    assert s["mean"] == pytest.approx(m)
    one = summarize(df.iloc[:1], ["cell"], "roc_auc").iloc[0]
    assert np.isnan(one["ci_low"]) and one["interval"] == ""


def test_best_methods_picks_highest_mean_with_its_paired_difference(trials):
    b = best_methods(trials, "roc_auc")
    assert len(b) == 6 * 2  # 6 cells x 2 evaluations
    assert set(b["best"]) == {"oversampling", "oversampling + thresholding"}
    one = b[(b["imbalance"] == "step") & (b["rho"] == 100) & (b["mu"] == 0.5) & (b["evaluation"] == "raw")]
    values = [auc("oversampling", 100, 0.5, r) for r in range(3)]
    assert one["best_mean"].item() == pytest.approx(statistics.mean(values), abs=1e-12)
    assert one["baseline_mean"].item() == pytest.approx(
        statistics.mean(auc("baseline", 100, 0.5, r) for r in range(3)), abs=1e-12)
    assert one["diff_mean"].item() == pytest.approx(0.022, abs=1e-12)
    assert one["n_pairs"].item() == 3 and one["best_n"].item() == 3
    assert bool(one["significant"].item())


def test_best_method_can_be_the_baseline():
    df = pd.DataFrame([row(m, "raw", "step", 10.0, 0.2, r, value=0.9 + (0.01 if m == "baseline" else 0) + r / 100)
                       for m in ("baseline", "undersampling") for r in range(3)])
    df["grid"] = "g1"
    b = best_methods(df, "roc_auc")
    assert b["best"].item() == "baseline"
    assert b["diff_mean"].item() == 0.0 and b["n_pairs"].item() == 3
    assert not bool(b["significant"].item())


def test_select_lr_runs_keeps_the_best_run_per_training_set():
    rows = []
    for lr_run, value in ((0, 0.90), (1, 0.95)):
        for ev in ("raw", "threshold"):
            r = row("baseline", ev, "step", 10.0, 0.2, 0, value=value, lr_run=lr_run)
            r["network_id"] += f"|lr{lr_run}"
            r["trial_id"] = r["network_id"] + "|" + ev
            rows.append(r)
    df = pd.DataFrame(rows)
    df["grid"] = "g1"
    kept = select_lr_runs(df, "roc_auc")
    assert set(kept["lr_run"]) == {1} and len(kept) == 2  # both evaluations of the winner
    assert select_lr_runs(pd.DataFrame(known_rows()).assign(grid="g1"), "roc_auc").shape[0] == len(known_rows())


# -- figures --------------------------------------------------------------------------------
def test_fig3_points_are_the_means_over_repeats_with_n(trials):
    fig = F.buda_figure(3, trials)
    pts = points(fig)
    # one panel per mu, x = rho, a line per trained method; raw evaluation only
    assert {p[0] for p in pts} == {"μ = 0.2 (2 minority classes)", "μ = 0.5 (5 minority classes)"}
    assert {p[1] for p in pts} == {"baseline", "oversampling", "undersampling"}
    for (panel, arm, x), (y, n, lo, hi) in pts.items():
        mu = 0.2 if "0.2" in panel else 0.5
        values = [auc(arm, x, mu, r) for r in range(3)]
        m, l_, h_ = hand_mean_ci(values)
        l_, h_ = max(l_, 0.0), min(h_, 1.0)  # a rate's interval stays within 0-100 %
        assert y == pytest.approx(100 * m, abs=1e-9)
        assert (lo, hi) == (pytest.approx(100 * l_, abs=1e-9), pytest.approx(100 * h_, abs=1e-9))
        assert n == 3
    layout = fig_json(fig)["layout"]
    assert layout["xaxis"]["type"] == "log"
    assert layout["yaxis"]["title"]["text"] == "multi-class ROC AUC (%)"
    assert "imbalance ratio ρ (log scale)" in json.dumps(layout, ensure_ascii=False)


def test_fig4_panels_per_rho_against_number_of_minority_classes(trials):
    pts = points(F.buda_figure(4, trials))
    assert {p[0] for p in pts} == {"ρ = 10", "ρ = 100"}
    assert {p[2] for p in pts} == {2.0, 5.0}
    y, n, _, _ = pts[("ρ = 100", "undersampling", 5.0)]
    assert y == pytest.approx(100 * statistics.mean(auc("undersampling", 100, 0.5, r) for r in range(3)))
    assert n == 3


def test_fig5_linear_imbalance(trials):
    fig = F.buda_figure(5, trials)
    pts = points(fig)
    assert {p[2] for p in pts} == {10.0, 100.0}
    y, n, _, _ = pts[("mnist · lenet5", "oversampling", 100.0)]  # one panel, named by experiment
    assert y == pytest.approx(100 * statistics.mean(auc("oversampling", 100, None, r) for r in range(3)))
    assert n == 3
    assert fig_json(fig)["layout"]["xaxis"]["type"] == "log"


def test_fig6_accuracy_with_and_without_thresholding(trials):
    fig = F.buda_figure(6, trials)
    traces = mean_traces(fig)
    arms = {t["meta"]["arm"] for t in traces}
    assert arms == {"baseline", "thresholding", "oversampling", "oversampling + thresholding"}
    dashed = {t["meta"]["arm"] for t in traces if t["line"]["dash"] == "dash"}
    assert dashed == {"thresholding", "oversampling + thresholding"}
    colour = {t["meta"]["arm"]: t["line"]["color"] for t in traces}
    assert colour["thresholding"] != colour["baseline"]
    pts = points(fig)
    y, n, _, _ = pts[("ρ = 10", "thresholding", 2.0)]
    assert y == pytest.approx(100 * statistics.mean(accuracy("baseline", "threshold", 10, 0.2, r) for r in range(3)))
    assert n == 3
    assert fig_json(fig)["layout"]["yaxis"]["title"]["text"] == "accuracy (%)"


def partial_rows() -> list[dict]:
    rows = []
    for r in range(3):
        rows.append(row("baseline", "raw", "step", 1000.0, 0.5, r, grid="g7", value=0.80 + r / 100))
        for method, base in (("oversampling", 0.9), ("undersampling", 0.85)):
            for ratio in (1.0, 10.0, 100.0):
                rows.append(row(method, "raw", "step", 1000.0, 0.5, r, grid="g7", resample_ratio=ratio,
                                value=base - ratio / 10000 + r / 100))
    for x in rows:
        x["grid"] = "g7"
    return rows


def test_fig7_partial_resampling_lines_per_method_with_baseline_at_rho():
    df = pd.DataFrame(partial_rows())
    fig = F.buda_figure(7, df)
    pts = points(fig)
    panel = "step ρ = 1000, 5 minority"
    for ratio in (1.0, 10.0, 100.0):
        y, n, _, _ = pts[(panel, "oversampling", ratio)]
        assert y == pytest.approx(100 * (0.9 - ratio / 10000 + 0.01)) and n == 3
    y, n, _, _ = pts[(panel, "baseline (no re-sampling)", 1000.0)]
    assert y == pytest.approx(100 * 0.81) and n == 3
    assert fig_json(fig)["layout"]["xaxis"]["type"] == "log"
    # full re-sampling is also plotted by the other figures; partial levels are not
    fig3 = F.buda_figure(3, df)
    assert {p[1] for p in points(fig3)} == {"baseline", "oversampling", "undersampling"}
    assert points(fig3)[("μ = 0.5 (5 minority classes)", "oversampling", 1000.0)][0] == pytest.approx(100 * 0.9099)


def test_fig8_training_curves_mean_per_method_and_iteration(trials):
    curves = pd.DataFrame(curve_rows(known_rows()))
    fig = F.buda_figure(8, trials, curves)
    pts = points(fig)
    tests = {k: v for k, v in pts.items() if not k[1].endswith("(train)")}
    assert {k[1] for k in tests} == {"baseline", "oversampling", "undersampling"}
    for (_, arm, it), (y, n, _, _) in tests.items():
        assert y == pytest.approx(100 * (it / 1000 + METHOD[arm] + 0.01)) and n == 3
    y, n, _, _ = next(v for k, v in pts.items() if k[1] == "oversampling (train)" and k[2] == 200.0)
    assert y == pytest.approx(100 * (0.2 + 0.02 + 0.01 + 0.1))
    assert "iteration" in json.dumps(fig_json(fig)["layout"])


def test_colours_are_one_per_arm_across_all_figures(trials):
    curves = pd.DataFrame(curve_rows(known_rows()))
    figs = [F.buda_figure(3, trials), F.buda_figure(4, trials), F.buda_figure(5, trials),
            F.buda_figure(6, trials), F.buda_figure(8, trials, curves),
            F.buda_figure(7, pd.DataFrame(partial_rows()))]
    colours: dict[str, set[str]] = {}
    for fig in figs:
        for t in mean_traces(fig):
            colours.setdefault(t["meta"]["arm_base"], set()).add(t["line"]["color"])
    assert all(len(c) == 1 for c in colours.values()), colours
    assert colours["oversampling"] == {P.COLORS["oversampling"]}
    flat = [next(iter(c)) for c in colours.values()]
    assert len(set(flat)) == len(flat)  # different arms, different colours
    assert P.color_of("some new method") == P.color_of("some new method")


def test_absent_data_gives_none_and_a_note_never_an_exception(trials):
    linear = trials[trials["imbalance"] == "linear"]
    assert F.buda_figure(3, linear) is None
    assert F.buda_figure(4, linear) is None
    assert F.buda_figure(6, linear[linear["evaluation"] == "raw"]) is None
    assert F.buda_figure(7, trials) is None
    assert F.buda_figure(8, trials, pd.DataFrame()) is None
    assert F.buda_figure(5, trials, dataset="cifar10") is None
    assert F.buda_figure(3, trials.iloc[0:0]) is None
    results = {r.fig_id: r for r in F.buda_figures(linear, None)}
    assert results["buda-fig5"].figure is not None
    assert "step" in results["buda-fig3"].note and results["buda-fig3"].figure is None
    assert "curves" in results["buda-fig8"].note
    with pytest.raises(ValueError, match="no figure 9"):
        F.buda_figure(9, trials)


def test_figures_filter_by_dataset_model_and_grid(trials):
    other = trials.assign(dataset="cifar10", model="allcnn", grid="g2",
                          roc_auc=0.5, network_id=trials["network_id"] + "x", trial_id=trials["trial_id"] + "x")
    both = pd.concat([trials, other], ignore_index=True)
    only = points(F.buda_figure(5, both, dataset="mnist"))
    assert all(v[0] > 80 for v in only.values())
    assert {p[0] for p in points(F.buda_figure(5, both, grid="g2"))} == {"cifar10 · allcnn"}
    assert all(v[0] == pytest.approx(50) for v in points(F.buda_figure(5, both, model="allcnn")).values())
    # unfiltered: one row of panels per experiment (grids named when there are several)
    panels = {p[0] for p in points(F.buda_figure(5, both))}
    assert panels == {"mnist · lenet5 · g1", "cifar10 · allcnn · g2"}


# -- the report ------------------------------------------------------------------------------
def figure_blocks(html_text: str) -> dict[str, dict]:
    blocks = re.findall(r"<script type='application/json' class='figure-json' data-target='plot-([^']+)'>(.*?)</script>",
                        html_text, flags=re.S)
    return {k: json.loads(v) for k, v in blocks}


def test_write_report_is_one_offline_file_with_every_figure(tmp_path):
    rows = known_rows()
    write_store(tmp_path / "store", rows, curve_rows(rows))
    out = tmp_path / "report.html"
    summary = write_report(str(tmp_path / "store"), str(out))
    assert isinstance(summary, ReportSummary)
    assert summary.figures == ["buda-fig3", "buda-fig4", "buda-fig5", "buda-fig6", "buda-fig8",
                               "cd-roc_auc", "cd-accuracy"]
    # trials only: the long-tail views say which table they need instead of failing
    assert set(summary.skipped) == {"buda-fig7", "longtail-shots", "longtail-f1-gmean", "longtail-recall",
                                    "longtail-confusion"}
    assert "no class_metrics table" in summary.skipped["longtail-shots"]
    assert "no confusion table" in summary.skipped["longtail-confusion"]
    assert summary.evaluations == len(rows) and summary.networks == 6 * 3 * 3
    assert summary.status_counts == {"ok": len(rows)}
    assert summary.summary_rows == 12 and summary.incomplete_cells == 0
    text = out.read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]*\ssrc=", text) and "<link" not in text  # nothing fetched
    assert text.count(get_plotlyjs()[:500]) == 1  # plotly.js embedded exactly once
    assert text.count("Plotly.newPlot(") == 1  # one render call for every figure
    blocks = figure_blocks(text)
    assert sorted(blocks) == sorted(summary.figures)
    # what the page plots is what the builders return
    df = pd.DataFrame(rows).assign(grid="g1")
    expected = fig_json(F.buda_figure(3, df))
    assert [t["y"] for t in blocks["buda-fig3"]["data"]] == [t["y"] for t in expected["data"]]
    assert "Each point rests on n = 3 networks" in text
    # the CD diagrams are the rankings of analysis.compare; ROC AUC without thresholded arms
    for metric in ("roc_auc", "accuracy"):
        r = ranking(F.prepare(df), metric)
        drawn = blocks[f"cd-{metric}"]["data"][0]
        assert drawn["text"] == r.ranks["arm"].tolist()
        assert values(drawn["x"]) == pytest.approx(r.ranks["average_rank"].tolist())
    assert not any("thresholding" in a for a in blocks["cd-roc_auc"]["data"][0]["text"])
    assert "thresholding" in blocks["cd-accuracy"]["data"][0]["text"]
    assert "Partial re-sampling" in text or "partial re-sampling" in text  # the skipped note
    assert "oversampling + thresholding" in text  # summary table
    assert str(tmp_path / "store") in text


def class_tables(rows: list[dict]) -> dict[str, list[dict]]:
    """class_metrics and confusion of every ok trial: 10 classes, the last one a 10-image
    minority class that the baseline gets half right and others fully."""
    cms, conf = [], []
    for t in rows:
        if t["status"] != "ok":
            continue
        hits = 5 if t["method"] == "baseline" else 10
        for c in range(10):
            right = hits if c == 9 else 10
            cms.append({"trial_id": t["trial_id"], "network_id": t["network_id"], "evaluation": t["evaluation"],
                        "class": c, "train_count": 10 if c == 9 else 1000, "sampled_count": 1000,
                        "test_count": 10, "accuracy": right / 10, "roc_auc": 0.9})
            conf.append({"trial_id": t["trial_id"], "network_id": t["network_id"], "evaluation": t["evaluation"],
                         "true_class": c, "predicted_class": c, "count": right})
            if right < 10:
                conf.append({**conf[-1], "predicted_class": 0, "count": 10 - right})
    return {"class_metrics": cms, "confusion": conf}


def test_report_draws_the_long_tail_views_from_class_metrics_and_confusion(tmp_path):
    rows = known_rows()
    write_store(tmp_path / "store", rows, extra=class_tables(rows))
    out = tmp_path / "report.html"
    summary = write_report(str(tmp_path / "store"), str(out))
    assert {"longtail-shots", "longtail-f1-gmean", "longtail-recall", "longtail-confusion"} <= set(summary.figures)
    text = out.read_text(encoding="utf-8")
    blocks = figure_blocks(text)
    assert "many-shot: &gt; 100 training images" in text or "many-shot: > 100 training images" in text
    shots = blocks["longtail-shots"]
    assert [a["text"] for a in shots["layout"]["annotations"]] == ["many-shot classes", "few-shot classes"]
    few_base = [t for t in shots["data"] if t["xaxis"] == "x2" and t["name"] == "baseline"][0]
    assert set(values(few_base["y"])) == {50.0}
    # the confusion matrix is the baseline's, in the most imbalanced cell, first repeat
    counts = values(blocks["longtail-confusion"]["data"][0]["customdata"])
    assert counts[9][9] == 5 and counts[9][0] == 5 and counts[0][0] == 10
    assert "baseline, linear, ρ = 100, repeat 0" in blocks["longtail-confusion"]["layout"]["title"]["text"]


def test_report_names_cells_with_fewer_repeats_and_failures(tmp_path):
    gone = {("baseline", ev, "step", 10.0, 0.2, 2) for ev in ("raw", "threshold")}
    bad = ("undersampling", "raw", "step", 100.0, 0.5, 2)
    rows = known_rows(skip=gone, status={bad: "diverged"})
    write_store(tmp_path / "store", rows)
    summary = write_report(str(tmp_path / "store"), str(tmp_path / "r.html"))
    assert summary.status_counts == {"ok": len(rows) - 1, "diverged": 1}
    assert summary.incomplete_cells == 2  # baseline and thresholding of that cell
    assert summary.missing_evaluations is None  # no saved grid: judged against the fullest cell
    text = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "fewer evaluations than expected" in text
    assert "n = 2–3 networks" in text
    # counts table: ok, diverged, failed, networks not ok
    assert f"<td>{len(rows) - 1:,}</td><td>1</td><td>0</td><td>1</td></tr>" in text


def test_report_with_saved_grid_counts_exactly_what_is_missing(tmp_path):
    from sweep.core.grid import load_grid

    grid_file = tmp_path / "tiny.yaml"
    grid_file.write_text(
        "name: tiny\ndataset: mnist\nmodel: lenet5\nrecipe: {preset: buda_mnist, iters: 10}\n"
        "imbalance:\n  step: {rho: [10, 100], mu: [0.5]}\nmethods: [baseline, oversampling]\n"
        "repeats: 2\nseed: 3\n")
    grid = load_grid(grid_file)
    store = ResultStore(str(tmp_path / "store"))
    store.save_grid(grid)
    rows = []
    for s in grid.specs:
        if s.imbalance.rho == 100 and s.repeat == 1:
            continue  # "still running"
        for e in s.evaluations:
            r = row(str(s.method), str(e), "step", s.imbalance.rho, s.imbalance.mu, s.repeat, grid="tiny")
            r.update(trial_id=s.trial_id(e), network_id=s.network_id)
            rows.append(r)
    store.write_pack("p1", "tiny", {"trials": rows})
    summary = write_report(str(tmp_path / "store"), str(tmp_path / "r.html"))
    assert grid.evaluations == 2 * 2 * 2 * 2
    assert summary.missing_evaluations == 4  # rho 100, repeat 1: 2 methods x 2 evaluations
    assert summary.incomplete_cells == 4
    text = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "The saved grid file of tiny asks for 16 evaluations; <b>4</b> are not stored yet" in text


def test_report_reads_only_committed_packs(tmp_path):
    rows = known_rows()
    store = write_store(tmp_path / "store", rows)
    # a pack caught between renames: its curves are in place, its trials are not
    folder = tmp_path / "store" / "curves" / "grid=g1"
    folder.mkdir(parents=True)
    pd.DataFrame(curve_rows(rows)).to_parquet(folder / "orphan-20260101T000000000Zabcdef.parquet")
    (tmp_path / "store" / "trials" / "grid=g1" / ".half-written.parquet.tmp").write_bytes(b"PAR1 partial")
    summary = write_report(str(store.root), str(tmp_path / "r.html"))
    assert summary.evaluations == len(rows)
    assert "buda-fig8" in summary.skipped  # the orphan curves are invisible


def test_report_while_a_sweep_is_writing(tmp_path):
    rows = known_rows()
    store = write_store(tmp_path / "store", rows)
    stop = threading.Event()
    written = []

    def sweep() -> None:  # more packs of another grid keep arriving
        i = 0
        while not stop.is_set() and i < 200:
            extra = [dict(r, trial_id=f"{r['trial_id']}#{i}", network_id=f"{r['network_id']}#{i}")
                     for r in rows[:6]]
            store.write_pack(f"live{i}", "live", {"trials": extra, "curves": curve_rows(extra)})
            written.append(len(extra))
            i += 1

    writer = threading.Thread(target=sweep)
    writer.start()
    try:
        summaries = [write_report(str(store.root), str(tmp_path / f"r{k}.html")) for k in range(3)]
    finally:
        stop.set()
        writer.join()
    for s in summaries:
        assert len(rows) <= s.evaluations <= len(rows) + sum(written)
        assert s.evaluations % 6 == 0  # whole packs only
        assert "buda-fig3" in s.figures


def test_report_filters_and_empty_store(tmp_path):
    rows = known_rows() + [dict(r, dataset="cifar10", model="allcnn", pack_id="pc", network_id=r["network_id"] + "c",
                                trial_id=r["trial_id"] + "c") for r in known_rows()]
    write_store(tmp_path / "store", rows)
    s = write_report(str(tmp_path / "store"), str(tmp_path / "r.html"), dataset="cifar10")
    assert s.evaluations == len(rows) // 2
    assert "dataset = cifar10" in (tmp_path / "r.html").read_text(encoding="utf-8")
    s = write_report(str(tmp_path / "store"), str(tmp_path / "r.html"), grid="nope")
    assert s.evaluations == 0 and s.figures == []
    empty = write_report(str(tmp_path / "nothing"), str(tmp_path / "e.html"))
    assert empty.evaluations == 0 and empty.figures == [] and len(empty.skipped) == 6
    assert "no committed trials" in (tmp_path / "e.html").read_text(encoding="utf-8")


def latent_rows(network_ids: list[str]) -> pd.DataFrame:
    """Dablain statistics of hand-built networks: H = 2 features, 2 classes.

    FE rows of labels (0, 0, 1) with W_C = identity and no bias, so logits = FE: each
    instance is predicted right and its largest ce alone beats the other logit
    (2 > 0, 1 > 0.5, 1 > 0.2): top-K = 1 for all, coverage 1 at K = 1 and 2.
    """
    from workers.latent import latent_statistics, statistics_table

    fe = torch.tensor([[[2.0, 0.0], [1.0, 0.5], [0.2, 1.0]]]).repeat(len(network_ids), 1, 1)
    w = torch.eye(2)[None].repeat(len(network_ids), 1, 1)
    labels = torch.tensor([0, 0, 1])
    rows = latent_statistics(fe, w, None, labels, "train") + latent_statistics(fe, w, None, labels, "test")
    return statistics_table(rows, network_ids)


def test_report_draws_dablain_figures_from_latent_stats(tmp_path, monkeypatch):
    rows = known_rows()
    store = write_store(tmp_path / "store", rows)
    nets = [rows[0]["network_id"], rows[2]["network_id"]]
    store.write_pack("lat", "g1", {"trials": [], "latent_stats": latent_rows(nets)})
    s = write_report(str(store.root), str(tmp_path / "r.html"))
    for fig_id in ("dablain-fig2", "dablain-fig3", "dablain-fig4", "dablain-fig7", "dablain-fig9",
                   "dablain-table2", "dablain-table3"):
        assert fig_id in s.figures
    assert "dablain-table1" not in s.figures  # no classifier re-training networks in this store
    assert "buda-fig3" in s.figures
    blocks = figure_blocks((tmp_path / "r.html").read_text(encoding="utf-8"))
    # Fig. 3: every instance is covered by its largest ce (2 > 0, 1 > 0.5, 1 > 0.2), n = 2 networks
    coverage = {t["name"]: t["y"] for t in blocks["dablain-fig3"]["data"]}
    assert coverage == {"class 0 (n=2)": [1.0, 1.0], "class 1 (n=2)": [1.0, 1.0],
                        "all classes (n=2)": [1.0, 1.0]}
    # a bug in the latent figures costs those figures, not the report
    import analysis.latent_figures as lf

    def broken(latent, trials):
        raise RuntimeError("bug in a latent figure")

    monkeypatch.setattr(lf, "dablain_figures", broken)
    s = write_report(str(store.root), str(tmp_path / "r2.html"))
    assert "bug in a latent figure" in s.skipped["dablain"] and "buda-fig3" in s.figures
