"""Checksummed stores: a damaged file is named, never read as different numbers, and repaired."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from sweep.cli import cli
from sweep.store.query import query
from sweep.store.results import ResultStore
from sweep.store.schema import StoreError
from sweep.store.status import store_status

ROOT = Path(__file__).resolve().parents[1]


def _write(store: ResultStore, pack: str, nets: list[str], auc: float = 0.987) -> None:
    trials = [{"trial_id": f"t-{n}", "network_id": n, "status": "ok", "roc_auc": auc} for n in nets]
    classes = [{"trial_id": f"t-{n}", "network_id": n, "class": c, "accuracy": auc} for n in nets for c in range(10)]
    store.write_pack(pack, "g", {"trials": trials, "class_metrics": classes})


def _file(root: Path, table: str, pack: str, grid: str = "g") -> Path:
    (path,) = (root / table / f"grid={grid}").glob(f"{pack}-*.parquet")
    return path


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def damaged(tmp_path: Path) -> tuple[Path, Path, Path]:
    store = ResultStore(str(tmp_path / "s"))
    _write(store, "good", ["n1", "n2"])
    _write(store, "flip", ["n3"])
    _write(store, "cut", ["n4", "n5"])
    flipped = _file(tmp_path / "s", "trials", "flip")
    _flip_byte(flipped)
    cut = _file(tmp_path / "s", "class_metrics", "cut")
    cut.write_bytes(cut.read_bytes()[:-40])
    return tmp_path / "s", flipped, cut


def test_reads_refuse_a_damaged_file_and_name_it(damaged) -> None:
    root, flipped, cut = damaged
    store = ResultStore(str(root))
    with pytest.raises(StoreError, match="damaged") as info:
        store.read_table("trials")
    assert str(flipped) in str(info.value) and "checksum" in str(info.value)
    with pytest.raises(StoreError, match="truncated"):
        store.read_table("class_metrics")
    with pytest.raises(StoreError, match=str(flipped)):
        query(str(root), "select avg(roc_auc) from trials")


def test_verify_names_every_damaged_file_and_its_networks(damaged) -> None:
    root, flipped, cut = damaged
    damage = {d.path: d for d in ResultStore(str(root)).verify()}
    assert set(damage) == {str(flipped), str(cut)}
    assert damage[str(flipped)].network_ids == ("n3",)
    assert damage[str(cut)].network_ids == ("n4", "n5")
    out = CliRunner().invoke(cli, ["verify", str(root), "--json"])
    assert out.exit_code == 1
    report = json.loads(out.output)
    assert report["damaged_files"] == 2 and report["networks"] == 3
    clean = CliRunner().invoke(cli, ["verify", str(root.parent / "clean")])
    assert clean.exit_code == 1 and "not found" in clean.output  # a store that is not there


def test_status_counts_damaged_writes_as_not_stored(damaged) -> None:
    root, flipped, _ = damaged
    info = store_status(str(root))
    assert info["damage"]["damaged_files"] == 2 and info["damage"]["networks"] == 3
    # Only the intact pack's rows are read: n3 (trials damaged) and n4, n5 (class_metrics) are left out.
    skip = ResultStore(str(root), on_damage="skip")
    assert set(skip.read_table("trials")["network_id"]) == {"n1", "n2"}
    assert set(skip.read_table("class_metrics")["network_id"]) == {"n1", "n2"}


def test_quarantine_moves_damaged_writes_aside_and_deletes_nothing(damaged) -> None:
    root, flipped, cut = damaged
    before = sorted(p.stat().st_size for p in root.rglob("*.parquet"))
    store = ResultStore(str(root))
    moved = store.quarantine(store.verify())
    assert moved == 6  # two pack writes: trials, class_metrics and manifest each
    assert not flipped.exists() and not cut.exists()
    assert sorted(p.stat().st_size for p in root.rglob("*.parquet")) == before  # moved, not removed
    assert all("_damaged" in p.parts for p in root.rglob("*.parquet") if p.name.startswith(("flip", "cut"))
               or "-flip-" in p.name or "-cut-" in p.name)
    assert ResultStore(str(root)).verify() == []
    assert set(ResultStore(str(root)).read_table("trials")["network_id"]) == {"n1", "n2"}


def test_a_file_without_manifest_is_checked_for_readability(tmp_path: Path) -> None:
    """Stores written before checksums: a truncated file is still caught, not skipped."""
    root = tmp_path / "old"
    _write(ResultStore(str(root)), "p", ["n1"])
    for m in (root / "_manifests").rglob("*.json"):
        m.unlink()
    (root / "_format.json").unlink()  # what a store of 2026-11 looks like
    assert ResultStore(str(root)).verify() == []
    path = _file(root, "trials", "p")
    path.write_bytes(path.read_bytes()[:100])
    (d,) = ResultStore(str(root)).verify()
    assert d.path == str(path) and "unreadable" in d.problem


GRID = {
    "name": "fix", "dataset": "mnist", "model": "lenet5", "recipe": {"preset": "buda_mnist", "iters": 3},
    "max_per_class": 50, "imbalance": {"step": {"rho": [10], "mu": [0.5]}},
    "methods": ["baseline", "oversampling"], "thresholding": [], "repeats": 2, "seed": 3,
    "resources": {"cpu": 1, "gpu": 0}, "pack": {"max_networks": 2},
}


@pytest.mark.ray
def test_resume_repair_trains_exactly_the_damaged_networks(tmp_path: Path, ray_dir: str) -> None:
    grid = tmp_path / "fix.yaml"
    grid.write_text(yaml.safe_dump(GRID))
    store = tmp_path / "store"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "CUDA_VISIBLE_DEVICES": ""}

    def sweep(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "sweep.cli", *args, "--num-cpus", "2", "--ray-temp-dir",
                               ray_dir, "-q"], capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)

    first = sweep("run", str(grid), "--store", str(store))
    assert first.returncode == 0, first.stderr
    files = sorted((store / "trials" / "grid=fix").glob("*.parquet"))
    assert len(files) == 2  # two packs of two networks
    _flip_byte(files[0])
    damaged_nets = {d for d in ResultStore(str(store)).verify()[0].network_ids}
    refused = sweep("resume", str(store))
    assert refused.returncode == 1 and "damaged" in refused.stderr and "--repair" in refused.stderr
    repaired = sweep("resume", str(store), "--repair")
    assert repaired.returncode == 0, repaired.stderr
    assert "2 networks trained" in repaired.stdout and "2 already stored" in repaired.stdout
    after = ResultStore(str(store)).read_table("trials")
    assert len(after) == 4 and damaged_nets <= set(after["network_id"])
    assert ResultStore(str(store)).verify() == []


def test_a_full_disk_is_a_clear_error_and_leaves_nothing_behind(tmp_path: Path, monkeypatch) -> None:
    import errno

    import sweep.store.results as results

    root = tmp_path / "s"
    store = ResultStore(str(root))
    _write(store, "before", ["n1"])
    real = results.pq.write_table
    calls = []

    def full(table, where, **kw):
        calls.append(where)
        if len(calls) == 2:  # the pack's second file: the disk fills up
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(table, where, **kw)

    monkeypatch.setattr(results.pq, "write_table", full)
    with pytest.raises(StoreError, match="No space left on device") as info:
        _write(store, "during", ["n2"])
    assert "bytes there" in str(info.value) and "intact" in str(info.value)
    monkeypatch.setattr(results.pq, "write_table", real)
    leftovers = [p for p in root.rglob("*") if p.is_file() and ("during" in p.name or p.name.startswith("."))]
    assert leftovers == []
    assert set(ResultStore(str(root)).read_table("trials")["network_id"]) == {"n1"}
    assert ResultStore(str(root)).verify() == []


def test_a_checkpoint_that_cannot_be_written_costs_time_not_the_pack(tmp_path: Path, small_mnist, monkeypatch) -> None:
    import errno

    import workers.checkpoint as checkpoint
    from sweep.core.grid import expand
    from sweep.core.plan import Pack
    from workers.run_pack import run_pack

    def full(obj, fh):
        fh.write(b"partial")  # what a full disk leaves: a started temporary
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    g = expand({"name": "c", "dataset": "mnist", "model": "lenet5", "max_per_class": 50,
                "recipe": {"preset": "buda_mnist", "iters": 4, "checkpoint_every": 2},
                "imbalance": {"step": {"rho": [10], "mu": [0.5]}}, "methods": ["baseline"], "seed": 1})
    store = ResultStore(str(tmp_path / "s"))
    result = run_pack(Pack(g.specs), store, dataset=small_mnist)
    assert result.networks == 1 and result.failed == 0
    assert len(store.read_table("trials")) == 2
    assert list((tmp_path / "s" / "_checkpoints").iterdir()) == []  # no orphan temporaries


# -- the manifest is the commit (issue 22) ---------------------------------------------

def _drop_forged_trials(root: Path, name: str) -> Path:
    """A Parquet file put into trials/ by hand: every AUC 0.5, no manifest names it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = root / "trials" / "grid=g" / name
    pq.write_table(pa.table({"trial_id": ["t-n1", "t-n2"], "network_id": ["n1", "n2"], "status": ["ok"] * 2,
                             "roc_auc": [0.5, 0.5]}), path)
    return path


