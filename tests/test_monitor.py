"""The monitor of a pack run (workers.monitor), its work estimate (workers.pack_work), the
store-sink protocol (workers.store_sink) and the listeners of the runners.

The pack runs are real: tiny grids of real MNIST (tests/conftest.py's ``tiny_grid``).
"""

import dataclasses
import os

import pytest

from sweep.core.grid import expand
from sweep.core.plan import Pack, plan_packs
from sweep.store.results import ResultStore
from workers.monitor import PackListener, PackMonitor
from workers.pack_work import LOAD_SHARE, WRITE_SHARE, Phase, estimate_work
from workers.run_pack import run_pack
from workers.stages import plan_stages
from workers.store_sink import StoreSink, as_sink

from conftest import tiny_grid

TWO_PHASE = tiny_grid("mon", methods=["oversampling", "two_phase_over"], latent=True)


class Recorder(PackListener):
    """Every event, in order, into ``log`` (shared between recorders to see the fan-out)."""

    def __init__(self, name, log, store=None):
        self.name, self.log, self.store = name, log, store
        self.events = []

    def _note(self, kind, event=None, stage=None):
        stored = None if self.store is None else len(self.store.completed_network_ids())
        entry = (kind, None if event is None else event.phase, stage if event is None else event.stage)
        self.events.append((*entry, None if event is None else event, stored))
        self.log.append((self.name, *entry))

    def on_phase(self, event):
        self._note("phase", event)

    def on_iteration(self, event):
        self._note("iteration", event)

    def on_stage_start(self, plan, model):
        self._note("stage_start", stage=plan.number)

    def on_stage_end(self, plan, model):
        self._note("stage_end", stage=plan.number)

    def on_pack_end(self, event):
        self._note("pack_end", event)


def test_every_listener_hears_every_event_in_the_order_the_pack_runs(small_mnist):
    log = []
    a, b = Recorder("a", log), Recorder("b", log)
    run_pack(Pack(expand(TWO_PHASE).specs), None, dataset=small_mnist, listeners=[a, b])
    order = [e[:3] for e in a.events]
    assert order == [
        ("phase", Phase.LOADING, 0),
        ("phase", Phase.TRAINING, 1), ("stage_start", None, 1), ("iteration", Phase.TRAINING, 1),
        ("stage_end", None, 1), ("phase", Phase.EVALUATING, 1), ("phase", Phase.LATENT, 1),
        ("phase", Phase.TRAINING_FROM_PHASE1, 2), ("stage_start", None, 2),
        ("iteration", Phase.TRAINING_FROM_PHASE1, 2), ("stage_end", None, 2), ("phase", Phase.EVALUATING, 2),
        ("phase", Phase.LATENT, 2), ("phase", Phase.WRITING, 0), ("pack_end", Phase.WRITING, 0)]
    assert [e[:3] for e in b.events] == order
    # Fanned out one event at a time: each event reaches a, then b, before the next one.
    assert [name for name, *_ in log] == ["a", "b"] * len(order)
    assert [tuple(rest) for name, *rest in log[::2]] == order
    last = a.events[-1][3]
    assert (last.iters_done, last.iters_total) == (10, 10)  # 5 iterations in each stage


def test_the_fraction_is_monotone_and_reaches_1_only_once_the_rows_are_written(small_mnist, tmp_path):
    store = ResultStore(str(tmp_path / "s"))
    rec = Recorder("r", [], store)
    pack = Pack(expand(TWO_PHASE).specs)
    run_pack(pack, store, dataset=small_mnist, listeners=[rec])
    timed = [(e[0], e[3].fraction, e[4]) for e in rec.events if e[3] is not None]
    fractions = [f for _, f, _ in timed]
    assert fractions == sorted(fractions) and fractions[0] == 0.0
    assert all(f < 1 for kind, f, _ in timed if kind != "pack_end")
    assert timed[-1][:2] == ("pack_end", 1.0)
    # 1 only once the rows are in the store: nothing is stored while it is writing.
    assert [stored for kind, _, stored in timed if kind == "phase"][-1] == 0
    assert timed[-1][2] == len(pack.stored_specs)
    # Training alone is not the pack: latent statistics and evaluation weigh too.
    stage1_trained = next(e[3] for e in rec.events if e[0] == "phase" and e[1] == Phase.EVALUATING)
    assert stage1_trained.fraction < stage1_trained.iters_fraction


