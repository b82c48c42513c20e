"""SQL over the results store: views, dedupe, errors and output formats."""

from __future__ import annotations

import datetime as dt
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sweep.store.query import QueryError, format_result, query
from sweep.store.results import ResultStore, StoreError, new_attempt

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def trial_rows(pack: str, n: int = 3, status: str = "ok", at: dt.datetime = T0) -> list[dict]:
    return [
        {"trial_id": f"{pack}-t{i}", "network_id": f"{pack}-n{i}", "status": status,
         "method": "baseline" if i % 2 else "oversampling", "roc_auc": 0.5 + i / 10,
         "classes": [i], "created_at": at}
        for i in range(n)
    ]


@pytest.fixture
def store(tmp_path) -> ResultStore:
    s = ResultStore(str(tmp_path))
    s.write_pack("p1", "a", {"trials": trial_rows("p1"), "curves": [{"network_id": "p1-n0", "iter": 1}]})
    s.write_pack("p2", "b", {"trials": trial_rows("p2", n=2)})
    return s


def test_query_count(store):
    df = query(store.root, "select grid, count(*) as n from trials group by grid order by grid")
    assert df.to_dict("records") == [{"grid": "a", "n": 3}, {"grid": "b", "n": 2}]
    assert query(store.root, "select count(*) as n from curves")["n"][0] == 1


def test_query_trials_dedupe(store):
    later = T0 + dt.timedelta(days=1)
    store.write_pack("p1", "a", {"trials": trial_rows("p1", status="failed", at=later)})
    df = query(store.root, "select status, count(*) as n from trials group by status order by status")
    assert df.to_dict("records") == [{"status": "failed", "n": 3}, {"status": "ok", "n": 2}]
    assert "__store_file" not in query(store.root, "select * from trials").columns


def test_query_unknown_table(store):
    with pytest.raises(QueryError, match="nope") as err:
        query(store.root, "select * from nope")
    assert "curves, trials" in str(err.value)
    assert isinstance(err.value, StoreError)


def test_query_empty_store(tmp_path):
    with pytest.raises(QueryError, match="store is empty"):
        query(str(tmp_path / "none"), "select count(*) from trials")
    assert query(str(tmp_path), "select 1 as one")["one"][0] == 1


def test_query_syntax_error(store):
    with pytest.raises(QueryError, match="failed"):
        query(store.root, "selec * from trials")


def test_query_ignores_temp_and_uncommitted_files(store, tmp_path):
    part = tmp_path / "trials" / "grid=a"
    (part / ".p9-x.parquet.tmp").write_bytes(b"PAR1 garbage")
    orphan = tmp_path / "curves" / "grid=a" / f"p9-{new_attempt()}.parquet"
    pq.write_table(pa.Table.from_pylist([{"network_id": "p9-n0", "iter": 1}]), orphan)
    (tmp_path / "latent_stats" / "grid=a").mkdir(parents=True)
    (tmp_path / "latent_stats" / "grid=a" / ".p9-x.parquet.tmp").write_bytes(b"")

    assert query(store.root, "select count(*) as n from trials")["n"][0] == 5
    assert query(store.root, "select count(*) as n from curves")["n"][0] == 1
    with pytest.raises(QueryError, match="latent_stats"):
        query(store.root, "select * from latent_stats")


def test_query_schema_evolution(store):
    rows = [r | {"val_balanced_accuracy": 0.7} for r in trial_rows("p3", n=1)]
    store.write_pack("p3", "a", {"trials": rows})
    df = query(store.root, "select count(val_balanced_accuracy) as v, count(*) as n from trials")
    assert df.to_dict("records") == [{"v": 1, "n": 6}]


def test_query_remote_uri_not_supported():
    with pytest.raises(QueryError, match="not supported by query yet"):
        query("mock:///store", "select 1")


def test_format_result_table(store):
    df = query(store.root, "select trial_id, roc_auc from trials where grid = 'b' order by trial_id")
    lines = format_result(df, "table").splitlines()
    assert lines[0].split() == ["trial_id", "roc_auc"]
    assert lines[1].split() == ["p2-t0", "0.5"] and len(lines) == 3
    assert len({len(line) for line in lines}) == 1  # aligned
    assert format_result(df.iloc[:0], "table").endswith("(0 rows)")


def test_format_result_csv(store):
    df = query(store.root, "select trial_id, roc_auc from trials where grid = 'b' order by trial_id")
    assert format_result(df, "csv").splitlines() == ["trial_id,roc_auc", "p2-t0,0.5", "p2-t1,0.6"]


def test_format_result_json(store):
    df = query(store.root, "select trial_id, classes, created_at from trials where grid = 'b' order by trial_id")
    records = json.loads(format_result(df, "json"))
    assert records[0]["trial_id"] == "p2-t0" and records[0]["classes"] == [0]
    assert records[0]["created_at"].startswith("2026-01-01T00:00:00")
    with pytest.raises(ValueError, match="unknown format"):
        format_result(df, "xml")  # type: ignore[arg-type]


def _snapshot(root) -> dict:
    from pathlib import Path

    return {str(p): p.read_bytes() for p in Path(root).rglob("*") if p.is_file()}


# Refused by DuckDB itself, not by the statement's text (tests/test_query_sandbox.py has
# the full fuzz of statement shapes).
@pytest.mark.parametrize("sql, message", [
    ("COPY (SELECT 'forged' AS trial_id, 0.5 AS roc_auc) TO '{file}' (FORMAT parquet, USE_TMP_FILE false)",
     "only reads"),
    ("COPY trials TO '{root}/stolen.csv'", "only reads"),
    ("ATTACH '{root}/x.db' AS x", "only reads"),
    ("EXPORT DATABASE '{root}/dump'", "only reads"),
    ("INSTALL httpfs", "only reads"),
    ("SET enable_external_access = true", "cannot change DuckDB's settings"),
])
def test_query_refuses_every_statement_that_writes(store, sql, message):
    before = _snapshot(store.root)
    target = store.files("trials")[0]
    with pytest.raises(QueryError, match=message):
        query(store.root, sql.format(file=target, root=store.root))
    assert _snapshot(store.root) == before  # not a byte of the store changed


@pytest.mark.parametrize("sql", ["CREATE TABLE t AS SELECT 1", "SELECT 1; DROP VIEW trials"])
def test_query_statements_in_memory_run_and_change_nothing(store, sql):
    before = _snapshot(store.root)
    query(store.root, sql)
    assert _snapshot(store.root) == before
    assert query(store.root, "select count(*) as n from trials")["n"][0] == 5  # a new connection each query


def test_query_cannot_read_files_outside_the_store(store, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside") / "secret.csv"
    outside.write_text("a\n1\n")
    with pytest.raises(QueryError, match="disabled|Permission"):
        query(store.root, f"SELECT * FROM read_csv('{outside}')")
    # Reading the store's own tables, with SHOW / DESCRIBE / EXPLAIN, still works (SHOW
    # TABLES also lists the datasets the views read, __raw_<table>, and the view rungs).
    assert set(query(store.root, "SHOW TABLES")["name"]) == {"__raw_curves", "__raw_trials", "curves", "trials",
                                                            "rungs"}
    assert len(query(store.root, "EXPLAIN SELECT count(*) FROM trials")) >= 1
