"""The options of how a pack computes: its precision and its layer kernels, as enums.

Floor: sweep.core (what a study is; pure: no torch). The options are a run's, not a
study's (no spec carries them), but the CLI, ``sweep.prepare`` and the workers must agree
on them without importing torch (``sweep --help`` starts fast), so they live here;
``workers.compute`` turns them into a pack's :class:`workers.compute.Numerics`.

Both enums refuse an unknown value with an error that names it and the allowed ones:
``Precision("fp8")`` raises ``UnknownOption("unknown precision 'fp8' (allowed: fp32,
tf32, bf16)")``.
"""

from __future__ import annotations

from enum import StrEnum

from sweep.core.errors import UserError


class UnknownOption(UserError, ValueError):
    """A precision or kernels value that does not exist; the message lists those that do."""


class _Option(StrEnum):
    """A closed set of option values whose constructor names the option on a bad value."""

    @classmethod
    def label(cls) -> str:
        return cls.__name__.lower()

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)

    @classmethod
    def _missing_(cls, value: object) -> None:
        raise UnknownOption(f"unknown {cls.label()} {value!r} (allowed: {', '.join(cls.values())})")


class Precision(_Option):
    """The arithmetic precision a pack trains in (``workers.compute`` applies it)."""

    FP32 = "fp32"  # IEEE fp32 everywhere (TF32 switched off on CUDA)
    TF32 = "tf32"  # fp32 storage, TF32 matmuls and convolutions on CUDA (fp32 on the CPU)
    BF16 = "bf16"  # bfloat16 arithmetic: autocast on the grouped layers, 16-bit inside the fused kernels


class Kernels(_Option):
    """Which layer kernels a pack trains on.

    ``fused`` is the Triton LeNet-5 fast path (``workers.fused_lenet``), CUDA only;
    ``grouped`` the packed grouped-convolution layers (the reference, and every other
    model); ``auto`` fused where it applies and is the faster path (LeNet-5 with a linear
    head on CUDA in a 16-bit precision, :data:`FUSED_AUTO_PRECISIONS`), grouped elsewhere.
    A resolved choice (``workers.compute.Numerics.kernels``) is never ``auto``.
    """

    AUTO = "auto"
    FUSED = "fused"
    GROUPED = "grouped"


PRECISIONS: tuple[str, ...] = Precision.values()  # for click.Choice / argparse choices
KERNELS: tuple[str, ...] = Kernels.values()
FUSED_MODELS: tuple[str, ...] = ("lenet5",)  # models with a fused path (linear head only)

# Precisions in which "auto" picks the fused kernels: their 16-bit products run on the tensor
# cores; in fp32 they use IEEE products (exact, no tensor cores) and, by their compiled code
# (../shared/GPU_FINDINGS.md), are no faster than grouped cuDNN, which tf32 also speeds up.
FUSED_AUTO_PRECISIONS: tuple[Precision, ...] = (Precision.BF16,)


def has_fused_path(model: str, head: str) -> bool:
    """Whether a network of ``model`` with a ``head`` classifier can train on the fused kernels."""
    return model in FUSED_MODELS and head == "linear"
