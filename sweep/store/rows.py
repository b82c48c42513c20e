"""Rows in Arrow: what the store does to a table on its way in and out.

Floor: sweep.store (pyarrow and pandas; no torch). Writes are converted to Arrow and the
``trials`` table is stamped with ``created_at``; reads of ``trials`` keep the latest row
per (grid, trial_id), the rule every reader of the store follows (sweep.store.query
spells the same rule in SQL).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Union

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from sweep.store.paths import attempt_of, stem_of
from sweep.store.schema import PARTITION, StoreError

TableData = Union[pd.DataFrame, pa.Table, Sequence[Mapping[str, Any]]]
Filters = Union[ds.Expression, Sequence[Any], None]

CREATED_AT_TYPE = pa.timestamp("us", tz="UTC")
# The (empty) trials file of a pack write that has no trial rows but other tables have rows.
MARKER_SCHEMA = pa.schema(
    [("trial_id", pa.string()), ("network_id", pa.string()), ("status", pa.string()),
     ("created_at", CREATED_AT_TYPE)]
)
FILE_COL = "__store_file"  # internal: which file a scanned row came from


def reason(exc: BaseException) -> str:
    """An exception as one line for an error message."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0] if len(text) > 300 else text


def check_columns(root: str, table: str, schema: pa.Schema, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise StoreError(
            f"results store {root}: table {table} has no column(s) {', '.join(missing)}; "
            f"it has {', '.join(schema.names)}"
        )


def to_arrow(name: str, data: TableData) -> pa.Table:
    try:
        if isinstance(data, pa.Table):
            return data
        if isinstance(data, pa.RecordBatch):
            return pa.Table.from_batches([data])
        if isinstance(data, pd.DataFrame):
            return pa.Table.from_pandas(data, preserve_index=False)
        if isinstance(data, (list, tuple)):
            return pa.Table.from_pylist(list(data))
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise StoreError(f"table {name} cannot be converted to Arrow: {reason(exc)}") from exc
    raise TypeError(f"table {name}: expected a DataFrame, pyarrow Table or list of dicts, "
                    f"got {type(data).__name__}")


def drop_partition_column(table: pa.Table) -> pa.Table:
    # The grid is the hive partition: a copy inside the files would clash with it on read.
    if PARTITION in table.column_names:
        table = table.drop_columns([PARTITION])
    # from_pandas records the pandas index/dtypes; readers rebuild frames themselves.
    return table.replace_schema_metadata(None)


def prepare_trials(table: pa.Table | None) -> pa.Table:
    """Check the columns resume and dedupe rely on; stamp created_at when missing."""
    if table is None or (table.num_rows == 0 and "trial_id" not in table.column_names):
        return MARKER_SCHEMA.empty_table()
    if table.num_rows:
        missing = [c for c in ("trial_id", "status") if c not in table.column_names]
        if missing:
            raise ValueError(f"trials table is missing column(s) {', '.join(missing)}")
    if "created_at" not in table.column_names:
        now = _dt.datetime.now(_dt.timezone.utc)
        return table.append_column("created_at", pa.array([now] * table.num_rows, CREATED_AT_TYPE))
    created = table["created_at"]
    if pa.types.is_timestamp(created.type) and created.type != CREATED_AT_TYPE:
        # One type across files; naive timestamps are taken to be UTC.
        idx = table.column_names.index("created_at")
        table = table.set_column(idx, "created_at", created.cast(CREATED_AT_TYPE))
    return table



def filters(filters: Filters) -> tuple[ds.Expression | None, set[str] | None]:
    """The filter as an Expression and the columns it uses (None: unknown)."""
    if filters is None:
        return None, set()
    if isinstance(filters, ds.Expression):
        return filters, None
    filters = list(filters)
    if not filters:
        return None, set()
    clauses = [filters] if isinstance(filters[0], tuple) else [list(c) for c in filters]
    return pq.filters_to_expression(clauses), {t[0] for c in clauses for t in c}


def union(*groups: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(c for g in groups for c in g))


def latest_rows(table: pa.Table, keep_file: bool = False) -> pa.Table:
    """Per (grid, trial_id): the row with the latest created_at, then the latest attempt."""
    keys = pd.DataFrame({
        "grid": table["grid"].to_pandas(),
        "trial_id": table["trial_id"].to_pandas(),
        "created_at": table["created_at"].to_pandas(),
        "attempt": [attempt_of(p) for p in table[FILE_COL].to_pylist()],
    })
    ordered = keys.sort_values(["created_at", "attempt"], na_position="first", kind="stable")
    winners = ordered.drop_duplicates(["grid", "trial_id"], keep="last").index
    latest = table.take(pa.array(sorted(winners), pa.int64()))
    return latest if keep_file else latest.drop_columns([FILE_COL])


def pack_key(grid: str | None, network_id: str | None, path: str) -> str:
    """Which write of which network a row of any table belongs to: grid, network, file stem."""
    return f"{grid}\x00{network_id}\x00{stem_of(path)}"


def rows_of_latest_packs(table: pa.Table, latest_trials: pa.Table, every_trials: pa.Table) -> pa.Table:
    """The rows of ``table`` (any table but trials, with FILE_COL) from one write per network.

    That write is the one whose trials rows are the network's latest when it has rows
    here; else the latest (by attempt) of the writes here that hold trials rows of the
    network at all: the others are leftovers of an earlier or concurrent run of the same
    networks, and reading two of them would count the network twice. Networks none of
    whose writes here hold trials rows (rows added apart), and rows without a network id,
    are kept whole.
    """
    if "network_id" not in table.column_names or table.num_rows == 0:
        return table.drop_columns([FILE_COL])
    lg, ln, lf = (latest_trials[c].to_pylist() for c in ("grid", "network_id", FILE_COL))
    winners = {pack_key(g, n, f) for g, n, f in zip(lg, ln, lf)}
    eg, en, ef = (every_trials[c].to_pylist() for c in ("grid", "network_id", FILE_COL))
    with_trials = {pack_key(g, n, f) for g, n, f in zip(eg, en, ef)}
    grids, ids, paths = (table[c].to_pylist() for c in ("grid", "network_id", FILE_COL))
    keys = [pack_key(g, n, f) for g, n, f in zip(grids, ids, paths)]
    chosen: dict[str, str] = {}  # grid + network -> the write whose rows are read
    for g, n, k, f in zip(grids, ids, keys, paths):
        net = f"{g}\x00{n}"
        if k in winners:
            chosen[net] = k
        elif k in with_trials and chosen.get(net) not in winners:
            if net not in chosen or attempt_of(f) > attempt_of(chosen[net].rsplit("\x00", 1)[1]):
                chosen[net] = k
    keep = [n is None or chosen.get(f"{g}\x00{n}", k) == k for g, n, k in zip(grids, ids, keys)]
    return table.filter(pa.array(keep, pa.bool_())).drop_columns([FILE_COL])
