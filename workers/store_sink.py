"""What a pack run needs of a results store: the :class:`StoreSink` protocol.

Floor: workers (imports sweep.store's ResultStore only to open a path). A pack writes
its rows through :meth:`StoreSink.write_pack`, asks which networks are stored already,
and, on a local filesystem only, holds a lease (``lease_dir``) and saves checkpoints
under ``base_path``. :class:`sweep.store.results.ResultStore` implements it.

One rule for "local": a sink is local when its ``is_local`` says so; nothing here or in
``workers.checkpoint`` guesses a default. Leases and checkpoints need a local path (file
locks by hard link, ``torch.save``), so a sink that is not local gets neither.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from sweep.store.results import ResultStore


@runtime_checkable
class StoreSink(Protocol):
    """Where a pack's rows go (``sweep.store.results.ResultStore`` is one)."""

    @property
    def is_local(self) -> bool:
        """The store is a folder of this machine's filesystem (leases and checkpoints)."""
        ...

    @property
    def base_path(self) -> str:
        """The root as a path of the store's filesystem (absolute when local)."""
        ...

    def lease_dir(self) -> str:
        """Where the packs' leases live (``sweep.store.leases``); local stores only."""
        ...

    def completed_network_ids(self, statuses: Any = ..., grid: str | None = None) -> set[str]:
        """Networks stored with a completed status (in ``grid``, if given)."""
        ...

    def write_pack(self, pack_id: str, grid: str, tables: Mapping[str, Any]) -> None:
        """Store one pack's tables atomically (all or nothing)."""
        ...


_MEMBERS = ("is_local", "base_path", "lease_dir", "completed_network_ids", "write_pack")


def as_sink(store: StoreSink | str | os.PathLike[str] | None) -> StoreSink | None:
    """``store`` as a sink: a path opens a :class:`ResultStore`, None stays None (rows are
    only returned), and anything else must implement :class:`StoreSink`.

    Raises TypeError naming the type and what it lacks, so a wrong argument fails before
    any data is loaded, not after minutes of training when the rows are written.
    """
    if store is None or isinstance(store, StoreSink):
        return store
    if isinstance(store, (str, os.PathLike)):
        return ResultStore(os.fspath(store))
    missing = [m for m in _MEMBERS if not hasattr(store, m)]
    raise TypeError(f"store must be a ResultStore (or a StoreSink), a path or None; got {type(store).__name__}"
                    + (f", which lacks {', '.join(missing)}" if missing else ""))
