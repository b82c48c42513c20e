"""Long-tail views: macro-F1 and G-mean against sklearn and hand values, shot groups, figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import confusion_matrix, f1_score, recall_score

from analysis.figures import prepare
from analysis.load import Results
from analysis.longtail import (
    ClassTables,
    ShotThresholds,
    confusion_figure,
    default_confusion_trial,
    g_mean,
    longtail_figures,
    macro_f1,
    read_class_tables,
    recall_heatmap,
    shot_accuracy,
    shot_figure,
    with_trial_metrics,
)

LEGACY = Path(__file__).resolve().parent / "data" / "legacy_store"


def confusion_rows(trial_id: str, y: np.ndarray, pred: np.ndarray, k: int) -> list[dict]:
    """What the worker stores: the non-zero cells of the confusion matrix."""
    m = confusion_matrix(y, pred, labels=range(k))
    return [{"trial_id": trial_id, "true_class": t, "predicted_class": q, "count": int(m[t, q])}
            for t in range(k) for q in range(k) if m[t, q]]


def test_macro_f1_equals_sklearn_including_classes_never_predicted_or_never_true() -> None:
    rng = np.random.default_rng(0)
    rows, expected = [], {}
    for i in range(5):
        y = rng.integers(0, 5, size=300)  # class 5 is never a label ...
        pred = np.where(rng.random(300) < 0.6, y, rng.integers(0, 6, size=300))
        pred[pred == 2] = 3  # ... and class 2 is never predicted
        rows += confusion_rows(f"t{i}", y, pred, 6)
        expected[f"t{i}"] = f1_score(y, pred, average="macro")
    got = macro_f1(pd.DataFrame(rows))
    assert set(got.index) == set(expected)
    for tid, value in expected.items():
        assert got[tid] == pytest.approx(value)


def test_g_mean_is_the_geometric_mean_of_per_class_recall() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, size=200)
    pred = np.where(rng.random(200) < 0.7, y, rng.integers(0, 4, size=200))
    recall = recall_score(y, pred, average=None)
    cm = pd.DataFrame({"trial_id": ["a"] * 4 + ["b"] * 3 + ["c"] * 3, "class": list(range(4)) + [0, 1, 2] * 2,
                       "accuracy": list(recall) + [1.0, 0.25, np.nan] + [0.9, 0.0, 0.8]})
    got = g_mean(cm)
    assert got["a"] == pytest.approx(np.prod(recall) ** 0.25)
    assert got["b"] == pytest.approx(0.5)  # sqrt(1 * 0.25); the NaN recall (absent class) is left out
    assert got["c"] == 0.0  # one class never recognised


def test_shot_groups_follow_the_stated_thresholds() -> None:
    counts = pd.Series([500, 101, 100, 20, 19, 0])
    assert ShotThresholds().shot(counts).tolist() == ["many", "many", "medium", "medium", "few", "few"]
    assert ShotThresholds(many=10, few=5).shot(counts).tolist() == ["many"] * 4 + ["many", "few"]
    assert "> 100" in ShotThresholds().describe() and "< 20" in ShotThresholds().describe()
    with pytest.raises(ValueError, match="few <= many"):
        ShotThresholds(many=10, few=50)


def test_shot_accuracy_is_accuracy_on_the_groups_test_images() -> None:
    cm = pd.DataFrame({"trial_id": "t", "class": [0, 1, 2, 3], "train_count": [1000, 500, 50, 5],
                       "test_count": [100, 300, 100, 100], "accuracy": [0.9, 0.5, 0.4, 0.1]})
    got = shot_accuracy(cm).set_index("shot")
    assert got.loc["many", "accuracy"] == pytest.approx((90 + 150) / 400)  # weighted by test images
    assert got.loc["medium", "accuracy"] == pytest.approx(0.4) and got.loc["few", "accuracy"] == pytest.approx(0.1)
    assert got["classes"].to_dict() == {"few": 1, "many": 2, "medium": 1}


def synthetic_store_frames() -> tuple[pd.DataFrame, ClassTables]:
    """Two cells x two methods x two repeats, 4 classes; minority classes differ per repeat."""
    trials, cms, conf = [], [], []
    rng = np.random.default_rng(2)
    for rho in (10.0, 100.0):
        for method in ("baseline", "oversampling"):
            for repeat in range(2):
                tid = f"{rho:g}-{method}-{repeat}"
                trials.append({"trial_id": tid, "network_id": tid, "grid": "g", "dataset": "mnist",
                               "model": "lenet5", "imbalance": "step", "rho": rho, "mu": 0.5, "method": method,
                               "loss": "ce", "resample_ratio": 1.0, "evaluation": "raw", "repeat": repeat,
                               "status": "ok", "roc_auc": 0.9})
                minority = {repeat, repeat + 1}  # each repeat draws other minority labels
                for c in range(4):
                    small = c in minority
                    cms.append({"trial_id": tid, "class": c, "train_count": int(1000 / rho) if small else 1000,
                                "test_count": 100, "accuracy": 0.2 if small else 0.9})
                y = rng.integers(0, 4, 100)
                conf += confusion_rows(tid, y, np.where(rng.random(100) < 0.8, y, 0), 4)
    return prepare(pd.DataFrame(trials)), ClassTables(pd.DataFrame(cms), pd.DataFrame(conf))


def test_figures_show_the_computed_values() -> None:
    trials, tables = synthetic_store_frames()
    fig = shot_figure(trials, tables.class_metrics)
    assert "> 100" in fig.layout.title.text and "< 20" in fig.layout.title.text
    # rho = 10: minority classes have 100 images (medium); rho = 100: 10 (few).
    titles = [a.text for a in fig.layout.annotations]
    assert titles == ["many-shot classes", "medium-shot classes", "few-shot classes"]
    many = [t for t in fig.data if t.xaxis == "x" and t.name == "baseline"][0]
    assert list(many.y) == pytest.approx([90.0, 90.0])
    heat = recall_heatmap(trials, tables.class_metrics)
    # Ranked by training count, the two majority classes come first whatever their labels.
    first = heat.data[0]
    assert np.allclose(np.asarray(first.z), [[90, 90, 20, 20]] * 2)
    assert len(heat.data) == 2 and len(heat.layout.updatemenus[0].buttons) == 2


def test_confusion_figure_rows_are_shares_of_the_true_class() -> None:
    trials, tables = synthetic_store_frames()
    tid = default_confusion_trial(trials, tables.confusion)
    assert tid == "100-baseline-0"  # the baseline in the most imbalanced cell, first repeat
    fig = confusion_figure(tables.confusion, tid)
    z, counts = np.asarray(fig.data[0].z), np.asarray(fig.data[0].customdata)
    assert np.allclose(z.sum(axis=1), 100.0)
    mine = tables.confusion[tables.confusion["trial_id"] == tid]
    assert counts.sum() == mine["count"].sum() == 100
    assert counts[0, 0] == mine[(mine["true_class"] == 0) & (mine["predicted_class"] == 0)]["count"].sum()


def test_with_trial_metrics_adds_both_columns() -> None:
    trials, tables = synthetic_store_frames()
    out = with_trial_metrics(trials, tables.class_metrics, tables.confusion)
    assert out["g_mean"].to_numpy() == pytest.approx(np.sqrt(0.9 * 0.2))
    assert out["macro_f1"].between(0, 1).all() and out["macro_f1"].nunique() > 1
    assert with_trial_metrics(trials, None, None)[["macro_f1", "g_mean"]].isna().all().all()


def test_a_store_without_confusion_still_gives_the_other_views() -> None:
    results = Results(str(LEGACY))
    trials = prepare(results.table("trials"))
    tables = read_class_tables(results, trials)
    assert tables.confusion is None and len(tables.class_metrics) == 10 * len(trials)
    figs = {f.fig_id: f for f in longtail_figures(trials, tables)}
    assert all(figs[i].figure is not None for i in ("longtail-shots", "longtail-f1-gmean", "longtail-recall"))
    assert figs["longtail-confusion"].figure is None
    assert "no confusion table" in figs["longtail-confusion"].note


def test_the_same_trial_under_two_grids_keeps_each_grids_numbers() -> None:
    trials, tables = synthetic_store_frames()
    two = pd.concat([trials.assign(grid="a"), trials.assign(grid="b")], ignore_index=True)
    cms = pd.concat([tables.class_metrics.assign(grid="a"),
                     tables.class_metrics.assign(grid="b", accuracy=1.0)], ignore_index=True)
    conf = pd.concat([tables.confusion.assign(grid="a"), tables.confusion.assign(grid="b")], ignore_index=True)
    out = with_trial_metrics(two, cms, conf)
    assert len(out) == len(two)
    assert out.loc[out["grid"] == "a", "g_mean"].to_numpy() == pytest.approx(np.sqrt(0.9 * 0.2))
    assert (out.loc[out["grid"] == "b", "g_mean"] == 1.0).all()
    assert out["macro_f1"].notna().all()
    assert (shot_accuracy(cms).groupby("grid").size() == len(trials) * 2).all()  # many and few per trial


def test_cells_of_two_grids_are_not_pooled_in_the_figures() -> None:
    trials, tables = synthetic_store_frames()
    two = pd.concat([trials.assign(grid="a"), trials.assign(grid="b")], ignore_index=True)
    cms = pd.concat([tables.class_metrics.assign(grid="a"),
                     tables.class_metrics.assign(grid="b", accuracy=1.0)], ignore_index=True)
    fig = shot_figure(two, cms)
    many = [t for t in fig.data if t.xaxis == "x" and t.name == "baseline"][0]
    assert list(many.x) == ["a · mnist · lenet5 · ρ = 10, μ = 0.5", "a · mnist · lenet5 · ρ = 100, μ = 0.5",
                            "b · mnist · lenet5 · ρ = 10, μ = 0.5", "b · mnist · lenet5 · ρ = 100, μ = 0.5"]
    assert list(many.y) == pytest.approx([90.0, 90.0, 100.0, 100.0])
