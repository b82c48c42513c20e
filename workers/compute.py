"""How a pack computes, decided in one place: its numerics, its model, its optimizer.

Floor: workers (imports sweep.core, and of workers the device, model and optimizer
modules; ``workers.fused_lenet``, which imports Triton, only where the fused path runs).

A pack's run asks three questions, and this module answers each once:

* :func:`resolve_numerics`: in which kernels and dtypes does it compute? The options
  (``sweep.core.numerics.Precision`` and ``Kernels``, enums that refuse unknown values)
  become a frozen :class:`Numerics`; ``kernels=fused`` where the fused path cannot run is
  an error, never a silent fallback. The trials rows record ``Numerics.columns()``.
* :func:`new_model`: the packed model those numerics train (the Triton LeNet-5 for fused
  kernels, the grouped layers otherwise), initialised per member from its seeds.
* :func:`new_optimizer`: one Triton SGD pass over the fused model's flat buffer where it
  trains every parameter, ``PackedSGD`` otherwise. The choice follows the model itself
  (the model is what the numerics chose), so model and optimizer cannot disagree.

``workers.models`` knows nothing of the fused model and ``workers.fused_lenet`` builds on
``workers.models.LeNet5``: the choice between them lives here, above both, so the two
import each other in one direction only.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from sweep.core.errors import UserError
from sweep.core.numerics import FUSED_AUTO_PRECISIONS, FUSED_MODELS, Kernels, Precision, has_fused_path
from sweep.core.spec import TrialSpec, derive_seed
from workers.devices import DeviceUnavailable
from workers.models import PackedNet, model_for
from workers.optim import PackedSGD

if TYPE_CHECKING:  # Triton: imported only where the fused path runs
    from workers.fused_lenet import FusedSGD

_FUSED_MODULE = "workers.fused_lenet"


@dataclass(frozen=True)
class Numerics:
    """How a pack's layers compute.

    ``kernels``: ``Kernels.FUSED`` (the Triton LeNet-5) or ``Kernels.GROUPED`` (the packed
    layers), never ``auto``. ``dtype``: the arithmetic's dtype (float32, or bfloat16 inside
    the fused kernels or under autocast on the grouped layers; master weights stay fp32).
    ``tf32``: fp32 matmuls and convolutions may use TF32 (CUDA, any precision but fp32);
    ``cuda``: the pack runs on CUDA, where :meth:`apply` sets torch's TF32 switches.
    """

    kernels: Kernels
    dtype: torch.dtype = torch.float32
    tf32: bool = False
    cuda: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "kernels", Kernels(self.kernels))  # "fused" -> Kernels.FUSED
        if self.kernels == Kernels.AUTO:
            raise ValueError("Numerics holds resolved kernels (fused or grouped), not 'auto'")
        if self.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"compute dtype {self.dtype} (allowed: float32, bfloat16)")
        if self.tf32 and not self.cuda:
            raise ValueError("TF32 exists on CUDA only")

    @property
    def fused(self) -> bool:
        return self.kernels == Kernels.FUSED

    @property
    def autocast(self) -> torch.dtype | None:
        """The autocast dtype of the grouped layers' forward passes (None: no autocast). The
        fused kernels run their 16-bit arithmetic themselves, without autocast."""
        return None if self.fused or self.dtype == torch.float32 else self.dtype

    @property
    def compute_dtype(self) -> str:
        """The rows' ``compute_dtype``: the arithmetic's dtype, ``tf32`` where fp32 products
        on the grouped layers may round to TF32 (the fused kernels' fp32 is IEEE)."""
        if self.fused or self.dtype != torch.float32:
            return str(self.dtype).removeprefix("torch.")
        return "tf32" if self.tf32 else "float32"

    def columns(self) -> dict[str, str]:
        """What every trials row of the pack records of its numerics (other kernels sum in
        other orders, other dtypes round otherwise: both change the numbers)."""
        return {"kernels": str(self.kernels), "compute_dtype": self.compute_dtype}

    def apply(self) -> None:
        """Set torch's process-wide TF32 switches as these numerics need (CUDA only: on the
        CPU they change nothing). A pack's run calls this before its first layer runs."""
        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32 = self.tf32
            torch.backends.cudnn.allow_tf32 = self.tf32


def resolve_numerics(precision: Precision | str, kernels: Kernels | str, model: str, head: str,
                     device: torch.device) -> Numerics:
    """The numerics a pack of ``model`` networks with a ``head`` classifier trains in on
    ``device``. Raises :class:`sweep.core.numerics.UnknownOption` on an unknown precision or
    kernels value; ``fused`` where the fused path cannot run raises (a ``UserError``;
    :class:`workers.devices.DeviceUnavailable` where only the device is missing)."""
    precision, kernels = Precision(precision), Kernels(kernels)
    cuda = device.type == "cuda"
    return Numerics(kernels=_kernel_path(kernels, precision, model, str(head), device),
                    dtype=torch.bfloat16 if precision == Precision.BF16 else torch.float32,
                    tf32=cuda and precision != Precision.FP32, cuda=cuda)


def _kernel_path(kernels: Kernels, precision: Precision, model: str, head: str, device: torch.device) -> Kernels:
    """``auto`` is fused for LeNet-5 with a linear head on CUDA in a 16-bit precision
    (``FUSED_AUTO_PRECISIONS``: the fused kernels' IEEE fp32 is no faster than cuDNN), else
    grouped; ``fused`` where it cannot run is an error."""
    if kernels == Kernels.GROUPED:
        return Kernels.GROUPED
    if not has_fused_path(model, head):
        if kernels == Kernels.FUSED:
            raise UserError(f"kernels 'fused' exist for {', '.join(FUSED_MODELS)} with a linear head only, "
                            f"not {model!r} with a {head} head")
        return Kernels.GROUPED
    if kernels == Kernels.AUTO:  # the interpreter runs on the CPU, but only tests want it
        cuda = device.type == "cuda"
        return Kernels.FUSED if cuda and precision in FUSED_AUTO_PRECISIONS else Kernels.GROUPED
    from workers.fused_lenet import fused_available  # imports Triton: only where it may be used

    if fused_available(device):
        return Kernels.FUSED
    raise DeviceUnavailable(f"kernels 'fused' need a CUDA device (or TRITON_INTERPRET=1 on the CPU, "
                            f"for tests), not {device}")


def new_model(specs: Sequence[TrialSpec], numerics: Numerics, num_classes: int,
              in_shape: tuple[int, int, int], device: torch.device) -> PackedNet:
    """The packed model of ``specs`` (one architecture: they share a pack key) on the
    kernels of ``numerics``, each member initialised from its own seed, on ``device``.

    Members with the same training seed start from the same weights whatever their method
    (paired comparisons); each member's dropout masks come from its own network id. The
    fused LeNet-5 has LeNet5's parameters and draws them the same way: same numbers."""
    s0 = specs[0]
    if numerics.fused:
        if not has_fused_path(s0.model, str(s0.head)):
            raise ValueError(f"fused numerics for {s0.model!r} with a {s0.head} head: no fused path")
        from workers.fused_lenet import FusedLeNet5  # Triton: only where the fast path runs

        model: PackedNet = FusedLeNet5(len(specs), num_classes, in_shape, compute_dtype=numerics.dtype)
    else:
        model = model_for(specs, num_classes, in_shape)
    model.reset_parameters(s0.recipe.init, [derive_seed(s.seed, "init") for s in specs])
    model.seed_noise([derive_seed(s.stream_id, "dropout") for s in specs])
    return model.to(device)


def is_fused(model: PackedNet) -> bool:
    """Whether ``model`` is the fused LeNet-5 (without importing Triton: a fused model exists
    only once its module is loaded)."""
    module = sys.modules.get(_FUSED_MODULE)
    return module is not None and isinstance(model, module.FusedLeNet5)


def new_optimizer(model: PackedNet, params: Sequence[Tensor], momentum: Tensor, weight_decay: Tensor,
                  bias_lr_factor: Tensor | None = None) -> PackedSGD | FusedSGD:
    """Momentum SGD (PyTorch's form; ``workers.optim``) of ``params``, with per-member
    ``[P]`` momentum, weight decay and bias lr factor (Caffe's lr_mult of biases).

    On the fused LeNet-5 training every parameter: ``FusedSGD``, one Triton pass over the
    flat buffer (the same update, the same state format). Elsewhere, and for a stage that
    trains only some parameters (a head-only stage steps the head's views of the flat
    buffer): ``PackedSGD``."""
    params = list(params)
    if is_fused(model) and {id(p) for p in params} == {id(p) for p in model.parameters()}:
        from workers.fused_lenet import FusedSGD

        return FusedSGD(model, momentum, weight_decay, bias_lr_factor)
    return PackedSGD(params, model.members, momentum, weight_decay, bias_lr_factor, model.bias_parameters())
