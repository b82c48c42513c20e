"""The worker's latent tables: latent_stats, embeddings and classifier_weights of a real pack."""

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.latent_figures import complete_coverage
from sweep.core.grid import expand
from sweep.core.plan import Pack
from sweep.core.spec import Evaluation
from sweep.store.query import query
from sweep.store.results import ResultStore
from workers import latent_tables as lt
from workers.latent import STATISTICS, latent_statistics
from workers.members import member_data
from workers.run_pack import run_pack

GRID = {
    "name": "lat", "dataset": "mnist", "model": "lenet5",
    "recipe": {"preset": "buda_mnist", "iters": 40}, "max_per_class": 150,
    "imbalance": {"step": {"rho": [10], "mu": [0.5]}},
    "methods": ["baseline", "oversampling", "two_phase_over"],
    "latent": True, "embeddings": 1, "repeats": 1, "seed": 3,
}


@pytest.fixture(scope="module")
def stored(small_mnist, tmp_path_factory):
    grid = expand(GRID)
    store = ResultStore(str(tmp_path_factory.mktemp("lat") / "store"))
    result = run_pack(Pack(grid.specs), store, dataset=small_mnist)
    return grid, store, result


def _matrix(column: pd.Series) -> np.ndarray:
    return np.stack([np.asarray(v, dtype=np.float32) for v in column])


def test_every_latent_network_has_both_splits_and_every_statistic(stored):
    grid, store, _ = stored
    latent = store.read_table("latent_stats")
    assert set(latent["network_id"]) == {s.network_id for s in grid.specs}
    for net, d in latent.groupby("network_id"):
        assert set(d["split"]) == {"train", "test"}
        assert set(d["statistic"]) == set(STATISTICS)  # the test split adds the TP / FP rows
    trials = store.read_table("trials")
    assert (trials["latent_seconds"] > 0).all()


def test_test_accuracy_per_class_agrees_with_the_evaluation(stored):
    """Two code paths, one answer: latent_stats' test recall vs class_metrics' accuracy."""
    grid, store, _ = stored
    latent = store.read_table("latent_stats")
    acc = latent[(latent["statistic"] == "accuracy") & (latent["split"] == "test") & (latent["class"] >= 0)]
    cm = store.read_table("class_metrics")
    cm = cm[cm["evaluation"] == "raw"]
    merged = acc.merge(cm, on=["network_id", "class"], suffixes=("_latent", "_eval"))
    assert len(merged) == len(grid.specs) * 10
    # float64 vs float32 arg-max may flip an exact near-tie: at most one image per class
    assert np.all(np.abs(merged["value"] - merged["accuracy"]) <= 1 / merged["test_count"] + 1e-12)


def test_topk_coverage_recomputed_from_stored_embeddings_equals_the_stored_statistic(stored, small_mnist):
    grid, store, _ = stored
    emb = store.read_table("embeddings")
    weights = store.read_table("classifier_weights").sort_values("class")
    net = grid.specs[0].network_id
    assert set(emb["network_id"]) == set(weights["network_id"]) == {net}  # embeddings: 1
    w = torch.from_numpy(_matrix(weights["weight"]).T.copy())[None]  # [1, F, K]
    b = torch.tensor(weights["bias"].to_numpy(np.float32))[None]
    stored_cov = complete_coverage(store.read_table("latent_stats").query(
        "statistic == 'topk_coverage' and network_id == @net"))
    for split in ("train", "test"):
        e = emb[emb["split"] == split].sort_values("sample")
        fe = torch.from_numpy(_matrix(e["fe"]))[None]
        rows = latent_statistics(fe, w, b, torch.tensor(e["label"].to_numpy()), split)
        again = pd.DataFrame([r for r in rows if r["statistic"] == "topk_coverage"])
        mine = stored_cov[stored_cov["split"] == split]
        joined = again.merge(mine, on=["class", "k"], suffixes=("_again", "_stored"))
        assert len(joined) == len(mine) > 0
        assert (joined["value_again"] == joined["value_stored"]).all()
        # beyond the stored K every recomputed curve stays at its last stored value
        last = mine.sort_values("k").groupby("class")["value"].last()
        beyond = again[again["k"] > mine["k"].max()]
        assert (beyond["value"].to_numpy() == beyond["class"].map(last).to_numpy()).all()


