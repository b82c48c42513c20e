"""The results store: atomic packs, completed ids, dedupe, schema evolution, cleanup."""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from analysis.load import Results, load
from sweep.store.provenance import provenance
from sweep.store.query import query
from sweep.store.results import ResultStore, StoreError, new_attempt

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def trial_rows(pack: str, n: int = 3, status: str = "ok", at: dt.datetime = T0, **extra) -> list[dict]:
    return [
        {
            "trial_id": f"{pack}-t{i}",
            "network_id": f"{pack}-n{i}",
            "pack_id": pack,
            "status": status,
            "roc_auc": 0.5 + i / 100,
            "classes": [i, i + 1],
            "created_at": at,
            **extra,
        }
        for i in range(n)
    ]


def class_rows(pack: str, n: int = 3) -> list[dict]:
    return [{"trial_id": f"{pack}-t{i}", "class": c, "accuracy": 0.9} for i in range(n) for c in range(2)]


def data_files(root: Path) -> list[Path]:
    """Data files (Parquet): every pack write also leaves a manifest in _manifests/, and the
    store its format marker _format.json."""
    return sorted(p for p in root.rglob("*") if p.is_file() and "_manifests" not in p.parts
                  and p.name != "_format.json")


def test_write_pack_round_trip(tmp_path):
    store = ResultStore(str(tmp_path))
    store.write_pack("p1", "demo", {"trials": trial_rows("p1"), "class_metrics": pd.DataFrame(class_rows("p1"))})

    trials = store.read_table("trials")
    assert sorted(trials["trial_id"]) == ["p1-t0", "p1-t1", "p1-t2"]
    assert set(trials["grid"]) == {"demo"}
    assert [list(c) for c in trials.sort_values("trial_id")["classes"]] == [[0, 1], [1, 2], [2, 3]]
    assert len(store.read_table("class_metrics")) == 6
    assert store.table_names() == ["class_metrics", "trials"]
    assert len(load(str(tmp_path))) == 3
    assert Results(str(tmp_path)).table_names() == ["class_metrics", "trials"]


def test_write_pack_layout(tmp_path):
    store = ResultStore(str(tmp_path))
    rows = [dict(r, grid="demo") for r in trial_rows("p1")]  # a grid column is dropped
    store.write_pack("p1", "demo", {"trials": rows, "class_metrics": class_rows("p1"), "curves": []})

    files = data_files(tmp_path)
    assert [f.relative_to(tmp_path).parts[:2] for f in files] == [
        ("class_metrics", "grid=demo"), ("trials", "grid=demo")]
    assert files[0].name == files[1].name  # one <pack_id>-<attempt> for the whole pack
    assert files[0].name.startswith("p1-") and files[0].name.endswith(".parquet")
    assert "grid" not in pq.read_schema(files[1]).names
    assert pq.read_schema(files[1]).field("created_at").type == pa.timestamp("us", tz="UTC")
    assert not (tmp_path / "curves").exists()  # empty tables are skipped


def test_write_pack_again_never_overwrites(tmp_path):
    store = ResultStore(str(tmp_path))
    store.write_pack("p1", "demo", {"trials": trial_rows("p1")})
    first = data_files(tmp_path)
    store.write_pack("p1", "demo", {"trials": trial_rows("p1")})
    assert set(first) < set(data_files(tmp_path))
    assert len(data_files(tmp_path)) == 2


def test_write_pack_creates_created_at(tmp_path):
    store = ResultStore(str(tmp_path))
    rows = [{k: v for k, v in r.items() if k != "created_at"} for r in trial_rows("p1")]
    store.write_pack("p1", "demo", {"trials": rows})
    assert store.read_table("trials")["created_at"].notna().all()


def test_write_pack_commit_marker_without_trials(tmp_path):
    store = ResultStore(str(tmp_path))
    store.write_pack("p1", "demo", {"failures": [{"network_id": "n1", "error": "boom"}], "trials": []})
    assert store.read_table("failures")["error"].tolist() == ["boom"]
    assert store.read_table("trials").empty
    assert store.cleanup_uncommitted() == 0  # the empty trials file commits the pack


def test_write_pack_nothing_to_write(tmp_path):
    store = ResultStore(str(tmp_path / "s"))
    store.write_pack("p1", "demo", {"trials": [], "curves": pd.DataFrame()})
    assert not (tmp_path / "s").exists()


