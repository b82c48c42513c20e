"""Run a grid's packs one after another in this process, without Ray.

Floor: sweep.local, a runner (imports sweep.prepare and everything below it; never
Ray). For a single GPU box (or a machine without Ray): the same checks, store, plan and
resume semantics as ``sweep run``; packs are trained in repeat-major order, so a run
cut short (``max_packs``, ``max_seconds``, a kill) leaves whole repeats but for the
last pack's. The same spec on the same device gives the same numbers as ``sweep run``:
the same packs (``sweep.prepare.plan_for``, sized for the grid's share of the GPU) and
the same torch thread count (``sweep.prepare.pack_threads``, from ``resources.cpu`` or
``--cpus-per-pack``, never the machine's core count). Ctrl-C ends it as it ends ``sweep
run``: one line saying how many networks this run stored, exit status 130. SIGTERM (a
SLURM time limit or preemption: ``sweep submit``) ends it the same way, after the running
pack has saved its checkpoint (``workers.preemption``). Each pack's
phases are logged, and ``progress`` hears what ``sweep run``'s bar hears (networks done,
the running pack pro rata of its expected work: ``sweep.prepare.ProgressFn``), both from
one listener of the pack's monitor (``workers.monitor``). Needs only torch, numpy,
pyarrow, pandas and pyyaml:

    python -m sweep.local grids/buda_mnist.yaml --store results/buda_mnist --device cuda \\
        --precision bf16 --max-seconds 3000
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator

import torch

from sweep.core.errors import UserError
from sweep.core.grid import Grid, load_grid
from sweep.core.numerics import Kernels, Precision
from sweep.core.plan import Pack
from sweep.prepare import (
    ProgressFn,
    check_numerics,
    pack_memory_bytes,
    pack_resources,
    pack_threads,
    plan_for,
    preflight,
)
from sweep.store.results import ResultStore
from workers.devices import resolve_device
from workers.monitor import PackEvent, PackListener
from workers.pack_work import Phase
from workers.preemption import Preempted, sigterm_stops, stop_requested
from workers.run_pack import run_pack

log = logging.getLogger(__name__)

INTERRUPTED_EXIT = 130  # as `sweep run` (sweep.cli.main): 128 + SIGINT


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped :func:`run_local`; ``stored``: networks of this run in the store,
    read back from it (a pack cut short stores nothing), ``in_store`` of ``total``."""

    def __init__(self, stored: int, in_store: int, total: int) -> None:
        super().__init__(f"interrupted: {stored} networks stored by this run")
        self.stored, self.in_store, self.total = stored, in_store, total