@pytest.mark.parametrize("phase", [Phase.EVALUATING, Phase.WRITING])
def test_a_listener_that_raises_stops_the_pack_and_nothing_is_stored(small_mnist, tmp_path, phase):
    """Decided: a listener's exception propagates (as the kill hook and tests rely on), and
    since every event but ``on_pack_end`` comes before the one atomic write, the store
    holds nothing of the pack; its lease is released, and the next run stores it."""

    class Boom(Exception):
        pass

    class Raises(PackListener):
        def on_phase(self, event):
            if event.phase == phase:
                raise Boom(event.phase)

    after = Recorder("after", [])
    store = ResultStore(str(tmp_path / "s"))
    pack = Pack(expand(tiny_grid("boom")).specs)
    with pytest.raises(Boom):
        run_pack(pack, store, dataset=small_mnist, listeners=[Raises(), after])
    assert store.table_names() == [] and store.completed_network_ids() == set()
    assert os.listdir(store.lease_dir()) == []
    assert phase not in [e[1] for e in after.events if e[0] == "phase"]  # later listeners never saw it
    result = run_pack(pack, store, dataset=small_mnist)
    assert not result.skipped and store.completed_network_ids() == {pack.specs[0].network_id}


class _MemorySink:
    """A store that is not a folder: rows kept in memory (no lease, no checkpoint)."""

    is_local = False
    base_path = "memory://nowhere"

    def __init__(self):
        self.writes = []

    def lease_dir(self):
        raise AssertionError("a sink that is not local holds no lease")

    def completed_network_ids(self, statuses=(), grid=None):
        return set()

    def write_pack(self, pack_id, grid, tables):
        self.writes.append((pack_id, grid, tables))


def test_the_store_protocol_takes_any_sink_and_rejects_what_is_not_one(small_mnist, tmp_path):
    pack = Pack(expand({**tiny_grid("sink"), "recipe": {"preset": "buda_mnist", "iters": 4,
                                                        "checkpoint_every": 2}}).specs)
    sink = _MemorySink()
    assert isinstance(sink, StoreSink) and isinstance(ResultStore(str(tmp_path)), StoreSink)
    result = run_pack(pack, sink, dataset=small_mnist)
    assert [(p, g) for p, g, _ in sink.writes] == [(pack.pack_id, "sink")]
    assert sink.writes[0][2]["trials"] == result.tables["trials"]
    assert isinstance(as_sink(str(tmp_path / "s")), ResultStore) and as_sink(None) is None
    with pytest.raises(TypeError, match=r"store must be a ResultStore .*got int"):
        run_pack(pack, 42, dataset=small_mnist)

    class HalfAStore:
        def write_pack(self, pack_id, grid, tables):
            raise AssertionError("never called")

    with pytest.raises(TypeError, match="got HalfAStore, which lacks is_local, base_path, lease_dir, "
                                        "completed_network_ids"):
        run_pack(pack, HalfAStore(), dataset=small_mnist)
    with pytest.raises(TypeError, match="must derive from workers.monitor.PackListener; got function"):
        PackMonitor("p", [lambda event: None])


def test_a_local_store_and_a_remote_one_follow_one_rule_for_checkpoints(tmp_path):
    from workers.checkpoint import CheckpointFile

    pack = Pack(expand(tiny_grid("ck")).specs)
    local = CheckpointFile(ResultStore(str(tmp_path / "s")), pack)
    assert local.path is not None and local.path.startswith(str(tmp_path / "s"))
    assert CheckpointFile(_MemorySink(), pack).path is None
    assert CheckpointFile(None, pack).path is None


