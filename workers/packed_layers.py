"""Layers that hold P independent networks ("members") as one stacked module.

Floor: workers (trial execution; imports sweep.core and sweep.store only).

Every parameter has a leading member dimension P. Convolutions run as one grouped
convolution (groups = P) over activations laid out ``[B, P*C, H, W]``; linear layers
run as one batched matrix product over ``[P, B, F]``. One kernel launch per layer
serves all members, and no member's numbers depend on another's.

Initialisation is per member, from that member's own CPU ``torch.Generator``, so a
member gets the same weights whether it trains alone or in a pack of 500.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CPU_LOOP_MAX_C_IN = 3  # see PackedConv2d.forward


def fill_weight(w: Tensor, fan_in: int, init: str, generators: Sequence[torch.Generator]) -> None:
    """Initialise each member's slice ``w[p]`` from ``generators[p]``.

    xavier: Caffe's XavierFiller (Buda et al. trained with Caffe): U(-a, a), a = sqrt(3/fan_in).
    kaiming: Caffe's MSRAFiller / He et al.: N(0, 2/fan_in).
    """
    with torch.no_grad():
        for p, g in enumerate(generators):
            cpu = torch.empty(w.shape[1:], dtype=torch.float32)
            if init == "xavier":
                bound = math.sqrt(3.0 / fan_in)
                cpu.uniform_(-bound, bound, generator=g)
            elif init == "kaiming":
                cpu.normal_(0.0, math.sqrt(2.0 / fan_in), generator=g)
            else:
                raise ValueError(f"unknown init {init!r} (allowed: xavier, kaiming)")
            w[p].copy_(cpu)


class PackedConv2d(nn.Module):
    """P independent Conv2d layers on ``[B, P*C_in, H, W]``."""

    def __init__(self, members: int, c_in: int, c_out: int, kernel: int, stride: int = 1,
                 padding: int = 0, bias: bool = True) -> None:
        super().__init__()
        self.members, self.c_in, self.c_out = members, c_in, c_out
        self.stride, self.padding, self.kernel = stride, padding, kernel
        self.weight = nn.Parameter(torch.zeros(members, c_out, c_in, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(members, c_out)) if bias else None

    def reset(self, init: str, generators: Sequence[torch.Generator]) -> None:
        fill_weight(self.weight, self.c_in * self.kernel * self.kernel, init, generators)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, then: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """The convolution, followed by ``then`` (a per-channel op such as pooling) if given."""
        w = self.weight.reshape(self.members * self.c_out, self.c_in, self.kernel, self.kernel)
        b = None if self.bias is None else self.bias.reshape(-1)
        if x.device.type == "cpu" and self.c_in <= CPU_LOOP_MAX_C_IN and self.members > 1:
            # oneDNN's grouped kernels are ~3x slower per member than P plain convolutions
            # when each group has a single input channel (LeNet's conv1; measured on 2 cores).
            # ``then`` runs per member before the outputs are joined: a smaller copy, and each
            # member's activations stay in the CPU's caches. Same numbers either way; GPUs
            # keep the one grouped launch.
            xs = x.split(self.c_in, dim=1)
            ws = w.split(self.c_out, dim=0)
            bs = [None] * self.members if b is None else b.split(self.c_out)
            outs = [F.conv2d(xi, wi, bi, self.stride, self.padding) for xi, wi, bi in zip(xs, ws, bs)]
            return torch.cat([then(o) for o in outs] if then else outs, dim=1)
        z = F.conv2d(x, w, b, self.stride, self.padding, groups=self.members)
        return then(z) if then else z


class PackedLinear(nn.Module):
    """P independent Linear layers on ``[P, B, F_in]`` (one batched matmul)."""

    def __init__(self, members: int, f_in: int, f_out: int) -> None:
        super().__init__()
        self.f_in, self.f_out = f_in, f_out
        self.weight = nn.Parameter(torch.zeros(members, f_in, f_out))  # x @ W: [P,B,in]@[P,in,out]
        self.bias = nn.Parameter(torch.zeros(members, f_out))

    def reset(self, init: str, generators: Sequence[torch.Generator]) -> None:
        fill_weight(self.weight, self.f_in, init, generators)
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight)

    def linear_form(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(what the weights multiply, W [P, F, K], b [P, K]): logits = x @ W + b."""
        return x, self.weight, self.bias


