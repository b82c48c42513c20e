"""What both runners do before the first pack: check every option, check the store and
the data, and plan the packs the store still lacks.

Floor: sweep.prepare (imports sweep.core, sweep.store and workers; never Ray). The Ray
driver (sweep.driver) and the local runner (sweep.local) share it, so a bad value is
refused the same way, with the same message, whichever runs the sweep, and always before
anything is created.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sweep.core.errors import UserError
from sweep.core.grid import Grid
from sweep.core.numerics import FUSED_MODELS, Kernels, Precision, UnknownOption, has_fused_path
from sweep.core.plan import Pack, pack_sizer, plan_packs
from sweep.store.results import ResultStore

NVIDIA_DRIVER = "/proc/driver/nvidia/version"  # present on Linux machines with an NVIDIA GPU
ADDRESS_TIMEOUT_SECONDS = 10.0  # for a cluster address to accept a connection
CLEANUP_MIN_AGE_SECONDS = 3600.0  # leftovers of another host's writer older than any pack write
DEVICE_RE = re.compile(r"cpu|auto|cuda(?::(\d+))?")  # what run_pack can train on (auto: cuda if there)


# What both runners tell a progress bar (sweep.cli's): networks done, with the running packs
# counted pro rata of the fraction of their expected work (workers.pack_work: every phase,
# not only training); the grid's networks; what the running packs do ("1 latent statistics").
ProgressFn = Callable[[float, int, str], None]


class SweepError(UserError, RuntimeError):
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
    precision: str = Precision.FP32  # a sweep.core.numerics.Precision value
    kernels: str = Kernels.AUTO  # a Kernels value; workers.compute.resolve_numerics decides per pack
    retries: int = 2  # Ray Tune retries of a failed pack
    num_cpus: int | None = None  # embedded Ray only: CPUs it may use
    ray_temp_dir: str | None = None  # embedded Ray only


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


def pack_threads(cpus_per_pack: float) -> int:
    """torch's intra-op threads for one pack: its CPU share (``resources.cpu`` or
    ``--cpus-per-pack``), at least 1. Both runners set it, from this one rule: on the CPU a
    network's numbers depend on the thread count (parallel reductions split differently;
    measured: accuracy 0.0008 apart after 60 LeNet-5 iterations, 1 vs 2 threads), so the
    thread count is part of what a spec means, never the machine's core count. Rows record
    it (``device`` column, e.g. ``cpu, 2 threads``)."""
    return max(1, int(cpus_per_pack))


def pack_resources(grid: Grid, cpus_per_pack: float | None, gpus_per_pack: float | None) -> tuple[float, float]:
    """The CPUs and GPUs per pack: the option when given, else the grid's ``resources``."""
    cpu = grid.cpu_per_pack if cpus_per_pack is None else cpus_per_pack
    gpu = grid.gpu_per_pack if gpus_per_pack is None else gpus_per_pack
    for flag, value in (("--cpus-per-pack", cpu), ("--gpus-per-pack", gpu)):
        if value < 0:
            raise SweepError(f"{flag} {value:g}: cannot be negative")
    return cpu, gpu


