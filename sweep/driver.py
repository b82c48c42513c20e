"""The Ray Tune driver: one Tune trial per pack.

Floor: sweep.driver, a runner (imports sweep.prepare and the floors below; the only
module that imports Ray). It is longer than 400 lines because everything that touches Ray
lives here: the trainable, its reporter, Tune's callbacks and the lr search's ASHA.

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

Progress: each pack's run tells its :class:`_TuneReporter` (a listener of the pack's
monitor, ``workers.monitor``) every phase at once and its iterations every
``REPORT_INTERVAL_SECONDS``; Tune hands the reports to ``_ProgressCallback`` here, which
counts running packs pro rata of the fraction of their expected work for the progress
bar, and says what they do.

Learning-rate search with early stopping across trials: where every pack of a halving search
is one network (``--max-networks 1``, or a model too large to pack), the packs cannot halve
their candidates, so Ray Tune's ``ASHAScheduler`` does, one per search group, with the grid's
rungs, metric and reduction (``sweep.core.lr_search.asha_settings``): each trial reports its
rung metric through ``tune.report`` (``_TuneReporter.on_rung``), and a trial ASHA stops is
stored with status ``stopped`` from its last report (``_record_stopped``).

Test hook (documented, used by tests/test_fault_tolerance.py): when
``SWEEP_TEST_KILL_AT_FRACTION`` is set in the driver's environment, the first pack to
reach that fraction of its training iterations SIGKILLs its own worker process, once
per marker file ``SWEEP_TEST_KILL_MARKER`` (created just before the kill). Unset, the
hook does nothing.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sweep.core.grid import Grid
from sweep.core.lr_search import ASHA_METRIC, ASHA_TIME_ATTR, LrSearch, asha_settings, rung_time
from sweep.core.options import LrScheduler
from sweep.core.plan import Pack
from sweep.prepare import (
    ProgressFn,
    RunOptions,
    SweepError,
    check_address,
    check_options,
    pack_memory_bytes,
    pack_threads,
    plan_for,
    preflight,
)
from sweep.store.results import ResultStore
from sweep.store.schema import TRIALS, Measurement, Status, trial_row
from workers.monitor import PackEvent, PackListener, RungEvent  # no torch: the driver's process stays light

log = logging.getLogger(__name__)

REPORT_INTERVAL_SECONDS = 5.0  # progress reports from a running pack to the driver
MAX_RAY_TEMP_DIR_CHARS = 48
KILL_AT_ENV = "SWEEP_TEST_KILL_AT_FRACTION"  # test hook, see the module doc
KILL_MARKER_ENV = "SWEEP_TEST_KILL_MARKER"


@dataclass(frozen=True)
class SweepSummary:
    total_networks: int
    already_done: int
    trained: int
    failed: int
    packs: int
    seconds: float
    # Networks of this run's plan neither stored nor recorded as failed when it ended: the
    # run was interrupted (Ctrl-C, a stopped cluster); `sweep resume` trains them.
    not_finished: int = 0
    skipped: int = 0  # held by another runner writing to the same store (sweep.store.leases)


def run_sweep(grid: Grid, store_root: str, options: RunOptions = RunOptions(),
              progress: ProgressFn | None = None) -> SweepSummary:
    t0 = time.perf_counter()
    cpu, gpu = check_options(grid, options)  # first: a bad value creates no store, loads no data
    check_address(options.address or os.environ.get("RAY_ADDRESS"))
    store = ResultStore(store_root)
    preflight(grid, store, options.data_dir)
    packs, done = plan_for(grid, store, options.max_networks, "cuda" if gpu > 0 else "cpu",
                           pack_memory_bytes(gpu, options.gpu_memory_gb))
    total = grid.trained_networks
    if not packs:
        store.save_grid(grid)
        if progress:
            progress(done, total, "")
        return SweepSummary(total, done, 0, 0, 0, time.perf_counter() - t0)

    # Quiet by default: Tune's own progress tables would drown the progress bar.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import ray
    from ray import tune

    handlers = _signal_handlers()
    _init_ray(options, cpu, gpu)
    _keep_sigterm_handler(handlers.get(signal.SIGTERM))
    try:
        device = options.device or ("cuda" if gpu > 0 else "cpu")
        _check_resources(cpu, gpu, device)
        # Saved only once the sweep can start: bad input leaves no sweep for `resume`.
        store.save_grid(grid)
        if progress:
            progress(done, total, "starting packs")
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
                kernels=options.kernels,
                threads=pack_threads(cpu),
                kill_hook=kill_hook,
            ),
            {"cpu": cpu, "gpu": gpu},
        )
        callback = _ProgressCallback(packs, done, total, progress)
        scheduler = _lr_search_scheduler(packs)
        tuner = tune.Tuner(
            trainable,
            param_space={"pack": tune.grid_search(list(range(len(packs))))},
            tune_config=tune.TuneConfig(max_concurrent_trials=options.max_concurrent or None,
                                        scheduler=scheduler),
            run_config=tune.RunConfig(
                name=f"sweep-{grid.name}",
                storage_path=os.path.abspath(os.path.join(store.root, "_ray")),
                failure_config=tune.FailureConfig(max_failures=options.retries),
                verbose=0,
                callbacks=[callback],
            ),
        )
        try:
            results = tuner.fit()
            # Tune stops on Ctrl-C and returns: a trial that never finished has no error.
            failures = [(packs[callback.pack_index(r)], str(r.error)) for r in results if r.error is not None]
            skipped = sum(len(packs[callback.pack_index(r)].stored_specs) for r in results
                          if r.error is None and (r.metrics or {}).get("skipped"))
            for r in results:  # stopped by ASHA at a rung (not finished before the stop took effect)
                i = callback.pack_index(r)
                if r.error is None and "seconds" not in (r.metrics or {}) and scheduler and i in scheduler.stopped:
                    _record_stopped(store, packs[i], grid, scheduler.stopped[i])
        except KeyboardInterrupt:  # a second Ctrl-C: what is stored stays stored
            failures, skipped = [], 0
        except (EOFError, pickle.UnpicklingError) as exc:
            # Tune reads back the state files it wrote under _ray; on a full disk it wrote
            # them empty or cut short. What is stored stays stored: say so in one line.
            raise SweepError(f"Ray Tune could not read back its own state under {store.root}/_ray "
                             f"({type(exc).__name__}: {exc}); is the disk full? Free space and run "
                             f"`sweep resume {store.root}`: stored packs are kept") from exc
    finally:
        if options.address is None and not os.environ.get("RAY_ADDRESS"):
            ray.shutdown()
        _restore_signal_handlers(handlers)
    failed = 0
    for p, error in failures:
        store.record_failure(p, error, grid.name)
        failed += len(p.stored_specs)
    # What this run really stored, read back: never what it meant to.
    planned = {s.network_id for p in packs for s in p.stored_specs}
    stored = len(planned & store.completed_network_ids(grid=grid.name))
    return SweepSummary(total, done, stored, failed, len(packs), time.perf_counter() - t0,
                        not_finished=max(0, len(planned) - stored - failed - skipped), skipped=skipped)


def _pack_trainable(config: dict[str, Any], packs: list[dict], store_root: str, grid_hash: str,
                    data_dir: str | None, device: str, precision: str, kernels: str, threads: int,
                    kill_hook: tuple[float, str] | None = None) -> dict[str, Any]:
    """The Ray Tune trainable: a thin wrapper around ``workers.run_pack``."""
    import torch
    from ray import tune

    torch.set_num_threads(threads)  # sweep.prepare.pack_threads: as sweep.local, so the numbers are the same

    from workers.run_pack import run_pack

    pack = Pack.from_dict(packs[config["pack"]])
    one = pack.specs[0].lr_search if len(pack.specs) == 1 else None  # ASHA's trial: one network
    result = run_pack(pack, store_root, device=device, data_dir=data_dir, grid_hash=grid_hash,
                      precision=precision, kernels=kernels,
                      listeners=[_TuneReporter(tune.report, kill_hook, search=one)])
    return {"fraction": 1.0, "networks_done": result.networks, "diverged": result.diverged,
            "failed": result.failed, "seconds": result.seconds, "skipped": result.skipped}


class _TuneReporter(PackListener):
    """A pack's listener that reports to Ray Tune: a new phase at once, iterations at most
    every ``REPORT_INTERVAL_SECONDS`` (each report is a message to the driver and a row of
    Tune's logs); it carries the kill hook of the module doc."""

    def __init__(self, report: Callable[[dict[str, Any]], None], kill_hook: tuple[float, str] | None = None,
                 clock: Callable[[], float] = time.monotonic, search: LrSearch | None = None) -> None:
        self.report, self.kill_hook, self.clock, self.search = report, kill_hook, clock, search
        self.last: float | None = None  # when the last report went
        self.fraction = 0.0  # of the pack's work, as last reported

    def on_rung(self, event: RungEvent) -> None:
        """A one-network trial's rung, for ASHA: its time, its metric, its test metrics there."""
        if self.search is None or len(event.network_ids) != 1:
            return  # a pack of several halves its own candidates
        self.last = self.clock()
        self.report({"fraction": self.fraction, "networks_done": 0, "phase": "training",
                     ASHA_TIME_ATTR: rung_time(self.search, event.rung), ASHA_METRIC: event.scores[0],
                     "rung": event.rung, "iteration": event.iteration, "network_id": event.network_ids[0],
                     **{f"test_{k}": v for k, v in event.test[0].items()}})

    def on_phase(self, event: PackEvent) -> None:
        self._send(event)

    def on_iteration(self, event: PackEvent) -> None:
        if self.kill_hook is not None:
            _maybe_kill_self(event.iters_fraction, *self.kill_hook)
        if self.last is None or self.clock() - self.last >= REPORT_INTERVAL_SECONDS:
            self._send(event)

    def _send(self, event: PackEvent) -> None:
        self.last, self.fraction = self.clock(), event.fraction
        self.report({"fraction": event.fraction, "networks_done": 0, "phase": str(event.phase)})


def _lr_search_scheduler(packs: list[Pack]) -> Any:
    """Ray Tune's ASHA per search group for the packs that are one network of a halving search
    (module doc), FIFO for every other pack; None where no pack is such a network."""
    groups = {i: (p.specs[0].search_group, p.specs[0].lr_search) for i, p in enumerate(packs)
              if len(p.specs) == 1 and p.specs[0].lr_search is not None
              and p.specs[0].lr_search.scheduler == LrScheduler.HALVING}
    if not groups:
        return None
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

    class _ASHAPerGroup(FIFOScheduler):
        """ASHA's own decisions, made among the candidates of one group only (a training set
        and method): its other trials are other searches."""

        def __init__(self) -> None:
            super().__init__()
            self.asha: dict[str, Any] = {}
            # pack index -> the report ASHA stopped its trial on. A trial's function runs on past
            # a report while Tune decides, so its last report may be a later rung's.
            self.stopped: dict[int, dict] = {}

        def _of(self, trial: Any) -> Any:
            found = groups.get(trial.config.get("pack"))
            if found is None:
                return None
            group, search = found
            return self.asha.setdefault(group, ASHAScheduler(**asha_settings(search)))

        def on_trial_add(self, controller: Any, trial: Any) -> None:
            if (asha := self._of(trial)) is not None:
                asha.on_trial_add(controller, trial)

        def on_trial_result(self, controller: Any, trial: Any, result: dict) -> str:
            asha, pack = self._of(trial), trial.config.get("pack")
            if asha is None:
                return TrialScheduler.CONTINUE
            if pack in self.stopped:  # a report that was under way when ASHA stopped it: not judged
                return TrialScheduler.STOP
            action = asha.on_trial_result(controller, trial, result)
            if action == TrialScheduler.STOP:
                self.stopped[pack] = dict(result)
            return action

        def on_trial_complete(self, controller: Any, trial: Any, result: dict) -> None:
            if (asha := self._of(trial)) is not None:
                asha.on_trial_complete(controller, trial, result)

        def on_trial_remove(self, controller: Any, trial: Any) -> None:
            if (asha := self._of(trial)) is not None and trial.trial_id in asha._trial_info:
                asha.on_trial_remove(controller, trial)

    return _ASHAPerGroup()


def _record_stopped(store: ResultStore, pack: Pack, grid: Grid, report: dict[str, Any]) -> None:
    """Store a one-network pack that ASHA stopped at a rung, from its last report there."""
    import datetime as dt

    m = Measurement(Status.STOPPED, error=f"stopped by ASHA at rung {report['rung']} (iteration "
                    f"{report['iteration']}) of the lr search", best_iter=report["iteration"], rung=report["rung"],
                    stopped_at_iter=report["iteration"], rung_metric=report[ASHA_METRIC],
                    metrics={"raw": {k: report[f"test_{k}"] for k in ("roc_auc", "accuracy", "balanced_accuracy")}})
    now = dt.datetime.now(dt.timezone.utc)
    rows = [trial_row(s, e, pack.pack_id, m, now) for s in pack.stored_specs for e in s.evaluations]
    store.write_pack(pack.pack_id, grid.name, {TRIALS: rows})
    if store.is_local:  # the stopped worker left its checkpoint: it will never be resumed
        from sweep.store.paths import checkpoint_path, checkpoint_record_path

        ckpt = checkpoint_path(store.base_path, pack.pack_id)
        for path in (ckpt, checkpoint_record_path(ckpt)):
            if os.path.exists(path):
                os.remove(path)


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


# Ray and Tune install handlers for these in the driver's process and leave them there:
# ``ray.init`` a SIGTERM handler that ends the process, ``Tuner.fit`` a SIGINT (and SIGUSR1)
# handler that only asks Tune to stop. A Python caller's next Ctrl-C after a sweep would be
# swallowed by Tune's; the caller's handlers come back when the sweep ends.
_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name))


