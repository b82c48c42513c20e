"""The lr search's two paths agree (issue 25): successive halving inside a pack, and Ray Tune's
ASHAScheduler over one-network trials with the same rungs, metric and reduction.

A 4-candidate LeNet-5 search (rungs at 10 and 20 of 40 iterations, 2,000 MNIST images) runs
as one pack; its rung metrics are then handed, as the one-network trials would report them
through ``tune.report``, to the scheduler ``sweep.driver`` gives such trials. No Ray cluster:
the scheduler is Tune's own object, driven by hand.
"""

from types import SimpleNamespace

import pytest

from sweep.core.grid import expand
from sweep.core.lr_search import ASHA_METRIC, ASHA_TIME_ATTR, rung_time
from sweep.core.plan import Pack
from sweep.driver import _lr_search_scheduler, _record_stopped, _TuneReporter
from sweep.store.results import ResultStore
from workers.monitor import PackListener, RungEvent
from workers.run_pack import run_pack

GRID = {
    "name": "asha", "dataset": "mnist", "model": "lenet5", "recipe": {"preset": "buda_mnist", "iters": 40},
    "max_per_class": 100, "imbalance": {"step": {"rho": [10], "mu": [0.5]}}, "methods": ["baseline"],
    "thresholding": [], "lr": [0.05, 0.01, 0.001, 0.0001], "selection": "validation", "seed": 5,
    "lr_search": {"scheduler": "halving", "rungs": [10, 20], "reduction": 2},
}


class _Rungs(PackListener):
    def __init__(self):
        self.events = []

    def on_rung(self, event):
        self.events.append(event)


@pytest.fixture(scope="module")
def in_pack(small_mnist):
    g = expand(GRID)
    rungs = _Rungs()
    run_pack(Pack(g.specs), None, dataset=small_mnist, listeners=[rungs])
    return g, rungs.events


def _asha_decisions(g, events, order):
    """Feed each candidate's rung metrics to the driver's scheduler for one-network packs, the
    trials reporting at each rung in ``order(event)``; the trials it lets go on, per rung."""
    packs = [Pack((s,)) for s in g.specs]
    scheduler = _lr_search_scheduler(packs)
    assert scheduler is not None
    trials = {s.network_id: SimpleNamespace(trial_id=f"t{i}", config={"pack": i}) for i, s in enumerate(g.specs)}
    for t in trials.values():
        scheduler.on_trial_add(None, t)
    alive = set(trials)
    kept = []
    for event in events:
        scores = dict(zip(event.network_ids, event.scores))
        go_on = set()
        for nid in order(event):
            if nid not in alive:
                continue
            result = {ASHA_TIME_ATTR: rung_time(g.specs[0].lr_search, event.rung), ASHA_METRIC: scores[nid]}
            if scheduler.on_trial_result(None, trials[nid], result) == "CONTINUE":
                go_on.add(nid)
        alive = go_on
        kept.append(go_on)
    return kept


def test_the_in_pack_halving_and_tunes_asha_keep_the_same_candidates(in_pack):
    g, events = in_pack
    assert [e.rung for e in events] == [0, 1] and [len(e.network_ids) for e in events] == [4, 2]

    def ranked_arrivals(event):
        # ASHA is asynchronous: a trial is judged against those that reached the rung before it.
        # Here the in-pack survivors arrive first, worst to best, then the others, best to worst.
        scores = dict(zip(event.network_ids, event.scores))
        ahead = sorted(event.kept, key=scores.get)
        rest = sorted(set(event.network_ids) - set(event.kept), key=scores.get, reverse=True)
        return ahead + rest

    assert _asha_decisions(g, events, ranked_arrivals) == [set(e.kept) for e in events]


def test_asha_keeps_more_when_worse_trials_reach_a_rung_first(in_pack):
    # Its first trials at a rung always go on (nothing to compare with): the asynchronous price.
    g, events = in_pack

    def worst_first(event):
        scores = dict(zip(event.network_ids, event.scores))
        return sorted(event.network_ids, key=scores.get)

    kept = _asha_decisions(g, events, worst_first)
    assert len(kept[0]) > len(events[0].kept) and kept[0] >= set(events[0].kept)


