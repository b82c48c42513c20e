"""Fault tolerance: pack checkpoints, killed workers, a killed driver, a two-node cluster.

The Ray tests run the real CLI in subprocesses on a tiny real-MNIST grid (4 networks,
2 packs of 2, 40 iterations with a checkpoint every 20). A worker is killed with the
driver's documented test hook (``SWEEP_TEST_KILL_AT_FRACTION``): the first pack to
reach half its iterations SIGKILLs its own process, right after its checkpoint at 20.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from sweep.core.grid import expand
from sweep.core.plan import Pack
from sweep.store.results import ResultStore
from workers.monitor import PackListener
from workers.run_pack import run_pack

ROOT = Path(__file__).resolve().parents[1]

GRID = {
    "name": "ft", "dataset": "mnist", "model": "lenet5",
    "recipe": {"preset": "buda_mnist", "iters": 40, "checkpoint_every": 20},
    "max_per_class": 100,
    "imbalance": {"step": {"rho": [10], "mu": [0.5]}},
    "methods": ["baseline", "oversampling"],
    "repeats": 2, "seed": 5,
    "resources": {"cpu": 1, "gpu": 0}, "pack": {"max_networks": 2},
}
EVALUATIONS = 8  # 4 networks x (raw, threshold)


def sweep(*args, env=None, check=False):
    return subprocess.run([sys.executable, "-m", "sweep.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, check=check, timeout=300, env=env)


def kill_env(marker):
    return {**os.environ, "SWEEP_TEST_KILL_AT_FRACTION": "0.5", "SWEEP_TEST_KILL_MARKER": str(marker)}


@pytest.fixture
def grid_file(tmp_path):
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(GRID))
    return path


def assert_exactly_once(store_dir):
    """Every evaluation once: deduplicated view, and the raw committed `ok` rows too."""
    store = ResultStore(str(store_dir))
    trials = store.read_table("trials")
    assert len(trials) == trials["trial_id"].nunique() == EVALUATIONS
    assert set(trials["status"]) == {"ok"}
    raw = [pq.read_table(f, columns=["trial_id", "status"]).to_pandas() for f in store.files("trials")]
    ok = [t[t["status"] == "ok"] for t in raw]
    ok_ids = [i for t in ok for i in t["trial_id"]]
    assert len(ok_ids) == len(set(ok_ids)) == EVALUATIONS  # no pack stored twice
    # No temporary or partial file of ours left (Ray Tune's own log folder _ray keeps its markers).
    visible = [p for p in Path(store_dir).rglob("*") if p.is_file() and p.name.startswith(".")
               and "_ray" not in p.relative_to(store_dir).parts]
    assert not visible, visible
    assert not list((Path(store_dir) / "_checkpoints").glob("*.pt"))  # removed once stored
    return trials


# -- checkpoints, no Ray -----------------------------------------------------------------

class _Killed(Exception):
    pass


class _DieAt(PackListener):
    """Stops the pack once it has trained ``at`` of its iterations (as the driver's kill hook)."""

    def __init__(self, at):
        self.at = at

    def on_iteration(self, event):
        if event.iters_fraction >= self.at:
            raise _Killed


TWO_PHASE = ("oversampling", "two_phase_over")
BOTH_HEAD_ONLY = ("baseline", "oversampling", "two_phase_over", "classifier_retraining")  # stages 1, 2, 3


# stage 1 at iteration 20; stage 2 at 20; with each member's crop/flip stream to restore; and
# stage 3 (re-training after two-phase phase 2) at 20, with stage 2's results from the checkpoint
@pytest.mark.parametrize(("kill_at", "augmentation", "methods"), [
    (0.5, "none", TWO_PHASE), (0.75, "none", TWO_PHASE), (0.5, "crop_flip", TWO_PHASE), (0.9, "none", BOTH_HEAD_ONLY)])
def test_a_pack_stopped_after_a_checkpoint_continues_from_it_with_the_same_numbers(small_mnist, tmp_path,
                                                                                     kill_at, augmentation, methods):
    g = expand({**GRID, "methods": list(methods), "repeats": 1,
                "recipe": {**GRID["recipe"], "augmentation": augmentation}})
    pack = Pack(g.specs)
    reference = run_pack(pack, None, dataset=small_mnist).tables["trials"]
    store = ResultStore(str(tmp_path / "store"))

    with pytest.raises(_Killed):
        run_pack(pack, store, dataset=small_mnist, listeners=[_DieAt(kill_at)])
    assert sorted(p.name for p in (tmp_path / "store" / "_checkpoints").iterdir()) == [
        f"{pack.pack_id}.json", f"{pack.pack_id}.pt"]  # the checkpoint and its checksum record
    assert store.completed_trial_ids() == set()
    result = run_pack(pack, store, dataset=small_mnist)
    assert result.resumed_from_iter == 20
    rows = store.read_table("trials")
    assert set(rows["resumed_from_iter"]) == {20}
    # Samplers, optimizer, weights (and RNG) restored: the same numbers as never stopped.
    by_id = {r["trial_id"]: r for r in result.tables["trials"]}
    for r in reference:
        assert by_id[r["trial_id"]]["roc_auc"] == r["roc_auc"]
        assert by_id[r["trial_id"]]["accuracy"] == r["accuracy"]
    assert not list((tmp_path / "store" / "_checkpoints").glob("*.pt"))


def test_checkpoints_of_another_pack_or_damaged_ones_are_ignored(small_mnist, tmp_path):
    g = expand({**GRID, "repeats": 1})
    pack = Pack(g.specs)
    store = ResultStore(str(tmp_path / "store"))
    ckpt = Path(store.checkpoint_dir()) / f"{pack.pack_id}.pt"
    ckpt.write_bytes(b"not a checkpoint")
    result = run_pack(pack, store, dataset=small_mnist)
    assert result.resumed_from_iter == 0 and not ckpt.exists()


def test_a_checkpoint_with_one_flipped_byte_is_refused_by_name_and_the_pack_starts_over(small_mnist, tmp_path,
                                                                                        caplog):
    """A flipped weight byte still unpickles: without its checksum the pack would go on from
    different weights and store different numbers, with nothing logged."""
    g = expand({**GRID, "methods": ["baseline"], "repeats": 1})
    pack = Pack(g.specs)
    reference = run_pack(pack, None, dataset=small_mnist).tables["trials"]
    store = ResultStore(str(tmp_path / "store"))

    with pytest.raises(_Killed):
        run_pack(pack, store, dataset=small_mnist, listeners=[_DieAt(0.5)])
    ckpt = tmp_path / "store" / "_checkpoints" / f"{pack.pack_id}.pt"
    data = bytearray(ckpt.read_bytes())
    data[len(data) * 3 // 4] ^= 0x01
    ckpt.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="workers.checkpoint"):
        result = run_pack(pack, store, dataset=small_mnist)
    assert result.resumed_from_iter == 0
    assert any(str(ckpt) in r.getMessage() and "checksum" in r.getMessage() for r in caplog.records)
    by_id = {r["trial_id"]: r for r in result.tables["trials"]}
    for r in reference:  # started over: the numbers of a run never stopped
        assert by_id[r["trial_id"]]["accuracy"] == r["accuracy"]
    assert not list((tmp_path / "store" / "_checkpoints").iterdir())


# -- Ray ---------------------------------------------------------------------------------

@pytest.mark.ray
def test_two_node_cluster_with_a_killed_worker_retries_from_the_checkpoint(tmp_path, grid_file, mnist):
    from ray.cluster_utils import Cluster

    sigterm = signal.getsignal(signal.SIGTERM)  # Ray's Cluster starts its head in this process,
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        store = tmp_path / "store"
        marker = tmp_path / "killed"
        run = sweep("run", str(grid_file), "--store", str(store), "--address", cluster.address,
                    "--retries", "1", "-q", env=kill_env(marker))
        assert run.returncode == 0, run.stderr[-3000:]
        assert "4 networks trained in 2 packs" in run.stdout
        assert marker.exists()  # a worker really was killed mid-pack
        trials = assert_exactly_once(store)
        resumed = trials.groupby("pack_id")["resumed_from_iter"].max()
        assert sorted(resumed) == [0, 20]  # the killed pack's retry continued from iteration 20
        assert len(run.stdout) < 2000  # quiet: no Tune tables
    finally:
        cluster.shutdown()
        signal.signal(signal.SIGTERM, sigterm)  # with Ray's SIGTERM handler, left after shutdown


@pytest.mark.ray
def test_a_finally_failed_pack_is_recorded_and_resume_continues_it(tmp_path, grid_file, mnist, ray_dir):
    store = tmp_path / "store"
    marker = tmp_path / "killed"
    common = ["--num-cpus", "2", "--ray-temp-dir", ray_dir, "-q"]
    run = sweep("run", str(grid_file), "--store", str(store), "--retries", "0", *common, env=kill_env(marker))
    assert run.returncode != 0 and marker.exists()
    assert "2 networks failed" in run.stderr and "sweep resume" in run.stderr
    status = json.loads(sweep("status", str(store), "--json", check=True).stdout)
    assert status["totals"] == {"total": 4, "done": 2, "diverged": 0, "stopped": 0, "failed": 2, "pending": 0}
    assert len(status["errors"]) == 1 and status["errors"][0]["networks"] == 2
    assert list((store / "_checkpoints").glob("*.pt"))  # kept for the retry
    again = sweep("resume", str(store), *common)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 networks trained in 1 packs (2 already stored, 0 failed)" in again.stdout
    trials = assert_exactly_once(store)
    assert sorted(trials.groupby("pack_id")["resumed_from_iter"].max()) == [0, 20]
    status = json.loads(sweep("status", str(store), "--json", check=True).stdout)
    assert status["totals"] == {"total": 4, "done": 4, "diverged": 0, "stopped": 0, "failed": 0, "pending": 0}
    assert status["errors"] == [] and status["eta_hours"] is None
    assert status["throughput"]["networks"] == 4 and status["throughput"]["networks_per_hour"] > 0


def start_run_until_first_pack(grid_file, store, ray_dir, **popen) -> subprocess.Popen:
    """`sweep run` in its own session, one pack at a time, returned once its first pack is stored."""
    common = ["--num-cpus", "1", "--max-concurrent", "1", "--ray-temp-dir", ray_dir, "-q"]
    proc = subprocess.Popen([sys.executable, "-m", "sweep.cli", "run", str(grid_file), "--store", str(store),
                             *common], cwd=ROOT, start_new_session=True, **popen)
    deadline = time.monotonic() + 180
    while not list((store / "trials").rglob("*.parquet")):
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("the sweep ended, or stored no pack in time, before it could be stopped")
        time.sleep(0.2)
    return proc


@pytest.mark.ray
def test_a_killed_driver_is_resumed_from_the_store(tmp_path, grid_file, mnist, ray_dir):
    store = tmp_path / "store"
    proc = start_run_until_first_pack(grid_file, store, ray_dir, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        # Ray processes the killed driver had started (its own session) must not outlive the test.
        time.sleep(2)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert len(ResultStore(str(store)).completed_network_ids()) == 2  # one pack of two
    again = sweep("resume", str(store), "--num-cpus", "2", "--ray-temp-dir", ray_dir, "-q")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 networks trained in 1 packs (2 already stored, 0 failed)" in again.stdout
    assert_exactly_once(store)


@pytest.mark.ray
def test_ctrl_c_says_interrupted_counts_the_store_and_exits_non_zero(tmp_path, grid_file, mnist, ray_dir):
    """SIGINT once the first pack is stored: the sweep says it was interrupted, reports what
    the store really holds, exits non-zero, and `sweep resume` finishes it."""
    store = tmp_path / "store"
    proc = start_run_until_first_pack(grid_file, store, ray_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True)
    try:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stored = len(ResultStore(str(store)).completed_network_ids())
    assert proc.returncode != 0, (out, err)
    assert "interrupted" in err, (out, err)
    assert stored < 4
    if "networks trained" in out:  # the summary counts what is in the store, nothing more
        assert f"{stored} networks trained" in out, (out, err)
    again = sweep("resume", str(store), "--num-cpus", "2", "--ray-temp-dir", ray_dir, "-q")
    assert again.returncode == 0, again.stderr[-3000:]
    assert_exactly_once(store)


@pytest.mark.ray
def test_tune_state_unreadable_on_a_full_disk_is_one_clear_error(tmp_path, ray_dir, monkeypatch, mnist):
    """On a full disk Tune writes its state files empty and fails reading them back inside
    fit(): the sweep ends with one message naming the cause, not an UnpicklingError."""
    import pickle

    from ray import tune

    from sweep.core.grid import expand
    from sweep.driver import run_sweep
    from sweep.prepare import RunOptions, SweepError

    def full_disk(self):
        signal.signal(signal.SIGINT, lambda *_: None)  # as Tuner.fit does, and leaves it there
        raise pickle.UnpicklingError("pickle data was truncated")

    monkeypatch.setattr(tune.Tuner, "fit", full_disk)
    grid = expand({"name": "full", "dataset": "mnist", "model": "lenet5", "recipe": {"preset": "buda_mnist", "iters": 2},
                   "imbalance": {"step": {"rho": [10], "mu": [0.5]}}, "methods": ["baseline"], "repeats": 1,
                   "resources": {"cpu": 1, "gpu": 0}})
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(SweepError, match="could not read back its own state.*disk full"):
        run_sweep(grid, str(tmp_path / "s"), RunOptions(num_cpus=1, ray_temp_dir=ray_dir, device="cpu"))
    # Ray's SIGTERM handler (ray.init) and Tune's SIGINT one are gone with the sweep: the
    # caller's next Ctrl-C is a KeyboardInterrupt again.
    assert {sig: signal.getsignal(sig) for sig in before} == before