def test_a_file_no_manifest_names_is_never_read_and_verify_lists_and_cleans_it(tmp_path: Path) -> None:
    from sweep.store.compact import compact_store
    from sweep.store.paths import new_attempt

    root = tmp_path / "s"
    _write(ResultStore(str(root)), "good", ["n1", "n2"])
    forged = _drop_forged_trials(root, f"forged-{new_attempt()}.parquet")
    store = ResultStore(str(root))
    assert set(store.read_table("trials")["roc_auc"]) == {0.987}
    assert query(str(root), "select min(roc_auc) as lo from trials")["lo"][0] == 0.987
    out = CliRunner().invoke(cli, ["verify", str(root)])
    assert out.exit_code == 1 and str(forged) in out.output and "no commit names" in out.output
    compact_store(str(root), str(tmp_path / "c"))
    assert set(ResultStore(str(tmp_path / "c")).read_table("trials")["roc_auc"]) == {0.987}
    assert CliRunner().invoke(cli, ["verify", str(tmp_path / "c")]).exit_code == 0
    cleaned = CliRunner().invoke(cli, ["verify", str(root), "--clean"])
    assert "removed 1 file(s)" in cleaned.output and cleaned.exit_code == 0, cleaned.output
    assert not forged.exists() and len(ResultStore(str(root)).read_table("trials")) == 2


