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

The views themselves (``trials`` deduplicated, ``rungs``): :mod:`sweep.store.query_views`.
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

from sweep.store.query_views import QueryError, first_line, register_views
from sweep.store.results import ResultStore

Format = Literal["table", "csv", "json"]
DEFAULT_TIMEOUT_S = 300.0  # `sweep query --timeout`; 0 or None: no limit
BATCH_ROWS = 10_000  # rows per streamed batch: what a query holds in Python at once
_T = TypeVar("_T")


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
        tables = register_views(con, store)
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
                raise QueryError(f"{first_line(exc)}; tables in results store {root}: {available}") from exc
            except duckdb.PermissionException as exc:
                raise QueryError(f"sweep query only reads the store's tables (it opens no file, writes "
                                 f"nothing, loads nothing): {first_line(exc)}") from exc
            except duckdb.InvalidInputException as exc:
                if "configuration has been locked" not in str(exc):
                    raise QueryError(f"query against results store {root} failed: {first_line(exc)}") from exc
                raise QueryError(f"sweep query cannot change DuckDB's settings (locked, so that no query "
                                 f"can open a file): {first_line(exc)}") from exc
            except BrokenPipeError:
                raise  # the output's reader went away: the caller's business, not the query's
            except (duckdb.Error, pa.ArrowException, OSError) as exc:
                # A failure while streaming comes through Arrow as an OSError.
                raise QueryError(f"query against results store {root} failed: {first_line(exc)}") from exc

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
