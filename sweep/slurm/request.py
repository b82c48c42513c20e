"""``sweep submit``'s options, checked and resolved into one :class:`SlurmJob`.

Floor: sweep.slurm (imports sweep.prepare, sweep.store and sweep.core; no Ray, no torch).
Every option is applied to the job or refused here with a message naming it, before
anything is written: a job that SLURM would queue for hours and then waste (GPUs no pack
can use, a store the nodes do not share, a time limit shorter than the warning signal)
is refused at once.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from sweep.core.errors import UserError
from sweep.core.grid import Grid
from sweep.prepare import check_numerics, pack_memory_bytes, plan_for
from sweep.store.results import ResultStore

DEFAULT_SIGNAL = "B:TERM@120"  # SIGTERM to the batch shell 120 s before the time limit
SIGNAL_RE = re.compile(r"B:TERM@(\d+)")
# SLURM's --time formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
TIME_RE = re.compile(r"(?:(?P<d>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?"
                     r"|(?P<a>\d+)(?::(?P<b>\d+)(?::(?P<c>\d+))?)?)")
NAME_RE = re.compile(r"[A-Za-z0-9_.+-]+")
# Stores here are on each node's own disk or memory: a job on several nodes would write
# several stores. (A shared filesystem shows as nfs, lustre, gpfs, beegfs, cephfs, ...)
NODE_LOCAL_PREFIXES = ("/tmp", "/var/tmp", "/dev/shm", "/run")
NODE_LOCAL_FSTYPES = ("tmpfs", "ramfs")
# sbatch options the command sets itself: given through --sbatch-arg they would contradict it.
OWN_SBATCH_OPTIONS = {
    "--array": "--array", "-a": "--array", "--nodes": "--nodes", "-N": "--nodes",
    "--gpus-per-node": "--gpus-per-node", "--gres": "--gpus-per-node", "--gpus": "--gpus-per-node",
    "-G": "--gpus-per-node", "--gpus-per-task": "--gpus-per-node", "--cpus-per-task": "--cpus-per-task",
    "-c": "--cpus-per-task", "--time": "--time", "-t": "--time", "--partition": "--partition",
    "-p": "--partition", "--account": "--account", "-A": "--account", "--qos": "--qos", "-q": "--qos",
    "--signal": "--signal", "--requeue": "--requeue", "--no-requeue": "--requeue", "--job-name": "--job-name",
    "-J": "--job-name", "--output": "(the log goes under DIR/_slurm)", "-o": "(the log goes under DIR/_slurm)",
    "--error": "(the log goes under DIR/_slurm)", "-e": "(the log goes under DIR/_slurm)",
    "--ntasks": "--nodes (one task per node)", "-n": "--nodes (one task per node)",
    "--ntasks-per-node": "--nodes (one task per node)",
}


class SubmitError(UserError, ValueError):
    """``sweep submit`` cannot write or submit this job; the message says why."""


class Mode(StrEnum):
    MULTI_NODE = "multi-node"  # one Ray cluster across the allocation, `sweep run` on its head
    ARRAY = "array"  # K independent tasks, each `python -m sweep.local` on the same store


@dataclass(frozen=True)
class SubmitOptions:
    """What the user asked, as the command line gives it (None: the default)."""

    nodes: int = 1
    gpus_per_node: int | None = None  # None: 1 if the grid's packs ask for a GPU, else 0
    cpus_per_task: int | None = None  # None: what the packs of one node need
    time: str | None = None  # SLURM's format; None: the partition's default
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    array: int = 0  # K > 0: array mode with K tasks
    sbatch_args: tuple[str, ...] = ()
    signal: str = DEFAULT_SIGNAL
    requeue: bool = False
    venv: str | None = None  # None: the virtualenv this command runs in, if any
    modules: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()
    data_dir: str | None = None
    job_name: str | None = None
    precision: str = "fp32"
    kernels: str = "auto"
    max_networks: int = 0
    gpu_memory_gb: float | None = None
    force: bool = False  # a store on node-local storage for a job on several nodes


@dataclass(frozen=True)
class SlurmJob:
    """Everything the sbatch script says, resolved and checked."""

    mode: Mode
    job_name: str
    grid_name: str
    store: str  # absolute
    nodes: int
    tasks: int  # array tasks (1 in multi-node mode)
    gpus_per_node: int
    cpus_per_task: int
    gpus_per_pack: float
    cpus_per_pack: float
    packs: int  # packs the store still lacks, as planned now
    time: str | None
    partition: str | None
    account: str | None
    qos: str | None
    signal: str
    signal_seconds: int
    requeue: bool
    sbatch_args: tuple[str, ...]
    venv: str | None
    python: str
    modules: tuple[str, ...]
    setup: tuple[str, ...]
    environment: tuple[tuple[str, str], ...]  # exported in the script, in this order
    code_root: str  # the checkout whose `sweep` wrote the script: the job runs the same code
    runner_args: tuple[str, ...]  # options the runner gets besides the grid and the store
    # Ray starts its client server only where `ray[client]` is installed (grpc), and then
    # refuses no port for it; the script gives it one of the job's ports only then.
    ray_client: bool = False

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_node > 0 else "cpu"


def resolve_job(grid: Grid, store_dir: str, o: SubmitOptions, environ: Mapping[str, str] = os.environ) -> SlurmJob:
    """The job ``o`` asks for, or :class:`SubmitError` naming the option that cannot be met."""
    mode = Mode.ARRAY if o.array else Mode.MULTI_NODE
    _check_counts(o, mode)
    gpus_per_node = o.gpus_per_node if o.gpus_per_node is not None else (1 if grid.gpu_per_pack > 0 else 0)
    gpus_per_pack = _gpus_per_pack(grid, gpus_per_node)
    cpus_per_pack = grid.cpu_per_pack
    need = max(1, math.ceil(cpus_per_pack))
    per_node = int(gpus_per_node // gpus_per_pack) if gpus_per_node else 1  # packs a node runs at once
    if mode == Mode.ARRAY and gpus_per_node > 1:
        raise SubmitError(f"--gpus-per-node {gpus_per_node} with --array: each array task trains its packs one "
                          "after another on one device; ask for more tasks (--array) instead of more GPUs")
    cpus = o.cpus_per_task if o.cpus_per_task is not None else need * (per_node if mode == Mode.MULTI_NODE else 1)
    if cpus < need:
        raise SubmitError(f"--cpus-per-task {cpus}: a pack of grid {grid.name} needs {cpus_per_pack:g} CPUs "
                          f"(its resources.cpu); ask for at least {need}")
    if mode == Mode.MULTI_NODE and not gpus_per_node:
        per_node = cpus // need  # on a CPU cluster a node runs as many packs as its CPUs allow
    device = "cuda" if gpus_per_node else "cpu"
    check_numerics(grid, o.precision, o.kernels, device)
    store = _check_store(store_dir, mode, o)
    packs, _ = plan_for(grid, ResultStore(store), o.max_networks, device,
                        pack_memory_bytes(gpus_per_pack, o.gpu_memory_gb))
    _check_packs(len(packs), mode, o, per_node, gpus_per_node)
    if mode == Mode.MULTI_NODE and importlib.util.find_spec("ray") is None:
        raise SubmitError("multi-node mode runs Ray across the allocation, and Ray is not installed in this "
                          "environment (pip install 'ray[tune]'); or use --array K, which needs no Ray")
    seconds = _signal_seconds(o.signal)
    if o.time is not None and seconds >= _time_seconds(o.time):
        raise SubmitError(f"--time {o.time} is not longer than the {seconds} s warning of --signal {o.signal}: "
                          "the job would be told to stop as it starts")
    venv, python = _environment(o.venv)
    return SlurmJob(
        mode=mode, job_name=_job_name(o.job_name, grid), grid_name=grid.name, store=store, nodes=o.nodes,
        tasks=o.array or 1, gpus_per_node=gpus_per_node, cpus_per_task=cpus, gpus_per_pack=gpus_per_pack,
        cpus_per_pack=cpus_per_pack, packs=len(packs), time=o.time, partition=_name("--partition", o.partition),
        account=_name("--account", o.account), qos=_name("--qos", o.qos), signal=o.signal,
        signal_seconds=seconds, requeue=o.requeue, sbatch_args=_sbatch_args(o.sbatch_args), venv=venv,
        python=python, modules=_lines("--module", o.modules, one_word=True), setup=_lines("--setup", o.setup),
        environment=_exports(environ), code_root=_code_root(), runner_args=_runner_args(o, device, gpus_per_pack),
        ray_client=mode == Mode.MULTI_NODE and importlib.util.find_spec("grpc") is not None)


def _check_counts(o: SubmitOptions, mode: Mode) -> None:
    for flag, value in (("--nodes", o.nodes), ("--array", o.array), ("--max-networks", o.max_networks),
                        ("--gpus-per-node", o.gpus_per_node or 0), ("--cpus-per-task", o.cpus_per_task or 0)):
        if value < 0:
            raise SubmitError(f"{flag} {value}: cannot be negative")
    if o.nodes < 1 or o.cpus_per_task == 0:
        raise SubmitError("--nodes and --cpus-per-task must be at least 1")
    if mode == Mode.ARRAY and o.nodes != 1:
        raise SubmitError(f"--nodes {o.nodes} with --array: each array task runs on one node; "
                          "ask for more tasks (--array) instead")
    if o.gpu_memory_gb is not None and o.gpu_memory_gb <= 0:
        raise SubmitError(f"--gpu-memory-gb must be > 0, got {o.gpu_memory_gb}")


def _gpus_per_pack(grid: Grid, gpus_per_node: int) -> float:
    """One pack per GPU by default; a grid asking for a fraction of a GPU shares it."""
    if gpus_per_node == 0:
        return 0.0
    gpu = grid.gpu_per_pack or 1.0
    if gpu > gpus_per_node:
        raise SubmitError(f"--gpus-per-node {gpus_per_node}: a pack of grid {grid.name} needs {gpu:g} GPUs "
                          "(its resources.gpu), more than a node would have")
    return gpu


def _check_store(store_dir: str, mode: Mode, o: SubmitOptions) -> str:
    if "://" in store_dir:
        raise SubmitError(f"store {store_dir}: a SLURM job needs the store on a filesystem path every node "
                          "mounts (leases and checkpoints need a local path), not a URI")
    store = os.path.abspath(store_dir)
    several = f"{o.array} tasks" if mode == Mode.ARRAY else f"{o.nodes} nodes"
    where = _node_local(store)
    if max(o.nodes, o.array) > 1 and where and not o.force:
        raise SubmitError(
            f"store {store} is on {where}, which each node has on its own: the job's {several} "
            "would write separate stores. Put it on a filesystem every node "
            f"mounts (`df -T {os.path.dirname(store)}` or `stat -f -c %T {os.path.dirname(store)}` on a compute node "
            "shows nfs, lustre, gpfs, beegfs, cephfs ...: shared; tmpfs, or a local disk under /tmp or /scratch: "
            "not), or pass --force if this path is shared on your cluster")
    return store


def _node_local(path: str) -> str | None:
    """Why ``path`` is on storage that each node has on its own (None: no sign of it)."""
    for prefix in NODE_LOCAL_PREFIXES:
        if path == prefix or path.startswith(prefix + "/"):
            return f"{prefix} (node-local)"
    fstype = _fstype(path)
    return f"a {fstype} filesystem" if fstype in NODE_LOCAL_FSTYPES else None


def _fstype(path: str) -> str | None:
    """The filesystem type of the mount holding ``path``, from /proc/mounts (Linux)."""
    try:
        with open("/proc/mounts") as fh:
            mounts = [line.split()[1:3] for line in fh if len(line.split()) >= 3]
    except OSError:
        return None
    best: tuple[str, str] | None = None
    for point, kind in mounts:
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) > len(best[0])):
            best = (point, kind)
    return None if best is None else best[1]


def _check_packs(packs: int, mode: Mode, o: SubmitOptions, per_node: int, gpus_per_node: int) -> None:
    if packs == 0:
        return  # nothing to train: the command says so and submits nothing
    if mode == Mode.ARRAY:
        if o.array > packs:
            raise SubmitError(f"--array {o.array}: the store lacks only {packs} pack(s) of this grid, and a task "
                              f"trains whole packs; ask for at most --array {packs}")
        return
    at_once = o.nodes * per_node
    if gpus_per_node and at_once > packs:
        raise SubmitError(f"--nodes {o.nodes} --gpus-per-node {gpus_per_node}: {at_once} packs would run at once "
                          f"(one per {'GPU' if at_once == o.nodes * gpus_per_node else 'GPU share'}), but the store "
                          f"lacks only {packs} pack(s) of this grid: {at_once - packs} GPU(s) would idle; ask for "
                          "fewer nodes or GPUs (or smaller packs: --max-networks)")
    if o.nodes > packs:
        raise SubmitError(f"--nodes {o.nodes}: the store lacks only {packs} pack(s) of this grid; a node runs "
                          f"whole packs, so at most {packs} nodes can be used")


def _signal_seconds(signal: str) -> int:
    m = SIGNAL_RE.fullmatch(signal)
    if m is None:
        raise SubmitError(f"--signal {signal!r}: the job stops cleanly on SIGTERM sent to its batch shell; give "
                          f"B:TERM@SECONDS (default {DEFAULT_SIGNAL}: 120 s before the time limit)")
    return int(m.group(1))


def _time_seconds(time: str) -> int:
    m = TIME_RE.fullmatch(time)
    if m is None:
        raise SubmitError(f"--time {time!r}: not a SLURM time (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS)")
    if m.group("d") is not None:
        d, h, mi, s = (int(m.group(k) or 0) for k in ("d", "dh", "dm", "ds"))
        return ((d * 24 + h) * 60 + mi) * 60 + s
    a, b, c = m.group("a"), m.group("b"), m.group("c")
    if c is not None:
        return int(a) * 3600 + int(b) * 60 + int(c)
    return int(a) * 60 + int(b or 0)  # MM or MM:SS


def _name(flag: str, value: str | None) -> str | None:
    if value is not None and not NAME_RE.fullmatch(value):
        raise SubmitError(f"{flag} {value!r}: not a SLURM name (letters, digits, _ . + -)")
    return value


def _job_name(name: str | None, grid: Grid) -> str:
    return _name("--job-name", name) or f"sweep-{grid.name}"


def _sbatch_args(args: tuple[str, ...]) -> tuple[str, ...]:
    for a in args:
        if not a.startswith("-") or "\n" in a:
            raise SubmitError(f"--sbatch-arg {a!r}: give one sbatch option per --sbatch-arg, as "
                              "--sbatch-arg=--mem=16G")
        own = OWN_SBATCH_OPTIONS.get(re.split(r"[=\s]", a, maxsplit=1)[0])
        if own is not None:
            raise SubmitError(f"--sbatch-arg {a!r}: sweep submit sets this itself; use {own}")
    return args


def _lines(flag: str, values: tuple[str, ...], one_word: bool = False) -> tuple[str, ...]:
    for v in values:
        if "\n" in v or not v.strip() or (one_word and len(v.split()) != 1):
            raise SubmitError(f"{flag} {v!r}: one {'name' if one_word else 'command line'} per {flag}")
    return values


def _environment(venv: str | None) -> tuple[str | None, str]:
    """The virtualenv the job activates (given, else this one) and the Python it runs."""
    if venv is None and sys.prefix != sys.base_prefix:
        venv = sys.prefix
    if venv is None:
        return None, sys.executable  # no virtualenv: this very interpreter, by its path
    venv = os.path.abspath(venv)
    if not os.path.isfile(os.path.join(venv, "bin", "activate")):
        raise SubmitError(f"--venv {venv}: no virtualenv there (no bin/activate)")
    return venv, "python"


def _exports(environ: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """This project's variables (SWEEP_*) and Ray's mode of authentication, as the
    submitting shell has them: the job must not depend on the shell that submitted it."""
    keep = sorted(k for k in environ if k.startswith("SWEEP_") or k == "RAY_AUTH_MODE")
    return tuple((k, environ[k]) for k in keep)


def _code_root() -> str:
    """The folder holding the ``sweep`` package that runs this command."""
    import sweep

    return os.path.dirname(os.path.dirname(os.path.abspath(sweep.__file__)))


def _runner_args(o: SubmitOptions, device: str, gpus_per_pack: float) -> tuple[str, ...]:
    args = ["--device", device, "--precision", o.precision, "--kernels", o.kernels]
    if o.max_networks:
        args += ["--max-networks", str(o.max_networks)]
    if o.data_dir is not None:
        data = os.path.abspath(o.data_dir)
        if not os.path.isdir(data) or not os.listdir(data):
            raise SubmitError(f"--data-dir {data}: missing or empty")
        args += ["--data-dir", data]
    if o.gpu_memory_gb is not None and o.array == 0:  # sweep.local sizes packs from its own GPU
        args += ["--gpu-memory-gb", f"{o.gpu_memory_gb:g}"]
    if o.array == 0:
        args += ["--gpus-per-pack", f"{gpus_per_pack:g}"]
    return tuple(args)
