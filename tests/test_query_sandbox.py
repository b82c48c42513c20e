"""A query can write nothing, whatever its text; it stops on a timeout or Ctrl-C; results
stream in batches.

The fuzz below runs statement shapes that try to write (COPY inside a CTE, under EXPLAIN
ANALYZE, among several statements, from a macro), to read files (read_parquet / read_csv
of paths inside and outside the store), to load code (LOAD, INSTALL), to attach or
export databases, or to undo the sandbox (SET, RESET, PRAGMA, CALL). No statement is
refused by its text any more: each either fails inside DuckDB with a one-line error or
runs harmlessly in memory, and for every one the SHA-256 of every file of the store and
of a watched folder outside it (also the working directory, for relative paths) is the
same before and after, with no file added anywhere under them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import signal
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from sweep.cli import cli
from sweep.store.query import QueryError, QueryStopped, Written, query, write_query
from sweep.store.results import ResultStore

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
FOREVER = "select count(*) as n from range(9223372036854775807)"  # never ends: only a stop ends it
ENDLESS_ROWS = "select i from range(9223372036854775807) t(i)"  # rows without end


def rows(pack: str, n: int = 3) -> list[dict]:
    return [{"trial_id": f"{pack}-t{i}", "network_id": f"{pack}-n{i}", "status": "ok", "method": "baseline",
             "roc_auc": 0.5 + i / 10, "created_at": T0} for i in range(n)]


@pytest.fixture
def store(tmp_path: Path) -> ResultStore:
    s = ResultStore(str(tmp_path / "store"))
    s.write_pack("p1", "a", {"trials": rows("p1"), "curves": [{"network_id": "p1-n0", "iter": 1}]})
    s.write_pack("p2", "b", {"trials": rows("p2", 2)})
    return s


def digests(*roots: Path) -> dict[str, str]:
    """Every file under ``roots`` (hidden ones too) by its SHA-256."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