def test_a_one_network_trial_reports_its_rungs_to_tune_and_a_stopped_one_is_stored(in_pack, tmp_path):
    g, events = in_pack
    search = g.specs[0].lr_search
    reports = []
    reporter = _TuneReporter(reports.append, search=search)
    reporter.on_rung(events[0])  # a pack of several halves its own candidates: nothing for ASHA
    assert reports == []
    e = events[0]
    i = e.network_ids.index(next(n for n in e.network_ids if n not in e.kept))
    one = RungEvent(e.pack_id, 1, 0, e.iteration, e.metric, (e.network_ids[i],), (e.scores[i],), (), (e.test[i],))
    reporter.on_rung(one)
    (r,) = reports
    assert r[ASHA_TIME_ATTR] == 1 and r[ASHA_METRIC] == e.scores[i] and r["iteration"] == 10
    # ASHA stopped it: the driver stores it from that report.
    spec = next(s for s in g.specs if s.network_id == e.network_ids[i])
    store = ResultStore(str(tmp_path / "store"))
    _record_stopped(store, Pack((spec,)), SimpleNamespace(name="asha"), r)
    (row,) = store.read_table("trials").to_dict("records")
    assert (row["status"], row["rung"], row["stopped_at_iter"], row["network_id"]) == ("stopped", 0, 10, spec.network_id)
    assert row["roc_auc"] == e.test[i]["roc_auc"] and row["rung_metric"] == e.scores[i]
    assert spec.network_id in store.completed_network_ids()  # resume does not train it again


def test_packs_of_several_networks_get_no_tune_scheduler():
    g = expand(GRID)
    assert _lr_search_scheduler([Pack(g.specs)]) is None
    assert _lr_search_scheduler([Pack((s,)) for s in expand({**GRID, "lr_search": None}).specs]) is None


@pytest.mark.ray
def test_one_network_trials_are_stopped_by_tunes_asha_and_stored(mnist, tmp_path, ray_dir):
    # The same 4 candidates as one-network packs under `sweep run` (Ray Tune), one trial at a
    # time in the packs' order: ASHA judges each at a rung against those before it. What each
    # trial reports at its rungs is what it reports trained alone here (the same numbers).
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    g = expand(GRID)
    alone = {}
    for s in g.specs:  # on all of MNIST, as the CLI's workers
        rungs = _Rungs()
        run_pack(Pack((s,)), None, dataset=mnist, listeners=[rungs])
        alone[s.network_id] = [e.scores[0] for e in rungs.events]

    grid_file = tmp_path / "asha.yaml"
    grid_file.write_text(yaml.safe_dump(GRID))
    store = tmp_path / "store"
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-m", "sweep.cli", "run", str(grid_file), "--store", str(store),
                          "--max-networks", "1", "--max-concurrent", "1", "--num-cpus", "1",
                          "--ray-temp-dir", ray_dir, "-q"], capture_output=True, text=True, cwd=root, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {r["network_id"]: r for r in ResultStore(str(store)).read_table("trials").to_dict("records")}
    assert set(rows) == set(alone)

    # ASHA's decisions on those reports, the trials in the order of their packs.
    from sweep.core.plan import plan_packs

    order = [p.specs[0].network_id for p in plan_packs(g.specs, 1)]
    every = [RungEvent("p", 1, k, it, "balanced_accuracy", tuple(order), tuple(alone[n][k] for n in order), ())
             for k, it in enumerate((10, 20))]
    kept = _asha_decisions(g, every, lambda e: order)
    for nid, r in rows.items():
        if nid in kept[-1]:
            assert r["status"] == "ok"
        else:
            rung = 0 if nid not in kept[0] else 1
            assert (r["status"], r["rung"], r["stopped_at_iter"]) == ("stopped", rung, [10, 20][rung])
            assert r["rung_metric"] == alone[nid][rung]
    assert not list((store / "_checkpoints").glob("*.pt"))
