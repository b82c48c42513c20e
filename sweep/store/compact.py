"""Compaction: a store's committed rows rewritten as one file per table and grid.

Floor: sweep.store (where results live; imports sweep.core only, no torch).

A sweep writes one file per pack and table, so a 22,500-network grid leaves hundreds
of small files; reading them is slower than reading one, and a machine that can only
hand back a few files (a lent GPU box) cannot return them. ``compact_store`` copies the
committed, deduplicated rows (the latest row per trial, as every reader sees them) and
the saved grid files into a new store with the same layout, so ``sweep query``,
``sweep report``, ``sweep status`` and ``sweep resume`` work on it unchanged. Columns
named in ``drop`` (e.g. ``spec_json``, most of the bytes of ``trials``) are left out.
"""

from __future__ import annotations

from collections.abc import Sequence

from sweep.store.results import TRIALS, ResultStore, StoreError

COMPACT_PACK_ID = "compacted"


def compact_store(source: str, target: str, tables: Sequence[str] | None = None,
                  drop: Sequence[str] = ()) -> dict[str, int]:
    """Copy ``tables`` (default: all) of ``source`` into the new store ``target``.

    Returns the number of rows written per table. ``target`` must hold no tables yet:
    compaction never mixes with or replaces stored results. ``trials`` is always
    copied (completed ids and the dedupe of every other table are read from it).
    """
    src, dst = ResultStore(source), ResultStore(target)
    names = src.table_names()
    if not names:
        raise StoreError(f"results store {source}: nothing to compact (no committed tables)")
    unknown = sorted(set(tables or ()) - set(names))
    if unknown:
        raise StoreError(f"results store {source} has no table(s) {', '.join(unknown)}; it has {', '.join(names)}")
    chosen = [t for t in names if tables is None or t in tables or t == TRIALS]
    dst.check_writable()
    if dst.table_names():
        raise StoreError(f"results store {target} already holds tables; compact into a new folder")
    rows = {t: 0 for t in chosen}
    for grid in sorted(set(src.read_table(TRIALS, columns=["grid"])["grid"])):
        data = {}
        for t in chosen:
            frame = src.read_table(t, filters=[("grid", "==", grid)])
            data[t] = frame.drop(columns=[c for c in (*drop, "grid") if c in frame.columns])
            rows[t] += len(frame)
        dst.write_pack(COMPACT_PACK_ID, grid, data)
    for grid in src.saved_grids():
        dst.save_grid(grid)
    return rows
