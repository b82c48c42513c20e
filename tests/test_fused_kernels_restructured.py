"""The restructured fused LeNet-5 kernels (issue 21) against float64 references.

Each gradient kernel is checked on its own, given the kernel forward's argmax, against a
float64 computation of the same quantity from the same (rounded) inputs:

* fp32 (IEEE products): the kernels' only difference from float64 is fp32 accumulation in our
  own fixed order, so the tolerance is tight (1e-5 of the largest value);
* fp16 (Triton's interpreter on the CPU): operands rounded to fp16 as the kernel rounds them,
  fp32 accumulation, a 16-bit result where the kernel returns one: 2e-3 of the largest value
  (fp16's half-ulp is 4.9e-4 relative, plus accumulation in fp32);
* bf16: only where CUDA is present (Triton's interpreter mishandles bf16), 1.6e-2 of the
  largest value (bf16's half-ulp is 3.9e-3 relative).

Shapes are tiny on the CPU (every program runs in Python).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed (or does not import)", exc_type=ImportError)

from workers import fused_kernels as fk  # noqa: E402
from workers.fused_lenet import fused_available  # noqa: E402

pytestmark = pytest.mark.interpreter  # tiers: pyproject.toml, tests/conftest.py

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if not fused_available(DEVICE):
    pytest.skip("no GPU, and triton was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

# Relative to the largest reference value (see the module docstring).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
_NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="bf16 needs CUDA (the interpreter mishandles it)")
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=_NEEDS_CUDA)]
# (c_in, c_out, side): LeNet's conv2, and a small odd-sized case (floor-mode pooling drops a row).
SHAPES = [(20, 50, 12), (3, 5, 9)]


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    err = (got.double() - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= TOL[dtype] * scale, f"{what} in {dtype}: max error {err:.3e} > {TOL[dtype]:.0e} x {scale:.3e}"


def _case(c_in: int, c_out: int, side: int, dtype: torch.dtype, members: int = 2, batch: int = 2, seed: int = 0):
    """Inputs already rounded to ``dtype`` (the kernels' operands), the kernel forward's argmax."""
    g = torch.Generator().manual_seed(seed)
    hp = (side - 4) // 2
    x = torch.randn(members, batch, c_in, side, side, generator=g).to(dtype).to(DEVICE)
    w = torch.randn(members, c_out, c_in, 5, 5, generator=g).to(dtype).float().to(DEVICE)  # fp32 masters
    b = torch.randn(members, c_out, generator=g).to(DEVICE)
    gy = torch.randn(members, batch, c_out, hp, hp, generator=g).to(dtype).to(DEVICE)
    _, arg = fk.conv_pool_forward(x, w, b)
    return x, w, b, gy, arg


def _unpooled64(gy: torch.Tensor, arg: torch.Tensor, conv_side: int) -> torch.Tensor:
    """float64 [P, B, C_out, conv_side, conv_side]: gy at its argmax cell, 0 elsewhere (and 0 in
    a trailing conv row/column that floor-mode pooling dropped)."""
    p, b, c, hp, wp = gy.shape
    gz = torch.zeros(p, b, c, conv_side, conv_side, dtype=torch.float64, device=gy.device)
    a = arg.long()
    for dy in range(2):
        for dx in range(2):
            gz[..., dy:2 * hp:2, dx:2 * wp:2] = torch.where(a == dy * 2 + dx, gy.double(), 0.0)
    return gz


def _reference_grads(x: torch.Tensor, w: torch.Tensor, gy: torch.Tensor, arg: torch.Tensor):
    """float64 gradients of the input, weight and bias of conv + pool for pooled gradient gy."""
    x64 = x.double().requires_grad_()
    w64 = w.double().requires_grad_()
    z = torch.stack([F.conv2d(x64[p], w64[p]) for p in range(x.shape[0])])
    gz = _unpooled64(gy, arg, z.shape[-1])
    gx, gw = torch.autograd.grad(z, (x64, w64), gz)
    return gx, gw, gz.sum(dim=(1, 3, 4))


def test_unpool_routes_each_pooled_value_to_its_argmax_cell() -> None:
    """Bit for bit: a copy and zeros, channels last, padded channels zero."""
    x, w, b, gy, arg = _case(3, 5, 9, torch.float32)
    gz = fk.unpool(gy, arg, torch.float32, co_pad=16)
    assert gz.shape == (2, 2, 4, 4, 16)
    want = _unpooled64(gy, arg, 4).float().permute(0, 1, 3, 4, 2)
    assert torch.equal(gz[..., :5], want)
    assert not gz[..., 5:].any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c_in, c_out, side", SHAPES)
def test_input_gradient_against_float64(c_in: int, c_out: int, side: int, dtype: torch.dtype) -> None:
    x, w, b, gy, arg = _case(c_in, c_out, side, dtype)
    want, _, _ = _reference_grads(x, w.to(dtype), gy, arg)
    got = fk.conv_pool_grad_input(w, gy, arg, x.shape, dtype)
    assert got.dtype == dtype
    _close(got, want, dtype, "input gradient")


def test_input_gradient_is_deterministic() -> None:
    """Same inputs, same bits (no atomics; the taps are summed in a fixed order)."""
    x, w, b, gy, arg = _case(3, 5, 9, torch.float32, seed=1)
    first = fk.conv_pool_grad_input(w, gy, arg, x.shape, torch.float32)
    assert torch.equal(first, fk.conv_pool_grad_input(w, gy, arg, x.shape, torch.float32))


@pytest.mark.parametrize("members", [1, 3, 1024, 5000])
def test_sgd_member_index_by_magic_number(members: int) -> None:
    """The SGD kernel's int32 division (multiply-high and shift) equals // on every element
    offset of every LeNet-5 segment, checked at each member boundary and a sample inside."""
    from workers.models import LeNet5

    for name, p in LeNet5(1).named_parameters():
        d = p.numel()  # elements per member
        m, s = fk._magic(d)
        assert 0 < m < 2 ** 32, name
        k = torch.arange(members + 1, dtype=torch.int64)
        n = torch.cat([k * d - 1, k * d, k * d + 1, torch.randint(0, members * d + fk.SGD_BLOCK, (4096,))])
        n = n[(n >= 0) & (n < 2 ** 31)]
        assert torch.equal(((n * m) >> 32) >> s, n // d), name


def test_sgd_leaves_the_tail_padding_zero() -> None:
    """The unmasked pass updates a segment's padding too: zero weights, gradients and momentum
    stay zero (and the padding's member index is clamped into the [P, 4] table)."""
    from workers.fused_lenet import FusedLeNet5, FusedSGD

    model = FusedLeNet5(3, device=DEVICE)
    for i, p in enumerate(model.parameters()):
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 + i)).to(DEVICE)
    opt = FusedSGD(model, torch.tensor([0.9, 0.5, 0.0]), torch.tensor([5e-4, 1e-2, 0.0]), torch.full((3,), 2.0))
    for _ in range(2):
        opt.step(torch.tensor([0.1, 0.2, 0.3], device=DEVICE))
    pad = torch.ones(model.layout.total, dtype=torch.bool, device=DEVICE)
    for s in model.layout.segments:
        pad[s.start:s.start + s.numel] = False
    assert pad.any()
    for t in (model.flat, model.flat_grad, opt.buf):
        assert not t[pad].any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c_in, c_out, side", SHAPES + [(1, 20, 28)])
