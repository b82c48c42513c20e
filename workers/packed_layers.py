"""Layers that hold P independent networks ("members") as one stacked module.

Every parameter has a leading member dimension P. Convolutions run as one grouped
convolution (groups = P) over activations laid out ``[B, P*C, H, W]``; linear layers
run as one batched matrix product over ``[P, B, F]``. One kernel launch per layer
serves all members, and no member's numbers depend on another's.

Initialisation is per member, from that member's own CPU ``torch.Generator``, so a
member gets the same weights whether it trains alone or in a pack of 500.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.reshape(self.members * self.c_out, self.c_in, self.kernel, self.kernel)
        b = None if self.bias is None else self.bias.reshape(-1)
        return F.conv2d(x, w, b, self.stride, self.padding, groups=self.members)


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


class PackedBatchNorm2d(nn.BatchNorm2d):
    """P independent BatchNorm2d layers: one BatchNorm over P*C channels is exactly that."""

    def __init__(self, members: int, channels: int) -> None:
        super().__init__(members * channels)
        self.members, self.channels = members, channels

    def reset(self, init: str, generators: Sequence[torch.Generator]) -> None:
        self.reset_parameters()


def to_grouped(x: Tensor) -> Tensor:
    """``[P, B, C, H, W]`` -> ``[B, P*C, H, W]``."""
    p, b, c, h, w = x.shape
    return x.transpose(0, 1).reshape(b, p * c, h, w)


def from_grouped(x: Tensor, members: int) -> Tensor:
    """``[B, P*C, ...]`` -> ``[P, B, C*...]`` (flattened per member)."""
    b = x.shape[0]
    return x.reshape(b, members, -1).transpose(0, 1)
