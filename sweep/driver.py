"""The Ray Tune driver: one Tune trial per pack.

Embedded local Ray by default; an existing cluster with ``address`` (or
``RAY_ADDRESS``), the store then on a path every node sees. Ray is imported lazily:
expanding, querying and the worker never need it.

Fault tolerance rests on the store, not on Tune's experiment state:

* **The store is the source of truth.** Every run (``sweep run`` again or ``sweep
  resume``) plans packs only for the grid's networks whose trials are not completed
  in the store, so failed, killed and never-started networks are trained, and
  nothing stored is trained again. A pack's rows are committed atomically, so a
  killed pack leaves nothing visible.
* **Retries.** A pack that raises or whose worker dies is retried by Tune
  (``FailureConfig(max_failures=retries)``). A pack that still fails is recorded with
  ``ResultStore.record_failure`` (``failed`` rows plus the error in ``failures``);
  those networks are not completed, so the next run retries them.
* **Long packs** save a checkpoint in ``<store>/_checkpoints`` every
  ``recipe.checkpoint_every`` iterations (``workers.run_pack``); a retried or re-planned
  pack with the same members continues from it (rows show ``resumed_from_iter``), and
  the checkpoint is removed once the pack's rows are stored.
* **Why not ``Tuner.restore``.** Tune's experiment state (under ``<store>/_ray``)
  describes the plan of the run that wrote it: trial ``i`` is pack ``i`` of *that*
  plan, bound into the trainable. Restoring it would re-run its unfinished and
  errored trials even when their networks have since been stored by another run,
  and would not see grid changes, while a fresh plan from the store covers exactly
  the missing networks and, through the pack checkpoints, loses no more training
  than a restore would. So ``sweep resume`` always re-plans from the store; Tune's
  state is kept only as logs.

Test hook (documented, used by tests/test_fault_tolerance.py): when
``SWEEP_TEST_KILL_AT_FRACTION`` is set in the driver's environment, the first pack to
reach that fraction of its iterations SIGKILLs its own worker process, once per
marker file ``SWEEP_TEST_KILL_MARKER`` (created just before the kill). Unset, the
hook does nothing.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sweep.grid import Grid
from sweep.plan import Pack, pack_sizer, plan_packs
from sweep.store import ResultStore

log = logging.getLogger(__name__)

REPORT_INTERVAL_SECONDS = 5.0  # progress reports from a running pack to the driver
MAX_RAY_TEMP_DIR_CHARS = 48
CLEANUP_MIN_AGE_SECONDS = 3600.0  # leftovers older than any pack write
KILL_AT_ENV = "SWEEP_TEST_KILL_AT_FRACTION"  # test hook, see the module doc
KILL_MARKER_ENV = "SWEEP_TEST_KILL_MARKER"
NVIDIA_DRIVER = "/proc/driver/nvidia/version"  # present on Linux machines with an NVIDIA GPU
DEVICE_RE = re.compile(r"cpu|auto|cuda(?::(\d+))?")  # what run_pack can train on (auto: cuda if there)


class SweepError(RuntimeError):
    """A sweep cannot start or did not finish; the message says why."""


@dataclass(frozen=True)
class RunOptions:
    address: str | None = None  # Ray cluster address; None: RAY_ADDRESS or embedded
    cpus_per_pack: float | None = None  # None: the grid's resources.cpu
    gpus_per_pack: float | None = None  # None: the grid's resources.gpu
    max_concurrent: int = 0  # packs running at once (0: as many as resources allow)
    max_networks: int = 0  # per pack (0: the grid's, else sized for the device)
    gpu_memory_gb: float | None = None  # per GPU, for pack sizing (None: the driver's GPU, if any)
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


ProgressFn = Callable[[float, int], None]  # (networks done, in-flight packs pro rata; networks total)


def plan_for(grid: Grid, store: ResultStore, max_networks: int = 0, device: str = "cpu",
             memory_bytes: int | None = None) -> tuple[list[Pack], int]:
    """Packs for the grid's networks that the store does not hold yet, and how many it holds.

    Pack sizes: ``max_networks``, else the grid's ``pack.max_networks``, else sized for
    the device (``memory_bytes``: the GPU memory one pack may use).
    """
    # Per grid: a grid's results stay complete on their own even if another grid shares networks.
    done = store.completed_network_ids(grid=grid.name)
    sizer = pack_sizer(max_networks or grid.max_networks_per_pack, device, memory_bytes)
    packs = plan_packs(grid.specs, sizer, done)
    return packs, sum(1 for s in grid.specs if s.network_id in done)


def pack_memory_bytes(gpus_per_pack: float, gpu_memory_gb: float | None) -> int | None:
    """GPU memory one pack may use: its share of the GPU (``--gpu-memory-gb``, else the
    driver's own GPU when it has one; None: unknown, ``sweep.plan`` assumes a small GPU)."""
    if gpus_per_pack <= 0:
        return None
    if gpu_memory_gb is None:
        if not os.path.exists(NVIDIA_DRIVER):
            return None  # no GPU here: spares `sweep expand` the import of torch
        import torch

        if not torch.cuda.is_available():
            return None
        total = torch.cuda.get_device_properties(0).total_memory
    else:
        total = gpu_memory_gb * 2**30
    return int(total * min(1.0, gpus_per_pack))  # a pack trains on one device


def check_options(grid: Grid, options: RunOptions) -> tuple[float, float]:
    """The CPUs and GPUs per pack, once every option value is one a sweep can run with.

    Pure (no store, no Ray), so it runs before anything is created. The grid's own
    values are checked by ``sweep.grid``; these messages name the command-line option.
    """
    cpu = grid.cpu_per_pack if options.cpus_per_pack is None else options.cpus_per_pack
    gpu = grid.gpu_per_pack if options.gpus_per_pack is None else options.gpus_per_pack
    counts = (("--cpus-per-pack", cpu), ("--gpus-per-pack", gpu), ("--max-concurrent", options.max_concurrent),
              ("--retries", options.retries), ("--max-networks", options.max_networks))
    for flag, value in counts:
        if value < 0:
            raise SweepError(f"{flag} {value:g}: cannot be negative")
    if options.gpu_memory_gb is not None and options.gpu_memory_gb <= 0:
        raise SweepError(f"--gpu-memory-gb must be > 0, got {options.gpu_memory_gb}")
    if options.device is not None:
        _check_device(options.device, gpu)
    return cpu, gpu


def _check_device(device: str, gpu: float) -> None:
    """A device every worker could use; otherwise each pack would fail only inside Ray, after its retries."""
    m = DEVICE_RE.fullmatch(device)
    if m is None:
        raise SweepError(f"--device {device!r}: not a worker device (allowed: cpu, cuda, cuda:N, auto)")
    visible = max(1, int(gpu))  # Ray shows a pack only the GPUs it holds (CUDA_VISIBLE_DEVICES)
    if gpu > 0 and m.group(1) is not None and int(m.group(1)) >= visible:
        raise SweepError(f"--device {device}: a pack holding {gpu:g} GPU sees only cuda:0..cuda:{visible - 1}; "
                         "use --device cuda, or more --gpus-per-pack")


def preflight(grid: Grid, store: ResultStore, data_dir: str | None) -> dict[str, Any]:
    """Everything that must hold before any pack starts; raises with a clear message.

    Returns the grid's datasets by name, loaded (an in-process runner can reuse them).
    """
    store.check_writable()
    from workers.datasets import load_dataset

    # DatasetNotFound names where it looked
    return {name: load_dataset(name, data_dir) for name in sorted({s.dataset for s in grid.specs})}


def run_sweep(grid: Grid, store_root: str, options: RunOptions = RunOptions(),
              progress: ProgressFn | None = None) -> SweepSummary:
    t0 = time.perf_counter()
    cpu, gpu = check_options(grid, options)  # first: a bad value creates no store, loads no data
    store = ResultStore(store_root)
    preflight(grid, store, options.data_dir)
    # Readers already ignore uncommitted files; only old ones are removed, so a second sweep
    # writing to the same store is never disturbed mid-write.
    store.cleanup_uncommitted(min_age_s=CLEANUP_MIN_AGE_SECONDS)
    packs, done = plan_for(grid, store, options.max_networks, "cuda" if gpu > 0 else "cpu",
                           pack_memory_bytes(gpu, options.gpu_memory_gb))
    total = grid.trained_networks
    if not packs:
        store.save_grid(grid)
        if progress:
            progress(done, total)
        return SweepSummary(total, done, 0, 0, 0, time.perf_counter() - t0)

    # Quiet by default: Tune's own progress tables would drown the progress bar.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import ray
    from ray import tune

    _init_ray(options, cpu, gpu)
    try:
        device = options.device or ("cuda" if gpu > 0 else "cpu")
        _check_resources(cpu, gpu, device)
        # Saved only once the sweep can start: bad input leaves no sweep for `resume`.
        store.save_grid(grid)
        if progress:
            progress(done, total)
        kill_hook = None
        if os.environ.get(KILL_AT_ENV):
            kill_hook = (float(os.environ[KILL_AT_ENV]), os.environ.get(KILL_MARKER_ENV, ""))
        trainable = tune.with_resources(
            tune.with_parameters(
                _pack_trainable,
                packs=[p.to_dict() for p in packs],
                # Absolute paths: Tune runs each trial in a working folder of its own, where a
                # relative store or data folder would silently point somewhere else.
                store_root=store.base_path if store.is_local else store.root,
                grid_hash=grid.file_hash,
                data_dir=os.path.abspath(options.data_dir) if options.data_dir else None,
                device=device,
                precision=options.precision,
                threads=max(1, int(cpu)),
                kill_hook=kill_hook,
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
        failures = [(packs[callback.pack_index(r)], str(r.error)) for r in results if r.error is not None]
    finally:
        if options.address is None and not os.environ.get("RAY_ADDRESS"):
            ray.shutdown()
    failed = 0
    for p, error in failures:
        store.record_failure(p, error, grid.name)
        failed += len(p.stored_specs)
    return SweepSummary(total, done, sum(len(p.stored_specs) for p in packs) - failed, failed,
                        len(packs), time.perf_counter() - t0)


def _pack_trainable(config: dict[str, Any], packs: list[dict], store_root: str, grid_hash: str,
                    data_dir: str | None, device: str, precision: str, threads: int,
                    kill_hook: tuple[float, str] | None = None) -> dict[str, Any]:
    """The Ray Tune trainable: a thin wrapper around ``workers.run_pack``."""
    import torch
    from ray import tune

    torch.set_num_threads(threads)  # the pack's CPU share; more threads only contend

    from workers.run_pack import run_pack

    pack = Pack.from_dict(packs[config["pack"]])
    last = [0.0]

    def report(fraction: float) -> None:
        if kill_hook is not None:
            _maybe_kill_self(fraction, *kill_hook)
        now = time.monotonic()
        if now - last[0] >= REPORT_INTERVAL_SECONDS:
            last[0] = now
            tune.report({"fraction": fraction, "networks_done": 0})

    result = run_pack(pack, store_root, device=device, data_dir=data_dir, grid_hash=grid_hash,
                      precision=precision, progress=report)
    return {"fraction": 1.0, "networks_done": result.networks, "diverged": result.diverged,
            "failed": result.failed, "seconds": result.seconds}


def _maybe_kill_self(fraction: float, at: float, marker: str) -> None:
    """Test hook (module doc): SIGKILL this worker once, when ``fraction`` reaches ``at``."""
    import signal

    if fraction < at:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # exactly one kill per marker
    except OSError:
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


def _init_ray(options: RunOptions, cpu: float, gpu: float) -> None:
    import ray

    address = options.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING,
                              "include_dashboard": False, "ignore_reinit_error": True}
    if address:
        try:
            ray.init(address=address, **kwargs)
        except Exception as e:  # ConnectionError, timeouts, a malformed address, ...
            raise SweepError(f"cannot connect to the Ray cluster at {address}: {e}") from e
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


def _check_resources(cpu: float, gpu: float, device: str) -> None:
    """Refuse packs that no node of the cluster could ever run (Tune would wait forever)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    have = [(n["Resources"].get("CPU", 0), n["Resources"].get("GPU", 0)) for n in nodes]
    if not any(c >= cpu and g >= gpu for c, g in have):
        raise SweepError(f"no Ray node can provide {cpu} CPU and {gpu} GPU per pack "
                         f"(nodes have (CPU, GPU): {have}); lower --cpus-per-pack/--gpus-per-pack")
    # A pack without GPUs but told to use cuda (--device cuda) fails in every worker, after
    # every retry, unless some node has a GPU it can see.
    if device.startswith("cuda") and not any(g > 0 for _, g in have):
        raise SweepError(f"--device {device}: no Ray node has a GPU (nodes have (CPU, GPU): {have}); "
                         "use --device cpu")


class _ProgressCallback:
    """Turns Tune's trial events into (networks done, total) for a progress bar.

    Finished packs count whole; running packs count pro rata of the ``fraction`` they
    report (every few seconds), so a bar over few large packs still moves.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        from ray.tune import Callback

        class _Impl(Callback):
            def __init__(self, packs: list[Pack], done: int, total: int, fn: ProgressFn | None) -> None:
                self.sizes = [len(p.stored_specs) for p in packs]
                self.done, self.total, self.fn = done, total, fn
                self.partial: dict[int, float] = {}  # pack index -> networks done pro rata
                self.errored: dict[str, int] = {}  # trial path -> pack index, of failed trials

            def _emit(self) -> None:
                if self.fn:
                    self.fn(self.done + sum(self.partial.values()), self.total)

            def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
                i = trial.config["pack"]
                fraction = result.get("fraction")
                if isinstance(fraction, (int, float)) and 0 <= fraction < 1:
                    self.partial[i] = fraction * self.sizes[i]
                    self._emit()

            def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
                self.partial.pop(trial.config["pack"], None)  # retried: its fraction starts over

            def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
                self.partial.pop(trial.config["pack"], None)
                self.errored[trial.path] = trial.config["pack"]
                self._emit()

            def pack_index(self, result: Any) -> int:
                """The pack of a Tune ``Result``. ``result.config`` comes from the trial's last
                report, so a pack whose worker died or could not import the trainable before
                reporting anything has none; its trial, seen failing here, still knows it."""
                if result.config is not None:
                    return int(result.config["pack"])
                return self.errored[result.path]

            def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
                i = trial.config["pack"]
                self.partial.pop(i, None)
                self.done += self.sizes[i]
                self._emit()

        return _Impl(*args, **kwargs)