# {file}: a committed trials file; {root}: the store; {out}: a folder outside it (and the
# working directory); {csv}: a file outside the store. Each shape: "refused" (must fail with
# a one-line QueryError) or "any" (may also run: in memory only).
SHAPES = [
    ("WITH w AS (COPY (SELECT 1 AS x) TO '{file}' (FORMAT parquet, USE_TMP_FILE false)) SELECT 1", "refused"),
    ("EXPLAIN ANALYZE COPY (SELECT 'forged' AS trial_id) TO '{file}' (FORMAT parquet)", "refused"),
    ("EXPLAIN COPY (SELECT 1 AS x) TO '{file}' (FORMAT parquet)", "any"),
    ("COPY (SELECT 'forged' AS trial_id, 0.5 AS roc_auc) TO '{file}' (FORMAT parquet, USE_TMP_FILE false)",
     "refused"),
    ("COPY trials TO '{root}/trials/grid=a/p9-20260101T000000000Z000000.parquet' (FORMAT parquet)", "refused"),
    ("COPY trials TO '{root}/stolen.csv'", "refused"),
    ("COPY trials TO '{out}/stolen.csv'", "refused"),
    ("COPY trials TO 'relative.csv'", "refused"),
    ("COPY (SELECT * FROM range(100000)) TO '{out}/big' (FORMAT parquet, PER_THREAD_OUTPUT true)", "refused"),
    ("SELECT 1; COPY trials TO '{out}/x.csv'; SELECT 2", "refused"),
    ("CREATE TABLE t AS SELECT * FROM trials; COPY t TO '{file}' (FORMAT parquet)", "refused"),
    ("CREATE VIEW v AS SELECT 1 AS x; COPY v TO '{out}/v.parquet'", "refused"),
    ("CREATE MACRO m(x) AS x * 2; SELECT m(roc_auc) AS twice FROM trials", "any"),
    ("CREATE MACRO leak() AS TABLE SELECT * FROM read_parquet('{file}'); SELECT * FROM leak()", "refused"),
    ("CREATE TABLE t AS SELECT 1 AS x; INSERT INTO t VALUES (2); SELECT * FROM t", "any"),
    ("INSERT INTO trials SELECT * FROM trials", "refused"),
    ("DROP VIEW trials; SELECT 1", "any"),
    ("SELECT * FROM query('COPY trials TO ''{out}/q.csv''')", "refused"),
    ("PRAGMA enable_profiling", "refused"),
    ("PRAGMA profiling_output = '{out}/profile.json'", "refused"),
    ("SET profiling_output = '{out}/profile.json'", "refused"),
    ("SET enable_external_access = true", "refused"),
    ("RESET enable_external_access", "refused"),
    ("SET lock_configuration = false", "refused"),
    ("SET temp_directory = '{out}'", "refused"),
    ("SET allowed_paths = ['{out}']", "refused"),
    ("SET allowed_directories = ['{out}']", "refused"),
    ("CALL enable_logging(storage = 'file', storage_config = {'path': '{out}/log'})", "refused"),
    ("CALL pragma_version()", "any"),
    ("CHECKPOINT", "any"),
    ("LOAD httpfs", "refused"),
    ("INSTALL httpfs", "refused"),
    ("FORCE INSTALL sqlite", "refused"),
    ("ATTACH '{out}/x.db' AS x", "refused"),
    ("ATTACH '{root}/x.db' AS x", "refused"),
    ("ATTACH ':memory:' AS m; CREATE TABLE m.t AS SELECT 1 AS x; SELECT * FROM m.t", "any"),
    ("EXPORT DATABASE '{out}/dump'", "refused"),
    ("EXPORT DATABASE '{root}/dump' (FORMAT parquet)", "refused"),
    ("IMPORT DATABASE '{out}'", "refused"),
    ("CREATE PERSISTENT SECRET s (TYPE s3, KEY_ID 'a', SECRET 'b')", "refused"),
    ("SELECT * FROM read_parquet('{file}')", "refused"),
    ("SELECT * FROM '{file}'", "refused"),
    ("SELECT * FROM read_parquet('{root}/*/*/*.parquet')", "refused"),
    ("SELECT * FROM read_csv('{csv}')", "refused"),
    ("SELECT * FROM read_text('{csv}')", "refused"),
    ("SELECT * FROM glob('{root}/*')", "refused"),
    ("SELECT * FROM sniff_csv('{csv}')", "refused"),
    ("SELECT count(*) AS n FROM trials", "any"),
]


@pytest.mark.parametrize("sql, expect", SHAPES, ids=[s[:60] for s, _ in SHAPES])
def test_no_statement_shape_changes_a_byte(store, tmp_path, monkeypatch, sql, expect):
    out = tmp_path / "outside"
    out.mkdir()
    csv = tmp_path / "secret.csv"
    csv.write_text("a\n1\n")
    monkeypatch.chdir(out)  # a relative path would land here
    text = (sql.replace("{file}", store.files("trials")[0]).replace("{root}", store.root)
            .replace("{out}", str(out)).replace("{csv}", str(csv)))
    before = digests(Path(store.root), out, tmp_path)
    try:
        query(store.root, text, timeout_s=120)
        outcome = "ran"
    except QueryError as exc:
        message = str(exc)
        assert "\n" not in message and message, message  # one clear line
        outcome = "refused"
    assert outcome == expect or expect == "any", f"{sql!r} was {outcome}"
    assert digests(Path(store.root), out, tmp_path) == before  # not a byte changed, no file added
    # ...and the store reads as it did.
    assert query(store.root, "select count(*) as n from trials")["n"][0] == 5


def test_the_probes_cte_copy_through_the_cli_is_one_line_and_changes_nothing(store):
    target = store.files("trials")[0]
    before = digests(Path(store.root))
    res = CliRunner().invoke(cli, ["query", store.root, f"WITH w AS (COPY (select 1 as x) TO '{target}' "
                                   "(FORMAT parquet, USE_TMP_FILE false)) SELECT 1"])
    assert res.exit_code == 1
    assert res.output.startswith("Error: sweep query only reads") and res.output.count("\n") == 1, res.output
    assert digests(Path(store.root)) == before


def test_the_sandbox_settings_are_on_and_locked(store):
    df = query(store.root, "select current_setting('enable_external_access') as ext, "
                           "current_setting('lock_configuration') as locked, "
                           "current_setting('temp_directory') as tmp")
    assert df.to_dict("records") == [{"ext": False, "locked": True, "tmp": ""}]


