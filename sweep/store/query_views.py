"""The views ``sweep query`` runs SQL against: one per table of a results store over its
committed files (``trials`` deduplicated), and ``rungs``, the rung ladder of learning-rate
searches with early stopping. DuckDB never sees a path: pyarrow streams the rows.

Floor: sweep.store (where results live; imports sweep.core only, no torch).

The ``trials`` view keeps the latest row per (grid, trial_id), exactly as
:meth:`ResultStore.read_table` does; every other table keeps the rows of the pack write
whose trials rows are the latest for their network.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from sweep.store import paths as store_paths
from sweep.store.results import TRIALS, ResultStore, StoreError
from sweep.store.schema import PARTITION

RUNGS = "rungs"  # a view over trials: the rung ladder of lr searches with early stopping
RAW_PREFIX = "__raw_"  # the registered datasets the views read: every committed row, not deduplicated
_FILE_COL = "__store_file"  # the <pack_id>-<attempt> stem of a row's file
# The attempt token of a stem <pack_id>-<attempt>: the later-written file wins a created_at
# tie, as in sweep.store.rows.latest_rows.
_ATTEMPT_SQL = rf"regexp_extract({_FILE_COL}, '-([^-]*)$', 1)"


class QueryError(StoreError):
    """The SQL could not run against the store; the message says why."""


def first_line(exc: BaseException) -> str:
    # DuckDB appends "Did you mean ..." with a system table; the table list is more useful.
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def register_views(con: duckdb.DuckDBPyConnection, store: ResultStore) -> list[str]:
    """One lazy pyarrow dataset per table, registered as ``__raw_<table>``, and the view
    ``<table>`` over it, plus ``rungs`` where there are trials: DuckDB reads the rows pyarrow
    streams, never a path. Returns the views' names."""
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
                         f"(incompatible column types or unreadable file): {first_line(exc)}") from exc
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
