"""Run a grid's packs one after another in this process, without Ray.

Floor: sweep.local, a runner (imports sweep.prepare and everything below it; never
Ray). For a single GPU box (or a machine without Ray): the same checks, store, plan and
resume semantics as ``sweep run``; packs are trained in repeat-major order, so a run
cut short (``max_packs``, ``max_seconds``, a kill) leaves whole repeats but for the
last pack's. Needs only torch, numpy, pyarrow, pandas and pyyaml:

    python -m sweep.local grids/buda_mnist.yaml --store results/buda_mnist --device cuda \\
        --precision bf16 --max-seconds 3000
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable

import torch

from sweep.core.catalog import KERNELS, PRECISIONS
from sweep.core.errors import UserError
from sweep.core.grid import Grid, load_grid
from sweep.prepare import check_kernels, plan_for, preflight
from sweep.store.results import ResultStore
from workers.devices import resolve_device
from workers.run_pack import run_pack

log = logging.getLogger(__name__)


def run_local(grid: Grid, store_root: str, *, device: str | None = None, data_dir: str | None = None,
              max_networks: int = 0, precision: str = "fp32", kernels: str = "auto", max_packs: int = 0,
              max_seconds: float = 0.0,
              progress: Callable[[int, int], None] | None = None) -> tuple[int, int, float]:
    """Train what the store lacks; returns (networks trained, networks failed, seconds).

    ``max_packs`` / ``max_seconds`` (0: no limit) stop before starting another pack; a
    started pack always finishes and is stored.
    """
    t0 = time.perf_counter()
    store = ResultStore(store_root)
    dev = resolve_device(device)  # a missing GPU fails here, before anything is written
    check_kernels(grid, kernels, dev.type)
    datasets = preflight(grid, store, data_dir)  # loaded once for all packs
    store.save_grid(grid)
    memory = torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else None
    packs, n_done = plan_for(grid, store, max_networks, dev.type, memory)
    trained = failed = 0
    if progress:
        progress(n_done, grid.trained_networks)
    for i, pack in enumerate(packs):
        if (max_packs and i >= max_packs) or (max_seconds and time.perf_counter() - t0 >= max_seconds):
            log.info("stopping after %d of %d packs (limit reached); run again to continue", i, len(packs))
            break
        result = run_pack(pack, store, device=str(dev), grid_hash=grid.file_hash, precision=precision,  # type: ignore[arg-type]
                          kernels=kernels,  # type: ignore[arg-type]
                          dataset=datasets[pack.specs[0].dataset])
        if result.skipped:
            log.info("pack %d/%d: skipped (another runner holds it or has stored it)", i + 1, len(packs))
            continue
        trained += result.networks - result.failed
        failed += result.failed
        n_done += result.networks
        log.info("pack %d/%d: %d networks in %.0f s", i + 1, len(packs), result.networks, result.seconds)
        if progress:
            progress(n_done, grid.trained_networks)
    return trained, failed, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sweep.local", description=__doc__.split("\n\n")[0])
    ap.add_argument("grid", help="grid file")
    ap.add_argument("--store", required=True, help="results store folder")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--precision", default="fp32", choices=PRECISIONS)
    ap.add_argument("--kernels", default="auto", choices=KERNELS,
                    help="auto: LeNet-5 on CUDA in bf16 trains on the fused Triton kernels; grouped: never")
    ap.add_argument("--max-networks", type=int, default=0, help="networks per pack (0: grid's, else device's)")
    ap.add_argument("--max-packs", type=int, default=0, help="stop after this many packs (0: all)")
    ap.add_argument("--max-seconds", type=float, default=0.0, help="start no pack after this long (0: no limit)")
    a = ap.parse_args(argv)
    if min(a.max_networks, a.max_packs, a.max_seconds) < 0:
        ap.error("--max-networks, --max-packs and --max-seconds cannot be negative")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        grid = load_grid(a.grid)
        resolve_device(a.device)  # RuntimeError: no CUDA here
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        trained, failed, seconds = run_local(
            grid, a.store, device=a.device, data_dir=a.data_dir, max_networks=a.max_networks,
            precision=a.precision, kernels=a.kernels, max_packs=a.max_packs, max_seconds=a.max_seconds,
            progress=lambda done, total: log.info("%d of %d networks stored", done, total))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{grid.name}: {trained} networks trained, {failed} failed, in {seconds:.0f} s; results in {a.store}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