def test_reading_the_stores_tables_still_works(store):
    assert set(query(store.root, "SHOW TABLES")["name"]) == {"trials", "curves", "rungs", "__raw_trials", "__raw_curves"}
    assert len(query(store.root, "EXPLAIN SELECT count(*) FROM trials")) >= 1
    assert len(query(store.root, "EXPLAIN ANALYZE SELECT count(*) FROM trials")) >= 1
    assert query(store.root, "DESCRIBE trials")["column_name"].tolist()[-1] == "grid"
    assert query(store.root, "select count(*) as n from trials where grid = 'b'")["n"][0] == 2


# -- timeout and Ctrl-C ----------------------------------------------------------
def test_a_runaway_query_stops_at_its_timeout(store):
    with pytest.raises(QueryStopped, match=r"timed out after 0.5 s \(raise it with --timeout") as err:
        query(store.root, FOREVER, timeout_s=0.5)
    assert not err.value.interrupted and "\n" not in str(err.value)


def test_the_timeout_also_stops_a_stream_between_and_inside_batches(store):
    out = io.StringIO()
    with pytest.raises(QueryStopped, match="timed out"):
        # The first rows come at once, the next one never: the stop lands inside a batch.
        write_query(store.root, "select i from range(9223372036854775807) t(i) where i < 50000 or i = -1",
                    out, "csv", timeout_s=0.5, batch_rows=1000)
    assert out.getvalue().splitlines()[:2] == ["i", "0"]