def pack_memory_bytes(gpus_per_pack: float, gpu_memory_gb: float | None) -> int | None:
    """GPU memory one pack may use: its share of the GPU (``--gpu-memory-gb``, else the
    driver's own GPU when it has one; None: unknown, ``sweep.core.plan`` assumes a small GPU)."""
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
    values are checked by ``sweep.core.grid``; these messages name the command-line option.
    """
    cpu, gpu = pack_resources(grid, options.cpus_per_pack, options.gpus_per_pack)
    counts = (("--max-concurrent", options.max_concurrent), ("--retries", options.retries),
              ("--max-networks", options.max_networks))
    for flag, value in counts:
        if value < 0:
            raise SweepError(f"{flag} {value:g}: cannot be negative")
    if options.gpu_memory_gb is not None and options.gpu_memory_gb <= 0:
        raise SweepError(f"--gpu-memory-gb must be > 0, got {options.gpu_memory_gb}")
    if options.device is not None:
        _check_device(options.device, gpu)
    check_numerics(grid, options.precision, options.kernels, options.device or ("cuda" if gpu > 0 else "cpu"))
    return cpu, gpu


def check_numerics(grid: Grid, precision: str, kernels: str, device: str) -> None:
    """``--precision`` is one of ``sweep.core.numerics.Precision``, and ``--kernels`` one
    every pack can run with (:func:`check_kernels`)."""
    try:
        Precision(precision)
    except UnknownOption:
        raise SweepError(f"--precision {precision!r}: allowed: {', '.join(Precision.values())}") from None
    check_kernels(grid, kernels, device)


def check_kernels(grid: Grid, kernels: str, device: str) -> None:
    """``--kernels fused`` only where every pack can take the fused path: LeNet-5 with a
    linear head, on CUDA (``workers.compute.resolve_numerics`` decides per pack)."""
    try:
        kernels = Kernels(kernels)
    except UnknownOption:
        raise SweepError(f"--kernels {kernels!r}: allowed: {', '.join(Kernels.values())}") from None
    if kernels != Kernels.FUSED:
        return
    others = sorted({f"{s.model} ({s.head} head)" for s in grid.specs
                     if not has_fused_path(s.model, str(s.head))})
    if others:
        raise SweepError(f"--kernels fused: the fused kernels exist for {', '.join(FUSED_MODELS)} with a linear "
                         f"head only; this grid also trains {', '.join(others)} (use --kernels auto)")
    if not device.startswith("cuda"):
        raise SweepError(f"--kernels fused needs a CUDA device, not {device!r}")


def check_address(address: str | None, timeout_s: float = ADDRESS_TIMEOUT_SECONDS) -> None:
    """A cluster address that answers as Ray does, within ``timeout_s`` in all; Ray's own
    connect waits minutes for one that does not.

    ``host:port`` (Ray's GCS) and ``ray://host:port`` (Ray Client) are gRPC servers: after
    a TCP connect they are sent HTTP/2's client preface and must answer with a SETTINGS
    frame, as every HTTP/2 server does at once (RFC 9113, 3.4). A port that accepts TCP and
    then stays silent, or answers anything else (an HTTP/1 server, SSH, a database), is
    refused. With ``RAY_USE_TLS`` set only the TCP connect is tried (the server expects a
    TLS handshake first). ``auto`` and ``local`` are Ray's to resolve.
    """
    if not address or address in ("auto", "local"):
        return
    target = address.split("://", 1)[-1]
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise SweepError(f"--address {address!r}: expected host:port, ray://host:port, auto or local")
    deadline = time.monotonic() + timeout_s
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s) as sock:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("0", "false", ""):
                why = _http2_answer(sock, deadline, timeout_s)
                if why is not None:
                    raise SweepError(f"{address} is not a Ray cluster: {why} (a Ray GCS or Ray Client port answers "
                                     f"gRPC at once); check the host and port of `ray start --head`")
    except OSError as exc:
        raise SweepError(f"cannot reach the Ray cluster at {address} within {timeout_s:g} s: "
                         f"{exc.strerror or exc}; is `ray start --head` running there?") from None


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HTTP2_SETTINGS = 0x4  # frame type
HTTP2_EMPTY_SETTINGS = bytes([0, 0, 0, HTTP2_SETTINGS, 0, 0, 0, 0, 0])  # length 0, no flags, stream 0


def _http2_answer(sock: socket.socket, deadline: float, timeout_s: float) -> str | None:
    """None if the peer answers HTTP/2's client preface with a SETTINGS frame before the
    deadline, else what it did instead."""
    sock.sendall(HTTP2_PREFACE + HTTP2_EMPTY_SETTINGS)
    head = b""
    while len(head) < 9:  # a frame header: 3 bytes length, type, flags, 4 bytes stream id
        left = deadline - time.monotonic()
        if left <= 0:
            return (f"it accepted a connection but answered nothing within {timeout_s:g} s" if not head
                    else "it sent an incomplete answer")
        sock.settimeout(left)
        try:
            chunk = sock.recv(9 - len(head))
        except TimeoutError:
            continue
        except OSError as exc:
            return f"it closed the connection ({exc.strerror or exc})"
        if not chunk:
            return "it closed the connection without answering" if not head else "it sent an incomplete answer"
        head += chunk
    if head[3] != HTTP2_SETTINGS or head[5:9] != bytes(4):
        return f"it answered {head[:9]!r}, not HTTP/2"
    return None


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
    # A network damaged in any table is not stored: training around it would leave it so.
    # The saved grid is left out: this run saves it again.
    store.check_intact(grids=False)
    # Readers already ignore uncommitted files. What a dead writer of this host left goes at
    # once; anything else only when old, so a second sweep writing to the same store is
    # never disturbed mid-write.
    store.cleanup_uncommitted(min_age_s=CLEANUP_MIN_AGE_SECONDS)
    # Here, not at the top: `sweep expand` imports this module and must not wait for torch.
    from workers.datasets import load_dataset

    # DatasetNotFound names where it looked
    return {name: load_dataset(name, data_dir) for name in sorted({s.dataset for s in grid.specs})}
