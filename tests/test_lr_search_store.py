"""Networks stopped by a learning-rate search with early stopping in the store's readers:
`sweep status` counts them apart from the failed, the lr selection of the analysis ignores
them, and the rung ladder is counted (issue 25). Frames built by hand: no training."""

import datetime as dt

import pandas as pd

from analysis.aggregate import select_lr_runs, stopped_by_rung
from analysis.report import _stopped_note
from sweep.core.grid import expand
from sweep.store.query import query
from sweep.store.results import ResultStore
from sweep.store.status import TRIAL_COLUMNS, format_status, summarize

DOC = {
    "name": "ls", "dataset": "mnist", "model": "lenet5", "recipe": {"preset": "buda_mnist", "iters": 40},
    "imbalance": {"step": {"rho": [10], "mu": [0.5]}}, "methods": ["baseline", "oversampling"],
    "thresholding": [], "lr": [0.1, 0.01, 0.001, 0.0001], "selection": "validation", "seed": 1,
    "lr_search": {"rungs": [10, 20]},
}
T0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
# Per lr: status, rung, stopped_at_iter, val_balanced_accuracy, roc_auc (a stopped network may
# have the higher test metric at its rung: it must not be chosen).
OUTCOME = {0.1: ("stopped", 0, 10, None, 0.99), 0.01: ("ok", 1, None, 0.8, 0.90),
           0.001: ("stopped", 1, 20, None, 0.95), 0.0001: ("stopped", 0, 10, None, 0.97)}


def trials():
    g = expand(DOC)
    out = []
    for s in g.specs:
        status, rung, at, val, auc = OUTCOME[s.recipe.base_lr]
        out.append({"trial_id": s.trial_id("raw"), "network_id": s.network_id, "pack_id": "p", "grid": "ls",
                    "method": str(s.method), "status": status, "error": None, "created_at": T0,
                    "train_seconds": 1.0, "eval_seconds": 0.0, "latent_seconds": 0.0, "evaluation": "raw",
                    "dataset": "mnist", "model": "lenet5", "loss": "ce", "imbalance": "step", "rho": 10.0,
                    "mu": 0.5, "resample_ratio": 1.0, "repeat": 0, "lr_run": 0, "base_lr": s.recipe.base_lr,
                    "selection": "validation", "val_balanced_accuracy": val, "roc_auc": auc, "rung": rung,
                    "stopped_at_iter": at})
    return g, pd.DataFrame(out)


def test_status_counts_stopped_networks_apart_from_failed_ones():
    g, t = trials()
    out = summarize([g], t[TRIAL_COLUMNS + ["grid"]], pd.DataFrame(columns=["network_id", "error", "created_at",
                                                                             "grid"]))
    assert out["totals"] == {"total": 8, "done": 2, "diverged": 0, "stopped": 6, "failed": 0, "pending": 0}
    assert out["grids"][0]["by_method"]["baseline"]["stopped"] == 3
    text = format_status(out)
    assert "2 done (0 of them diverged), 6 stopped by the lr search, 0 failed, 0 pending of 8" in text
    assert "stopped" in text.splitlines()[1]  # the table's column
    assert "time left: none" in text  # a stopped network is not left to train


def test_the_lr_selection_considers_survivors_only():
    _, t = trials()
    chosen = select_lr_runs(t)
    assert len(chosen) == 2 and set(chosen["status"]) == {"ok"} and set(chosen["base_lr"]) == {0.01}


def test_stopped_by_rung_counts_the_ladder():
    _, t = trials()
    ladder = stopped_by_rung(t)
    got = {(r.method, r.rung, r.stopped_at_iter): r.networks for r in ladder.itertuples()}
    assert got == {("baseline", 0, 10): 2, ("baseline", 1, 20): 1, ("oversampling", 0, 10): 2,
                   ("oversampling", 1, 20): 1}
    assert stopped_by_rung(t.drop(columns=["rung", "stopped_at_iter"])).empty  # an older store


def test_sweep_query_has_the_ladder_as_a_view(tmp_path):
    _, t = trials()
    t["rung_metric"] = [0.1 * (i + 1) for i in range(len(t))]
    store = ResultStore(str(tmp_path / "s"))
    store.write_pack("p", "ls", {"trials": t.drop(columns=["grid"])})
    got = query(store.root, "SELECT * FROM rungs")
    want = stopped_by_rung(t)
    assert list(got.columns) == ["grid", "method", "rung", "iteration", "networks_stopped", "metric_min",
                                 "metric_max"]
    assert [(r.method, r.rung, r.iteration, r.networks_stopped) for r in got.itertuples()] == \
        [(r.method, r.rung, r.stopped_at_iter, r.networks) for r in want.itertuples()]
    stopped = t[t["status"].eq("stopped")]
    first = stopped[(stopped["method"] == "baseline") & (stopped["rung"] == 0)]["rung_metric"]
    assert (got.loc[0, "metric_min"], got.loc[0, "metric_max"]) == (first.min(), first.max())
    # A store written before lr searches had rungs: the view is there, and empty.
    old = ResultStore(str(tmp_path / "old"))
    old.write_pack("p", "ls", {"trials": t.drop(columns=["grid", "rung", "stopped_at_iter", "rung_metric"])})
    assert query(old.root, "SELECT * FROM rungs").empty


def test_the_report_says_how_many_were_stopped_where():
    _, t = trials()
    note = _stopped_note(t)
    assert "6 networks were stopped" in note
    assert "4 at rung 0 (iteration 10), 2 at rung 1 (iteration 20)" in note
    assert _stopped_note(t[~t["status"].eq("stopped")]) == ""


def test_a_diverged_network_a_rung_dropped_is_not_chosen_either():
    # A rung drops a diverged network with its status kept (diverged) and its stopped_at_iter set.
    _, t = trials()
    t["status"] = "diverged"  # say the survivor diverged late too: no ok network in the group
    t["val_balanced_accuracy"] = None
    chosen = select_lr_runs(t)
    assert set(chosen["base_lr"]) == {0.01}  # not lr 0.1, dropped at rung 0 with a higher test AUC