def test_write_pack_rejects_bad_input(tmp_path):
    store = ResultStore(str(tmp_path))
    with pytest.raises(ValueError, match="grid"):
        store.write_pack("p1", "../x", {"trials": trial_rows("p1")})
    with pytest.raises(ValueError, match="table name"):
        store.write_pack("p1", "demo", {"_checkpoints": trial_rows("p1")})
    with pytest.raises(ValueError, match="status"):
        store.write_pack("p1", "demo", {"trials": [{"trial_id": "t"}]})
    assert data_files(tmp_path) == []


def test_read_table_grid_column(tmp_path):
    store = ResultStore(str(tmp_path))
    store.write_pack("p1", "a", {"trials": trial_rows("p1")})
    store.write_pack("p2", "b", {"trials": trial_rows("p2", n=2)})
    trials = store.read_table("trials")
    assert trials.groupby("grid").size().to_dict() == {"a": 3, "b": 2}
    only_b = store.read_table("trials", columns=["trial_id"], filters=[("grid", "==", "b")])
    assert list(only_b.columns) == ["trial_id"] and len(only_b) == 2
    # A grid named like a number stays a string.
    store.write_pack("p3", "007", {"trials": trial_rows("p3", n=1)})
    assert "007" in set(store.read_table("trials")["grid"])


def test_read_table_filters(tmp_path):
    store = ResultStore(str(tmp_path))
    store.write_pack("p1", "demo", {"trials": trial_rows("p1"), "class_metrics": class_rows("p1")})
    high = store.read_table("trials", columns=["trial_id"], filters=[("roc_auc", ">", 0.505)])
    assert sorted(high["trial_id"]) == ["p1-t1", "p1-t2"]
    expr = ds.field("class") == 1
    assert len(store.read_table("class_metrics", filters=expr)) == 3
    assert len(store.read_table("trials", filters=ds.field("roc_auc") < 0.505)) == 1
    with pytest.raises(StoreError, match="no column"):
        store.read_table("trials", columns=["nope"])


def test_read_table_missing_table(tmp_path):
    store = ResultStore(str(tmp_path / "nothing"))
    assert store.read_table("trials").empty
    assert list(store.read_table("curves", columns=["iter"]).columns) == ["iter"]
    assert store.table_names() == []
    assert store.completed_trial_ids() == set()


def test_read_table_dedupe(tmp_path):
    store = ResultStore(str(tmp_path))
    store.write_pack("p1", "demo", {"trials": trial_rows("p1", status="failed", at=T0)})
    later = T0 + dt.timedelta(hours=1)
    store.write_pack("p1", "demo", {"trials": trial_rows("p1", status="ok", at=later)})
    # Written last but older: must not win.
    store.write_pack("p1", "demo", {"trials": trial_rows("p1", n=1, status="diverged", at=T0)})

    trials = store.read_table("trials")
    assert len(trials) == 3 and set(trials["status"]) == {"ok"}
    assert store.read_table("trials", filters=[("status", "==", "failed")]).empty
    assert store.completed_trial_ids() == {"p1-t0", "p1-t1", "p1-t2"}


def test_read_table_dedupe_tie_goes_to_later_attempt(tmp_path):
    store = ResultStore(str(tmp_path))
    store.write_pack("p1", "demo", {"trials": trial_rows("p1", n=1, status="failed")})
    time.sleep(0.002)  # attempts are ordered by the millisecond
    store.write_pack("p1", "demo", {"trials": trial_rows("p1", n=1, status="ok")})
    assert store.read_table("trials")["status"].tolist() == ["ok"]


def test_read_table_dedupe_is_per_grid(tmp_path):
    store = ResultStore(str(tmp_path))
    store.write_pack("p1", "a", {"trials": trial_rows("p1", n=1)})
    store.write_pack("p1", "b", {"trials": trial_rows("p1", n=1)})
    assert sorted(store.read_table("trials")["grid"]) == ["a", "b"]


def test_read_table_schema_evolution(tmp_path):
    store = ResultStore(str(tmp_path))
    old = [{k: v for k, v in r.items() if k != "roc_auc"} | {"iters": 10} for r in trial_rows("p1")]
    store.write_pack("p1", "demo", {"trials": old})
    new = [r | {"iters": 2.5, "val_balanced_accuracy": 0.7} for r in trial_rows("p2")]
    store.write_pack("p2", "demo", {"trials": new})

    trials = store.read_table("trials").set_index("trial_id")
    assert trials.loc["p1-t0", "iters"] == 10.0 and trials.loc["p2-t0", "iters"] == 2.5
    assert pd.isna(trials.loc["p1-t0", "val_balanced_accuracy"])
    assert trials.loc["p2-t0", "val_balanced_accuracy"] == 0.7
    assert pd.isna(trials.loc["p1-t0", "roc_auc"])


