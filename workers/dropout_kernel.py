"""One Triton kernel for every member's dropout: mask, apply and scale in a single pass.

Floor: workers (trial execution; imports sweep.core and sweep.store only).

The same bits as ``workers.noise.keep_mask`` and ``(x * mask).div_(keep)`` as PyTorch computes
them on CUDA, where division by a Python scalar is a multiplication by the fp32 reciprocal
(``a * (1 / b)`` in the operation dtype, fp32 for 16-bit tensors): element ``e`` of member
``p`` is kept iff ``h(h_e ^ h(key_p ^ h(n))) < keep * 2^32``, with the 32-bit hash ``h`` in
uint32 registers. It reads the activation (or its gradient) and writes the result, nothing
else: 2 x 2 bytes per element in 16 bit, 2 x 4 in fp32 (the torch path: about 40 int64
passes, some 200 bytes per element, and a saved mask). The backward regenerates the mask
from the draw count the forward used (written by the forward's program 0 into an 8-byte
snapshot), so nothing of the mask is stored. No host read, no allocation that depends on
values: a CUDA graph can hold it. ``workers.noise.member_dropout`` uses it on CUDA only; the
tests run it in Triton's interpreter (``TRITON_INTERPRET=1``).

Layouts: ``[B, P*C, H, W]`` contiguous or channels-last (the two the packed layers make),
other layouts are copied to contiguous first. A program covers BLOCK consecutive elements of
one row: a ``(b, p)`` slice of ``C*H*W`` elements (contiguous: one member, its salt a
scalar) or a ``(b, h, w)`` pixel of ``P*C`` channels (channels last: member per element).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRETED = bool(triton.knobs.runtime.interpret)
# Elements per program: 1024 with 4 warps (8 per thread) on the GPU; the interpreter pays
# Python time per program, so it takes bigger blocks.
BLOCK = 1024 * (4 if INTERPRETED else 1)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_M = 0x45D9F3B  # Mueller's multiplier, as workers.noise.mix32


@triton.jit
def _mix32(x):
    """workers.noise.mix32 on uint32: the products wrap mod 2^32 as its ``& 0xFFFFFFFF`` does."""
    x = ((x >> 16) ^ x) * 0x45D9F3B
    x = ((x >> 16) ^ x) * 0x45D9F3B
    return (x >> 16) ^ x


@triton.jit
def dropout_kernel(x_ptr, y_ptr, keys_ptr, draws_ptr, snap_ptr, thr, scale, TILES,
                   P: tl.constexpr, C: tl.constexpr, HW: tl.constexpr, ROW: tl.constexpr,
                   CHANNELS_LAST: tl.constexpr, BACKWARD: tl.constexpr, SNAP: tl.constexpr,
                   BLOCK: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """Grid (rows * TILES,): y = x * mask * scale (forward) or (x * scale) * mask (backward,
    PyTorch's order for ``div_`` then ``mul``: the same bits, overflow included).

    Rows are ``(b, p)`` (contiguous; ROW = C*HW) or ``(b, hw)`` (channels last; ROW = P*C).
    ``thr`` = int(keep * 2^32), ``scale`` = fp32(1 / fp32(keep)). With SNAP program 0 copies
    the draw count to ``snap`` for the backward.
    """
    pid = tl.program_id(0)
    row = pid // TILES
    j = (pid % TILES) * BLOCK + tl.arange(0, BLOCK)
    ok = j < ROW
    offs = row.to(tl.int64) * ROW + j
    d = tl.load(draws_ptr)  # int64: h(n)'s first round takes its low 32 bits after the shift-xor
    if SNAP:
        if pid == 0:
            tl.store(snap_ptr, d)
    dm = (((d >> 16) ^ d).to(tl.uint32) * 0x45D9F3B)
    dm = ((dm >> 16) ^ dm) * 0x45D9F3B
    dm = (dm >> 16) ^ dm
    if CHANNELS_LAST:
        b = row // HW
        p = j // C
        e = b * (C * HW) + (j - p * C) * HW + (row - b * HW)
        key = tl.load(keys_ptr + p, mask=ok, other=0)
    else:
        b = row // P
        p = row - b * P
        e = b * (C * HW) + j
        key = tl.load(keys_ptr + p)
    salt = _mix32(key.to(tl.uint32) ^ dm)
    u = _mix32(_mix32(e.to(tl.uint32)) ^ salt)
    m = tl.where(u.to(tl.int64) < thr, 1.0, 0.0)
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    dtype = y_ptr.dtype.element_ty
    if BACKWARD:
        y = _round(x * scale, dtype, EMULATE_BF16).to(tl.float32) * m
    else:
        y = (x * m) * scale
    tl.store(y_ptr + offs, _round(y, dtype, EMULATE_BF16), mask=ok)


@triton.jit
def _round(x, dtype: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """fp32 -> ``dtype``, to nearest even as PyTorch rounds. The interpreter's fp32 -> bf16
    cast does not round so (it truncates, or rounds half up without carry), so there it is
    done on the bits as c10's round_to_nearest_even does (a NaN becomes 0x7FC0)."""
    if EMULATE_BF16 and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        r = tl.where(x != x, 0x7FC0, r)
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


def supported(z: Tensor, members: int, keep: float) -> bool:
    """Whether the kernel gives today's bits for this call (else the torch path runs)."""
    if z.dim() != 4 or z.dtype not in _DTYPES or not 0.0 < keep < 1.0 or z.shape[1] % members:
        return False
    b, pc, h, w = z.shape
    return b * (pc // members) * h * w < 2 ** 31  # h_e of a 32-bit index, as the torch path


def _launch(x: Tensor, members: int, keys: Tensor, draws: Tensor, keep: float, backward: bool,
            snap: Tensor | None) -> Tensor:
    if x.is_contiguous():
        cl = False
    elif x.is_contiguous(memory_format=torch.channels_last):
        cl = True
    else:
        x, cl = x.contiguous(), False
    b, pc, h, w = x.shape
    c, hw = pc // members, h * w
    row, rows = (pc, b * hw) if cl else (c * hw, b * members)
    block = min(BLOCK, triton.next_power_of_2(row))
    tiles = triton.cdiv(row, block)
    y = torch.empty_like(x)  # the same strides (dense): the layout the torch path returns
    scale = float(np.float32(1.0) / np.float32(keep))
    dropout_kernel[(rows * tiles,)](x, y, keys, draws, draws if snap is None else snap, int(keep * 2 ** 32),
                                    scale, tiles, P=members, C=c, HW=hw, ROW=row, CHANNELS_LAST=cl,
                                    BACKWARD=backward, SNAP=snap is not None, BLOCK=block, EMULATE_BF16=INTERPRETED,
                                    num_warps=4)
    return y


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, keys: Tensor, draws: Tensor, members: int, keep: float) -> Tensor:
        snap = torch.empty((), dtype=torch.int64, device=z.device) if ctx.needs_input_grad[0] else None
        ctx.members, ctx.keep = members, keep
        if snap is not None:
            ctx.save_for_backward(keys, snap)
        return _launch(z, members, keys, draws, keep, False, snap)

    @staticmethod
    def backward(ctx, g: Tensor):
        keys, snap = ctx.saved_tensors
        return _launch(g, ctx.members, keys, snap, ctx.keep, True, None), None, None, None, None


def dropout(z: Tensor, members: int, keys: Tensor, draws: Tensor, keep: float) -> Tensor:
    """``[B, P*C, H, W]`` with member p's channels ``p*C .. (p+1)*C - 1`` masked by draw
    ``draws`` (0-dim int64, not advanced here) of stream ``keys[p]`` and scaled by 1/keep."""
    return _Dropout.apply(z, keys, draws, members, keep)