def test_embeddings_hold_the_training_subset_and_the_test_set(stored, small_mnist):
    grid, store, _ = stored
    spec = grid.specs[0]
    emb = store.read_table("embeddings")
    labels = small_mnist.train_y.numpy()
    subset = member_data(spec, labels, 10).subset
    train = emb[emb["split"] == "train"]
    assert sorted(train["sample"]) == sorted(subset.tolist())
    assert (train["label"].to_numpy() == labels[train["sample"].to_numpy()]).all()
    test = emb[emb["split"] == "test"]
    assert sorted(test["sample"]) == list(range(len(small_mnist.test_y)))
    assert set(emb["trial_id"]) == {spec.trial_id(Evaluation.RAW)}
    # predictions are the arg-max of FE @ W_C + b
    weights = store.read_table("classifier_weights").sort_values("class")
    logits = _matrix(test["fe"]).astype(np.float64) @ _matrix(weights["weight"]).T.astype(np.float64) \
        + weights["bias"].to_numpy(np.float64)
    assert (logits.argmax(1) == test["prediction"].to_numpy()).all()
    assert len(_matrix(test["fe"])[0]) == 500  # LeNet-5's FE width


def test_members_split_into_chunks_give_the_same_statistics(stored, small_mnist, monkeypatch):
    _, store, _ = stored
    grid = expand(GRID)
    monkeypatch.setattr(lt, "FE_CHUNK_BYTES", 1)  # every member in a chunk (a sub-model) of its own
    alone = run_pack(Pack(grid.specs), None, dataset=small_mnist).tables["latent_stats"].to_pandas()
    together = store.read_table("latent_stats").drop(columns=["grid"])
    keys = ["network_id", "split", "class", "statistic", "k", "feature"]
    a = alone.sort_values(keys).reset_index(drop=True)
    b = together.sort_values(keys).reset_index(drop=True)
    pd.testing.assert_frame_equal(a[keys], b[keys], check_dtype=False)
    np.testing.assert_allclose(a["value"], b["value"], rtol=1e-5, atol=1e-6)


def test_compact_coverage_stops_each_curve_where_it_reaches_its_final_value():
    rows = []
    for cls, curve in ((0, [0.5, 0.9, 1.0, 1.0, 1.0]), (1, [0.2, 0.2, 0.6, 0.6, 0.6]), (2, [1.0] * 5)):
        rows += [{"network_id": "n", "split": "train", "class": cls, "statistic": "topk_coverage",
                  "k": k, "feature": None, "value": v} for k, v in enumerate(curve, start=1)]
    rows.append({"network_id": "n", "split": "train", "class": 0, "statistic": "instances", "k": None,
                 "feature": None, "value": 7.0})
    table = lt.compact_coverage(pd.DataFrame(rows))
    cov = table[table["statistic"] == "topk_coverage"]
    assert cov.groupby("class")["k"].max().to_dict() == {0: 3, 1: 3, 2: 1}
    assert (table["statistic"] == "instances").sum() == 1
    filled = complete_coverage(cov)
    assert filled.groupby("class")["value"].apply(list).to_dict() == {
        0: [0.5, 0.9, 1.0], 1: [0.2, 0.2, 0.6], 2: [1.0, 1.0, 1.0]}


def test_latent_tables_are_queryable_with_sql(stored):
    _, store, _ = stored
    top = query(store.root, "select split, count(distinct network_id) as n from latent_stats "
                            "where statistic = 'topk_mean' group by split order by split")
    assert top.to_dict("records") == [{"split": "test", "n": 3}, {"split": "train", "n": 3}]
    width = query(store.root, "select len(fe) as w from embeddings limit 1")
    assert width["w"].item() == 500


# -- LDAM's cosine head: raw and normalised feature scales --------------------------------
@pytest.fixture(scope="module")
def ldam(small_mnist):
    """One LDAM LeNet-5 (cosine head) with latent statistics and embeddings, and its trained head."""
    grid = expand({**GRID, "methods": ["baseline"], "losses": ["ldam"]})
    assert [str(s.head) for s in grid.specs] == ["cosine"]
    heads = []
    result = run_pack(Pack(grid.specs), None, dataset=small_mnist,
                      observer=lambda plan, model, when: heads.append(model.fc2) if when == "end" else None)
    tables = {k: result.tables[k].to_pandas() for k in ("latent_stats", "embeddings", "classifier_weights")}
    return grid.specs[0], tables, heads[0]


def test_a_linear_head_has_one_scale_raw(stored):
    _, store, _ = stored
    for table in ("latent_stats", "embeddings", "classifier_weights"):
        assert set(store.read_table(table)["feature_scale"]) == {"raw"}, table