def test_completed_ids(tmp_path):
    store = ResultStore(str(tmp_path))
    store.write_pack("p1", "a", {"trials": trial_rows("p1", n=2, status="ok")})
    store.write_pack("p2", "a", {"trials": trial_rows("p2", n=1, status="diverged")})
    store.write_pack("p3", "b", {"trials": trial_rows("p3", n=1, status="failed")})

    assert store.completed_trial_ids() == {"p1-t0", "p1-t1", "p2-t0"}
    assert store.completed_network_ids() == {"p1-n0", "p1-n1", "p2-n0"}
    assert store.completed_network_ids(statuses=("ok",)) == {"p1-n0", "p1-n1"}
    assert store.completed_trial_ids(statuses=("failed",)) == {"p3-t0"}
    assert store.completed_trial_ids(grid="b") == set()


def test_completed_ids_many_files_read_only_the_id_columns(tmp_path, monkeypatch):
    """Over many wide files the completed ids read only the columns they need (what kept them
    fast): never the metrics or the spec, and each file once per call."""
    store = ResultStore(str(tmp_path))
    big = {f"c{k}": 0.1 for k in range(20)} | {"spec_json": "x" * 500}
    for p in range(300):
        store.write_pack(f"p{p}", "demo", {"trials": trial_rows(f"p{p}", n=120, **big)})
    scans = []
    real_scan = ResultStore._scan

    def scan(self, files, schema, columns, expr=None):
        scans.append((len(files), list(columns)))
        return real_scan(self, files, schema, columns, expr)

    monkeypatch.setattr(ResultStore, "_scan", scan)
    assert len(store.completed_trial_ids()) == 36_000
    assert len(store.completed_network_ids()) == 36_000
    assert [n for n, _ in scans] == [300, 300]  # one scan per call, each file in it once
    read = {c for _, cols in scans for c in cols}
    assert read <= {"grid", "trial_id", "network_id", "created_at", "status"}, read


def test_cleanup_uncommitted(tmp_path):
    store = ResultStore(str(tmp_path))
    store.write_pack("p1", "demo", {"trials": trial_rows("p1"), "class_metrics": class_rows("p1")})
    part = tmp_path / "class_metrics" / "grid=demo"
    pq.write_table(pa.Table.from_pylist(class_rows("p9")), part / f"p9-{new_attempt()}.parquet")  # orphan
    (part / ".p8-x.parquet.tmp").write_bytes(b"PAR1 half a file")
    (tmp_path / "trials" / "grid=demo" / ".p8-x.parquet.tmp").write_bytes(b"")
    (tmp_path / ".write-probe-abc").write_bytes(b"")
    (tmp_path / "_grids").mkdir()
    (tmp_path / "_grids" / ".demo.yaml.abc.tmp").write_bytes(b"")
    (tmp_path / "_checkpoints").mkdir()
    (tmp_path / "_checkpoints" / "p7.pt").write_bytes(b"state")

    assert len(store.read_table("class_metrics")) == 6  # the orphan is already invisible
    assert len(store.leftovers()) == 5
    # The orphan has no manifest and no writer announced it: no manifest can ever name it,
    # so it goes at once; the temporaries (no writer in their names) wait for their age.
    assert store.cleanup_uncommitted(min_age_s=3600) == 1
    assert store.cleanup_uncommitted() == 4
    assert store.cleanup_uncommitted() == 0 and store.leftovers() == []
    assert len(data_files(tmp_path)) == 3  # the pack's two files and the checkpoint
    assert len(store.read_table("class_metrics")) == 6


def test_check_writable(tmp_path):
    root = tmp_path / "a" / "b"
    ResultStore(str(root)).check_writable()
    assert root.is_dir() and list(root.iterdir()) == []


