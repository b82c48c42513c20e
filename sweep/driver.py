"""The Ray Tune driver: one Tune trial per pack.

Embedded local Ray by default; an existing cluster with ``address`` (or
``RAY_ADDRESS``). The store's completed trial ids are the source of truth: a re-run
or ``resume`` plans packs only for networks not yet stored, so nothing finished is
trained again. Ray is imported lazily: expanding, querying and the worker never
need it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sweep.grid import Grid
from sweep.plan import Pack, default_pack_size, plan_packs
from sweep.store import ResultStore

log = logging.getLogger(__name__)

REPORT_INTERVAL_SECONDS = 5.0
MAX_RAY_TEMP_DIR_CHARS = 48
CLEANUP_MIN_AGE_SECONDS = 3600.0  # leftovers older than any pack write  # progress reports from a running pack to the driver


class SweepError(RuntimeError):
    """A sweep cannot start or did not finish; the message says why."""


@dataclass(frozen=True)
class RunOptions:
    address: str | None = None  # Ray cluster address; None: RAY_ADDRESS or embedded
    cpus_per_pack: float | None = None  # None: the grid's resources.cpu
    gpus_per_pack: float | None = None  # None: the grid's resources.gpu
    max_concurrent: int = 0  # packs running at once (0: as many as resources allow)
    max_networks: int = 0  # per pack (0: the grid's, else sized for the device)
    data_dir: str | None = None
    device: str | None = None  # worker device; None: cuda when the pack has a GPU
    precision: str = "fp32"
    retries: int = 2  # Ray Tune retries of a failed pack
    num_cpus: int | None = None  # embedded Ray only: CPUs it may use
    ray_temp_dir: str | None = None  # embedded Ray only


@dataclass(frozen=True)
class SweepSummary:
    total_networks: int
    already_done: int
    trained: int
    failed: int
    packs: int
    seconds: float


ProgressFn = Callable[[int, int], None]  # (networks done, networks total)


def plan_for(grid: Grid, store: ResultStore, max_networks: int = 0, device: str = "cpu") -> tuple[list[Pack], int]:
    """Packs for the grid's networks that the store does not hold yet, and how many it holds."""
    # Per grid: a grid's results stay complete on their own even if another grid shares networks.
    done = store.completed_network_ids(grid=grid.name)
    size = max_networks or grid.max_networks_per_pack or default_pack_size(device)
    packs = plan_packs(grid.specs, size, done)
    return packs, sum(1 for s in grid.specs if s.network_id in done)


def preflight(grid: Grid, store: ResultStore, data_dir: str | None) -> None:
    """Everything that must hold before any pack starts; raises with a clear message."""
    store.check_writable()
    from workers.datasets import load_dataset

    for name in sorted({s.dataset for s in grid.specs}):
        load_dataset(name, data_dir)  # DatasetNotFound names where it looked


def run_sweep(grid: Grid, store_root: str, options: RunOptions = RunOptions(),
              progress: ProgressFn | None = None) -> SweepSummary:
    t0 = time.perf_counter()
    store = ResultStore(store_root)
    preflight(grid, store, options.data_dir)
    # Readers already ignore uncommitted files; only old ones are removed, so a second sweep
    # writing to the same store is never disturbed mid-write.
    store.cleanup_uncommitted(min_age_s=CLEANUP_MIN_AGE_SECONDS)
    store.save_grid(grid)
    cpu = grid.cpu_per_pack if options.cpus_per_pack is None else options.cpus_per_pack
    gpu = grid.gpu_per_pack if options.gpus_per_pack is None else options.gpus_per_pack
    packs, done = plan_for(grid, store, options.max_networks, "cuda" if gpu > 0 else "cpu")
    total = grid.trained_networks
    if progress:
        progress(done, total)
    if not packs:
        return SweepSummary(total, done, 0, 0, 0, time.perf_counter() - t0)

    # Quiet by default: Tune's own progress tables would drown the progress bar.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import ray
    from ray import tune

    _init_ray(options, cpu, gpu)
    try:
        _check_resources(cpu, gpu)
        trainable = tune.with_resources(
            tune.with_parameters(
                _pack_trainable,
                packs=[p.to_dict() for p in packs],
                store_root=store.root,
                grid_hash=grid.file_hash,
                data_dir=options.data_dir,
                device=options.device or ("cuda" if gpu > 0 else "cpu"),
                precision=options.precision,
                threads=max(1, int(cpu)),
            ),
            {"cpu": cpu, "gpu": gpu},
        )
        callback = _ProgressCallback(packs, done, total, progress)
        tuner = tune.Tuner(
            trainable,
            param_space={"pack": tune.grid_search(list(range(len(packs))))},
            tune_config=tune.TuneConfig(max_concurrent_trials=options.max_concurrent or None),
            run_config=tune.RunConfig(
                name=f"sweep-{grid.name}",
                storage_path=os.path.abspath(os.path.join(store.root, "_ray")),
                failure_config=tune.FailureConfig(max_failures=options.retries),
                verbose=0,
                callbacks=[callback],
            ),
        )
        results = tuner.fit()
        failed_packs = [packs[r.config["pack"]] for r in results if r.error is not None]
        errors = {packs[r.config["pack"]].pack_id: str(r.error) for r in results if r.error is not None}
    finally:
        if options.address is None and not os.environ.get("RAY_ADDRESS"):
            ray.shutdown()
    failed = 0
    for p in failed_packs:
        store.record_failure(p, errors[p.pack_id], grid.name)
        failed += len(p.stored_specs)
    return SweepSummary(total, done, sum(len(p.stored_specs) for p in packs) - failed, failed,
                        len(packs), time.perf_counter() - t0)


