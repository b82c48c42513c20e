"""SQL over a results store with DuckDB: one view per table, ``trials`` deduplicated, in a
DuckDB that can write nothing, stopped by a timeout or Ctrl-C, results streamed in batches.

Floor: sweep.store (where results live; imports sweep.core only, no torch).

Why no statement is ever checked by its text: a ``COPY ... TO`` hides inside a CTE or an
``EXPLAIN ANALYZE`` and still runs. Instead DuckDB gets no file at all. pyarrow opens the
store's committed files (:meth:`ResultStore.files`, so temporary dot-files and the
leftovers of a crashed pack never show up) as lazy datasets registered in DuckDB, and
DuckDB runs with ``enable_external_access = false`` and ``temp_directory = ''`` (no path
it may open, read or write, no spill files, no extensions, no Python objects by
replacement scan) and its configuration locked, so no statement can turn that back on.
Whatever the SQL, its effects stay in this process's memory and end with the connection.

The ``trials`` view keeps the latest row per (grid, trial_id), exactly as
:meth:`ResultStore.read_table` does; every other table keeps the rows of the pack write
whose trials rows are the latest for their network. One view more, ``rungs``, is the rung
ladder of learning-rate searches with early stopping (issue 25), from ``trials``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, TextIO, TypeVar

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from sweep.store import paths as store_paths
from sweep.store.results import TRIALS, ResultStore, StoreError
from sweep.store.schema import PARTITION

Format = Literal["table", "csv", "json"]
DEFAULT_TIMEOUT_S = 300.0  # `sweep query --timeout`; 0 or None: no limit
BATCH_ROWS = 10_000  # rows per streamed batch: what a query holds in Python at once
RUNGS = "rungs"  # a view over trials: the rung ladder of lr searches with early stopping
RAW_PREFIX = "__raw_"  # the registered datasets the views read: every committed row, not deduplicated
_FILE_COL = "__store_file"  # the <pack_id>-<attempt> stem of a row's file
# The attempt token of a stem <pack_id>-<attempt>: the later-written file wins a created_at
# tie, as in sweep.store.rows.latest_rows.
_ATTEMPT_SQL = rf"regexp_extract({_FILE_COL}, '-([^-]*)$', 1)"
_T = TypeVar("_T")


class QueryError(StoreError):
    """The SQL could not run against the store; the message says why."""


class QueryStopped(QueryError):
    """The query was stopped before it finished: by its timeout or by Ctrl-C (``interrupted``)."""

    def __init__(self, message: str, interrupted: bool) -> None:
        super().__init__(message)
        self.interrupted = interrupted


@dataclass(frozen=True)
class Written:
    """What :func:`write_query` wrote: ``rows``, and whether the limit was reached (rows
    after it were not read: there may be none)."""

    rows: int
    limit_reached: bool


def query(root: str, sql: str, timeout_s: float | None = DEFAULT_TIMEOUT_S,
          limit: int | None = None) -> pd.DataFrame:
    """Run ``sql`` against the store at ``root`` (a local path) and return the result
    (at most ``limit`` rows; stopped with :class:`QueryStopped` after ``timeout_s``)."""
    def collect(reader: pa.RecordBatchReader, stop: threading.Event) -> pd.DataFrame:
        batches = [_plain_batch(b) for b in _limited(reader, limit, stop, [False])]
        return pa.Table.from_batches(batches, _plain_schema(reader.schema)).to_pandas()

    return _run(root, sql, collect, timeout_s)


def write_query(root: str, sql: str, out: TextIO, fmt: Format = "table",
                timeout_s: float | None = DEFAULT_TIMEOUT_S, limit: int | None = None,
                batch_rows: int = BATCH_ROWS) -> Written:
    """Run ``sql`` and write its result to ``out`` as it comes, ``batch_rows`` rows at a time,
    so a result of any size is never held whole (``table``: columns as wide as the first
    batch needs; a longer value later widens only its own line)."""
    if fmt not in ("table", "csv", "json"):
        raise ValueError(f"unknown format {fmt!r}: expected table, csv or json")

    def stream(reader: pa.RecordBatchReader, stop: threading.Event) -> Written:
        cut = [False]
        writer = _Writer(out, fmt, reader.schema.names)
        for batch in _limited(reader, limit, stop, cut):
            writer.batch(_plain_batch(batch).to_pandas())
        writer.close()
        return Written(writer.rows, cut[0])

    return _run(root, sql, stream, timeout_s, batch_rows)


# -- the sandbox ---------------------------------------------------------------
def _run(root: str, sql: str, consume: Callable[[pa.RecordBatchReader, threading.Event], _T],
         timeout_s: float | None, batch_rows: int = BATCH_ROWS) -> _T:
    if timeout_s is not None and timeout_s < 0:
        raise QueryError(f"timeout must be >= 0 seconds (0: none), got {timeout_s:g}")
    store = ResultStore(root)
    if not store.is_local:
        raise QueryError(f"results store {root}: SQL queries of remote stores (URIs) are not "
                         "supported by query yet; copy the store to a local folder first")
    store.check_intact()  # every damaged file named at once, before any is read
    con = _sandbox()
    try:
        tables = _register_tables(con, store)
        con.execute("SET lock_configuration = true")  # after this no SET or PRAGMA changes anything

        def work(stop: threading.Event) -> _T:
            try:
                relation = con.sql(sql)
                # A statement without a result (CREATE MACRO, SET ...) gives None.
                reader = (pa.RecordBatchReader.from_batches(pa.schema([]), []) if relation is None
                          else relation.to_arrow_reader(batch_rows))
                return consume(reader, stop)
            except duckdb.CatalogException as exc:
                available = ", ".join(tables) if tables else "(none: the store is empty)"
                raise QueryError(f"{_first_line(exc)}; tables in results store {root}: {available}") from exc
            except duckdb.PermissionException as exc:
                raise QueryError(f"sweep query only reads the store's tables (it opens no file, writes "
                                 f"nothing, loads nothing): {_first_line(exc)}") from exc
            except duckdb.InvalidInputException as exc:
                if "configuration has been locked" not in str(exc):
                    raise QueryError(f"query against results store {root} failed: {_first_line(exc)}") from exc
                raise QueryError(f"sweep query cannot change DuckDB's settings (locked, so that no query "
                                 f"can open a file): {_first_line(exc)}") from exc
            except BrokenPipeError:
                raise  # the output's reader went away: the caller's business, not the query's
            except (duckdb.Error, pa.ArrowException, OSError) as exc:
                # A failure while streaming comes through Arrow as an OSError.
                raise QueryError(f"query against results store {root} failed: {_first_line(exc)}") from exc

        return _watched(con, work, timeout_s, root)
    finally:
        con.close()


def _sandbox() -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB that may open no path at all (see the module docstring)."""
    con = duckdb.connect(":memory:", config={
        "enable_external_access": False,  # COPY, ATTACH, EXPORT, read_*, INSTALL, LOAD, secrets
        "temp_directory": "",  # no spill files: a query too big for memory fails instead
        "autoinstall_known_extensions": False,
        "autoload_known_extensions": False,
    })
    # The time zone needs ICU, loaded on first use: set before the configuration is locked.
    con.execute("SET TimeZone = 'UTC'")  # timestamps come back as stored, not local time
    return con