def test_check_writable_under_a_file(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    root = tmp_path / "file" / "store"
    with pytest.raises(StoreError, match="is not writable") as err:
        ResultStore(str(root)).check_writable()
    assert str(root) in str(err.value)
    with pytest.raises(StoreError, match=str(root)):
        ResultStore(str(root)).write_pack("p1", "demo", {"trials": trial_rows("p1")})


def test_check_writable_keeps_data(tmp_path):
    store = ResultStore(str(tmp_path))
    store.write_pack("p1", "demo", {"trials": trial_rows("p1")})
    before = data_files(tmp_path)
    store.check_writable()
    assert data_files(tmp_path) == before


def test_result_store_uri(tmp_path):
    store = ResultStore(f"file://{tmp_path}")
    store.write_pack("p1", "demo", {"trials": trial_rows("p1")})
    assert len(ResultStore(str(tmp_path)).read_table("trials")) == 3
    mock = ResultStore("mock:///store")  # an in-memory, non-local filesystem
    mock.check_writable()
    mock.write_pack("p1", "demo", {"trials": trial_rows("p1"), "class_metrics": class_rows("p1")})
    assert mock.completed_trial_ids() == {"p1-t0", "p1-t1", "p1-t2"}
    assert len(mock.read_table("class_metrics")) == 6
    assert mock.checkpoint_dir() == "mock:///store/_checkpoints"


def test_checkpoint_dir(tmp_path):
    path = ResultStore(str(tmp_path)).checkpoint_dir()
    assert path == str(tmp_path / "_checkpoints") and os.path.isdir(path)


def test_provenance():
    p = provenance("gh", "cpu")
    assert p["grid_hash"] == "gh" and p["device"] == "cpu"
    assert p["package_version"] and p["host"]
    assert p["git_commit"] is None or len(p["git_commit"]) == 40


def test_rows_name_the_commit_of_the_checkout_they_run_from():
    """In a checkout (the tests run in one), every row names its HEAD; it was None for every
    row while the source root was taken one level too low (sweep/ instead of the repository)."""
    import sweep
    from sweep.store.provenance import git_commit

    root = Path(sweep.__file__).resolve().parents[1]
    if not (root / ".git").exists():
        pytest.skip(f"{root} is not a git checkout (an installed copy names no commit)")
    head = (root / ".git" / "HEAD").read_text().strip() if (root / ".git").is_dir() else None
    commit = git_commit()
    assert commit is not None and len(commit) == 40
    if head is not None and not head.startswith("ref:"):
        assert commit == head  # a detached HEAD is the commit itself


GRID_YAML = """\
name: tiny
dataset: mnist
model: lenet5
recipe: buda_mnist
imbalance: {step: {rho: [10], mu: [0.5]}}
methods: [baseline, oversampling]
"""


def test_save_grid_and_saved_grids(tmp_path):
    from sweep.core.grid import load_grid

    path = tmp_path / "tiny-file.yaml"
    path.write_text(GRID_YAML)
    grid = load_grid(path)
    store = ResultStore(str(tmp_path / "store"))
    assert store.saved_grids() == []
    store.save_grid(grid)
    store.save_grid(grid)  # replaces the copy
    (saved,) = store.saved_grids()
    assert saved.name == "tiny" and saved.file_hash == grid.file_hash
    assert [s.network_id for s in saved.specs] == [s.network_id for s in grid.specs]
    assert store.table_names() == [] and store.cleanup_uncommitted() == 0


def test_saved_grids_broken_copy(tmp_path):
    store = ResultStore(str(tmp_path))
    (tmp_path / "_grids").mkdir()
    (tmp_path / "_grids" / "bad.yaml").write_text("dataset: nope\n")
    with pytest.raises(StoreError, match="bad.yaml"):
        store.saved_grids()


def test_record_failure(tmp_path):
    from sweep.core.grid import expand
    from sweep.core.plan import plan_packs

    grid = expand(__import__("yaml").safe_load(GRID_YAML))
    (pack,) = plan_packs(grid.specs, 10)
    done_spec = pack.stored_specs[0]
    store = ResultStore(str(tmp_path))
    done = [{"trial_id": t, "network_id": done_spec.network_id, "status": "ok"} for t in done_spec.trial_ids]
    store.write_pack(pack.pack_id, "tiny", {"trials": done})

    store.record_failure(pack, "CUDA out of memory", "tiny")
    trials = store.read_table("trials").set_index("trial_id")
    assert len(trials) == 4
    assert set(trials.loc[list(done_spec.trial_ids), "status"]) == {"ok"}  # not masked
    failed = trials[trials["status"] == "failed"]
    assert len(failed) == 2 and set(failed["error"]) == {"CUDA out of memory"}
    assert set(failed["method"]) == {str(pack.stored_specs[1].method)}
    assert store.read_table("failures")["network_id"].tolist() == [pack.stored_specs[1].network_id]
    assert store.completed_network_ids() == {done_spec.network_id}


def test_write_pack_grid_name_with_space(tmp_path):
    store = ResultStore(str(tmp_path))
    store.write_pack("p1", "Buda MNIST+x", {"trials": trial_rows("p1"), "curves": [{"iter": 1}]})
    assert set(store.read_table("trials")["grid"]) == {"Buda MNIST+x"}
    assert set(store.read_table("curves")["grid"]) == {"Buda MNIST+x"}
    assert query(str(tmp_path), "select distinct grid from trials")["grid"].tolist() == ["Buda MNIST+x"]


def test_every_table_is_deduplicated_like_trials(tmp_path):
    """Two runs of the same networks (concurrent, or a rerun) leave both packs' files; every
    table reads the rows of the pack whose trials rows are the latest, in Python and SQL."""
    import datetime as dt

    store = ResultStore(str(tmp_path))
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)

    def write(pack: str, at: dt.datetime, auc: float) -> None:
        trials = [{"trial_id": f"t{i}", "network_id": f"n{i}", "status": "ok", "roc_auc": auc,
                   "created_at": at} for i in range(2)]
        classes = [{"trial_id": f"t{i}", "network_id": f"n{i}", "class": c, "accuracy": auc}
                   for i in range(2) for c in range(3)]
        store.write_pack(pack, "g", {"trials": trials, "class_metrics": classes})

    write("first", t0, 0.6)
    write("second", t0 + dt.timedelta(seconds=1), 0.9)
    # A table of networks that have no trials rows at all is read whole.
    store.write_pack("side", "g", {"curves": [{"network_id": "other", "iter": 1}]})
    cm = store.read_table("class_metrics")
    assert len(cm) == 6 and set(cm["accuracy"]) == {0.9}
    assert len(store.read_table("curves")) == 1
    sql = query(store.root, "select count(*) as n, min(accuracy) as lo from class_metrics")
    assert sql["n"][0] == 6 and sql["lo"][0] == 0.9
    assert query(store.root, "select count(*) as n from curves")["n"][0] == 1