def _pack_trainable(config: dict[str, Any], packs: list[dict], store_root: str, grid_hash: str,
                    data_dir: str | None, device: str, precision: str, threads: int) -> dict[str, Any]:
    """The Ray Tune trainable: a thin wrapper around ``workers.run_pack``."""
    import torch
    from ray import tune

    torch.set_num_threads(threads)  # the pack's CPU share; more threads only contend

    from workers.run_pack import run_pack

    pack = Pack.from_dict(packs[config["pack"]])
    last = [0.0]

    def report(fraction: float) -> None:
        now = time.monotonic()
        if now - last[0] >= REPORT_INTERVAL_SECONDS:
            last[0] = now
            tune.report({"fraction": fraction, "networks_done": 0})

    result = run_pack(pack, store_root, device=device, data_dir=data_dir, grid_hash=grid_hash,
                      precision=precision, progress=report)
    return {"fraction": 1.0, "networks_done": result.networks, "diverged": result.diverged,
            "failed": result.failed, "seconds": result.seconds}


def _init_ray(options: RunOptions, cpu: float, gpu: float) -> None:
    import ray

    address = options.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING,
                              "include_dashboard": False, "ignore_reinit_error": True}
    if address:
        ray.init(address=address, **kwargs)
        return
    if options.num_cpus:
        kwargs["num_cpus"] = options.num_cpus
    if options.ray_temp_dir:
        temp = os.path.abspath(options.ray_temp_dir)
        # Ray puts Unix sockets under session_<date>_<pid>/sockets/: 107 bytes at most.
        if len(temp) > MAX_RAY_TEMP_DIR_CHARS:
            raise SweepError(f"--ray-temp-dir {temp} is too long ({len(temp)} characters) for Ray's "
                             f"Unix sockets; use a path of at most {MAX_RAY_TEMP_DIR_CHARS} characters")
        kwargs["_temp_dir"] = temp
    ray.init(**kwargs)


def _check_resources(cpu: float, gpu: float) -> None:
    """Refuse packs that no node of the cluster could ever run (Tune would wait forever)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    fits = any(n["Resources"].get("CPU", 0) >= cpu and n["Resources"].get("GPU", 0) >= gpu for n in nodes)
    if not fits:
        have = [(n["Resources"].get("CPU", 0), n["Resources"].get("GPU", 0)) for n in nodes]
        raise SweepError(f"no Ray node can provide {cpu} CPU and {gpu} GPU per pack "
                         f"(nodes have (CPU, GPU): {have}); lower --cpus-per-pack/--gpus-per-pack")


class _ProgressCallback:
    """Turns Tune's trial events into (networks done, total) for a progress bar."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        from ray.tune import Callback

        class _Impl(Callback):
            def __init__(self, packs: list[Pack], done: int, total: int, fn: ProgressFn | None) -> None:
                self.sizes = [len(p.stored_specs) for p in packs]
                self.done, self.total, self.fn = done, total, fn

            def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
                self.done += self.sizes[trial.config["pack"]]
                if self.fn:
                    self.fn(self.done, self.total)

        return _Impl(*args, **kwargs)
