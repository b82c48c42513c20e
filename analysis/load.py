"""Loading the results store into pandas: the only way analysis reads results."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from sweep.store import TRIALS, Filters, ResultStore


def load(
    root: str,
    table: str = TRIALS,
    columns: Sequence[str] | None = None,
    filters: Filters = None,
) -> pd.DataFrame:
    """One table of the store (``trials`` deduplicated: latest row per grid and trial)."""
    return ResultStore(root).read_table(table, columns=columns, filters=filters)


def load_all(root: str) -> dict[str, pd.DataFrame]:
    """Every table in the store, by name."""
    store = ResultStore(root)
    return {name: store.read_table(name) for name in store.table_names()}
