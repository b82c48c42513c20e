"""Paired tests, adjusted p-values and rankings, checked against scipy and hand values."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from scipy import stats

from analysis.compare import CompareError, _adjust, cd_diagram, paired_tests, ranking
from sweep.cli import cli

LEGACY = Path(__file__).resolve().parent / "data" / "legacy_store"
SHIFT = {"baseline": 0.0, "oversampling": 0.02, "undersampling": -0.01}


def synthetic(repeats: int = 9, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for rho in (10, 100, 1000):
        for r in range(repeats):
            draw = rng.normal(0.9 - rho / 10_000, 0.01)  # the training set's own difficulty
            for method, shift in SHIFT.items():
                rows.append({"grid": "g", "dataset": "mnist", "model": "lenet5", "imbalance": "step",
                             "rho": float(rho), "mu": 0.5, "repeat": r, "method": method, "loss": "ce",
                             "resample_ratio": 1.0, "evaluation": "raw", "status": "ok",
                             "network_id": f"{rho}-{r}-{method}", "seed": r,
                             "roc_auc": draw + shift + rng.normal(0, 0.003), "accuracy": draw})
    return pd.DataFrame(rows)


def test_paired_tests_equal_scipy_on_the_same_pairs() -> None:
    trials = synthetic()
    table = paired_tests(trials, "roc_auc", by=("rho",))
    assert set(table["arm"]) == {"oversampling", "undersampling"} and len(table) == 6
    for row in table.itertuples():
        cell = trials[trials["rho"] == row.rho]
        arm = cell[cell["method"] == row.arm].sort_values("repeat")["roc_auc"].to_numpy()
        base = cell[cell["method"] == "baseline"].sort_values("repeat")["roc_auc"].to_numpy()
        assert row.n == 9
        assert row.p_wilcoxon == pytest.approx(stats.wilcoxon(arm - base).pvalue)
        assert row.p_ttest == pytest.approx(stats.ttest_rel(arm, base).pvalue)
        assert row.median_diff == pytest.approx(np.median(arm - base))
        assert row.median_ci_low <= row.median_diff <= row.median_ci_high
        assert np.sign(row.mean_diff) == np.sign(SHIFT[row.arm])
    # Exact Wilcoxon for 9 pairs all of one sign: p = 2 / 2^9.
    assert table["p_wilcoxon"].min() == pytest.approx(2 / 2**9)
    assert (table["p_wilcoxon_holm"] >= table["p_wilcoxon"]).all()


def test_holm_and_benjamini_hochberg_against_hand_values() -> None:
    p = pd.Series([0.01, 0.04, 0.03, 0.005, np.nan])
    # Holm: sorted 0.005 x4, 0.01 x3, 0.03 x2, 0.04 x1, made monotone: 0.02, 0.03, 0.06, 0.06.
    np.testing.assert_allclose(_adjust(p, "holm")[:4], [0.03, 0.06, 0.06, 0.02])
    # BH: p(i) m / i = 0.02, 0.02, 0.04, 0.04, then the running minimum from the top.
    np.testing.assert_allclose(_adjust(p, "fdr_bh")[:4], [0.02, 0.04, 0.04, 0.02])
    assert np.isnan(_adjust(p, "holm")[4])


def test_ranking_friedman_and_nemenyi() -> None:
    trials = synthetic()
    r = ranking(trials, "roc_auc")
    assert list(r.ranks["arm"]) == ["oversampling", "baseline", "undersampling"]
    assert r.blocks == 3
    table = trials.groupby(["rho", "method"])["roc_auc"].mean().unstack()
    expected = stats.friedmanchisquare(table["oversampling"], table["baseline"], table["undersampling"])
    assert r.statistic == pytest.approx(expected.statistic) and r.p_value == pytest.approx(expected.pvalue)
    # Demsar 2006, Table 5: q_0.05 = 2.343 for k = 3.
    assert r.critical_difference == pytest.approx(2.343 * np.sqrt(3 * 4 / (6 * 3)), rel=1e-3)
    assert r.ranks["average_rank"].tolist() == [1.0, 2.0, 3.0]
    assert len(cd_diagram(r).data) >= 2


def test_bad_metric_grouping_or_arm_is_a_clear_error() -> None:
    trials = synthetic()
    with pytest.raises(CompareError, match="unknown metric 'auc'.*roc_auc"):
        paired_tests(trials, "auc")
    with pytest.raises(CompareError, match="unknown grouping 'ro'"):
        paired_tests(trials, by=("ro",))
    with pytest.raises(CompareError, match="no arm 'smote'"):
        paired_tests(trials, arms=["smote"])
    with pytest.raises(CompareError, match="at least 3 arms"):
        ranking(trials, arms=["baseline", "oversampling"])


def test_compare_command_on_a_store() -> None:
    runner = CliRunner()
    out = runner.invoke(cli, ["compare", str(LEGACY), "--format", "json"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)
    # ROC AUC: thresholded arms would only repeat their raw arms' numbers.
    assert {r["arm"] for r in rows} == {"oversampling", "two-phase (oversampling)"}
    assert all(r["n"] == 2 and r["reference"] == "baseline" for r in rows)
    table = runner.invoke(cli, ["compare", str(LEGACY)])
    assert table.exit_code == 0 and "Wilcoxon" in table.output and "thresholded arms left out" in table.output
    accuracy = json.loads(runner.invoke(cli, ["compare", str(LEGACY), "--metric", "accuracy",
                                              "--format", "json"]).output)
    assert {r["arm"] for r in accuracy} == {"oversampling", "oversampling + thresholding", "thresholding",
                                            "two-phase (oversampling)"}
    g = runner.invoke(cli, ["compare", str(LEGACY), "--metric", "g_mean", "--format", "json"])
    assert g.exit_code == 0 and len(json.loads(g.output)) == 4, g.output
    for args, needle in ((["--metric", "auc"], "unknown metric"), (["--by", "colour"], "unknown grouping"),
                         (["--metric", "macro_f1"], "macro_f1 needs the confusion table"),
                         (["--arms", "thresholding"], "thresholded arms are left out for roc_auc")):
        bad = runner.invoke(cli, ["compare", str(LEGACY), *args])
        assert bad.exit_code == 1 and needle in bad.output


def with_thresholded(trials: pd.DataFrame) -> pd.DataFrame:
    """Each network evaluated again after thresholding: the same ROC AUC, another accuracy."""
    thr = trials.assign(evaluation="threshold", accuracy=trials["accuracy"] + 0.05)
    return pd.concat([trials, thr], ignore_index=True)


def test_roc_auc_leaves_thresholded_arms_out_of_tests_and_ranking() -> None:
    trials = with_thresholded(synthetic())
    auc = paired_tests(trials, "roc_auc", by=("rho",))
    assert set(auc["arm"]) == {"oversampling", "undersampling"}
    # ... so the correction runs over 6 comparisons, as without the thresholded copies.
    plain = paired_tests(synthetic(), "roc_auc", by=("rho",))
    np.testing.assert_allclose(auc["p_wilcoxon_holm"], plain["p_wilcoxon_holm"])
    assert set(ranking(trials, "roc_auc").ranks["arm"]) == {"baseline", "oversampling", "undersampling"}
    acc = paired_tests(trials, "accuracy", by=("rho",))
    assert {"thresholding", "oversampling + thresholding"} <= set(acc["arm"])
    assert len(ranking(trials, "accuracy").ranks) == 6


def test_macro_f1_and_g_mean_are_compared_per_trial(tmp_path) -> None:
    """A store with class_metrics and confusion: trials_for adds both metrics, which the
    tests pair like any other; a missing column is a clear error."""
    from analysis.compare import trials_for
    from sweep.store.results import ResultStore

    trials = synthetic(repeats=3)
    trials["trial_id"] = trials["network_id"]
    trials["created_at"] = pd.Timestamp("2026-01-01", tz="UTC")
    shift = trials["method"].map({"baseline": 0, "oversampling": 2, "undersampling": 1}).to_numpy()
    classes, conf = [], []
    for tid, s in zip(trials["trial_id"], shift):
        # 2 classes x 10 test images; a better arm gets more of class 1 right.
        hits = 5 + s
        classes += [{"trial_id": tid, "class": 0, "train_count": 100, "test_count": 10, "accuracy": 1.0},
                    {"trial_id": tid, "class": 1, "train_count": 10, "test_count": 10, "accuracy": hits / 10}]
        conf += [{"trial_id": tid, "true_class": 0, "predicted_class": 0, "count": 10},
                 {"trial_id": tid, "true_class": 1, "predicted_class": 1, "count": hits},
                 {"trial_id": tid, "true_class": 1, "predicted_class": 0, "count": 10 - hits}]
    store = ResultStore(str(tmp_path))
    store.write_pack("p", "g", {"trials": trials.drop(columns="grid"), "class_metrics": classes, "confusion": conf})
    loaded = trials_for(str(tmp_path), "g_mean")
    by_method = loaded.groupby("method")["g_mean"].mean()
    assert by_method.to_dict() == pytest.approx({"baseline": 0.5 ** 0.5, "oversampling": 0.7 ** 0.5,
                                                 "undersampling": 0.6 ** 0.5})
    table = paired_tests(loaded, "g_mean", by=("rho",))
    assert (table.loc[table["arm"] == "oversampling", "mean_diff"] > 0).all()
    f1 = trials_for(str(tmp_path), "macro_f1")
    base = f1.loc[f1["method"] == "baseline", "macro_f1"].iloc[0]
    # class 0: TP 10, FP 5, FN 0 -> 20/25; class 1: TP 5, FN 5 -> 10/15.
    assert base == pytest.approx((20 / 25 + 10 / 15) / 2)
    assert set(ranking(f1, "macro_f1").ranks["arm"]) == set(SHIFT)
    with pytest.raises(CompareError, match="no macro_f1 column"):
        paired_tests(synthetic(), "macro_f1")
