"""Tests for analysis.latent_figures: traces and tables equal hand-computed aggregates.

A tiny latent table of three networks: n1 and n2 trained with cross-entropy,
n3 with focal loss; n1 and n2 have class 0 as majority (class_counts [100, 10]),
n3 has class 1 (class_counts [10, 100]). Two classes, K = 1..2.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import pytest

from analysis import latent_figures as lf

NAN = float("nan")


def _row(net: str, split: str, cls: int, stat: str, value: float, k: int | None = None,
         feature: int | None = None) -> dict:
    return {"network_id": net, "split": split, "class": cls, "statistic": stat, "k": k, "feature": feature,
            "value": value}


def _latent() -> pd.DataFrame:
    rows = []
    coverage = {  # (network, class): coverage at K = 1, 2
        ("n1", 0): [0.5, 1.0], ("n1", 1): [0.8, 1.0], ("n1", -1): [0.6, 1.0],
        ("n2", 0): [0.7, 0.9], ("n2", 1): [1.0, 1.0], ("n2", -1): [0.8, 0.95],
        ("n3", 0): [0.2, 0.4], ("n3", 1): [0.4, 0.6], ("n3", -1): [0.3, 0.5],
    }
    for (net, c), vals in coverage.items():
        rows += [_row(net, "train", c, "topk_coverage", v, k=k) for k, v in enumerate(vals, start=1)]
        rows.append(_row(net, "test", c, "topk_coverage", 0.0, k=1))  # another split: never plotted
    needed = {("n1", 0): 5, ("n1", 1): 2, ("n2", 0): 7, ("n2", 1): 4, ("n3", 0): 3, ("n3", 1): 9}
    rows += [_row(net, "train", c, "class_topk_fe_needed", v) for (net, c), v in needed.items()]
    ce = {("n1", 0): [1.0, 0.5], ("n1", 1): [4.0, 1.0], ("n2", 0): [2.0], ("n2", 1): [6.0],
          ("n3", 0): [9.0], ("n3", 1): [3.0]}
    for (net, c), vals in ce.items():
        rows += [_row(net, "train", c, "ce_mean_magnitude", v, k=k, feature=10 + k + c)
                 for k, v in enumerate(vals, start=1)]
    norms = {"n1": (2.0, 10.0), "n2": (4.0, 14.0), "n3": (1.0, NAN)}  # n3 has no false positive
    for net, (tp, fp) in norms.items():
        rows += [_row(net, "test", -1, "fe_frobenius_tp", tp), _row(net, "test", -1, "fe_frobenius_fp", fp),
                 _row(net, "test", 0, "fe_frobenius_tp", 99.0)]  # a class row: not the -1 bar
    acc = {  # (network, split): class 0, class 1 accuracy
        ("n1", "train"): (1.0, 0.9), ("n1", "test"): (0.95, 0.5),
        ("n2", "train"): (1.0, 1.0), ("n2", "test"): (0.85, 0.7),
        ("n3", "train"): (0.8, 1.0), ("n3", "test"): (0.3, 0.9),
    }
    for (net, split), (a0, a1) in acc.items():
        rows += [_row(net, split, 0, "accuracy", a0), _row(net, split, 1, "accuracy", a1),
                 _row(net, split, -1, "accuracy", (a0 + a1) / 2)]
    return pd.DataFrame(rows)


def _trials() -> pd.DataFrame:
    # Two evaluations of each network: join_trials must keep one row per network.
    nets = [("n1", "ce", [100, 10]), ("n2", "ce", [100, 10]), ("n3", "focal", [10, 100])]
    return pd.DataFrame([
        {"trial_id": f"{net}-{e}", "network_id": net, "evaluation": e, "dataset": "cifar10", "method": "baseline",
         "loss": loss, "imbalance": "exponential", "rho": 10.0, "class_counts": counts}
        for net, loss, counts in nets for e in ("raw", "threshold")
    ])


@pytest.fixture(scope="module")
def df() -> pd.DataFrame:
    out = lf.join_trials(_latent(), _trials())
    assert len(out) == len(_latent())  # one trial row per network joined
    return out


def _traces(fig: go.Figure) -> dict[str, tuple[list, list]]:
    return {t.name: (list(t.x), list(t.y)) for t in fig.data}


def test_join_and_select(df: pd.DataFrame) -> None:
    assert {"loss", "imbalance", "rho", "class_counts", "method"} <= set(df.columns)
    assert set(lf.select(df, {"loss": "focal"})["network_id"]) == {"n3"}
    assert set(lf.select(df, {"network_id": ["n1", "n3"]}, split="train")["split"]) == {"train"}
    with pytest.raises(KeyError, match="join_trials"):
        lf.select(df, {"no_such_column": 1})


def test_coverage_figure(df: pd.DataFrame) -> None:
    fig = lf.coverage_figure(df, facet="loss")
    assert isinstance(fig, go.Figure)
    tr = _traces(fig)
    # ce panel = mean of n1 and n2: class 0 (.5+.7)/2, (1+.9)/2; class 1 (.8+1)/2, 1; all (.6+.8)/2, (1+.95)/2.
    assert tr["class 0 (n=2)"][0] == [1, 2]
    assert tr["class 0 (n=2)"][1] == pytest.approx([0.6, 0.95])
    assert tr["class 1 (n=2)"][1] == pytest.approx([0.9, 1.0])
    assert tr["all classes (n=2)"][1] == pytest.approx([0.7, 0.975])
    # focal panel = n3 alone.
    assert tr["class 0 (n=1)"][1] == pytest.approx([0.2, 0.4])
    assert tr["all classes (n=1)"][1] == pytest.approx([0.3, 0.5])
    assert [a.text for a in fig.layout.annotations] == ["ce", "focal"]  # panel titles
    assert "coverage" in fig.layout.yaxis.title.text and "K" in fig.layout.xaxis.title.text
    # The same numbers as coverage_data, with n.
    data = lf.coverage_data(df, facet="loss")
    row = data[(data.facet == "ce") & (data["class"] == 0) & (data.k == 2)].iloc[0]
    assert row.value == pytest.approx(0.95) and row.n == 2
    # Subset: only n1.
    one = _traces(lf.coverage_figure(df, facet=None, where={"network_id": "n1"}, max_k=1))
    assert one["class 1 (n=1)"] == ([1], [0.8])


def test_coverage_by_class_figure(df: pd.DataFrame) -> None:
    tr = _traces(lf.coverage_by_class_figure(df, ks=(1, 2), facet="loss", where={"loss": "ce"}))
    assert tr["K=1 (n=2)"][0] == [0, 1]  # classes; the -1 "all" row is not a class
    assert tr["K=1 (n=2)"][1] == pytest.approx([0.6, 0.9])
    assert tr["K=2 (n=2)"][1] == pytest.approx([0.95, 1.0])


def test_features_needed_figure(df: pd.DataFrame) -> None:
    fig = lf.features_needed_figure(df, kind="fe", group="loss")
    tr = _traces(fig)
    assert tr["ce (n=2)"] == ([0, 1], [6.0, 3.0])  # (5+7)/2, (2+4)/2
    assert tr["focal (n=1)"] == ([0, 1], [3.0, 9.0])
    assert fig.layout.barmode == "group" and "number of fe" in fig.layout.yaxis.title.text


def test_ranked_figure(df: pd.DataFrame) -> None:
    tr = _traces(lf.ranked_figure(df, "ce_mean_magnitude"))
    # Rank 1: class 0 (1+2+9)/3 = 4, class 1 (4+6+3)/3 = 13/3, n = 3; rank 2 only n1: .5, 1.
    assert tr["rank 1 (n=3)"][0] == [0, 1]
    assert tr["rank 1 (n=3)"][1] == pytest.approx([4.0, 13 / 3])
    assert tr["rank 2 (n=1)"][1] == pytest.approx([0.5, 1.0])
    assert set(_traces(lf.ranked_figure(df, "ce_mean_magnitude", top=1))) == {"rank 1 (n=3)"}


def test_magnitude_table(df: pd.DataFrame) -> None:
    data = lf.magnitude_table_data(df, "ce_mean_magnitude", group=("loss",))
    ce = data[data.loss == "ce"].iloc[0]
    # Majority = class 0 for n1, n2: (1+2)/2 = 1.5; other = class 1: (4+6)/2 = 5; ratio 5/1.5.
    assert (ce.majority, ce.other, ce.n) == (1.5, 5.0, 2)
    assert ce.ratio == pytest.approx(10 / 3)
    focal = data[data.loss == "focal"].iloc[0]
    # n3's majority is class 1 (class_counts [10, 100]): 3; other = class 0: 9.
    assert (focal.majority, focal.other, focal.ratio, focal.n) == (3.0, 9.0, 3.0, 1)
    fig = lf.magnitude_table(df, "ce_mean_magnitude", group=("loss",))
    table = fig.data[0]
    assert isinstance(table, go.Table)
    cells = table.cells.values
    assert list(cells[0]) == ["ce", "focal"]
    assert list(cells[1]) == ["1.5000", "3.0000"] and list(cells[2]) == ["5.0000", "9.0000"]
    assert list(cells[3]) == ["3.33", "3.00"] and list(cells[4]) == [2, 1]
    assert "n networks" in table.header.values
    # Without class_counts the majority defaults to class 0 (or the given one).
    plain = _latent()
    d0 = lf.magnitude_table_data(plain, group=())
    assert (d0.majority.iloc[0], d0.other.iloc[0], d0.n.iloc[0]) == (4.0, 13 / 3, 3)
    d1 = lf.magnitude_table_data(plain, group=(), majority=1)
    assert d1.majority.iloc[0] == pytest.approx(13 / 3)


def test_tp_fp_norms_figure(df: pd.DataFrame) -> None:
    fig = lf.tp_fp_norms_figure(df, group="loss")
    tr = _traces(fig)
    # The legend gives the range of n over the bars; each bar's n is in its hover data.
    assert tr["test TP (n=1-2)"] == (["ce", "focal"], [3.0, 1.0])  # (2+4)/2; n3 alone
    assert list(fig.data[0].customdata) == [2, 1]
    assert tr["test FP (n=2)"] == (["ce"], [12.0])  # (10+14)/2; n3's NaN is left out
    assert "norm" in fig.layout.yaxis.title.text
    per_class = lf.tp_fp_norms_data(df, group=None, cls=0)
    assert per_class.value.tolist() == [99.0] and per_class.n.tolist() == [3]


def test_class_accuracy_figure(df: pd.DataFrame) -> None:
    fig = lf.class_accuracy_figure(df, facet="imbalance")
    tr = _traces(fig)
    # In %: train class 0 (1+1+.8)/3, class 1 (.9+1+1)/3; test (.95+.85+.3)/3, (.5+.7+.9)/3.
    assert tr["train (n=3)"][0] == [0, 1]
    assert tr["train (n=3)"][1] == pytest.approx([280 / 3, 290 / 3])
    assert tr["test (n=3)"][1] == pytest.approx([70.0, 70.0])
    assert "%" in fig.layout.yaxis.title.text


def test_accuracy_table(df: pd.DataFrame) -> None:
    data = lf.accuracy_table_data(df, group=("loss",)).set_index("loss")
    # ce (n1, n2): majority class 0, minority class 1.
    assert data.loc["ce", "train majority"] == 1.0
    assert data.loc["ce", "test majority"] == pytest.approx(0.9)
    assert data.loc["ce", "train minority"] == pytest.approx(0.95)
    assert data.loc["ce", "test minority"] == pytest.approx(0.6)
    assert data.loc["ce", "n"] == 2
    # focal (n3): majority class 1, minority class 0.
    assert (data.loc["focal", "train majority"], data.loc["focal", "test minority"]) == (1.0, 0.3)
    table = lf.accuracy_table(df, group=("loss",)).data[0]
    assert list(table.cells.values[0]) == ["ce", "focal"]
    assert list(table.cells.values[4]) == ["60.00", "30.00"]  # test minority, %
    assert list(table.cells.values[5]) == [2, 1]


def test_retraining_table() -> None:
    trials = pd.DataFrame([
        {"network_id": "b1", "evaluation": "raw", "dataset": "cifar10", "loss": "ce", "method": "baseline",
         "imbalance": "none", "balanced_accuracy": 0.9},
        {"network_id": "b2", "evaluation": "raw", "dataset": "cifar10", "loss": "ce", "method": "baseline",
         "imbalance": "exponential", "balanced_accuracy": 0.7},
        {"network_id": "b2", "evaluation": "threshold", "dataset": "cifar10", "loss": "ce", "method": "baseline",
         "imbalance": "exponential", "balanced_accuracy": 0.99},  # not the raw evaluation: ignored
        {"network_id": "b3", "evaluation": "raw", "dataset": "cifar10", "loss": "ce", "method": "baseline",
         "imbalance": "exponential", "balanced_accuracy": 0.74},
        {"network_id": "r1", "evaluation": "raw", "dataset": "cifar10", "loss": "ce",
         "method": "classifier_retraining", "imbalance": "exponential", "balanced_accuracy": 0.8},
        {"network_id": "o1", "evaluation": "raw", "dataset": "cifar10", "loss": "ce", "method": "oversampling",
         "imbalance": "exponential", "balanced_accuracy": 0.1},  # not part of Table 1
    ])
    data = lf.retraining_table_data(trials).iloc[0]
    assert (data.balanced, data.imbalanced, data.retrained) == (0.9, pytest.approx(0.72), 0.8)
    assert (data["n balanced"], data["n imbalanced"], data["n retrained"]) == (1, 2, 1)
    table = lf.retraining_table(trials).data[0]
    assert list(table.cells.values[0]) == ["cifar10 / ce"]
    assert [list(v) for v in table.cells.values[1:]] == [["90.00"], [1], ["72.00"], [2], ["80.00"], [1]]


def test_every_builder_accepts_an_empty_subset(df: pd.DataFrame) -> None:
    none = {"network_id": "missing"}
    for fig in (lf.coverage_figure(df, where=none), lf.features_needed_figure(df, where=none),
                lf.ranked_figure(df, where=none), lf.tp_fp_norms_figure(df, where=none),
                lf.class_accuracy_figure(df, where=none)):
        assert isinstance(fig, go.Figure) and len(fig.data) == 0
    assert lf.magnitude_table_data(df, where=none).empty
    assert lf.accuracy_table_data(df, where=none).empty


def test_on_scale_reads_new_and_old_stores_and_the_report_draws_the_papers_scale() -> None:
    """New rows say their scale; rows of older stores hold one scale per network (normalised
    for LDAM's cosine head, raw otherwise). Dablain's figures use the raw scale and say so."""
    def norms(net: str, v: float, scale: str | None = None) -> list[dict]:
        rows = [_row(net, "test", -1, f"fe_frobenius_{tag}", v) for tag in ("tp", "fp")]
        return [r if scale is None else {**r, "feature_scale": scale} for r in rows]

    new = pd.DataFrame(norms("ldam_new", 21.0, "raw") + norms("ldam_new", 1.5, "normalised")
                       + norms("ce_new", 12.0, "raw"))
    old = pd.DataFrame(norms("ldam_old", 1.9) + norms("ce_old", 11.0))  # no feature_scale column
    latent = pd.concat([new, old], ignore_index=True)  # a store read across both: NaN for the old rows
    trials = pd.DataFrame([{"network_id": n, "loss": loss, "dataset": "cifar10", "method": "baseline"}
                           for n, loss in (("ldam_new", "ldam"), ("ce_new", "ce"), ("ldam_old", "ldam"),
                                           ("ce_old", "ce"))])
    raw = lf.on_scale(latent, trials, "raw")
    assert sorted(set(zip(raw["network_id"], raw["value"]))) == [("ce_new", 12.0), ("ce_old", 11.0), ("ldam_new", 21.0)]
    unit = lf.on_scale(latent, trials, "normalised")
    assert sorted(set(zip(unit["network_id"], unit["value"]))) == [("ldam_new", 1.5), ("ldam_old", 1.9)]
    assert set(lf.on_scale(old, trials, "raw")["network_id"]) == {"ce_old"}  # no column at all
    with_head = trials.assign(head=["cosine", "linear", "linear", "linear"])  # ldam_old with ldam_head: linear
    assert set(lf.on_scale(latent, with_head, "raw")["network_id"]) == {"ce_new", "ce_old", "ldam_new", "ldam_old"}
    with pytest.raises(ValueError, match="unknown feature scale 'unit'"):
        lf.on_scale(latent, trials, "unit")
    made = {fig_id: (caption, fig) for fig_id, _, caption, fig in lf.dablain_figures(latent, trials)}
    caption, fig = made["dablain-fig10"]
    assert "paper's scale" in caption
    drawn = {y for t in fig.data for y in t.y if y == y}
    assert drawn == {21.0, 11.5}  # by loss: LDAM's raw norm, the mean of the two CE networks
    caption, fig = {i: (c, f) for i, _, c, f in lf.dablain_figures(latent, trials, "normalised")}["dablain-fig10"]
    assert "unit-length" in caption and {y for t in fig.data for y in t.y if y == y} == {1.7, 11.5}
