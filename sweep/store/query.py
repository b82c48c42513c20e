"""SQL over a results store with DuckDB: one view per table, ``trials`` deduplicated,
read-only.

Floor: sweep.store (where results live; imports sweep.core only, no torch).

Views read only the files of committed packs (see :mod:`sweep.store.results`), so temporary
dot-files and the leftovers of a crashed pack never show up. The ``trials`` view keeps
the latest row per (grid, trial_id), exactly as :meth:`ResultStore.read_table` does.
"""

from __future__ import annotations

import json
from typing import Literal

import duckdb
import pandas as pd

from sweep.store.results import TRIALS, ResultStore, StoreError

Format = Literal["table", "csv", "json"]
_FILE_COL = "__store_file"
# The attempt token of a data file name <pack_id>-<attempt>.parquet: the later-written
# file wins a created_at tie, as in sweep.store.results._latest_rows.
_ATTEMPT_SQL = rf"regexp_extract({_FILE_COL}, '-([^-/]*)\.parquet$', 1)"


# Statements a query may consist of: SELECT (with SHOW, DESCRIBE, SUMMARIZE) and EXPLAIN.
READ_STATEMENTS = frozenset({duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN})


class QueryError(StoreError):
    """The SQL could not run against the store; the message says why."""


def query(root: str, sql: str) -> pd.DataFrame:
    """Run ``sql`` against the store at ``root`` (a local path) and return the result."""
    store = ResultStore(root)
    if not store.is_local:
        raise QueryError(f"results store {root}: SQL queries of remote stores (URIs) are not "
                         "supported by query yet; copy the store to a local folder first")
    store.check_intact()  # every damaged file named at once, before DuckDB reads any
    con = duckdb.connect(":memory:")
    try:
        con.execute("SET TimeZone = 'UTC'")  # timestamps come back as stored, not local time
        tables = _create_views(con, store)
        _check_read_only(con, sql, root)
        return _run(con, sql, root, tables)
    finally:
        con.close()


def _read_only_connection(con: duckdb.DuckDBPyConnection, files: list[str]) -> None:
    """No file access but reading the store's committed files; settings locked.

    A query cannot write anywhere else (COPY ... TO, ATTACH, EXPORT), read files outside
    the store's tables, load extensions, or turn this off again. Writing over an allowed
    file is still possible to DuckDB, which is why only reading statements run at all
    (:func:`_check_read_only`).
    """
    con.execute("SET allowed_paths = [" + ", ".join(_literal(f) for f in files) + "]")
    con.execute("SET enable_external_access = false")
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET lock_configuration = true")


def _check_read_only(con: duckdb.DuckDBPyConnection, sql: str, root: str) -> None:
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryError(f"query against results store {root} failed: {exc}") from exc
    for st in statements:
        if st.type not in READ_STATEMENTS:
            kind = str(st.type).rsplit(".", 1)[-1]
            raise QueryError(f"sweep query only reads: a {kind} statement is refused (results store "
                             f"{root} is changed only by sweep run, resume and compact)")