@pytest.mark.parametrize("from_gz", [False, True])
def test_weight_and_bias_gradient_against_float64(c_in: int, c_out: int, side: int, dtype: torch.dtype,
                                                  from_gz: bool) -> None:
    """Both weight-gradient kernels: from the argmax (conv1's) and from the unpooled gradient
    (conv2's, sharing ``unpool`` with the input gradient); the bias gradient is gy's sum."""
    if from_gz and c_in == 1 and DEVICE == "cpu":
        pytest.skip("conv1 never takes the unpooled path; too slow for the interpreter")
    x, w, b, gy, arg = _case(c_in, c_out, side, dtype, batch=2 if side < 28 else 1)
    _, want_w, want_b = _reference_grads(x, w.to(dtype), gy, arg)
    gz = fk.unpool(gy, arg, dtype) if from_gz else None
    got = fk.conv_pool_grad_weight(x, gy, arg, w.shape, gz=gz)
    assert got.dtype == torch.float32
    _close(got, want_w, dtype, "weight gradient")
    _close(torch.sum(gy, dim=(1, 3, 4), dtype=torch.float32), want_b, dtype, "bias gradient")


def test_forward_without_gradient_writes_no_argmax() -> None:
    """Evaluation and predict (no gradient to come) get the same values and no argmax."""
    from workers.fused_lenet import FusedLeNet5

    x, w, b, _, arg = _case(3, 5, 9, torch.float32, seed=2)
    y, none = fk.conv_pool_forward(x, w, b, with_arg=False)
    assert none is None
    assert torch.equal(y, fk.conv_pool_forward(x, w, b)[0])
    model = FusedLeNet5(2, device=DEVICE)
    images = torch.randn(2, 2, 1, 28, 28, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with torch.no_grad():
        _, quiet = model(images)
    _, logits = model(images)
    assert logits.requires_grad and torch.equal(quiet, logits.detach())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="out_dtype=float32 products are CUDA-only")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fc_weight_gradient_written_in_fp32_in_place(dtype: torch.dtype) -> None:
    from workers.fused_lenet import _bmm_fp32

    g = torch.Generator().manual_seed(4)
    a = torch.randn(3, 40, 16, generator=g).to(dtype).to(DEVICE)
    c = torch.randn(3, 16, 24, generator=g).to(dtype).to(DEVICE)
    out = torch.empty(3, 40, 24, device=DEVICE)
    r = _bmm_fp32(a, c, out)
    assert r.data_ptr() == out.data_ptr() and r.dtype == torch.float32
    _close(out, a.double() @ c.double(), torch.float32, "fp32 product of 16-bit operands")  # fp32 accumulation


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_weight_gradient_split_over_programs(dtype: torch.dtype) -> None:
    """conv1's weight gradient with a member's rows in several parts summed in a fixed order
    (the GPU default at batch 64 is 9 parts; the interpreter's bigger tiles leave 1 at this
    size, so the split is forced): equal to float64, and deterministic."""
    x, w, b, gy, arg = _case(3, 5, 12, dtype, batch=48, seed=5)
    _, want, _ = _reference_grads(x, w.to(dtype), gy, arg)
    rows = gy.shape[1] * gy.shape[3] * gy.shape[4]
    block_m = fk.launch_config("grad_weight", rows, 3, 5, 5, dtype)["BLOCK_M"]
    assert rows >= 3 * block_m  # three parts really happen
    got = fk.conv_pool_grad_weight(x, gy, arg, w.shape, split=3)
    _close(got, want, dtype, "split weight gradient")
    assert torch.equal(got, fk.conv_pool_grad_weight(x, gy, arg, w.shape, split=3))
    _close(fk.conv_pool_grad_weight(x, gy, arg, w.shape, split=1), want, dtype, "unsplit weight gradient")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 needs CUDA (the interpreter mishandles it)")