def test_confusion_table_is_deduplicated_compacted_and_queried_like_every_table(tmp_path):
    """The confusion table (zero cells left out) rides on the generic store: a pack stored
    twice reads once, in Python, in SQL and after compaction."""
    import numpy as np

    from sweep.core.grid import expand
    from sweep.store.compact import compact_store
    from sweep.store.schema import CONFUSION, Measurement, Status, confusion_rows

    spec = expand({"name": "g", "dataset": "mnist", "model": "lenet5", "recipe": "buda_mnist",
                   "imbalance": {"step": {"rho": [10], "mu": [0.5]}}, "methods": ["baseline"],
                   "repeats": 1}).specs[0]
    store = ResultStore(str(tmp_path / "s"))

    def write(at: dt.datetime, diagonal: int) -> None:
        conf = np.diag([diagonal] * 10)
        conf[3, 5] = 2  # one off-diagonal cell; the other 89 are zero and not stored
        m = Measurement(Status.OK, metrics={str(e): {"confusion": conf} for e in spec.evaluations})
        rows = [r for e in spec.evaluations for r in confusion_rows(spec, e, m)]
        trials = [{"trial_id": spec.trial_id(e), "network_id": spec.network_id, "status": "ok",
                   "created_at": at} for e in spec.evaluations]
        store.write_pack(spec.network_id, "g", {"trials": trials, CONFUSION: rows})

    write(T0, 7)
    write(T0 + dt.timedelta(seconds=1), 9)  # a rerun of the same pack
    cells = 11 * len(spec.evaluations)
    conf = store.read_table(CONFUSION)
    assert len(conf) == cells and set(conf.loc[conf["true_class"] == conf["predicted_class"], "count"]) == {9}
    assert set(conf.columns) >= {"trial_id", "network_id", "evaluation", "true_class", "predicted_class", "count"}
    sql = query(store.root, "select count(*) as n, sum(count) as images from confusion where evaluation = 'raw'")
    assert sql["n"][0] == 11 and sql["images"][0] == 92
    compact_store(store.root, str(tmp_path / "c"))
    assert len(ResultStore(str(tmp_path / "c")).read_table(CONFUSION)) == cells
