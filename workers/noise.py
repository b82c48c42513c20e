"""Counter-based random masks: every member's dropout in one element-wise kernel (CUDA).

Floor: workers (trial execution; imports sweep.core and sweep.store only).

Element e of member p's slice in draw n is kept iff ``h(h_e ^ h(key_p ^ h(n))) < keep * 2^32``
with ``h`` a 32-bit integer hash and ``h_e`` the hash of the element's logical index within
the member's ``[B, C, H, W]``. So a member's masks depend on its seed and the number of
draws alone (the same alone or in any pack, in any memory layout), all members are drawn
by the same few kernels (no launch, no generator per member), and nothing is read back to
the host: a CUDA graph can hold it. A stream's state is one integer, the draw count.

On CUDA ``member_dropout`` runs ``workers.dropout_kernel`` (one Triton kernel per call and
per backward, the same bits); elsewhere the torch ops below (about 40 per element).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF


def mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (Mueller's ``0x45d9f3b`` mixer) of int64 tensors holding 32-bit
    values; the multiplier is below 2^27, so products never leave int64."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def member_keys(seeds: Sequence[int], device: torch.device) -> Tensor:
    """The members' stream keys [P] (int64 holding 32 bits)."""
    return mix32(torch.tensor([int(s) & _MASK32 for s in seeds], dtype=torch.int64, device=device))


@functools.lru_cache(maxsize=32)
def _element_hashes(shape: torch.Size, device: torch.device) -> Tensor:
    """``h_e`` of one member's ``[B, C, H, W]`` slice, as ``[B, 1, C, H, W]`` (once per shape)."""
    b, _, *rest = shape
    n = b * int(torch.Size(rest).numel())
    return mix32(torch.arange(n, dtype=torch.int64, device=device)).view(b, 1, *rest)


def keep_mask(shape: torch.Size, keys: Tensor, draws: Tensor, keep: float, dtype: torch.dtype) -> Tensor:
    """1/0 mask of activations ``shape`` = ``[B, P, C, H, W]`` for draw number ``draws``
    (0-dim int64 on the device) of the members' streams ``keys`` [P]."""
    salt = mix32(keys ^ mix32(draws.expand(keys.shape[0])))  # [P]: this draw of each stream
    u = mix32(_element_hashes(shape, keys.device) ^ salt.view(1, -1, *([1] * (len(shape) - 2))))
    return (u < int(keep * 2 ** 32)).to(dtype)


def torch_dropout(z: Tensor, members: int, keys: Tensor, draws: Tensor, keep: float) -> Tensor:
    """Member dropout as torch ops: ``[B, P*C, H, W]`` in any memory layout, draw ``draws``."""
    per = z.unflatten(1, (members, -1))  # [B, P, C, H, W], any memory layout
    mask = keep_mask(per.shape, keys, draws, keep, z.dtype)
    return (per * mask).div_(keep).flatten(1, 2)


def member_dropout(z: Tensor, members: int, keys: Tensor, draws: Tensor, keep: float,
                   kernel: bool | None = None) -> Tensor:
    """Every member's dropout of draw ``draws`` (not advanced here), scaled by ``1 / keep``.

    ``kernel``: whether to run ``workers.dropout_kernel`` (default: on CUDA, where it gives
    the torch path's bits; True on the CPU runs it in Triton's interpreter, for tests).
    """
    if kernel is None:
        kernel = z.is_cuda
    if kernel:
        try:
            from workers import dropout_kernel
        except ImportError:  # no Triton here: the torch ops, the same bits
            dropout_kernel = None
        if dropout_kernel is not None and dropout_kernel.supported(z, members, keep):
            return dropout_kernel.dropout(z, members, keys, draws, keep)
    return torch_dropout(z, members, keys, draws, keep)