def _watched(con: duckdb.DuckDBPyConnection, work: Callable[[threading.Event], _T],
             timeout_s: float | None, root: str) -> _T:
    """Run ``work`` in a thread; stop it through ``con.interrupt()`` on timeout or Ctrl-C.

    DuckDB runs a query in C++ with the GIL released, so a SIGINT only reaches Python
    once the query returns, which for a runaway query is never. The calling thread
    therefore only waits, takes the KeyboardInterrupt (or the deadline) itself and
    interrupts the connection; ``stop`` also ends the streaming between batches.
    """
    done, stop = threading.Event(), threading.Event()
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = work(stop)
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc
        finally:
            done.set()

    started = time.monotonic()
    deadline = None if not timeout_s else started + timeout_s
    why = None
    worker = threading.Thread(target=target, name="sweep-query")
    try:
        worker.start()
        while not done.wait(0.25 if deadline is None else max(0.0, min(0.25, deadline - time.monotonic()))):
            if deadline is not None and time.monotonic() >= deadline:
                why = f"timed out after {timeout_s:g} s (raise it with --timeout SECONDS, 0: none)"
                break
    except KeyboardInterrupt:
        why = f"interrupted (Ctrl-C) after {time.monotonic() - started:.1f} s"
    if why is not None:
        _stop(con, done, stop)
        worker.join()  # it has finished its work: no query thread outlives its query
        raise QueryStopped(f"query against results store {root} {why}; the store is unchanged",
                           interrupted=why.startswith("interrupted"))
    worker.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


