"""A pack write killed or failing at every one of its steps: every later read sees the store
without the pack or with all of it, the dead writer's leftovers are removed at once, and
resume plans exactly the networks that are not stored.

The steps are the calls a pack write makes that touch the disk: writing a Parquet file,
fsync (files and folders) and rename. A subprocess runs the write and ``os._exit``s at
step k (before the call, and after the last one); in-process, the call at step k raises.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sweep.core.grid import expand
from sweep.core.plan import plan_packs
from sweep.prepare import plan_for
from sweep.store.query import query
from sweep.store.results import ResultStore, StoreError
from sweep.store.status import store_status

REPO = Path(__file__).resolve().parents[1]
GRID = expand({"name": "crash", "dataset": "mnist", "model": "lenet5", "recipe": "buda_mnist",
               "imbalance": {"step": {"rho": [10], "mu": [0.5]}}, "methods": ["baseline", "oversampling"],
               "thresholding": [], "repeats": 2, "pack": {"max_networks": 2}})
PACKS = plan_packs(GRID.specs, 2)
# Two data files and a manifest: each is written (Parquet only), fsynced, renamed and its
# folder fsynced.
STEPS = 11


def tables(pack_index: int) -> dict[str, list[dict]]:
    pack = PACKS[pack_index]
    trials = [{"trial_id": s.trial_id(e), "network_id": s.network_id, "pack_id": pack.pack_id,
               "status": "ok", "roc_auc": 0.9} for s in pack.stored_specs for e in s.evaluations]
    classes = [{"trial_id": r["trial_id"], "network_id": r["network_id"], "class": c, "accuracy": 0.9}
               for r in trials for c in range(3)]
    return {"trials": trials, "class_metrics": classes}


def networks(pack_index: int) -> set[str]:
    return {s.network_id for s in PACKS[pack_index].stored_specs}


_STEPS = textwrap.dedent(
    """
    import os, sys
    import pyarrow.parquet as pq
    sys.path.insert(0, sys.argv[1])
    import tests.test_store_crash as t
    from sweep.store.results import ResultStore

    kill_at, root = int(sys.argv[2]), sys.argv[3]
    step = 0

    def hooked(real):
        def call(*a, **kw):
            global step
            step += 1
            if step == kill_at:
                os._exit(9)  # no clean-up, no finally: what kill -9 leaves
            return real(*a, **kw)
        return call

    os.replace, os.fsync, pq.write_table = hooked(os.replace), hooked(os.fsync), hooked(pq.write_table)
    ResultStore(root).write_pack(t.PACKS[1].pack_id, "crash", t.tables(1))
    print("steps", step)
    """
)


def _seeded(root: Path) -> ResultStore:
    store = ResultStore(str(root))
    store.write_pack(PACKS[0].pack_id, "crash", tables(0))
    return store


def _writer(root: Path, kill_at: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", _STEPS, str(REPO), str(kill_at), str(root)],
                          capture_output=True, text=True, env=env, timeout=120)


def _assert_whole_or_absent(root: Path) -> bool:
    """Every reader agrees: the second pack is there whole, or not at all. Returns which."""
    store = ResultStore(str(root))
    stored = store.completed_network_ids(grid="crash")
    assert stored in (networks(0), networks(0) | networks(1))
    whole = stored != networks(0)
    n_trials = len(tables(0)["trials"]) * (2 if whole else 1)
    assert len(store.read_table("trials")) == n_trials
    assert len(store.read_table("class_metrics")) == 3 * n_trials
    assert query(str(root), "select count(*) as n from class_metrics")["n"][0] == 3 * n_trials
    assert ResultStore(str(root), on_damage="skip").verify() == []
    packs, done = plan_for(GRID, store, max_networks=2)
    planned = {s.network_id for p in packs for s in p.stored_specs}
    assert planned == {s.network_id for s in GRID.specs} - stored and done == len(stored)
    return whole


@pytest.mark.subprocess
def test_the_write_has_steps_to_kill(tmp_path: Path) -> None:
    _seeded(tmp_path / "s")
    out = _writer(tmp_path / "s", 0)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) == STEPS  # else the kill points below miss some


@pytest.mark.subprocess
@pytest.mark.parametrize("kill_at", range(1, STEPS + 2))
def test_killed_at_every_step(tmp_path: Path, kill_at: int) -> None:
    root = tmp_path / "s"
    _seeded(root)
    out = _writer(root, kill_at)
    killed = out.returncode == 9
    assert killed or out.returncode == 0, out.stderr  # past the last step: the write simply ends
    whole = _assert_whole_or_absent(root)
    assert whole or killed
    store = ResultStore(str(root))
    # The writer is provably dead: a run removes what it left, without waiting an hour.
    store.cleanup_uncommitted(min_age_s=3600)
    assert store.leftovers() == []
    assert _assert_whole_or_absent(root) == whole
    assert store_status(str(root))["damage"]["damaged_files"] == 0


def test_failing_at_every_step_leaves_the_pack_out_whole(tmp_path: Path, monkeypatch) -> None:
    import pyarrow.parquet as pq

    count = {"n": 0, "fail_at": 0}

    def hooked(real):
        def call(*a, **kw):
            count["n"] += 1
            if count["n"] == count["fail_at"]:
                raise OSError(5, "Input/output error")
            return real(*a, **kw)
        return call

    monkeypatch.setattr(os, "replace", hooked(os.replace))
    monkeypatch.setattr(os, "fsync", hooked(os.fsync))
    monkeypatch.setattr(pq, "write_table", hooked(pq.write_table))
    outcomes = set()
    for fail_at in range(1, STEPS + 1):
        root = tmp_path / f"s{fail_at}"
        count["fail_at"] = 0
        store = _seeded(root)
        count.update(n=0, fail_at=fail_at)
        try:
            store.write_pack(PACKS[1].pack_id, "crash", tables(1))
        except StoreError as exc:
            assert "Input/output error" in str(exc)
            outcomes.add("failed")
            # A failed write removes everything it created.
            assert ResultStore(str(root)).leftovers() == []
            assert not _assert_whole_or_absent(root)
        else:
            outcomes.add("stored")  # a folder fsync that fails is not a failed commit
            assert _assert_whole_or_absent(root)
        count["fail_at"] = 0
    assert "failed" in outcomes
