"""SQL over a results store with DuckDB: one view per table, ``trials`` deduplicated.

Views read only the files of committed packs (see :mod:`sweep.store`), so temporary
dot-files and the leftovers of a crashed pack never show up. The ``trials`` view keeps
the latest row per (grid, trial_id), exactly as :meth:`ResultStore.read_table` does.
"""

from __future__ import annotations

import json
from typing import Literal

import duckdb
import pandas as pd

from sweep.store import TRIALS, ResultStore, StoreError

Format = Literal["table", "csv", "json"]
_FILE_COL = "__store_file"
# The attempt token of a data file name <pack_id>-<attempt>.parquet: the later-written
# file wins a created_at tie, as in sweep.store._latest_rows.
_ATTEMPT_SQL = rf"regexp_extract({_FILE_COL}, '-([^-/]*)\.parquet$', 1)"


class QueryError(StoreError):
    """The SQL could not run against the store; the message says why."""


def query(root: str, sql: str) -> pd.DataFrame:
    """Run ``sql`` against the store at ``root`` (a local path) and return the result."""
    store = ResultStore(root)
    if not store.is_local:
        raise QueryError(f"results store {root}: SQL queries of remote stores (URIs) are not "
                         "supported by query yet; copy the store to a local folder first")
    con = duckdb.connect(":memory:")
    try:
        con.execute("SET TimeZone = 'UTC'")  # timestamps come back as stored, not local time
        tables = _create_views(con, store)
        return _run(con, sql, root, tables)
    finally:
        con.close()


def _create_views(con: duckdb.DuckDBPyConnection, store: ResultStore) -> list[str]:
    tables = []
    for table in store.table_names():
        files = store.files(table)
        if files:
            con.execute(_view_sql(table, files))
            tables.append(table)
    return tables


def _view_sql(table: str, files: list[str]) -> str:
    listing = ", ".join(_literal(f) for f in files)
    source = (
        f"read_parquet([{listing}], hive_partitioning = true, union_by_name = true, "
        f"hive_types = {{'grid': VARCHAR}}, filename = '{_FILE_COL}')"
    )
    if table != TRIALS:
        return f'CREATE VIEW "{table}" AS SELECT * EXCLUDE ({_FILE_COL}) FROM {source}'
    return (
        f'CREATE VIEW "{table}" AS SELECT * EXCLUDE ({_FILE_COL}) FROM {source} '
        f"QUALIFY row_number() OVER (PARTITION BY grid, trial_id "
        f"ORDER BY created_at DESC NULLS LAST, {_ATTEMPT_SQL} DESC) = 1"
    )


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
