"""Which device a pack trains on and in which precision.

Floor: workers (torch; imports sweep.core only). run_pack, the local runner and
the benchmarks set devices and precision up through these functions only.
"""

from __future__ import annotations

from typing import Literal

import torch

from sweep.core.catalog import FUSED_AUTO_PRECISIONS, FUSED_MODELS, KERNELS, PRECISIONS, has_fused_path
from sweep.core.errors import UserError

Precision = Literal["fp32", "tf32", "bf16"]  # sweep.core.catalog.PRECISIONS
Kernels = Literal["auto", "fused", "grouped"]  # sweep.core.catalog.KERNELS


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


def set_precision(precision: str, dev: torch.device) -> torch.dtype | None:
    """Allow TF32 on CUDA unless fp32 is asked for; bf16 means autocast(bfloat16) (returned)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} (allowed: {', '.join(PRECISIONS)})")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
        torch.backends.cudnn.allow_tf32 = precision != "fp32"
    return torch.bfloat16 if precision == "bf16" else None


def resolve_kernels(kernels: str, model: str, dev: torch.device, head: str = "linear",
                    precision: str = "fp32") -> Literal["fused", "grouped"]:
    """The kernels a pack of ``model`` trains on: ``fused`` (the Triton LeNet-5 fast path) or
    ``grouped`` (the packed layers). ``auto`` is fused for LeNet-5 with a linear head on CUDA
    in 16-bit ``precision`` (bf16; ``FUSED_AUTO_PRECISIONS``), else grouped (fp32 and tf32:
    the fused kernels' IEEE fp32 is no faster than cuDNN); ``fused`` where it cannot run is
    an error, not a silent fallback."""
    if kernels not in KERNELS:
        raise ValueError(f"unknown kernels {kernels!r} (allowed: {', '.join(KERNELS)})")
    if kernels == "grouped":
        return "grouped"
    if not has_fused_path(model, head):
        if kernels == "fused":
            raise UserError(f"kernels 'fused' exist for {', '.join(FUSED_MODELS)} with a linear head only, "
                            f"not {model!r} with a {head} head")
        return "grouped"
    if kernels == "auto":  # the interpreter runs on the CPU, but only tests want it
        return "fused" if dev.type == "cuda" and precision in FUSED_AUTO_PRECISIONS else "grouped"
    from workers.fused_lenet import fused_available  # imports Triton: only where it may be used

    if fused_available(dev):
        return "fused"
    raise DeviceUnavailable(f"kernels 'fused' need a CUDA device (or TRITON_INTERPRET=1 on the CPU, "
                            f"for tests), not {dev}")


def numerics(dev: torch.device, autocast: torch.dtype | None, fused: torch.dtype | None) -> dict[str, str]:
    """How a pack computed, as its rows record it: the kernels change the numbers (other
    summation orders), and so does the arithmetic's dtype (bf16 inside the fused kernels or
    under autocast; TF32 matmuls on CUDA unless fp32 was asked for)."""
    if fused is not None:
        dtype = str(fused).removeprefix("torch.")
    elif autocast is not None:
        dtype = str(autocast).removeprefix("torch.")
    else:
        dtype = "tf32" if dev.type == "cuda" and torch.backends.cuda.matmul.allow_tf32 else "float32"
    return {"kernels": "grouped" if fused is None else "fused", "compute_dtype": dtype}