def _create_views(con: duckdb.DuckDBPyConnection, store: ResultStore) -> list[str]:
    files = {table: store.files(table) for table in store.table_names()}
    _read_only_connection(con, [f for fs in files.values() for f in fs])
    trials = files.get(TRIALS, [])
    # Other tables keep the rows of one write per network (ResultStore.read_table's rule,
    # sweep.store.rows.rows_of_latest_packs), when both sides know the network.
    latest = _latest_sql(trials) if trials and "network_id" in store.columns(TRIALS) else None
    tables = []
    for table, paths in files.items():
        if not paths:
            continue
        if table == TRIALS:
            sql = f"SELECT * EXCLUDE ({_FILE_COL}) FROM ({_latest_rows_sql(paths)})"
        elif latest is not None and "network_id" in store.columns(table):
            # Per network: the rows of its latest write when that write has any, else those of
            # the latest write here that holds trials rows of it, else all.
            sql = (f"WITH latest AS ({latest}), every AS ({_writes_sql(trials)}), "
                   f"src AS (SELECT *, {_stem_sql(_FILE_COL)} AS __stem FROM {_source(paths)}), "
                   f"chosen AS (SELECT s.grid, s.network_id, s.__stem AS stem FROM (SELECT DISTINCT grid, network_id, "
                   f"__stem FROM src) s JOIN every e ON e.grid = s.grid AND e.network_id = s.network_id "
                   f"AND e.stem = s.__stem LEFT JOIN latest l ON l.grid = s.grid AND l.network_id = s.network_id "
                   f"AND l.stem = s.__stem QUALIFY row_number() OVER (PARTITION BY s.grid, s.network_id ORDER BY "
                   f"l.stem IS NOT NULL DESC, regexp_extract(s.__stem, '-([^-]*)$', 1) DESC) = 1) "
                   f"SELECT r.* EXCLUDE ({_FILE_COL}, __stem) FROM src r WHERE r.network_id IS NULL "
                   f"OR EXISTS (SELECT 1 FROM chosen c WHERE c.grid = r.grid AND c.network_id = r.network_id "
                   f"AND c.stem = r.__stem) OR NOT EXISTS (SELECT 1 FROM chosen c WHERE c.grid = r.grid "
                   f"AND c.network_id = r.network_id)")
        else:
            sql = f"SELECT * EXCLUDE ({_FILE_COL}) FROM {_source(paths)}"
        con.execute(f'CREATE VIEW "{table}" AS {sql}')
        tables.append(table)
    return tables


def _source(files: list[str]) -> str:
    listing = ", ".join(_literal(f) for f in files)
    return (f"read_parquet([{listing}], hive_partitioning = true, union_by_name = true, "
            f"hive_types = {{'grid': VARCHAR}}, filename = '{_FILE_COL}')")


def _latest_rows_sql(trial_files: list[str]) -> str:
    """The latest row per (grid, trial_id), with its source file."""
    return (f"SELECT * FROM {_source(trial_files)} QUALIFY row_number() OVER (PARTITION BY grid, trial_id "
            f"ORDER BY created_at DESC NULLS LAST, {_ATTEMPT_SQL} DESC) = 1")


def _latest_sql(trial_files: list[str]) -> str:
    return (f"SELECT DISTINCT grid, network_id, {_stem_sql(_FILE_COL)} AS stem "
            f"FROM ({_latest_rows_sql(trial_files)})")


def _writes_sql(trial_files: list[str]) -> str:
    """Every (grid, network, write) that has trials rows."""
    return f"SELECT DISTINCT grid, network_id, {_stem_sql(_FILE_COL)} AS stem FROM {_source(trial_files)}"


def _stem_sql(column: str) -> str:
    return rf"regexp_extract({column}, '([^/]*)\.parquet$', 1)"


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _run(con: duckdb.DuckDBPyConnection, sql: str, root: str, tables: list[str]) -> pd.DataFrame:
    try:
        relation = con.sql(sql)
        # Statements without a result (SET, CREATE ...) give None.
        return pd.DataFrame() if relation is None else relation.df()
    except duckdb.CatalogException as exc:
        available = ", ".join(tables) if tables else "(none: the store is empty)"
        raise QueryError(f"{_first_line(exc)}; tables in results store {root}: {available}") from exc
    except duckdb.Error as exc:
        raise QueryError(f"query against results store {root} failed: {exc}") from exc


def _first_line(exc: BaseException) -> str:
    # DuckDB appends "Did you mean ..." with a system table; the table list is more useful.
    return str(exc).strip().splitlines()[0]


def format_result(df: pd.DataFrame, fmt: Format = "table") -> str:
    """Render a query result as aligned plain text, CSV or a JSON list of records."""
    if fmt == "table":
        if df.empty:
            header = "  ".join(str(c) for c in df.columns)
            return (header + "\n" if header else "") + "(0 rows)"
        return df.to_string(index=False)
    if fmt == "csv":
        return df.to_csv(index=False)
    if fmt == "json":
        # Through pandas' encoder (timestamps, numpy scalars and arrays), then pretty.
        records = json.loads(df.to_json(orient="records", date_format="iso", date_unit="us"))
        return json.dumps(records, indent=2)
    raise ValueError(f"unknown format {fmt!r}: expected table, csv or json")
