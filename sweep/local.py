"""Run a grid's packs one after another in this process, without Ray.

For a single GPU box (or a machine without Ray): the same store, the same plan and
the same resume semantics as ``sweep run``; packs are trained in repeat-major
order, so a run cut short leaves whole repeats.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from sweep.grid import Grid
from sweep.plan import pack_sizer, plan_packs
from sweep.store import ResultStore

log = logging.getLogger(__name__)


def run_local(grid: Grid, store_root: str, *, device: str | None = None, data_dir: str | None = None,
              max_networks: int = 0, precision: str = "fp32", max_packs: int = 0,
              progress: Callable[[int, int], None] | None = None) -> tuple[int, int, float]:
    """Train what the store lacks; returns (networks trained, networks failed, seconds)."""
    import torch

    from workers.datasets import load_dataset
    from workers.run_pack import resolve_device, run_pack

    t0 = time.perf_counter()
    store = ResultStore(store_root)
    store.check_writable()
    for name in sorted({s.dataset for s in grid.specs}):
        load_dataset(name, data_dir)  # fail before any training, naming where it looked
    store.save_grid(grid)
    dev = resolve_device(device)
    done = store.completed_network_ids(grid=grid.name)
    memory = torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else None
    packs = plan_packs(grid.specs, pack_sizer(max_networks or grid.max_networks_per_pack, dev.type, memory), done)
    if max_packs:
        packs = packs[:max_packs]
    n_done = sum(1 for s in grid.specs if s.network_id in done)
    trained = failed = 0
    if progress:
        progress(n_done, grid.trained_networks)
    for i, pack in enumerate(packs):
        result = run_pack(pack, store, device=str(dev), data_dir=data_dir, grid_hash=grid.file_hash,
                          precision=precision)  # type: ignore[arg-type]
        trained += result.networks - result.failed
        failed += result.failed
        n_done += result.networks
        log.info("pack %d/%d: %d networks in %.0f s", i + 1, len(packs), result.networks, result.seconds)
        if progress:
            progress(n_done, grid.trained_networks)
    return trained, failed, time.perf_counter() - t0
