"""Triton kernels for the fused packed LeNet-5 step: convolution + bias + 2x2 max-pool, and SGD.

Floor: workers (trial execution; imports sweep.core and sweep.store only).

It is longer than 400 lines on purpose: this is the project's only Triton code (docs/layout.md), so
every kernel of the fused step, its launch helper and its tile choice stay in one place.

Activations are laid out ``[P, B, C, H, W]`` (contiguous), weights ``[P, C_out, C_in, k, k]``
and biases ``[P, C_out]`` as in ``workers.packed_layers``. Each convolution is an implicit
GEMM per member: rows are output positions of several images of one member, columns are
output channels, the reduction runs over ``(c_in, kh, kw)``. No im2col matrix is formed:
an input address splits into a part that depends on the row only and a part that depends
on the reduction index only (see ``_window_rows`` and ``_tap_cols``), so a tile of the
virtual im2col matrix is one gather from the input.

The forward computes the four convolution outputs of each 2x2 pooling window, adds the
bias, and keeps only the maximum and its position 0..3 (``dy * 2 + dx``, PyTorch's order:
the first maximum wins, NaN wins) as int8. The backward kernels route the pooled gradient
through that position, so the pre-pool activation is never stored: conv1's weight gradient
selects it per window cell; for conv2 ``unpool_kernel`` writes the unpooled gradient once
(channels last) and the input and weight gradients are plain shifted matrix products of it.

Stride 1, no padding, square kernels, floor-mode pooling (a trailing odd row or column
of the convolution output is not pooled and gets no gradient), as LeNet-5 uses them.
Launch helpers check shapes; the kernels trust them. On a machine without a GPU the
kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` set before ``triton`` is
imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# Whether the kernels below run in Triton's interpreter: @triton.jit reads this when it
# decorates them, i.e. when this module is first imported.
INTERPRETED = bool(triton.knobs.runtime.interpret)
# Elements per SGD program; flat parameter segments are padded to it. 2048 with 8 warps:
# 8 elements per thread, 79 registers on sm_90. The interpreter pays Python time per
# program, so it takes bigger blocks.
SGD_BLOCK = 2048 * (16 if INTERPRETED else 1)
# Row tiles per program of the argmax-select weight gradient (conv1's) when a member's rows
# are split over several programs (see conv_pool_grad_weight).
SPLIT_STEPS = 16


def _tile(n: int, cap: int) -> int:
    """A power-of-two tile edge >= 16 (tl.dot's minimum) covering ``n`` where ``cap`` allows.

    Under the interpreter every program and every tile operation costs Python time, so
    tiles grow up to 4x the GPU's (whose sizes are first guesses, to be tuned on the device).
    """
    return max(16, min(cap * (4 if INTERPRETED else 1), triton.next_power_of_2(n)))


@triton.jit
def _window_rows(offs_m, HW_OUT: tl.constexpr, W_OUT: tl.constexpr, IMG: tl.constexpr, W: tl.constexpr):
    """Input offset of the top-left tap of each row's pooling window.

    A row ``m`` is ``(image b, pooled position s)`` of one member: ``b = m // HW_OUT``,
    ``s = ph * W_OUT + pw``. Its window's top-left convolution output is ``(2ph, 2pw)``, whose
    kernel tap ``(0, 0)`` reads input ``(2ph, 2pw)`` of image ``b`` (``IMG`` elements apart).
    """
    b = offs_m // HW_OUT
    s = offs_m % HW_OUT
    ph = s // W_OUT
    pw = s % W_OUT
    return b * IMG + (2 * ph) * W + 2 * pw  # int32: offsets inside one member (launch helpers check)


@triton.jit
def _tap_cols(offs_k, KS: tl.constexpr, H: tl.constexpr, W: tl.constexpr):
    """Input offset of reduction index ``k = (ci, kh, kw)`` relative to the tap (0, 0)."""
    ci = offs_k // (KS * KS)
    r = offs_k % (KS * KS)
    return ci * (H * W) + (r // KS) * W + (r % KS)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    # fp32 operands: IEEE products, so the result equals PyTorch's fp32 convolution up to the
    # summation order (Triton's default on GPUs is TF32). 16-bit operands ignore the flag.
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _take_max(best, arg, v, pos: tl.constexpr):
    # Strictly greater: the first maximum in window order wins; a NaN wins (and stays) as in
    # PyTorch's max_pool2d, so a diverging member's NaN reaches its loss.
    take = (v > best) | (v != v)
    return tl.where(take, v, best), tl.where(take, pos, arg)


@triton.jit
def conv_pool_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, arg_ptr, B,
                         C_IN: tl.constexpr, H: tl.constexpr, W: tl.constexpr, C_OUT: tl.constexpr,
                         KS: tl.constexpr, HP: tl.constexpr, WP: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         IEEE: tl.constexpr, WRITE_ARG: tl.constexpr = True):
    """Grid (P, cdiv(B * HP * WP, BLOCK_M)): one member, BLOCK_M pooled positions, all channels.
    Without WRITE_ARG (no gradient to come) only the pooled values are written."""
    p = tl.program_id(0).to(tl.int64)
    K: tl.constexpr = C_IN * KS * KS
    HW_OUT: tl.constexpr = HP * WP
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < B * HW_OUT
    rows = _window_rows(offs_m, HW_OUT, WP, C_IN * H * W, W)
    offs_n = tl.arange(0, BLOCK_N)
    n_ok = offs_n < C_OUT
    x_base = x_ptr + p * B * (C_IN * H * W)
    w_base = w_ptr + p * (C_OUT * K)
    dtype = x_ptr.dtype.element_ty
    acc00 = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc01 = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc10 = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc11 = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        # W^T tile [BLOCK_K, BLOCK_N]: w[p, co, k] at co * K + k. fp32 masters, cast in registers.
        wt = tl.load(w_base + offs_n[None, :] * K + offs_k[:, None],
                     mask=k_ok[:, None] & n_ok[None, :], other=0.0).to(dtype)
        a_ptrs = x_base + rows[:, None] + _tap_cols(offs_k, KS, H, W)[None, :]
        a_mask = m_ok[:, None] & k_ok[None, :]
        # The four window cells are the same gather shifted by (dy, dx) input positions.
        acc00 = _dot(tl.load(a_ptrs, mask=a_mask, other=0.0), wt, acc00, IEEE)
        acc01 = _dot(tl.load(a_ptrs + 1, mask=a_mask, other=0.0), wt, acc01, IEEE)
        acc10 = _dot(tl.load(a_ptrs + W, mask=a_mask, other=0.0), wt, acc10, IEEE)
        acc11 = _dot(tl.load(a_ptrs + W + 1, mask=a_mask, other=0.0), wt, acc11, IEEE)
    # Bias before the max, as the reference pools conv + bias (rounding may create ties).
    bias = tl.load(b_ptr + p * C_OUT + offs_n, mask=n_ok, other=0.0)[None, :]
    best = acc00 + bias
    arg = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
    best, arg = _take_max(best, arg, acc01 + bias, 1)
    best, arg = _take_max(best, arg, acc10 + bias, 2)
    best, arg = _take_max(best, arg, acc11 + bias, 3)
    # y[p, b, co, s] with offs_m = b * HW_OUT + s
    b_idx = (offs_m // HW_OUT).to(tl.int64)
    out = (p * B + b_idx)[:, None] * (C_OUT * HW_OUT) + offs_n[None, :] * HW_OUT + (offs_m % HW_OUT)[:, None]
    mask = m_ok[:, None] & n_ok[None, :]
    tl.store(y_ptr + out, best.to(y_ptr.dtype.element_ty), mask=mask)
    if WRITE_ARG:
        tl.store(arg_ptr + out, arg.to(tl.int8), mask=mask)


@triton.jit
def conv_pool_grad_weight_kernel(x_ptr, gy_ptr, arg_ptr, gw_ptr, B, CHUNK,
                                 C_IN: tl.constexpr, H: tl.constexpr, W: tl.constexpr, C_OUT: tl.constexpr,
                                 KS: tl.constexpr, HP: tl.constexpr, WP: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                 IEEE: tl.constexpr):
    """Grid (P, cdiv(K, BLOCK_K), S): gw[p, :, k-tile] = sum over images and pooled positions.

    gw[co, k] = sum_m gz[m, co] * im2col[m, k]; gz is the pooled gradient placed at its
    argmax cell and zero at the other three, so each window cell d contributes
    ``where(arg == d, gy, 0)^T @ (the input gather shifted by cell d)``.
    Program z of S sums rows [z * CHUNK, (z + 1) * CHUNK) into ``gw[p, z]`` ([P, S, C_OUT, K];
    with S = 1 that is the gradient itself), and ``split_sum_kernel`` adds the S parts in
    order: a member's rows spread over S programs, deterministic.
    """
    p = tl.program_id(0).to(tl.int64)
    z = tl.program_id(2)
    K: tl.constexpr = C_IN * KS * KS
    HW_OUT: tl.constexpr = HP * WP
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    cols = _tap_cols(offs_k, KS, H, W)
    offs_n = tl.arange(0, BLOCK_N)
    n_ok = offs_n < C_OUT
    x_base = x_ptr + p * B * (C_IN * H * W)
    gy_base = gy_ptr + p * B * (C_OUT * HW_OUT)
    arg_base = arg_ptr + p * B * (C_OUT * HW_OUT)
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for i in range(0, CHUNK, BLOCK_M):  # rows past the member's last are masked (zero)
        offs_m = z * CHUNK + i + tl.arange(0, BLOCK_M)
        m_ok = offs_m < B * HW_OUT
        rows = _window_rows(offs_m, HW_OUT, WP, C_IN * H * W, W)
        # gy / arg tile [BLOCK_N, BLOCK_M] (channels x rows), transposed for the product
        q = (offs_m // HW_OUT)[None, :] * (C_OUT * HW_OUT) + offs_n[:, None] * HW_OUT + (offs_m % HW_OUT)[None, :]
        g_mask = n_ok[:, None] & m_ok[None, :]
        g = tl.load(gy_base + q, mask=g_mask, other=0.0)
        arg = tl.load(arg_base + q, mask=g_mask, other=-1).to(tl.int32)
        a_ptrs = x_base + rows[:, None] + cols[None, :]
        a_mask = m_ok[:, None] & k_ok[None, :]
        acc = _dot(tl.where(arg == 0, g, 0.0).to(dtype), tl.load(a_ptrs, mask=a_mask, other=0.0), acc, IEEE)
        acc = _dot(tl.where(arg == 1, g, 0.0).to(dtype), tl.load(a_ptrs + 1, mask=a_mask, other=0.0), acc, IEEE)
        acc = _dot(tl.where(arg == 2, g, 0.0).to(dtype), tl.load(a_ptrs + W, mask=a_mask, other=0.0), acc, IEEE)
        acc = _dot(tl.where(arg == 3, g, 0.0).to(dtype), tl.load(a_ptrs + W + 1, mask=a_mask, other=0.0),
                   acc, IEEE)
    out = (p * tl.num_programs(2) + z) * (C_OUT * K) + offs_n[:, None] * K + offs_k[None, :]
    tl.store(gw_ptr + out, acc, mask=n_ok[:, None] & k_ok[None, :])


@triton.jit
def split_sum_kernel(part_ptr, out_ptr, S: tl.constexpr, N: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (P, cdiv(N, BLOCK)): out[p] = part[p, 0] + part[p, 1] + ... in that order."""
    p = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    acc = tl.load(part_ptr + p * S * N + offs, mask=ok)
    for s in tl.static_range(1, S):  # unrolled, S from the batch only (18 at batch 64 in 16 bit)
        acc += tl.load(part_ptr + (p * S + s) * N + offs, mask=ok)
    tl.store(out_ptr + p * N + offs, acc, mask=ok)


@triton.jit
def conv_grad_weight_kernel(x_ptr, gz_ptr, gw_ptr, B,
                            C_IN: tl.constexpr, H: tl.constexpr, W: tl.constexpr, C_OUT: tl.constexpr,
                            KS: tl.constexpr, HP: tl.constexpr, WP: tl.constexpr, CO_PAD: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """Grid (P, cdiv(K, BLOCK_K)): the weight gradient from the unpooled gradient ``gz``.

    ``gw[co, k] = sum_m gz[m, co] * im2col[m, k]`` with rows ``m`` the pooled area's
    convolution outputs ``(b, oh, ow)`` of one member, in order (``gz``: ``unpool_kernel``,
    channels last, so its tile is contiguous vector loads). One product per row tile, no
    argmax test: the four window cells are rows of the same tile.
    """
    p = tl.program_id(0).to(tl.int64)
    K: tl.constexpr = C_IN * KS * KS
    OW2: tl.constexpr = 2 * WP
    R: tl.constexpr = 2 * HP * OW2
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    cols = _tap_cols(offs_k, KS, H, W)
    co = tl.arange(0, CO_PAD)
    x_base = x_ptr + p * B * (C_IN * H * W)
    g_base = gz_ptr + p * B * (R * CO_PAD)
    acc = tl.zeros((CO_PAD, BLOCK_K), tl.float32)
    for m0 in range(0, B * R, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < B * R
        s = offs_m % R
        rows = (offs_m // R).to(tl.int64) * (C_IN * H * W) + (s // OW2) * W + s % OW2
        gzt = tl.load(g_base + offs_m.to(tl.int64)[None, :] * CO_PAD + co[:, None], mask=m_ok[None, :], other=0.0)
        a = tl.load(x_base + rows[:, None] + cols[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _dot(gzt, a, acc, IEEE)
    out = p * (C_OUT * K) + co[:, None] * K + offs_k[None, :]
    tl.store(gw_ptr + out, acc, mask=(co < C_OUT)[:, None] & k_ok[None, :])


@triton.jit
def unpool_kernel(gy_ptr, arg_ptr, gz_ptr, C_OUT: tl.constexpr, HP: tl.constexpr, WP: tl.constexpr,
                  CO_PAD: tl.constexpr, BLOCK_R: tl.constexpr):
    """Grid (P * B,): the unpooled gradient of one image, channels last and zero-padded.

    ``gz[p, b, oh, ow, co]`` ([P, B, 2HP, 2WP, CO_PAD]) is ``gy[p, b, co, oh // 2, ow // 2]``
    where the window's argmax is the cell ``(oh % 2) * 2 + ow % 2``, else 0; channels
    ``C_OUT..CO_PAD-1`` are 0. Built once per backward, it turns the input gradient into
    plain shifted matrix products (no argmax test, no mask over channels in the inner loop).
    """
    img = tl.program_id(0).to(tl.int64)
    OW2: tl.constexpr = 2 * WP
    R: tl.constexpr = 2 * HP * OW2
    r = tl.arange(0, BLOCK_R)
    co = tl.arange(0, CO_PAD)
    oh = r // OW2
    ow = r % OW2
    src = co[None, :] * (HP * WP) + ((oh // 2) * WP + ow // 2)[:, None]
    ok = (r < R)[:, None] & (co < C_OUT)[None, :]
    g = tl.load(gy_ptr + img * (C_OUT * HP * WP) + src, mask=ok, other=0.0)
    a = tl.load(arg_ptr + img * (C_OUT * HP * WP) + src, mask=ok, other=-1).to(tl.int32)
    gz = tl.where(a == ((oh % 2) * 2 + ow % 2)[:, None], g, 0.0)
    tl.store(gz_ptr + img * (R * CO_PAD) + r[:, None] * CO_PAD + co[None, :], gz.to(gz_ptr.dtype.element_ty),
             mask=(r < R)[:, None])


@triton.jit
def _tap(g_ptrs, w_ptrs, acc, m_ok, ih, iw, kh, kw, t, OH2: tl.constexpr, OW2: tl.constexpr,
         CO_PAD: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    """acc += gz[b, ih - kh, iw - kw, :] @ wt[t]: one tap of the input gradient."""
    ok = m_ok & (ih >= kh) & (ih < kh + OH2) & (iw >= kw) & (iw < kw + OW2)
    gz = tl.load(g_ptrs - (kh * OW2 + kw) * CO_PAD, mask=ok[:, None], other=0.0)
    wt = tl.load(w_ptrs + t * (CO_PAD * BLOCK_N))
    return _dot(gz, wt, acc, IEEE)


@triton.jit
def conv_grad_input_kernel(gz_ptr, wt_ptr, gx_ptr, B,
                           C_IN: tl.constexpr, H: tl.constexpr, W: tl.constexpr, KS: tl.constexpr,
                           HP: tl.constexpr, WP: tl.constexpr, CO_PAD: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
                           UNROLL: tl.constexpr):
    """Grid (P, cdiv(B * H * W, BLOCK_M)): gx for BLOCK_M input positions, all input channels.

    A gather, not a scatter (no atomics, deterministic): input (ih, iw) received tap (kh, kw)
    of convolution output (ih - kh, iw - kw), so, tap by tap in a fixed order,
    ``gx[m, :] += gz[b, ih - kh, iw - kw, :] @ wt[kh, kw]`` with ``gz`` the unpooled gradient
    (``unpool_kernel``: channels last, zero-padded to CO_PAD) and ``wt[p, kh, kw]`` the
    [CO_PAD, BLOCK_N] weight slice ``w[p, :, :, kh, kw]`` zero-padded (``_tap_weights``).
    Per tap the gz tile is one row shift of the same pointers (a constant, the loop is
    unrolled) and a per-row bound check; contiguous channels make the loads vector loads.
    Outputs outside the pooled area (floor mode) are zero in gz's extent: out of bounds.
    """
    p = tl.program_id(0).to(tl.int64)
    OH2: tl.constexpr = 2 * HP
    OW2: tl.constexpr = 2 * WP
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < B * (H * W)
    b_idx = offs_m // (H * W)
    s = offs_m % (H * W)
    ih = s // W
    iw = s % W
    co = tl.arange(0, CO_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    # gz[p, b, ih, iw, 0]: tap (kh, kw) reads kh * OW2 + kw positions earlier.
    g_ptrs = gz_ptr + (p * B * (OH2 * OW2 * CO_PAD)
                       + (b_idx * (OH2 * OW2) + ih * OW2 + iw).to(tl.int64)[:, None] * CO_PAD + co[None, :])
    w_ptrs = wt_ptr + p * (KS * KS * CO_PAD * BLOCK_N) + co[:, None] * BLOCK_N + offs_n[None, :]
    dtype = gx_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    # Taps in a fixed order (deterministic). 16-bit: unrolled, every shift an immediate offset
    # (43 SASS per tap on sm_90 against 142 in a loop); fp32 (IEEE FMAs) keeps the loop, whose
    # unrolled form spills.
    if UNROLL:
        for t in tl.static_range(KS * KS):
            acc = _tap(g_ptrs, w_ptrs, acc, m_ok, ih, iw, t // KS, t % KS, t, OH2, OW2, CO_PAD, BLOCK_N, IEEE)
    else:
        for t in range(KS * KS):
            acc = _tap(g_ptrs, w_ptrs, acc, m_ok, ih, iw, t // KS, t % KS, t, OH2, OW2, CO_PAD, BLOCK_N, IEEE)
    out = (p * B + b_idx.to(tl.int64))[:, None] * (C_IN * H * W) + offs_n[None, :] * (H * W) + s[:, None]
    tl.store(gx_ptr + out, acc.to(dtype), mask=m_ok[:, None] & (offs_n < C_IN)[None, :])


def _shapes(x: Tensor, w: Tensor) -> tuple[int, int, int, int, int, int, int, int, int]:
    p, b, c_in, h, wd = x.shape
    pw, c_out, c_in_w, ks, ks2 = w.shape
    if (pw, c_in_w) != (p, c_in) or ks != ks2 or h < ks + 1 or wd < ks + 1:
        raise ValueError(f"input {tuple(x.shape)} does not fit weight {tuple(w.shape)}")
    _member_offsets_fit(b * c_in * h * wd, b * c_out * h * wd)
    return p, b, c_in, h, wd, c_out, ks, (h - ks + 1) // 2, (wd - ks + 1) // 2


def _member_offsets_fit(*sizes: int) -> None:
    """The kernels index inside one member's activations in int32 (a member's base in int64)."""
    if max(sizes) >= 2 ** 31:
        raise ValueError(f"{max(sizes)} elements per member: the kernels' in-member offsets are int32")


def launch_config(kind: str, rows: int, c_in: int, c_out: int, ks: int, dtype: torch.dtype) -> dict[str, int]:
    """Tiles and warps of one convolution kernel launch.

    ``kind``: "fwd" (rows: pooled positions of all images of a member), "grad_weight" (the
    same rows, reduced over, argmax selects), "grad_weight_gz" (rows: convolution outputs,
    from the unpooled gradient) or "grad_input" (rows: input positions, tap by tap over
    CO_PAD channels). One tile spans all output channels (forward, weight gradient) or all
    input channels (input gradient). 16-bit tiles and warps are chosen by the sm_90 SASS
    count of each launch at P = 1024, batch 64 (bench/sass_loops.py; bench/static_cost.py
    for the whole step), with no register spills; their speed is still to be measured. fp32
    (IEEE products, no tensor cores) keeps smaller tiles: four 64 x 64 fp32 accumulators spill.
    """
    fp32 = dtype == torch.float32
    if kind == "fwd":
        cfg = {"BLOCK_M": _tile(rows, 32 if fp32 else 64), "BLOCK_N": _tile(c_out, 128),
               "BLOCK_K": _tile(c_in * ks * ks, 64)}
        if not fp32 and c_in * ks * ks <= 32:  # conv1 (one reduction step): 0.54 G SASS per step at P=1024, not 0.72
            cfg.update(BLOCK_M=_tile(rows, 128), num_warps=4)
    elif kind == "grad_weight":
        cfg = {"BLOCK_M": _tile(rows, 64), "BLOCK_N": _tile(c_out, 128), "BLOCK_K": _tile(c_in * ks * ks, 32)}
        if not fp32:  # conv1 16-bit sm_90: 828 SASS per 32-row tile at 2 warps (0.49 G per step at
            cfg.update(BLOCK_M=_tile(rows, 32), num_warps=2)  # P=1024) against 945 per 64 rows at 8 (1.11 G)
    elif kind == "grad_weight_gz":  # rows: convolution outputs of the pooled area
        # 16-bit sm_90: 166 SASS per row tile at 4 warps (8 warps, BLOCK_K 32: 147 at 2x the programs)
        cfg = {"BLOCK_M": _tile(rows, 64), "BLOCK_K": _tile(c_in * ks * ks, 32 if fp32 else 64),
               "num_warps": 8 if fp32 else 4}
    elif kind == "grad_input":  # the reduction runs tap by tap over CO_PAD channels
        cfg = {"BLOCK_M": _tile(rows, 32 if fp32 else 128), "BLOCK_N": _tile(c_in, 128),
               "CO_PAD": _tile(c_out, 128), "UNROLL": not fp32}
    else:
        raise ValueError(f"unknown kernel kind {kind!r}")
    if cfg.get("BLOCK_N", cfg.get("CO_PAD", 128)) < (c_in if kind == "grad_input" else c_out) \
            or cfg.get("CO_PAD", 128) < c_out:
        raise ValueError(f"{c_in} -> {c_out} channels: more than one channel tile is not implemented")
    return {"num_warps": 8, **cfg, "IEEE": fp32}


def conv_pool_forward(x: Tensor, w: Tensor, bias: Tensor, with_arg: bool = True) -> tuple[Tensor, Tensor | None]:
    """max_pool2d(conv2d(x, w) + bias, 2) per member and its argmax cell (int8 0..3).

    ``x`` [P, B, C_in, H, W] contiguous (fp32 or 16-bit: the arithmetic dtype), ``w`` and
    ``bias`` fp32. Returns the pooled output in ``x``'s dtype and the argmax, both
    [P, B, C_out, HP, WP]; without ``with_arg`` (no backward to come: evaluation, predict)
    the argmax is neither written nor allocated, and None is returned for it.
    """
    p, b, c_in, h, wd, c_out, ks, hp, wp = _shapes(x, w)
    y = torch.empty((p, b, c_out, hp, wp), device=x.device, dtype=x.dtype)
    arg = torch.empty((p, b, c_out, hp, wp), device=x.device, dtype=torch.int8) if with_arg else None
    cfg = launch_config("fwd", b * hp * wp, c_in, c_out, ks, x.dtype)
    grid = (p, triton.cdiv(b * hp * wp, cfg["BLOCK_M"]))
    conv_pool_fwd_kernel[grid](x, w, bias, y, y if arg is None else arg, b, c_in, h, wd, c_out, ks, hp, wp, **cfg,
                               WRITE_ARG=with_arg)
    return y, arg


def conv_pool_grad_weight(x: Tensor, gy: Tensor, arg: Tensor, w_shape: torch.Size, out: Tensor | None = None,
                          gz: Tensor | None = None, split: int | None = None) -> Tensor:
    """Gradient of the weight (fp32, into ``out`` if given) from the pooled gradient ``gy``
    and the argmax; ``x`` is the forward's input. With ``gz`` (``unpool``'s output, as the
    input gradient makes it) one product per row tile instead of four selects and products.
    ``split``: parts a member's rows are summed in (default: from the batch, see below)."""
    p, b, c_in, h, wd = x.shape
    _, c_out, _, ks, _ = w_shape
    hp, wp = gy.shape[-2:]
    _member_offsets_fit(b * c_in * h * wd, b * c_out * hp * wp)
    gw = torch.empty(w_shape, device=x.device, dtype=torch.float32) if out is None else out
    if gz is not None:
        cfg = launch_config("grad_weight_gz", b * 4 * hp * wp, c_in, c_out, ks, x.dtype)
        if gz.shape[:4] != (p, b, 2 * hp, 2 * wp) or gz.shape[4] < c_out or gz.dtype != x.dtype:
            raise ValueError(f"gz {tuple(gz.shape)} {gz.dtype} does not fit gy {tuple(gy.shape)} in {x.dtype}")
        grid = (p, triton.cdiv(c_in * ks * ks, cfg["BLOCK_K"]))
        conv_grad_weight_kernel[grid](x, gz, gw, b, c_in, h, wd, c_out, ks, hp, wp, gz.shape[4], **cfg)
        return gw
    cfg = launch_config("grad_weight", b * hp * wp, c_in, c_out, ks, x.dtype)
    steps = triton.cdiv(b * hp * wp, cfg["BLOCK_M"])
    # Split a member's rows over S programs of >= SPLIT_STEPS row tiles each (conv1 at batch 64
    # in 16 bit: 288 tiles, S = 18): at P <= 132 one program per member would leave most SMs idle. S depends
    # on the batch only, so a member gets the same bits alone and in a pack.
    split = max(1, steps // SPLIT_STEPS) if split is None else max(1, min(split, steps))
    chunk = triton.cdiv(steps, split)
    split = triton.cdiv(steps, chunk)  # no empty parts
    part = gw if split == 1 else torch.empty((p, split, c_out, c_in * ks * ks), device=x.device,
                                             dtype=torch.float32)
    grid = (p, triton.cdiv(c_in * ks * ks, cfg["BLOCK_K"]), split)
    conv_pool_grad_weight_kernel[grid](x, gy, arg, part, b, chunk * cfg["BLOCK_M"], c_in, h, wd, c_out, ks, hp, wp,
                                       **cfg)
    if split > 1:
        n = c_out * c_in * ks * ks
        block = min(1024, triton.next_power_of_2(n))
        split_sum_kernel[(p, triton.cdiv(n, block))](part, gw, split, n, block, num_warps=4)
    return gw


def unpool(gy: Tensor, arg: Tensor, dtype: torch.dtype, co_pad: int | None = None) -> Tensor:
    """The unpooled gradient ``[P, B, 2HP, 2WP, co_pad]`` (channels last, zero-padded channels)
    of the pooled gradient ``gy`` [P, B, C_out, HP, WP] routed through the argmax."""
    p, b, c_out, hp, wp = gy.shape
    co_pad = _tile(c_out, 128) if co_pad is None else co_pad
    gz = torch.empty((p, b, 2 * hp, 2 * wp, co_pad), device=gy.device, dtype=dtype)
    unpool_kernel[(p * b,)](gy, arg, gz, c_out, hp, wp, co_pad, triton.next_power_of_2(4 * hp * wp), num_warps=4)
    return gz


def _tap_weights(w: Tensor, co_pad: int, ci_pad: int, dtype: torch.dtype) -> Tensor:
    """``w[p, co, ci, kh, kw]`` as ``[P, kh, kw, co_pad, ci_pad]`` in ``dtype``, zero-padded: the
    input gradient's per-tap [co, ci] weight slices, contiguous (LeNet's conv2 in 16 bit: 100 KB
    per member, written once per backward and read from L2 by each of the member's programs)."""
    p, c_out, c_in, ks, _ = w.shape
    wt = torch.zeros((p, ks, ks, co_pad, ci_pad), device=w.device, dtype=dtype)
    wt[:, :, :, :c_out, :c_in] = w.permute(0, 3, 4, 1, 2)
    return wt


def conv_pool_grad_input(w: Tensor, gy: Tensor, arg: Tensor, x_shape: torch.Size, dtype: torch.dtype,
                         gz: Tensor | None = None) -> Tensor:
    """Gradient of the input, in ``dtype`` (the arithmetic dtype); ``gz``: ``unpool(gy, arg,
    dtype)`` if the caller already made it."""
    p, b, c_in, h, wd = x_shape
    _, c_out, _, ks, _ = w.shape
    hp, wp = gy.shape[-2:]
    cfg = launch_config("grad_input", b * h * wd, c_in, c_out, ks, dtype)
    gz = unpool(gy, arg, dtype, cfg["CO_PAD"]) if gz is None else gz
    if gz.shape != (p, b, 2 * hp, 2 * wp, cfg["CO_PAD"]) or gz.dtype != dtype:
        raise ValueError(f"gz {tuple(gz.shape)} {gz.dtype} does not fit gy {tuple(gy.shape)} in {dtype}")
    wt = _tap_weights(w, cfg["CO_PAD"], cfg["BLOCK_N"], dtype)
    gx = torch.empty(x_shape, device=gy.device, dtype=dtype)
    grid = (p, triton.cdiv(b * h * wd, cfg["BLOCK_M"]))
    conv_grad_input_kernel[grid](gz, wt, gx, b, c_in, h, wd, ks, hp, wp, **cfg)
    return gx


@triton.jit
def sgd_kernel(w_ptr, g_ptr, buf_ptr, block_seg_ptr, seg_start_ptr, seg_magic_ptr, seg_shift_ptr, seg_is_bias_ptr,
               hyper_ptr, w16_ptr, P, BLOCK: tl.constexpr, WRITE16: tl.constexpr, EMULATE_FMA: tl.constexpr):
    """One pass over a flat parameter buffer: d = g + wd*w; buf = m*buf + d; w -= rate*buf.

    Reads w, g, buf and writes w, buf: 20 bytes per parameter (PackedSGD's passes: 36); with
    WRITE16 also the 16-bit copy of w the next forward's matrix products read (+2 bytes).

    Segments (one per parameter, each ``[P, ...]`` contiguous) start at multiples of BLOCK,
    so program ``i`` covers ``[i * BLOCK, (i + 1) * BLOCK)`` inside segment ``block_seg[i]``,
    unmasked: a segment's tail padding is zero in w, g and buf, and stays zero (d = 0, buf = 0,
    w -= rate * 0), so full vector loads and stores need no bound. The member of an element is
    its offset in the segment divided by the segment's elements per member, an int32 division
    by a per-segment magic number (``_magic``: one multiply-high and a shift); padding past the
    last member is clamped to it. ``hyper[p]`` = (lr, bias lr factor, weight decay, momentum).
    A zero-filled ``buf`` gives PyTorch's first step (buf = d) bit for bit: m*0 + d == d.
    """
    pid = tl.program_id(0)
    seg = tl.load(block_seg_ptr + pid)
    base = pid.to(tl.int64) * BLOCK
    local = (base - tl.load(seg_start_ptr + seg)).to(tl.int32) + tl.arange(0, BLOCK)
    magic = tl.load(seg_magic_ptr + seg).to(tl.uint32)
    member = (tl.umulhi(local.to(tl.uint32), magic) >> tl.load(seg_shift_ptr + seg).to(tl.uint32)).to(tl.int32)
    row = hyper_ptr + tl.minimum(member, P - 1) * 4
    lr = tl.load(row)
    if tl.load(seg_is_bias_ptr + seg) != 0:
        lr = lr * tl.load(row + 1)  # as PackedSGD's lr * factor
    offs = base + tl.arange(0, BLOCK)
    w = tl.load(w_ptr + offs)
    g = tl.load(g_ptr + offs)
    buf = tl.load(buf_ptr + offs)
    # PackedSGD's three addcmul_ calls, each one fused multiply-add as PyTorch's kernels
    # compute them (CPU: vectorised fmadd; CUDA: nvcc contracts a + b * c).
    d = _fma(w, tl.load(row + 2), g, EMULATE_FMA)
    buf = _fma(buf, tl.load(row + 3), d, EMULATE_FMA)
    tl.store(buf_ptr + offs, buf)
    w = _fma(-buf, lr, w, EMULATE_FMA)
    tl.store(w_ptr + offs, w)
    if WRITE16:
        tl.store(w16_ptr + offs, w.to(w16_ptr.dtype.element_ty))


def _magic(d: int) -> tuple[int, int]:
    """(m, s) with n // d == umulhi(n, m) >> s for every 0 <= n < 2**31 (Granlund-Montgomery:
    l = ceil(log2 d), m = ceil(2**(31 + l) / d) < 2**32 satisfies 2**(31+l) <= m*d <= 2**(31+l) + 2**l)."""
    if not 2 <= d < 2 ** 31:
        raise ValueError(f"elements per member {d}: the SGD kernel's division needs 2 <= d < 2**31")
    l = (d - 1).bit_length()
    return -(-(1 << (31 + l)) // d), l - 1


@triton.jit
def _fma(a, b, c, EMULATE: tl.constexpr):
    """a * b + c rounded once. The interpreter's tl.fma rounds twice (numpy has no fma), so there
    it is emulated in fp64: the exact product plus c, rounded to fp64 and then to fp32."""
    if EMULATE:
        return (a.to(tl.float64) * b.to(tl.float64) + c.to(tl.float64)).to(tl.float32)
    return tl.fma(a, b, c)


def sgd_step(w: Tensor, g: Tensor, buf: Tensor, table: dict[str, Tensor], hyper: Tensor,
             w16: Tensor | None = None) -> None:
    """Launch ``sgd_kernel`` over the flat fp32 buffers (``table``: see FlatLayout.table;
    ``hyper``: [P, 4] fp32 rows (lr, bias lr factor, weight decay, momentum)), also writing
    the updated weights to ``w16`` (16-bit, same layout) if given."""
    if hyper.dim() != 2 or hyper.shape[1] != 4 or hyper.dtype != torch.float32 or not hyper.is_contiguous():
        raise ValueError(f"hyper must be a contiguous fp32 [P, 4], not {tuple(hyper.shape)} {hyper.dtype}")
    grid = (table["block_seg"].numel(),)
    sgd_kernel[grid](w, g, buf, table["block_seg"], table["seg_start"], table["seg_magic"], table["seg_shift"],
                     table["seg_is_bias"], hyper, w if w16 is None else w16, hyper.shape[0], BLOCK=SGD_BLOCK,
                     WRITE16=w16 is not None, EMULATE_FMA=INTERPRETED, num_warps=8)