def _signal_handlers() -> dict[int, Any]:
    """The caller's handlers of ``_SIGNALS`` (none off the main thread, where none can be set)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.getsignal(sig) for sig in _SIGNALS}


def _restore_signal_handlers(handlers: dict[int, Any]) -> None:
    for sig, handler in handlers.items():
        if handler is not None:  # None: set outside Python; nothing to put back
            signal.signal(sig, handler)


def _keep_sigterm_handler(handler: Any) -> None:
    """``ray.init`` gives the driver Ray's own SIGTERM handler, which ends the process at once;
    put back the caller's (sweep.cli's: SIGTERM as Ctrl-C), so a SLURM time limit or
    preemption stops a sweep as Ctrl-C does: Tune stops its trials, the run says "interrupted"."""
    if callable(handler) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


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
    # Ray turns token authentication on for a new local cluster and warns about it on every
    # run unless the mode is set: say so explicitly (same security, no warning). A mode the
    # user set (tests use "disabled") is kept.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
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
                self.phases: dict[int, str] = {}  # pack index -> what it is doing
                self.errored: dict[str, int] = {}  # trial path -> pack index, of failed trials

            def _emit(self) -> None:
                if self.fn:
                    counts = Counter(self.phases[i] for i in self.partial if i in self.phases)
                    doing = ", ".join(f"{n} {phase}" for phase, n in sorted(counts.items()))
                    self.fn(self.done + sum(self.partial.values()), self.total, doing)

            def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
                i = trial.config["pack"]
                fraction = result.get("fraction")
                if isinstance(fraction, (int, float)) and 0 <= fraction < 1:
                    self.partial[i] = fraction * self.sizes[i]
                    self.phases[i] = str(result.get("phase") or "training")
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
