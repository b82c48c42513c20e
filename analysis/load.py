"""Loading the results store into pandas: the only way analysis reads results.

Floor: analysis (imports sweep.core and sweep.store only). Everything in ``analysis``
reads committed packs through :class:`Results` (or :func:`load`, one table at a time), so every
figure sees the same deduplicated rows that ``sweep query`` sees.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from sweep.core.grid import Grid
from sweep.store.results import ResultStore
from sweep.store.rows import Filters
from sweep.store.schema import TRIALS


class Results:
    """Read-only access to one store's tables and saved grids."""

    def __init__(self, root: str) -> None:
        self._store = ResultStore(root)

    @property
    def root(self) -> str:
        return self._store.root

    def has(self, table: str) -> bool:
        return table in self._store.table_names()

    def table_names(self) -> list[str]:
        return self._store.table_names()

    def table(self, name: str = TRIALS, columns: Sequence[str] | None = None,
              filters: Filters = None) -> pd.DataFrame:
        """One table (``trials`` deduplicated: the latest row per grid and trial)."""
        return self._store.read_table(name, columns=columns, filters=filters)

    def saved_grids(self) -> list[Grid]:
        """The grid files the store's sweeps were run from, expanded."""
        return self._store.saved_grids()


def load(
    root: str,
    table: str = TRIALS,
    columns: Sequence[str] | None = None,
    filters: Filters = None,
) -> pd.DataFrame:
    """One table of the store (``trials`` deduplicated: latest row per grid and trial)."""
    return Results(root).table(table, columns=columns, filters=filters)