@pytest.fixture
def ctrl_c_raises():
    """SIGINT raising KeyboardInterrupt, as in a terminal. A shell's background job (`pytest &`,
    `nohup ... &`) starts Python with SIGINT ignored, and Python then keeps it ignored: the
    signal below would be lost and the query would run for ever."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _sigint_once_the_query_runs() -> threading.Thread:
    """Send this process SIGINT as soon as the query's thread exists: then the waiting
    thread is inside the part that turns Ctrl-C into an interrupt (no sleep, no race)."""
    before = {t.ident for t in threading.enumerate() if t.name == "sweep-query"}  # none: each is joined

    def fire() -> None:
        while not any(t.name == "sweep-query" and t.ident not in before for t in threading.enumerate()):
            threading.Event().wait(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=fire, daemon=True)
    thread.start()
    return thread


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="SIGINT needs the main thread")
def test_ctrl_c_interrupts_a_running_query_with_one_line_and_status_130(store, ctrl_c_raises):
    _sigint_once_the_query_runs()
    res = CliRunner().invoke(cli, ["query", store.root, FOREVER, "--timeout", "0"])
    assert res.exit_code == 130, res.output
    assert "interrupted (Ctrl-C)" in res.output and res.output.count("\n") == 1, res.output
    assert "store is unchanged" in res.output


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="SIGINT needs the main thread")
def test_ctrl_c_in_python_raises_query_stopped(store, ctrl_c_raises):
    _sigint_once_the_query_runs()
    with pytest.raises(QueryStopped, match="interrupted") as err:
        query(store.root, FOREVER, timeout_s=None)
    assert err.value.interrupted


def test_timeout_is_an_option_with_its_default_in_the_help():
    res = CliRunner().invoke(cli, ["query", "--help"])
    assert "--timeout" in res.output and "300" in res.output and "--limit" in res.output
    bad = CliRunner().invoke(cli, ["query", ".", "select 1", "--timeout", "-1"])
    assert bad.exit_code == 2


# -- streaming ---------------------------------------------------------------------
def test_limit_stops_an_endless_result(store):
    # Held whole, this result would never exist; streamed, its first rows come at once.
    out = io.StringIO()
    written = write_query(store.root, ENDLESS_ROWS, out, "csv", timeout_s=120, limit=25_000, batch_rows=10_000)
    assert written.rows == 25_000 and written.limit_reached
    lines = out.getvalue().splitlines()
    assert lines[0] == "i" and lines[1] == "0" and lines[-1] == "24999" and len(lines) == 25_001
    assert len(query(store.root, ENDLESS_ROWS, timeout_s=120, limit=3)) == 3
    assert query(store.root, ENDLESS_ROWS, timeout_s=120, limit=0).columns.tolist() == ["i"]
    assert write_query(store.root, ENDLESS_ROWS, io.StringIO(), "csv", limit=0) == Written(0, True)


class _Enough(Exception):
    pass


class _Sink(io.StringIO):
    """Output that counts the lines of each flush and stops the query after ``stop_after``."""

    def __init__(self, stop_after: int | None = None) -> None:
        super().__init__()
        self.flushed: list[int] = []
        self.stop_after = stop_after
        self._at = 0

    def flush(self) -> None:
        text = self.getvalue()
        self.flushed.append(text.count("\n", self._at))
        self._at = len(text)
        if self.stop_after is not None and len(self.flushed) >= self.stop_after:
            raise _Enough


@pytest.mark.parametrize("fmt", ["csv", "json", "table"])
def test_the_first_batch_is_written_before_the_result_exists(store, fmt):
    sink = _Sink(stop_after=2)
    with pytest.raises(_Enough):  # the sink's own error, raised from inside the endless stream
        write_query(store.root, ENDLESS_ROWS, sink, fmt, timeout_s=120, batch_rows=1000)
    assert len(sink.flushed) == 2


@pytest.mark.parametrize("fmt", ["csv", "json", "table"])
def test_rows_are_written_one_bounded_batch_at_a_time(store, fmt):
    sink = _Sink()
    written = write_query(store.root, "select i, i * 0.5 as half from range(20000) t(i)", sink, fmt,
                          timeout_s=120, batch_rows=3000)
    assert written.rows == 20_000 and not written.limit_reached
    assert len(sink.flushed) >= 20_000 // 3000
    assert max(sink.flushed) <= 3000 + 1  # a line per row, + the header or the opening bracket


# -- what the formats write ----------------------------------------------------------
def written(store: ResultStore, sql: str, fmt: str) -> str:
    out = io.StringIO()
    write_query(store.root, sql, out, fmt)  # type: ignore[arg-type]
    return out.getvalue()


def test_streamed_formats(store):
    sql = "select trial_id, roc_auc, created_at from trials where grid = 'b' order by trial_id"
    assert written(store, sql, "csv").splitlines() == [
        "trial_id,roc_auc,created_at", "p2-t0,0.5,2026-01-01 00:00:00+00:00", "p2-t1,0.6,2026-01-01 00:00:00+00:00"]
    records = json.loads(written(store, sql, "json"))
    assert [r["trial_id"] for r in records] == ["p2-t0", "p2-t1"]
    assert records[0]["created_at"].startswith("2026-01-01T00:00:00")
    lines = written(store, sql, "table").splitlines()
    assert lines[0].split() == ["trial_id", "roc_auc", "created_at"] and lines[1].split()[:2] == ["p2-t0", "0.5"]
    assert len({len(line) for line in lines}) == 1  # aligned
    empty = "select trial_id from trials where false"
    assert written(store, empty, "table").splitlines() == ["trial_id", "(0 rows)"]
    assert written(store, empty, "csv").splitlines() == ["trial_id"]
    assert json.loads(written(store, empty, "json")) == []
    assert json.loads(written(store, "select 0.5 as d, null as n, sum(2) as s", "json")) == [
        {"d": 0.5, "n": None, "s": 2.0}]
    slashes = ["a/b", "a\\/b", "\\", "x\\\\/y"]  # pandas escapes "/": undone, backslashes kept
    sql = "select * from (values " + ", ".join(f"('{v}')" for v in slashes) + ") t(s)"
    assert [r["s"] for r in json.loads(written(store, sql, "json"))] == slashes


def test_cli_limit_says_when_it_was_reached(store):
    res = CliRunner().invoke(cli, ["query", store.root, "select trial_id from trials order by 1", "--format",
                                   "csv", "--limit", "2"])
    assert res.exit_code == 0
    assert res.stdout.splitlines() == ["trial_id", "p1-t0", "p1-t1"]
    assert "--limit 2: rows after the first 2 were not read" in res.stderr