class PackedCosineLinear(nn.Module):
    """P normalised classifiers (Cao et al.'s ``NormedLinear``, built for the LDAM loss).

    ``logits = s * normalize(x) @ normalize(W)``: each feature vector and each class's
    weight column at unit L2 norm, so a logit is ``s`` times a cosine and lies in
    ``[-s, s]``; no bias. ``s`` (the recipe's ``ldam_scale``, per member) is applied here,
    not in the loss, so that evaluation (softmax scores, thresholding) sees the logits
    the loss trained. Initialisation as Cao et al.: U(-1, 1), each column at unit norm.
    """

    bias = None

    def __init__(self, members: int, f_in: int, f_out: int, scale: float = 30.0) -> None:
        super().__init__()
        self.f_in, self.f_out = f_in, f_out
        self.weight = nn.Parameter(torch.zeros(members, f_in, f_out))
        self.register_buffer("scale", torch.full((members,), float(scale)))

    def reset(self, init: str, generators: Sequence[torch.Generator]) -> None:
        with torch.no_grad():
            for p, g in enumerate(generators):
                cpu = torch.empty(self.weight.shape[1:]).uniform_(-1.0, 1.0, generator=g)
                self.weight[p].copy_(F.normalize(cpu, dim=0))

    def _scaled_columns(self) -> Tensor:
        return F.normalize(self.weight, dim=1) * self.scale.to(self.weight.dtype)[:, None, None]

    def forward(self, x: Tensor) -> Tensor:
        return torch.bmm(F.normalize(x, dim=-1), self._scaled_columns())

    def linear_form(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(unit features, s * unit columns, zero bias): the same logits as a linear layer."""
        w = self._scaled_columns()
        return F.normalize(x, dim=-1), w, torch.zeros(w.shape[0], w.shape[2], dtype=w.dtype, device=w.device)


def classifier_layer(head: str, members: int, f_in: int, f_out: int) -> "PackedLinear | PackedCosineLinear":
    """The final layer W_C of a model: ``head`` is a ``sweep.core.spec.Head`` value."""
    if head == "linear":
        return PackedLinear(members, f_in, f_out)
    if head == "cosine":
        return PackedCosineLinear(members, f_in, f_out)
    raise ValueError(f"unknown head {head!r} (allowed: linear, cosine)")


class PackedBatchNorm2d(nn.BatchNorm2d):
    """P independent BatchNorm2d layers: one BatchNorm over P*C channels is exactly that."""

    def __init__(self, members: int, channels: int) -> None:
        super().__init__(members * channels)
        self.members, self.channels = members, channels

    def reset(self, init: str, generators: Sequence[torch.Generator]) -> None:
        self.reset_parameters()


def to_grouped(x: Tensor, channels_last: bool = False) -> Tensor:
    """``[P, B, C, H, W]`` -> ``[B, P*C, H, W]``.

    With ``channels_last`` the result is laid out in memory as ``[B, H, W, P*C]``
    (``torch.channels_last``), written by one copy; every packed layer keeps that layout.
    """
    p, b, c, h, w = x.shape
    if channels_last:
        return x.permute(1, 3, 4, 0, 2).reshape(b, h, w, p * c).permute(0, 3, 1, 2)
    return x.transpose(0, 1).reshape(b, p * c, h, w)


def from_grouped(x: Tensor, members: int) -> Tensor:
    """``[B, P*C, ...]`` -> ``[P, B, C*...]`` (flattened per member)."""
    b = x.shape[0]
    return x.reshape(b, members, -1).transpose(0, 1)


def grouped_avg_pool(x: Tensor, members: int) -> Tensor:
    """Global average pooling: ``[B, P*C, H, W]`` -> ``[P, B, C]``."""
    return from_grouped(x.mean(dim=(2, 3)), members)


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def pad_shortcut(x: Tensor, members: int, c_in: int, c_out: int, stride: int) -> Tensor:
    """He et al.'s option-A shortcut for every member at once.

    Subsample by ``stride`` and zero-pad each member's channels from ``c_in`` to
    ``c_out``, ``(c_out - c_in) // 2`` zero channels before and the rest after (as in
    the LDAM-DRW ResNet-32: ``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4))``).
    No parameters; the memory layout of ``x`` is kept.
    """
    fmt = _memory_format(x)
    if stride > 1:
        x = x[:, :, ::stride, ::stride]
    if c_out == c_in:
        return x.contiguous(memory_format=fmt)
    b, _, h, w = x.shape
    lo = (c_out - c_in) // 2
    out = torch.empty((b, members * c_out, h, w), dtype=x.dtype, device=x.device, memory_format=fmt).zero_()
    out.unflatten(1, (members, c_out))[:, :, lo:lo + c_in] = x.unflatten(1, (members, c_in))
    return out


class PackedBasicBlock(nn.Module):
    """P independent ResNet basic blocks (He et al.): two 3x3 conv-BN, shortcut, ReLU.

    ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` on ``[B, P*C, H, W]``.
    Convolutions have no bias (BatchNorm follows). When the block changes the width or
    the resolution the shortcut is ``"pad"`` (option A: subsample + zero channels,
    no parameters) or ``"projection"`` (option B: 1x1 conv with the block's stride + BN).
    """

    def __init__(self, members: int, c_in: int, c_out: int, stride: int = 1,
                 shortcut: str = "projection") -> None:
        super().__init__()
        if shortcut not in ("pad", "projection"):
            raise ValueError(f"unknown shortcut {shortcut!r} (allowed: pad, projection)")
        self.members, self.c_in, self.c_out, self.stride = members, c_in, c_out, stride
        self.conv1 = PackedConv2d(members, c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = PackedBatchNorm2d(members, c_out)
        self.conv2 = PackedConv2d(members, c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = PackedBatchNorm2d(members, c_out)
        self.identity = stride == 1 and c_in == c_out
        self.pad = not self.identity and shortcut == "pad"
        if not self.identity and not self.pad:
            self.short_conv = PackedConv2d(members, c_in, c_out, 1, stride, 0, bias=False)
            self.short_bn = PackedBatchNorm2d(members, c_out)

    def forward(self, x: Tensor) -> Tensor:
        # In place where autograd allows (BatchNorm saves its input, not its output):
        # two fewer activation-sized buffers per block, which is what limits P.
        out = F.relu_(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.identity:
            short = x
        elif self.pad:
            short = pad_shortcut(x, self.members, self.c_in, self.c_out, self.stride)
        else:
            short = self.short_bn(self.short_conv(x))
        return F.relu_(out.add_(short))