def _stop(con: duckdb.DuckDBPyConnection, done: threading.Event, stop: threading.Event) -> None:
    """Interrupt until the worker has finished: leaving it running in C++ would crash the
    interpreter at exit. A second Ctrl-C only interrupts again."""
    stop.set()
    while True:
        try:
            con.interrupt()
            if done.wait(0.2):
                return
        except KeyboardInterrupt:
            continue


def _limited(reader: pa.RecordBatchReader, limit: int | None, stop: threading.Event,
             cut: list[bool]) -> Iterator[pa.RecordBatch]:
    """The reader's batches up to ``limit`` rows; ``cut[0]`` says whether the limit was reached."""
    left = limit
    cut[0] = left == 0
    while not stop.is_set() and (left is None or left > 0):
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return
        if left is not None:
            batch = batch.slice(0, left)
            left -= batch.num_rows
            # Said without reading on to see whether a row is left: it may take forever to find.
            cut[0] = left == 0
        yield batch


# -- the views -----------------------------------------------------------------
def _register_tables(con: duckdb.DuckDBPyConnection, store: ResultStore) -> list[str]:
    """One lazy pyarrow dataset per table, registered as ``__raw_<table>``, and the view
    ``<table>`` over it: DuckDB reads the rows pyarrow streams, never a path."""
    datasets = {t: _dataset(store, t) for t in store.table_names()}
    datasets = {t: d for t, d in datasets.items() if d is not None}
    for table, dataset in datasets.items():
        con.register(RAW_PREFIX + table, dataset)
    trials = datasets.get(TRIALS)
    # Other tables keep the rows of the pack whose trials rows are the latest for their
    # network (ResultStore.read_table's rule), when both sides know the network.
    latest = _latest_sql() if trials is not None and "network_id" in trials.schema.names else None
    for table, dataset in datasets.items():
        raw = f'"{RAW_PREFIX}{table}"'
        if table == TRIALS:
            sql = f"SELECT * EXCLUDE ({_FILE_COL}) FROM ({_latest_rows_sql()})"
        elif latest is not None and "network_id" in dataset.schema.names:
            # Per network: the rows of its latest write when that write has any, else those of
            # the latest write here that holds trials rows of it, else all.
            sql = (f"WITH latest AS ({latest}), every AS ({_writes_sql()}), "
                   f"chosen AS (SELECT s.grid, s.network_id, s.stem FROM (SELECT DISTINCT grid, network_id, "
                   f"{_FILE_COL} AS stem FROM {raw}) s JOIN every e ON e.grid = s.grid AND e.network_id = s.network_id "
                   f"AND e.stem = s.stem LEFT JOIN latest l ON l.grid = s.grid AND l.network_id = s.network_id "
                   f"AND l.stem = s.stem QUALIFY row_number() OVER (PARTITION BY s.grid, s.network_id ORDER BY "
                   f"l.stem IS NOT NULL DESC, regexp_extract(s.stem, '-([^-]*)$', 1) DESC) = 1) "
                   f"SELECT r.* EXCLUDE ({_FILE_COL}) FROM {raw} r WHERE r.network_id IS NULL "
                   f"OR EXISTS (SELECT 1 FROM chosen c WHERE c.grid = r.grid AND c.network_id = r.network_id "
                   f"AND c.stem = r.{_FILE_COL}) OR NOT EXISTS (SELECT 1 FROM chosen c WHERE c.grid = r.grid "
                   f"AND c.network_id = r.network_id)")
        else:
            sql = f"SELECT * EXCLUDE ({_FILE_COL}) FROM {raw}"
        con.execute(f'CREATE VIEW "{table}" AS {sql}')
    if trials is not None and RUNGS not in datasets:
        con.execute(f'CREATE VIEW "{RUNGS}" AS {_rungs_sql(trials.schema.names)}')
        return [*datasets, RUNGS]
    return list(datasets)


