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
    assert {r["arm"] for r in rows} == {"oversampling", "oversampling + thresholding", "thresholding",
                                        "two-phase (oversampling)"}
    assert all(r["n"] == 2 and r["reference"] == "baseline" for r in rows)
    table = runner.invoke(cli, ["compare", str(LEGACY)])
    assert table.exit_code == 0 and "Wilcoxon" in table.output
    for args, needle in ((["--metric", "auc"], "unknown metric"), (["--by", "colour"], "unknown grouping")):
        bad = runner.invoke(cli, ["compare", str(LEGACY), *args])
        assert bad.exit_code == 1 and needle in bad.output
