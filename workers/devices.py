"""Which device a pack trains on, and what its rows call it.

Floor: workers (torch; imports sweep.core only). run_pack, the local runner and
the benchmarks resolve devices through these functions only; how a pack computes on
its device (precision, kernels) is ``workers.compute``'s.
"""

from __future__ import annotations

import torch

from sweep.core.errors import UserError


class DeviceUnavailable(UserError, RuntimeError):
    """The device asked for is not on this machine."""


def resolve_device(device: str | None) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N``, or None / ``auto`` (cuda when there is one)."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(f"device {device!r} requested but CUDA is not available on this machine")
    return d


def device_name(device: torch.device) -> str:
    """What the rows' ``device`` column says: the GPU's name, or ``cpu, N threads``. On the
    CPU the numbers depend on torch's thread count (``sweep.prepare.pack_threads``), so it
    is recorded; on a GPU the arithmetic runs there and the CPU threads change nothing."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    n = torch.get_num_threads()
    return f"{device.type}, {n} thread{'s' if n != 1 else ''}"
