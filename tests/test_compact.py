"""Compaction: the same rows as every reader sees them, one file per table and grid."""

import datetime as dt
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from sweep.cli import cli
from sweep.core.grid import load_grid
from sweep.store.compact import compact_store
from sweep.store.results import ResultStore, StoreError

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def rows(pack: str, status: str = "ok", at: dt.datetime = T0, auc: float = 0.9) -> list[dict]:
    return [{"trial_id": f"t{i}", "network_id": f"n{i}", "pack_id": pack, "status": status,
             "roc_auc": auc + i / 100, "spec_json": "{...}", "created_at": at} for i in range(3)]


@pytest.fixture
def source(tmp_path) -> ResultStore:
    store = ResultStore(str(tmp_path / "src"))
    store.write_pack("p1", "g1", {"trials": rows("p1", auc=0.5),
                                  "class_metrics": [{"trial_id": "t0", "class": 0, "accuracy": 0.7}]})
    # the same trials stored again later: every reader keeps these latest rows
    store.write_pack("p1", "g1", {"trials": rows("p1", at=T0 + dt.timedelta(hours=1))})
    store.write_pack("p2", "g2", {"trials": rows("p2", status="failed")})
    grid = tmp_path / "g1.yaml"
    grid.write_text(yaml.safe_dump({"name": "g1", "dataset": "mnist", "model": "lenet5", "recipe": "buda_mnist"}))
    store.save_grid(load_grid(grid))
    return store


def test_compacted_store_reads_the_same_rows_from_one_file_per_table_and_grid(source, tmp_path, caplog):
    target = str(tmp_path / "dst")
    written = compact_store(source.root, target, drop=["spec_json"])
    assert "changed since it was loaded" not in caplog.text  # the saved copy is the grid as given
    assert written == {"class_metrics": 1, "trials": 6}
    out = ResultStore(target)
    assert [Path(f).parent.name for f in out.files("trials")] == ["grid=g1", "grid=g2"]
    before = source.read_table("trials").drop(columns=["spec_json"]).sort_values(["grid", "trial_id"])
    after = out.read_table("trials").sort_values(["grid", "trial_id"])
    assert list(after["roc_auc"]) == list(before["roc_auc"]) == [0.9, 0.91, 0.92, 0.9, 0.91, 0.92]
    assert "spec_json" not in after.columns
    assert out.completed_network_ids() == source.completed_network_ids() == {"n0", "n1", "n2"}
    assert len(out.read_table("class_metrics")) == 1
    assert [g.name for g in out.saved_grids()] == ["g1"]  # `sweep resume` works on the copy
    assert Path(out.saved_grids()[0].path).read_bytes() == Path(source.saved_grids()[0].path).read_bytes()


def test_a_grid_file_changed_after_loading_is_saved_as_it_now_is_with_a_warning(tmp_path, caplog):
    grid = tmp_path / "g1.yaml"
    grid.write_text(yaml.safe_dump({"name": "g1", "dataset": "mnist", "model": "lenet5", "recipe": "buda_mnist"}))
    loaded = load_grid(grid)
    grid.write_text(grid.read_text() + "# edited\n")
    store = ResultStore(str(tmp_path / "s"))
    store.save_grid(loaded)
    assert "changed since it was loaded" in caplog.text
    assert Path(store.saved_grids()[0].path).read_text().endswith("# edited\n")


def test_compaction_never_writes_into_a_store_with_tables_and_names_unknown_tables(source, tmp_path):
    target = tmp_path / "dst"
    compact_store(source.root, str(target), tables=["trials"])
    files = sorted(p for p in target.rglob("*") if p.is_file())
    with pytest.raises(StoreError, match="already holds tables"):
        compact_store(source.root, str(target))
    assert sorted(p for p in target.rglob("*") if p.is_file()) == files  # untouched
    with pytest.raises(StoreError, match="no table.s. curves"):
        compact_store(source.root, str(tmp_path / "other"), tables=["curves"])
    with pytest.raises(StoreError, match="nothing to compact"):
        compact_store(str(tmp_path / "empty"), str(tmp_path / "x"))


def test_compact_command(source, tmp_path):
    result = CliRunner().invoke(cli, ["compact", source.root, str(tmp_path / "c"), "--tables", "trials",
                                      "--drop-columns", "spec_json"])
    assert result.exit_code == 0, result.output
    assert "trials 6 rows" in result.output
    again = CliRunner().invoke(cli, ["compact", source.root, str(tmp_path / "c")])
    assert again.exit_code == 1 and "already holds tables" in again.output
