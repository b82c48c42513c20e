"""Counter-based random masks: every member's dropout in a few element-wise kernels.

Floor: workers (trial execution; imports sweep.core and sweep.store only).

Element e of member p's slice in draw n is kept iff ``h(h_e ^ h(key_p ^ h(n))) < keep * 2^32``
with ``h`` a 32-bit integer hash and ``h_e`` the hash of the element's logical index within
the member's ``[B, C, H, W]``. So a member's masks depend on its seed and the number of
draws alone (the same alone or in any pack, in any memory layout), all members are drawn
by the same few kernels (no launch, no generator per member), and nothing is read back to
the host: a CUDA graph can hold it. A stream's state is one integer, the draw count.
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
