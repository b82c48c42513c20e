"""A fused GPU fast path for the packed LeNet-5: Triton conv+bias+pool, batched fc, one-pass SGD.

Floor: workers (trial execution; imports sweep.core and sweep.store only).

``FusedLeNet5`` is a ``LeNet5`` (same submodules, parameter names and shapes, so
``member_state`` / ``load_member_state``, ``state_dict`` and checkpoints are
interchangeable) whose parameters are views into one flat fp32 buffer, and whose
forward runs

* conv1 / conv2 as ``workers.fused_kernels`` convolution + bias + 2x2 max-pool kernels on
  activations ``[P, B, C, H, W]`` (the engine's input layout: no conversion at the
  boundary), writing the pooled output and an int8 argmax only;
* fc1 / fc2 as batched matrix products over ``[P, B, F]``.

Backward passes write every parameter gradient straight into a second flat buffer
(``flat_grad``), so ``FusedSGD`` updates all parameters of the pack in one kernel that
reads w, g, buf and writes w, buf. ``compute_dtype`` fp16/bf16 runs the arithmetic in
16 bits (fp32 accumulation, fp32 master weights, fp32 gradients; the fc layers read a
16-bit copy of the weights that the SGD pass writes); fp32 uses IEEE products (no TF32).

The model needs a CUDA device, or CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1`` before ``triton`` is first imported): that is how the tests
check it against ``LeNet5``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers import fused_kernels as fk
from workers.models import LeNet5

GradSink = Callable[[], Tensor | None]  # where a parameter's gradient should be written, if anywhere


def fused_available(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on ``device``."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available()
    return kind == "cpu" and fk.INTERPRETED


@dataclass(frozen=True)
class Segment:
    """One parameter inside the flat buffer: ``flat[start:start + numel].view(shape)``."""

    name: str
    shape: torch.Size
    start: int
    is_bias: bool

    @property
    def numel(self) -> int:
        return self.shape.numel()


class FlatLayout:
    """Parameters ``[P, ...]`` one after another, each starting at a multiple of ``align``.

    The alignment lets one SGD program cover exactly one parameter's elements (and its
    tail padding), so the program needs its segment only, never a per-element search.
    """

    def __init__(self, members: int, specs: Sequence[tuple[str, torch.Size, bool]], align: int = fk.SGD_BLOCK):
        self.members, self.align = members, align
        segs, start = [], 0
        for name, shape, is_bias in specs:
            if shape[0] != members:
                raise ValueError(f"{name}: dim 0 is {shape[0]}, not the {members} members")
            segs.append(Segment(name, torch.Size(shape), start, is_bias))
            start += -(-torch.Size(shape).numel() // align) * align
        self.segments: tuple[Segment, ...] = tuple(segs)
        self.total = start

    def view(self, flat: Tensor, i: int) -> Tensor:
        s = self.segments[i]
        return flat[s.start:s.start + s.numel].view(s.shape)

    def views(self, flat: Tensor) -> list[Tensor]:
        return [self.view(flat, i) for i in range(len(self.segments))]

    def table(self, device: torch.device) -> dict[str, Tensor]:
        """The SGD kernel's segment table: block -> segment, and per segment its geometry."""
        block_seg = [i for i, s in enumerate(self.segments) for _ in range(-(-s.numel // self.align))]

        def col(values: Sequence[int], dtype: torch.dtype) -> Tensor:
            return torch.tensor(values, dtype=dtype, device=device)
        magic = [fk._magic(s.numel // self.members) for s in self.segments]
        if any(s.numel + self.align >= 2 ** 31 for s in self.segments):
            raise ValueError("a parameter of 2**31 elements or more: the SGD kernel's offsets are int32")
        return {
            "block_seg": col(block_seg, torch.int32),
            "seg_start": col([s.start for s in self.segments], torch.int64),
            "seg_magic": col([m for m, _ in magic], torch.int64),  # a uint32 value
            "seg_shift": col([sh for _, sh in magic], torch.int32),
            "seg_is_bias": col([int(s.is_bias) for s in self.segments], torch.int32),
        }


def _into(sink: GradSink | None, make: Callable[[Tensor | None], Tensor]) -> Tensor:
    return make(None if sink is None else sink())


class ConvPool(torch.autograd.Function):
    """``max_pool2d(conv2d(x, w) + b, 2)`` per member on ``[P, B, C, H, W]``, fused."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor, sink_w: GradSink | None = None,
                sink_b: GradSink | None = None) -> Tensor:
        y, arg = fk.conv_pool_forward(x, w, b)
        ctx.save_for_backward(x, w, arg)
        ctx.sinks = (sink_w, sink_b)
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):
        x, w, arg = ctx.saved_tensors
        gy = gy.contiguous()
        sink_w, sink_b = ctx.sinks
        gx = gw = gb = gz = None
        if ctx.needs_input_grad[0]:  # conv1's input (the images) never asks
            # conv2: the unpooled gradient, made once, feeds both the input and weight gradient.
            # (conv1's would be 24 x 24 x 32 per image: it keeps the argmax-select kernel.)
            gz = fk.unpool(gy, arg, x.dtype)
            gx = fk.conv_pool_grad_input(w, gy, arg, x.shape, x.dtype, gz=gz)
        if ctx.needs_input_grad[1]:
            gw = _into(sink_w, lambda out: fk.conv_pool_grad_weight(x, gy, arg, w.shape, out, gz=gz))
        if ctx.needs_input_grad[2]:
            # Each pooled value reaches exactly one pre-pool cell: the bias gradient is gy's sum.
            gb = _into(sink_b, lambda out: torch.sum(gy, dim=(1, 3, 4), dtype=torch.float32, out=out))
        return gx, gw, gb, None, None


class PackedLinearFn(torch.autograd.Function):
    """``baddbmm(b, x, w)`` over ``[P, B, F]`` in ``x``'s dtype, fp32 gradients of w and b.

    ``w_c`` / ``b_c`` are w and b in ``x``'s dtype (the same tensors in fp32; the model's
    16-bit shadow otherwise): the product reads them, autograd credits w and b.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor, w_c: Tensor, b_c: Tensor, sink_w: GradSink | None = None,
                sink_b: GradSink | None = None) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):  # the model chooses its own dtype
            y = torch.baddbmm(b_c.unsqueeze(1), x, w_c)
        ctx.save_for_backward(x, w_c)
        ctx.sinks = (sink_w, sink_b)
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):
        x, w_c = ctx.saved_tensors
        sink_w, sink_b = ctx.sinks
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.bmm(gy, w_c.transpose(1, 2))
        if ctx.needs_input_grad[1]:
            gw = _into(sink_w, lambda out: _bmm_fp32(x.transpose(1, 2), gy, out))
        if ctx.needs_input_grad[2]:
            gb = _into(sink_b, lambda out: torch.sum(gy, dim=1, dtype=torch.float32, out=out))
        return gx, gw, gb, None, None, None, None


# torch.bmm(..., out_dtype=torch.float32) of 16-bit operands: fp32 accumulation written as fp32
# (CUDA only; aten::bmm.dtype_out exists in the torch versions in use, 2.11 and 2.14).
_BMM_OUT_DTYPE = hasattr(torch.ops.aten.bmm, "dtype_out")


def _bmm_fp32(a: Tensor, b: Tensor, out: Tensor | None) -> Tensor:
    """``a @ b`` into an fp32 ``out``: directly in fp32; for 16-bit operands on CUDA the fp32
    accumulator written once as fp32 (``out_dtype``: 4 B per element instead of a 16-bit
    result, its re-read and a 4-byte copy), elsewhere through a 16-bit result and a copy."""
    if a.dtype == torch.float32:
        return torch.bmm(a, b, out=out)
    if _BMM_OUT_DTYPE and a.device.type in ("cuda", "meta"):  # meta: bench/static_cost.py's recording
        if out is None:
            return torch.bmm(a, b, out_dtype=torch.float32)
        return torch.bmm(a, b, out_dtype=torch.float32, out=out)
    r = torch.bmm(a, b)
    return r.float() if out is None else out.copy_(r)


class FusedLeNet5(LeNet5):
    """``LeNet5`` on the fused kernels; parameters are views into ``flat`` (fp32).

    Build it on its device (``FusedLeNet5(P, device=...)`` or ``from_lenet``); ``.to()``
    moves the flat buffers and re-binds the views. Gradients land in ``flat_grad`` when
    ``.grad`` is None before the backward (``FusedSGD.zero_grad``); a gradient taken from
    ``.grad`` is valid until the next backward, which overwrites it.

    With a 16-bit ``compute_dtype`` the fc layers read ``flat16``, a 16-bit copy of
    ``flat`` that ``FusedSGD`` writes in its pass (2 bytes per parameter instead of a
    6-byte cast per step). Any other change of the parameters (``load_member_state``,
    ``load_state_dict``, ...) bumps ``flat``'s version counter, which the next forward sees
    and re-casts. (Triton's writes bump no counter: the optimizer records the version.)
    """

    def __init__(self, members: int, num_classes: int = 10, in_shape: tuple[int, int, int] = (1, 28, 28),
                 compute_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__(members, num_classes, in_shape)
        if compute_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"compute_dtype {compute_dtype} (allowed: float32, float16, bfloat16)")
        self.compute_dtype = compute_dtype
        named = list(self.named_parameters())
        biases = {id(b) for b in self.bias_parameters()}
        self.layout = FlatLayout(members, [(n, p.shape, id(p) in biases) for n, p in named])
        self._slots = [tuple(n.rsplit(".", 1)) for n, _ in named]  # (module, attribute)
        self.flat = torch.zeros(self.layout.total, device=device)
        for view, (_, p) in zip(self.layout.views(self.flat), named):
            view.copy_(p.detach())
        self._bind()

    @classmethod
    def from_lenet(cls, model: LeNet5, compute_dtype: torch.dtype = torch.float32,
                   in_shape: tuple[int, int, int] = (1, 28, 28)) -> FusedLeNet5:
        """A fused copy of ``model`` (same device, same numbers)."""
        fused = cls(model.members, model.fc2.f_out, in_shape, compute_dtype, model.fc1.weight.device)
        fused.load_state_dict(model.state_dict())
        return fused

    def _bind(self) -> None:
        """(Re)make every parameter a view of ``flat``, and ``flat_grad`` a zeroed twin."""
        self.flat_grad = torch.zeros_like(self.flat)
        sixteen = self.compute_dtype != torch.float32
        self.flat16 = torch.empty_like(self.flat, dtype=self.compute_dtype) if sixteen else None
        self.flat16_version: int | None = None  # flat._version that flat16 was made from
        self._whole_under: frozenset[int] | None = None  # trainable set when flat16 was last made whole
        for (mod, attr), view in zip(self._slots, self.layout.views(self.flat)):
            holder = self.get_submodule(mod)
            old = holder._parameters[attr]
            holder._parameters[attr] = nn.Parameter(view, requires_grad=old.requires_grad)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module's signature
        # nn.Module would give every parameter storage of its own and break the views.
        flat = fn(self.flat)
        if flat.dtype != torch.float32:
            raise TypeError("FusedLeNet5 keeps fp32 master weights; choose compute_dtype instead")
        self.flat = flat
        self._bind()
        return self

    def _sink(self, i: int) -> GradSink:
        """Parameter i's gradient goes into ``flat_grad`` unless a gradient is already there to
        be accumulated into (then autograd adds a fresh tensor, and ``gather_grads`` copies)."""
        mod, attr = self._slots[i]
        holder = self.get_submodule(mod)
        # A fresh view each time: autograd adopts a returned gradient as ``.grad`` without a
        # copy only when nothing else holds that tensor object.
        return lambda: self.layout.view(self.flat_grad, i) if holder._parameters[attr].grad is None else None

    def refresh_compute_copy(self, full: bool = False) -> None:
        """Re-cast ``flat16`` if the parameters changed since it was made. Forward passes do
        this themselves; a CUDA graph replay runs no Python, so a caller that changes the
        parameters between replays (loading a state, restoring the best) calls it.

        While some parameters are frozen (``requires_grad`` False: a head-only stage) and
        ``flat16`` was made whole under the same frozen set, only the trainable parameters'
        segments are re-cast (fc2: 5,010 of 431,080 per member; a whole re-cast is 2.6 GB per
        step at P = 1024). Contract: frozen parameters change only through
        ``load_state_dict``, ``load_member_state`` or ``_member_tensors`` (restoring a best
        state), which make the next re-cast whole; after any other in-place change of a frozen
        parameter pass ``full=True``.
        """
        if self.flat16 is None or (self.flat16_version == self.flat._version and not full):
            return
        trainable = frozenset(i for i, p in enumerate(self.parameters()) if p.requires_grad)
        if not full and self._whole_under is not None and trainable == self._whole_under:
            for i in sorted(trainable):
                self.layout.view(self.flat16, i).copy_(self.layout.view(self.flat, i))
        else:
            self.flat16.copy_(self.flat)
            # Partial re-casts are valid from here on only while the same parameters are frozen.
            self._whole_under = trainable if len(trainable) < len(self.layout.segments) else None
        self.flat16_version = self.flat._version

    def _member_tensors(self) -> dict[str, Tensor]:
        self._whole_under = None  # a caller may write into these (engine._restore_best)
        return super()._member_tensors()

    def load_state_dict(self, *args, **kwargs):  # noqa: ANN002, ANN003 - nn.Module's signature
        self._whole_under = None
        return super().load_state_dict(*args, **kwargs)

    def forget_compute_copy(self) -> None:
        """Make the next forward re-cast ``flat16``: after CUDA-graph replays, whose writes
        (``PackedSGD`` on the head's views in a head-only stage) no version counter followed."""
        self.flat16_version = None

    def _compute_copies(self, first: int) -> tuple[Tensor, Tensor]:
        """Parameters ``first`` and ``first + 1`` in the compute dtype."""
        source = self.flat if self.flat16 is None else self.flat16
        return self.layout.view(source, first), self.layout.view(source, first + 1)

    def _conv(self, x: Tensor, module: nn.Module, first: int) -> Tensor:
        # The kernels read the fp32 masters and cast in registers (conv weights are few).
        if not (torch.is_grad_enabled() and (x.requires_grad or module.weight.requires_grad
                                             or module.bias.requires_grad)):
            return fk.conv_pool_forward(x, module.weight, module.bias, with_arg=False)[0]  # no argmax written
        return ConvPool.apply(x, module.weight, module.bias, self._sink(first), self._sink(first + 1))

    def _linear(self, x: Tensor, module: nn.Module, first: int) -> Tensor:
        w_c, b_c = self._compute_copies(first)
        return PackedLinearFn.apply(x, module.weight, module.bias, w_c, b_c, self._sink(first),
                                    self._sink(first + 1))

    def body(self, x: Tensor) -> Tensor:
        # Before any layer saves a view of flat16 for its backward: re-casting afterwards
        # would bump flat16's version and make autograd refuse the saved view.
        self.refresh_compute_copy()
        x = x.to(self.compute_dtype).contiguous()  # [P, B, C, H, W]
        z = self._conv(x, self.conv1, 0)
        z = self._conv(z, self.conv2, 2)
        z = z.reshape(self.members, x.shape[1], -1)  # [P, B, 50*4*4] in (c, h, w) order, as from_grouped
        return F.relu(self._linear(z, self.fc1, 4))

    def head(self, z: Tensor) -> tuple[Tensor, Tensor]:
        self.refresh_compute_copy()  # a no-op after body(); head-only stages call head alone
        return z, self._linear(z, self.fc2, 6)

    def gather_grads(self) -> None:
        """Make ``flat_grad`` hold every parameter's gradient (a copy only where autograd did
        not take the gradient written into ``flat_grad``)."""
        for (name, p), view in zip(self.named_parameters(), self.layout.views(self.flat_grad)):
            if p.grad is None:
                raise RuntimeError(f"{name} has no gradient: FusedSGD steps every parameter")
            if p.grad.data_ptr() != view.data_ptr():
                view.copy_(p.grad)


class FusedSGD:
    """``PackedSGD`` for a ``FusedLeNet5``: every parameter in one Triton pass per step.

    Same semantics (PyTorch SGD: buf = m*buf + g + wd*w, buf = g + wd*w on the first step;
    w -= lr*buf, biases at ``lr * bias_lr_factor``), same ``step`` / ``zero_grad`` /
    ``state`` / ``load_state``, and the same state format (one buffer per parameter in
    ``model.parameters()`` order, None before the first step), so checkpoints pass
    between the two. Steps all parameters (no head-only stages).
    """

    def __init__(self, model: FusedLeNet5, momentum: Tensor, weight_decay: Tensor,
                 bias_lr_factor: Tensor | None = None) -> None:
        self.model = model
        p, dev = model.members, model.flat.device
        # One row per member: (lr, bias lr factor, weight decay, momentum); step() writes column 0.
        self.hyper = torch.zeros(p, 4, device=dev)
        self.hyper[:, 1] = 1.0 if bias_lr_factor is None else bias_lr_factor.to(dev, torch.float32)
        self.hyper[:, 2] = weight_decay.to(dev, torch.float32)
        self.hyper[:, 3] = momentum.to(dev, torch.float32)
        self.table = model.layout.table(dev)
        # Zeros make the first step PyTorch's buf = d exactly (m*0 + d == d), with no branch.
        self.buf = torch.zeros_like(model.flat)
        self.started = False

    @torch.no_grad()
    def step(self, lr: Tensor) -> None:
        """One update; ``lr`` is the [P] learning rate of the weights (device tensor)."""
        model = self.model
        model.gather_grads()
        self.hyper[:, 0].copy_(lr)  # one small copy per step (captured in the step's graph)
        fk.sgd_step(model.flat, model.flat_grad, self.buf, self.table, self.hyper, model.flat16)
        if model.flat16 is not None:  # the pass rewrote every element of the 16-bit copy
            model.flat16_version = model.flat._version
        self.started = True

    def zero_grad(self) -> None:
        for p in self.model.parameters():
            p.grad = None

    def state(self) -> list[Tensor | None]:
        if not self.started:
            return [None] * len(self.model.layout.segments)
        return [v.detach().cpu().clone() for v in self.model.layout.views(self.buf)]

    def load_state(self, buffers: Sequence[Tensor | None], device: torch.device | None = None) -> None:
        if len(buffers) != len(self.model.layout.segments):
            raise ValueError(f"{len(buffers)} buffers for {len(self.model.layout.segments)} parameters")
        if all(b is None for b in buffers):
            self.buf.zero_()
            self.started = False
            return
        if any(b is None for b in buffers):
            raise ValueError("FusedSGD steps every parameter: all buffers or none")
        with torch.no_grad():
            for view, b in zip(self.model.layout.views(self.buf), buffers):
                view.copy_(b)
        self.started = True