def test_the_work_estimate_weighs_latent_statistics_as_the_demo_spent_them():
    """The demo's packs (15 LeNet-5s, 300 iterations of 64 images, about 33,000 training
    images each and 10,000 test images, latent statistics for all): training alone is
    well under half of the work, where counting iterations said 100 %."""
    grid = expand({**tiny_grid("demo"), "recipe": {"preset": "buda_mnist", "iters": 300}, "latent": True,
                   "methods": ["baseline", "oversampling", "undersampling"],
                   "imbalance": {"step": {"rho": [10, 100], "mu": [0.2, 0.5]}, "linear": {"rho": [100]}}})
    pack = plan_packs(grid.specs, 15)[0]
    stages = plan_stages(pack)
    work = estimate_work(stages, {s.network_id: 33_000 for s in pack.specs}, 10_000, 10_000)
    assert [(s.phase, s.stage) for s in work.segments] == [
        (Phase.TRAINING, 1), (Phase.EVALUATING, 1), (Phase.LATENT, 1)]
    trained = work.fraction(Phase.EVALUATING, 1)
    assert LOAD_SHARE < trained < 0.4
    assert work.fraction(Phase.LATENT, 1) < work.fraction(Phase.LATENT, 1, 0.5) < 1 - WRITE_SHARE
    assert work.fraction(Phase.WRITING) == 1 - WRITE_SHARE
    without = estimate_work(plan_stages(Pack(tuple(dataclasses.replace(s, latent=False) for s in pack.specs))),
                            {s.network_id: 33_000 for s in pack.specs}, 10_000, 10_000)
    assert [s.phase for s in without.segments] == [Phase.TRAINING, Phase.EVALUATING]
    assert without.fraction(Phase.EVALUATING, 1) > 0.7  # without latent statistics, training is most of it
    with pytest.raises(ValueError, match="no phase 'latent statistics' in stage 1"):
        without.fraction(Phase.LATENT, 1)


def test_the_tune_reporter_says_a_new_phase_at_once_and_iterations_every_few_seconds():
    from sweep.driver import REPORT_INTERVAL_SECONDS, _TuneReporter
    from workers.monitor import PackEvent

    now, sent = [100.0], []
    reporter = _TuneReporter(sent.append, clock=lambda: now[0])
    train = PackEvent("p", Phase.TRAINING, 0.1, 1, 10, 10, 100)
    reporter.on_phase(PackEvent("p", Phase.LOADING, 0.0))
    reporter.on_iteration(train)  # a moment later: held back
    now[0] += REPORT_INTERVAL_SECONDS
    reporter.on_iteration(dataclasses.replace(train, fraction=0.2))
    now[0] += 1
    reporter.on_iteration(dataclasses.replace(train, fraction=0.3))  # held back again
    reporter.on_phase(PackEvent("p", Phase.EVALUATING, 0.4, 1, 100, 100, 100))  # said at once
    assert sent == [{"fraction": 0.0, "networks_done": 0, "phase": "loading data"},
                    {"fraction": 0.2, "networks_done": 0, "phase": "training"},
                    {"fraction": 0.4, "networks_done": 0, "phase": "evaluating"}]


def test_the_local_runner_tells_progress_what_the_pack_does_pro_rata(tmp_path, fewer_test_images):
    from sweep.local import run_local

    seen = []
    grid = expand(tiny_grid("loc", latent=True, methods=["baseline", "oversampling"]))
    run_local(grid, str(tmp_path / "s"), device="cpu", progress=lambda *a: seen.append(a))
    done = [d for d, _, _ in seen]
    assert done == sorted(done) and done[0] == 0 and done[-1] == grid.trained_networks == 2
    assert {t for _, t, _ in seen} == {2}
    doing = list(dict.fromkeys(d for _, _, d in seen if d))
    assert doing == ["1 loading data", "1 training", "1 evaluating", "1 latent statistics", "1 writing"]
    assert all(0 < d < 2 for d, _, what in seen if what.endswith(("evaluating", "latent statistics", "writing")))