def test_ldam_stores_raw_features_beside_the_normalised_ones(ldam):
    spec, tables, head = ldam
    for table in ("latent_stats", "embeddings", "classifier_weights"):
        assert set(tables[table]["feature_scale"]) == {"raw", "normalised"}, table
    emb = tables["embeddings"]
    for split in ("train", "test"):
        raw = emb[(emb["split"] == split) & (emb["feature_scale"] == "raw")].sort_values("sample")
        unit = emb[(emb["split"] == split) & (emb["feature_scale"] == "normalised")].sort_values("sample")
        raw_fe, unit_fe = _matrix(raw["fe"]), _matrix(unit["fe"])
        np.testing.assert_allclose(np.linalg.norm(unit_fe, axis=1), 1, atol=1e-5)
        assert np.median(np.linalg.norm(raw_fe, axis=1)) > 2  # penultimate activations, not unit vectors
        np.testing.assert_allclose(unit_fe, raw_fe / np.linalg.norm(raw_fe, axis=1, keepdims=True), atol=1e-5)
        assert (raw["prediction"].to_numpy() == unit["prediction"].to_numpy()).all()  # the network's decisions
    w = tables["classifier_weights"]
    raw_w = _matrix(w[w["feature_scale"] == "raw"].sort_values("class")["weight"])  # [K, F]
    unit_w = _matrix(w[w["feature_scale"] == "normalised"].sort_values("class")["weight"])
    np.testing.assert_array_equal(raw_w, head.weight.detach()[0].T.numpy())  # the stored parameter
    np.testing.assert_allclose(unit_w, 30 * raw_w / np.linalg.norm(raw_w, axis=1, keepdims=True), rtol=1e-5)


def test_ldam_raw_norms_exceed_the_unit_cap_and_decisions_agree(ldam):
    """Unit features cap ||mu(train FE) - mu(test FE)|| at 2 per class and 2 sqrt(10) over 10
    classes; Dablain's LDAM reports 21.16. Raw rows are on the paper's scale, beyond the cap."""
    _, tables, _ = ldam
    lat = tables["latent_stats"]
    norms = lat[lat["statistic"].isin(["fe_frobenius_tp", "fe_frobenius_fp"])].dropna(subset=["value"])
    unit = norms[norms["feature_scale"] == "normalised"]
    raw = norms[norms["feature_scale"] == "raw"]
    cap = 2 * np.sqrt(10)
    assert (unit.loc[unit["class"] >= 0, "value"] <= 2 + 1e-6).all() and (unit["value"] <= cap + 1e-6).all()
    fp_all = raw[(raw["statistic"] == "fe_frobenius_fp") & (raw["class"] == -1)]["value"]
    assert len(fp_all) == 1 and fp_all.iloc[0] > cap
    # Both scales classify the same way: accuracies and TP / FP counts are the network's.
    for stat in ("accuracy", "tp_instances", "fp_instances", "instances"):
        d = lat[lat["statistic"] == stat].pivot_table(index=["split", "class"], columns="feature_scale",
                                                        values="value")
        np.testing.assert_array_equal(d["raw"].to_numpy(), d["normalised"].to_numpy())


def test_ldam_normalised_rows_are_the_statistics_of_what_the_head_multiplies(ldam, small_mnist):
    """The normalised rows are what every LDAM row was before raw ones were added: the
    statistics of the unit features and s * unit columns (recomputed here from the stored
    normalised embeddings and weights, which are exactly those)."""
    _, tables, _ = ldam
    lat, emb, w = tables["latent_stats"], tables["embeddings"], tables["classifier_weights"]
    wn = w[w["feature_scale"] == "normalised"].sort_values("class")
    weight = torch.from_numpy(_matrix(wn["weight"]).T.copy())[None]
    bias = torch.tensor(wn["bias"].to_numpy(np.float32))[None]
    assert not bias.any()
    stored_norm = lat[lat["feature_scale"] == "normalised"]
    for split in ("train", "test"):
        e = emb[(emb["split"] == split) & (emb["feature_scale"] == "normalised")].sort_values("sample")
        fe = torch.from_numpy(_matrix(e["fe"]))[None]
        rows = pd.DataFrame(latent_statistics(fe, weight, bias, torch.tensor(e["label"].to_numpy()), split,
                                              lt.TOP, fixed_k=lt.CLASS_TOPK_K))
        rows = rows[rows["statistic"] != "topk_coverage"]  # stored compacted; checked in the test above
        mine = stored_norm[(stored_norm["split"] == split) & stored_norm["statistic"].isin(set(rows["statistic"]))]
        keys = ["statistic", "class", "k", "feature"]
        joined = rows.merge(mine, on=keys, how="outer", suffixes=("_again", "_stored"), indicator=True)
        assert (joined["_merge"] == "both").all(), joined[joined["_merge"] != "both"].head()
        np.testing.assert_allclose(joined["value_again"], joined["value_stored"], rtol=1e-6, atol=1e-9)