def _rungs_sql(columns: list[str]) -> str:
    """The rung ladder of learning-rate searches with early stopping: per grid, method, rung and
    iteration, how many networks were stopped there and the range of their rung metric (the
    rule of analysis.aggregate.stopped_by_rung; empty for a store without such a search)."""
    have = set(columns)
    if not {"rung", "stopped_at_iter", "status", "network_id", "method"} <= have:
        return ("SELECT NULL::VARCHAR AS grid, NULL::VARCHAR AS method, NULL::BIGINT AS rung, "
                "NULL::BIGINT AS iteration, NULL::BIGINT AS networks_stopped, NULL::DOUBLE AS metric_min, "
                "NULL::DOUBLE AS metric_max WHERE false")
    raw = "evaluation = 'raw' AND " if "evaluation" in have else ""
    metric = "rung_metric" if "rung_metric" in have else "NULL::DOUBLE"
    return (f"SELECT grid, method, CAST(rung AS BIGINT) AS rung, CAST(stopped_at_iter AS BIGINT) AS iteration, "
            f"count(DISTINCT network_id) AS "
            f"networks_stopped, min({metric}) AS metric_min, max({metric}) AS metric_max FROM trials "
            f"WHERE {raw}status = 'stopped' GROUP BY ALL ORDER BY ALL")


def _dataset(store: ResultStore, table: str) -> ds.Dataset | None:
    """The table's committed files as one dataset: columns united by name (types promoted
    as ResultStore reads them), plus ``grid`` and the file's stem taken from its path."""
    paths = store.files(table)
    if not paths:
        return None
    fs = pafs.LocalFileSystem()
    fmt = ds.ParquetFileFormat()
    try:
        schema = ds.FileSystemDatasetFactory(fs, paths, fmt, ds.FileSystemFactoryOptions()).inspect(
            promote_options="permissive", fragments=None)
    except (OSError, pa.ArrowException) as exc:
        raise QueryError(f"results store {store.root}: table {table} has files that cannot be combined "
                         f"(incompatible column types or unreadable file): {_first_line(exc)}") from exc
    for name in (PARTITION, _FILE_COL):
        if name not in schema.names:
            schema = schema.append(pa.field(name, pa.string()))
    # A column a file lacks is filled from its partition expression: that is how every row
    # gets its grid and stem, and how a WHERE on grid skips the other grids' files.
    parsed = [store_paths.parse_data_path(store.base_path, p) for p in paths]  # committed data files only
    parts = [(pc.field(PARTITION) == d.grid) & (pc.field(_FILE_COL) == d.stem) for d in parsed]
    return ds.FileSystemDataset.from_paths(paths, schema=schema, format=fmt, filesystem=fs, partitions=parts)


def _latest_rows_sql() -> str:
    """The latest row per (grid, trial_id), with its file's stem."""
    return (f'SELECT * FROM "{RAW_PREFIX}{TRIALS}" QUALIFY row_number() OVER (PARTITION BY grid, trial_id '
            f"ORDER BY created_at DESC NULLS LAST, {_ATTEMPT_SQL} DESC) = 1")


def _latest_sql() -> str:
    return f"SELECT DISTINCT grid, network_id, {_FILE_COL} AS stem FROM ({_latest_rows_sql()})"