def test_bf16_model_gradients_against_float64() -> None:
    """Every parameter gradient of the bf16 fused model against the float64 LeNet5's: no
    further from it than PyTorch's own autocast(bfloat16) LeNet5, times 1.5, plus 1e-2 of the
    largest value (16-bit rounding moves pooling argmaxes between near-equal cells)."""
    from workers.fused_lenet import FusedLeNet5
    from workers.models import LeNet5

    ref = LeNet5(2).to(DEVICE)
    ref.reset_parameters("xavier", [0, 10])
    x = torch.randn(2, 8, 1, 28, 28, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    y = torch.randint(0, 10, (2, 8), generator=torch.Generator().manual_seed(7)).to(DEVICE)

    def grads(model, images, autocast=None):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast is not None):
            _, logits = model(images)
        F.cross_entropy(logits.double().transpose(1, 2), y, reduction="none").mean(1).sum().backward()
        return {n: p.grad.detach().double() for n, p in model.named_parameters()}

    exact = LeNet5(2).to(DEVICE).double()
    exact.load_state_dict(ref.state_dict())
    want = grads(exact, x.double())
    fused = grads(FusedLeNet5.from_lenet(ref, compute_dtype=torch.bfloat16), x)
    stock = grads(ref, x, autocast=torch.bfloat16)
    for n, g in want.items():
        scale = g.abs().max().item()
        err = (fused[n] - g).abs().max().item() / scale
        bound = 1.5 * (stock[n] - g).abs().max().item() / scale + 1e-2
        assert err <= bound, f"{n}: {err:.2e} > {bound:.2e}"


def test_head_only_steps_recast_only_the_head() -> None:
    """With the body frozen, a step of PackedSGD on the head re-casts the head's segments only;
    loading a member state (which may change frozen parameters) makes the next re-cast whole."""
    from workers.fused_lenet import FusedLeNet5
    from workers.optim import PackedSGD

    model = FusedLeNet5(2, compute_dtype=torch.float16, device=DEVICE)
    x = torch.randn(2, 2, 1, 28, 28, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    head = model.head_parameters()
    for p in model.parameters():
        p.requires_grad_(any(p is h for h in head))
    opt = PackedSGD(head, 2, torch.zeros(2, device=DEVICE), torch.zeros(2, device=DEVICE))

    def step() -> None:
        opt.zero_grad()
        with torch.no_grad():
            z = model.body(x)
        model.head(z)[1].float().sum().backward()
        opt.step(torch.tensor([0.1, 0.2], device=DEVICE))

    step()
    model.refresh_compute_copy()  # the first re-cast under this frozen set is whole
    body = [i for i, p in enumerate(model.parameters()) if not p.requires_grad]
    marker = model.layout.view(model.flat16, body[0])
    marker.fill_(7.0)  # a stale body copy would survive a partial re-cast: it must
    step()
    model.refresh_compute_copy()
    assert torch.equal(marker, torch.full_like(marker, 7.0))  # the body was not re-cast
    for i in range(len(model.layout.segments)):
        if i not in body:
            assert torch.equal(model.layout.view(model.flat16, i), model.layout.view(model.flat, i).half())
    model.load_member_state(0, model.member_state(1))
    model.refresh_compute_copy()
    assert torch.equal(model.flat16, model.flat.half())  # whole again