class _PackLog(PackListener):
    """Logs each phase of the running pack and tells ``progress`` the networks done, the
    running pack counted pro rata of the fraction of its expected work."""

    def __init__(self, packs: list[Pack], done: int, total: int, progress: ProgressFn | None) -> None:
        self.packs, self.done, self.total, self.progress = packs, done, total, progress
        self.index = 0  # the running pack

    def on_phase(self, event: PackEvent) -> None:
        # SIGTERM (workers.preemption): stop before this pack loads or trains anything; later
        # phases go on (the engine stops the next stage at its first checkpoint).
        if stop_requested() and event.phase in (Phase.LOADING, Phase.TRAINING):
            raise Preempted(f"SIGTERM: pack {self.index + 1} stopped as it began {event.phase}")
        log.info("pack %d/%d: %s (%.0f %% of the pack)", self.index + 1, len(self.packs), event.phase,
                 100 * event.fraction)
        self.on_iteration(event)

    def on_iteration(self, event: PackEvent) -> None:
        if self.progress:
            self.progress(self.done + event.fraction * len(self.packs[self.index].stored_specs), self.total,
                          f"1 {event.phase}")

    def pack_stored(self, networks: int) -> None:
        self.done += networks
        if self.progress:
            self.progress(self.done, self.total, "")


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_local(grid: Grid, store_root: str, *, device: str | None = None, data_dir: str | None = None,
              max_networks: int = 0, precision: str = "fp32", kernels: str = "auto", max_packs: int = 0,
              max_seconds: float = 0.0, cpus_per_pack: float | None = None,
              progress: ProgressFn | None = None) -> tuple[int, int, float]:
    """Train what the store lacks; returns (networks trained, networks failed, seconds).

    ``max_packs`` / ``max_seconds`` (0: no limit) stop before starting another pack; a
    started pack always finishes and is stored. ``cpus_per_pack`` (None: the grid's
    ``resources.cpu``) sets torch's thread count, as ``sweep run --cpus-per-pack`` does;
    the process's own count is restored on return. ``progress``: as ``sweep run``'s
    (module doc). Ctrl-C raises :class:`Interrupted`.
    """
    t0 = time.perf_counter()
    cpu, _ = pack_resources(grid, cpus_per_pack, None)
    store = ResultStore(store_root)
    dev = resolve_device(device)  # a missing GPU fails here, before anything is written
    check_numerics(grid, precision, kernels, dev.type)
    datasets = preflight(grid, store, data_dir)  # loaded once for all packs
    store.save_grid(grid)
    memory = None
    if dev.type == "cuda":  # the driver's rule: the pack's share of the GPU, so the packs are the same
        total = torch.cuda.get_device_properties(dev).total_memory
        memory = pack_memory_bytes(grid.gpu_per_pack if grid.gpu_per_pack > 0 else 1.0, total / 2**30)
    packs, n_done = plan_for(grid, store, max_networks, dev.type, memory)
    if any(len(p.specs) == 1 and p.specs[0].lr_search is not None for p in packs):
        # Only Ray Tune's ASHA stops one-network trials (sweep.driver); here each trains to the end.
        log.warning("packs of one network cannot halve an lr search without Ray Tune: every candidate of "
                    "those packs trains to the end (use `sweep run`, or larger packs)")
    trained = failed = 0
    listener = _PackLog(packs, n_done, grid.trained_networks, progress)
    if progress:
        progress(n_done, grid.trained_networks, "")
    threads = torch.get_num_threads()
    torch.set_num_threads(pack_threads(cpu))
    try:
        for i, pack in enumerate(packs):
            if (max_packs and i >= max_packs) or (max_seconds and time.perf_counter() - t0 >= max_seconds):
                log.info("stopping after %d of %d packs (limit reached); run again to continue", i, len(packs))
                break
            if stop_requested():
                raise Preempted(f"SIGTERM: stopped before pack {i + 1} of {len(packs)}")
            listener.index = i
            result = run_pack(pack, store, device=str(dev), grid_hash=grid.file_hash,
                              precision=precision, kernels=kernels,  # type: ignore[arg-type]
                              dataset=datasets[pack.specs[0].dataset], listeners=[listener])
            if result.skipped:
                log.info("pack %d/%d: skipped (another runner holds it or has stored it)", i + 1, len(packs))
                continue
            trained += result.networks - result.failed
            failed += result.failed
            n_done += result.networks
            log.info("pack %d/%d: %d networks in %.0f s (%d of %d networks of %s stored)", i + 1, len(packs),
                     result.networks, result.seconds, n_done, grid.trained_networks, grid.name)
            listener.pack_stored(result.networks)
    except KeyboardInterrupt:
        # What this run really stored, read back: never what it meant to (as sweep.driver).
        # A second Ctrl-C must not cut the count short.
        with _sigint_ignored():
            in_store = store.completed_network_ids(grid=grid.name)
        planned = {s.network_id for p in packs for s in p.stored_specs}
        raise Interrupted(len(planned & in_store), sum(1 for s in grid.specs if s.network_id in in_store),
                          grid.trained_networks) from None
    finally:
        torch.set_num_threads(threads)
    return trained, failed, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sweep.local", description=__doc__.split("\n\n")[0])
    ap.add_argument("grid", help="grid file")
    ap.add_argument("--store", required=True, help="results store folder")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--precision", default=Precision.FP32.value, choices=Precision.values())
    ap.add_argument("--kernels", default=Kernels.AUTO.value, choices=Kernels.values(),
                    help="auto: LeNet-5 on CUDA in bf16 trains on the fused Triton kernels; grouped: never")
    ap.add_argument("--max-networks", type=int, default=0, help="networks per pack (0: grid's, else device's)")
    ap.add_argument("--cpus-per-pack", type=float, default=None,
                    help="torch threads per pack, as `sweep run --cpus-per-pack` (default: the grid's resources.cpu)")
    ap.add_argument("--max-packs", type=int, default=0, help="stop after this many packs (0: all)")
    ap.add_argument("--max-seconds", type=float, default=0.0, help="start no pack after this long (0: no limit)")
    a = ap.parse_args(argv)
    if min(a.max_networks, a.max_packs, a.max_seconds) < 0:
        ap.error("--max-networks, --max-packs and --max-seconds cannot be negative")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        grid = load_grid(a.grid)
        resolve_device(a.device)  # RuntimeError: no CUDA here
        with sigterm_stops():  # SIGTERM: the running pack checkpoints, then as Ctrl-C
            trained, failed, seconds = run_local(
                grid, a.store, device=a.device, data_dir=a.data_dir, max_networks=a.max_networks,
                precision=a.precision, kernels=a.kernels, max_packs=a.max_packs, max_seconds=a.max_seconds,
                cpus_per_pack=a.cpus_per_pack)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        if isinstance(e, Interrupted):
            print(f"interrupted: {e.stored} networks stored by this run ({e.in_store} of {e.total} networks of "
                  f"{grid.name} in the store); the same command continues", file=sys.stderr)
        else:  # while checking the grid, store or data
            print("interrupted before the first pack: 0 networks stored by this run", file=sys.stderr)
        return INTERRUPTED_EXIT
    print(f"{grid.name}: {trained} networks trained, {failed} failed, in {seconds:.0f} s; results in {a.store}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