def test_deleting_a_manifest_uncommits_its_write(damaged) -> None:
    """With its manifest gone, a write whose trials file has a flipped bit is not read as
    "written before manifests": it is not committed, and verify says so."""
    root, flipped, _ = damaged
    (manifest,) = (root / "_manifests" / "grid=g").glob("flip-*.json")
    manifest.unlink()
    store = ResultStore(str(root), on_damage="skip")
    assert "n3" not in set(store.read_table("trials")["network_id"])
    assert str(flipped) in {f.path for f in store.leftovers()}
    assert CliRunner().invoke(cli, ["verify", str(root)]).exit_code == 1


def test_a_flipped_bit_in_a_saved_grid_is_reported_and_refused(tmp_path: Path) -> None:
    from sweep.core.grid import load_grid

    grid = tmp_path / "fix.yaml"
    grid.write_text(yaml.safe_dump({**GRID, "repeats": 1}))
    root = tmp_path / "s"
    store = ResultStore(str(root))
    store.save_grid(load_grid(grid))
    (saved,) = store.saved_grids()
    assert saved.file_hash == load_grid(grid).file_hash  # the grid as given, not its saved form
    copy = root / "_grids" / "fix.yaml"
    copy.write_bytes(copy.read_bytes().replace(b"repeats: 1", b"repeats: 3"))  # one bit: 0x31 -> 0x33
    (d,) = ResultStore(str(root)).verify()
    assert d.path == str(copy) and "checksum" in d.problem
    assert CliRunner().invoke(cli, ["verify", str(root)]).exit_code == 1
    with pytest.raises(StoreError, match="fix.yaml"):
        ResultStore(str(root)).saved_grids()
    for args in (["status", str(root)], ["resume", str(root)]):
        out = CliRunner().invoke(cli, args)
        assert out.exit_code == 1 and str(copy) in out.output, out.output


def test_damage_outside_trials_counts_as_not_stored_everywhere(tmp_path: Path) -> None:
    from sweep.core.grid import load_grid

    grid_file = tmp_path / "fix.yaml"
    grid_file.write_text(yaml.safe_dump(GRID))
    grid = load_grid(grid_file)
    root = tmp_path / "s"
    store = ResultStore(str(root))
    store.save_grid(grid)
    nets = [s.network_id for s in grid.specs]
    for i, n in enumerate(nets):
        store.write_pack(f"p{i}", "fix", {
            "trials": [{"trial_id": s.trial_id(e), "network_id": n, "status": "ok"}
                       for s in grid.specs if s.network_id == n for e in s.evaluations],
            "class_metrics": [{"trial_id": "x", "network_id": n, "class": 0, "accuracy": 0.9}]})
    cut = _file(root, "class_metrics", "p0", "fix")
    cut.write_bytes(cut.read_bytes()[:-40])
    info = store_status(str(root))
    assert info["totals"]["done"] == len(nets) - 1 and info["totals"]["pending"] == 1
    text = CliRunner().invoke(cli, ["status", str(root)]).output
    assert "DAMAGED" in text and "every network is stored" not in text
    for args in (["run", str(grid_file), "--store", str(root), "-q"], ["resume", str(root), "-q"]):
        out = CliRunner().invoke(cli, args)
        assert out.exit_code == 1 and "damaged" in out.output and "--repair" in out.output, out.output


def test_every_table_reads_one_write_per_network_when_the_latest_lacks_it(tmp_path: Path) -> None:
    """Three writes of the same networks; the latest has no class_metrics. Only the second
    write's class rows are read (not the first's and the second's together)."""
    import datetime as dt

    store = ResultStore(str(tmp_path))
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    for k, with_classes in enumerate([True, True, False]):
        trials = [{"trial_id": f"t{i}", "network_id": f"n{i}", "status": "ok", "created_at": t0 + dt.timedelta(k)}
                  for i in range(2)]
        data = {"trials": trials}
        if with_classes:
            data["class_metrics"] = [{"trial_id": f"t{i}", "network_id": f"n{i}", "class": c, "accuracy": k}
                                     for i in range(2) for c in range(3)]
        store.write_pack("p", "g", data)
    cm = store.read_table("class_metrics")
    assert len(cm) == 6 and set(cm["accuracy"]) == {1}
    sql = query(str(tmp_path), "select count(*) as n, min(accuracy) as lo from class_metrics")
    assert sql["n"][0] == 6 and sql["lo"][0] == 1