def _writes_sql() -> str:
    """Every (grid, network, write) that has trials rows."""
    return f'SELECT DISTINCT grid, network_id, {_FILE_COL} AS stem FROM "{RAW_PREFIX}{TRIALS}"'


def _first_line(exc: BaseException) -> str:
    # DuckDB appends "Did you mean ..." with a system table; the table list is more useful.
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


# -- output --------------------------------------------------------------------
def _plain_schema(schema: pa.Schema) -> pa.Schema:
    """Decimals (DuckDB's literals, HUGEINT sums) as float64, as DuckDB's own DataFrames have them."""
    return pa.schema([f.with_type(pa.float64()) if pa.types.is_decimal(f.type) else f for f in schema])


def _plain_batch(batch: pa.RecordBatch) -> pa.RecordBatch:
    schema = _plain_schema(batch.schema)
    return batch if schema.equals(batch.schema) else batch.cast(schema)


class _Writer:
    """Writes batches in one format as they come; ``close`` ends the output."""

    def __init__(self, out: TextIO, fmt: Format, columns: list[str]) -> None:
        self.out, self.fmt, self.columns, self.rows = out, fmt, columns, 0
        self.widths: list[int] | None = None

    def batch(self, df: pd.DataFrame) -> None:
        if df.empty:
            return
        if self.fmt == "csv":
            df.to_csv(self.out, index=False, header=self.rows == 0)
        elif self.fmt == "json":
            # pandas' encoder (timestamps, numpy scalars and arrays) in C, one record a line:
            # a JSON list that streams, where json.dumps(indent=2) per record was 5x slower.
            lines = df.to_json(orient="records", lines=True, date_format="iso", date_unit="us").rstrip("\n")
            # pandas writes every "/" as "\/"; each such pair is one (a "\" is "\\"), so undo it.
            lines = lines.replace("\\/", "/")
            self.out.write(("[\n" if self.rows == 0 else ",\n") + lines.replace("\n", ",\n"))
        else:
            cells = [[_cell(v) for v in df[c]] for c in df.columns]
            if self.widths is None:
                self.widths = [max([len(str(c))] + [len(v) for v in col]) for c, col in zip(df.columns, cells)]
                self.out.write(self._line([str(c) for c in df.columns]) + "\n")
            for row in zip(*cells):
                self.out.write(self._line(list(row)) + "\n")
        self.rows += len(df)
        self.out.flush()

    def _line(self, values: list[str]) -> str:
        assert self.widths is not None
        return "  ".join(v.rjust(w) for v, w in zip(values, self.widths))

    def close(self) -> None:
        if self.fmt == "json":
            self.out.write("[]\n" if self.rows == 0 else "\n]\n")
        elif self.fmt == "table" and self.rows == 0:
            header = "  ".join(self.columns)
            self.out.write((header + "\n" if header else "") + "(0 rows)\n")
        elif self.fmt == "csv" and self.rows == 0 and self.columns:
            self.out.write(",".join(self.columns) + "\n")
        self.out.flush()


def _cell(value: object) -> str:
    if value is None or (isinstance(value, float) and value != value) or value is pd.NaT:
        return "NULL"
    if hasattr(value, "tolist"):  # numpy arrays (lists, arrays) print as Python lists, with commas
        value = value.tolist()
    if isinstance(value, float):
        return f"{value:.10g}"  # what pandas' to_json keeps, without a run of float noise
    return str(value)


def format_result(df: pd.DataFrame, fmt: Format = "table") -> str:
    """Render a small result held whole (``sweep compare``'s tables) as aligned plain text,
    CSV or a JSON list of records."""
    if fmt == "table":
        if df.empty:
            header = "  ".join(str(c) for c in df.columns)
            return (header + "\n" if header else "") + "(0 rows)"
        return df.to_string(index=False)
    if fmt == "csv":
        return df.to_csv(index=False)
    if fmt == "json":
        records = json.loads(df.to_json(orient="records", date_format="iso", date_unit="us"))
        return json.dumps(records, indent=2)
    raise ValueError(f"unknown format {fmt!r}: expected table, csv or json")
