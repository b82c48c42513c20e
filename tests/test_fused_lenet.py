"""The fused LeNet-5 path (workers.fused_lenet) equals the reference packed LeNet5.

Without a GPU the Triton kernels run in Triton's interpreter on the CPU. The interpreter
must be chosen (``TRITON_INTERPRET=1``) before ``triton`` is first imported and stay chosen
while kernels launch: tests/conftest.py sets it for CPU-only sessions, and this module sets
it too when run on its own.
Shapes are tiny (P = 2-3, batch 2-3): the interpreter runs every program in Python.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed (or does not import): the fused LeNet-5 kernels "
                    "need it", exc_type=ImportError)

from workers import fused_kernels as fk  # noqa: E402
from workers.fused_lenet import FusedLeNet5, FusedSGD, fused_available  # noqa: E402
from workers.models import LeNet5  # noqa: E402
from workers.optim import PackedSGD  # noqa: E402

pytestmark = pytest.mark.interpreter  # tiers: pyproject.toml, tests/conftest.py

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if not fused_available(DEVICE):
    pytest.skip("no GPU, and triton was imported before TRITON_INTERPRET=1 was set (see "
                "tests/conftest.py): the kernels cannot run", allow_module_level=True)

FP32 = {"rtol": 1e-5, "atol": 1e-5}  # different summation orders in fp32, values of order 1


@pytest.fixture(scope="module", autouse=True)
def _ieee_reference():
    """On a GPU the reference's cuDNN convolutions default to TF32: compare against fp32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _reference(members: int, seed: int = 0) -> LeNet5:
    """A LeNet5 with Xavier weights and non-zero biases (zero biases would hide bias mistakes)."""
    model = LeNet5(members).to(DEVICE)
    model.reset_parameters("xavier", [seed + 10 * p for p in range(members)])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in (model.conv1, model.conv2, model.fc1, model.fc2):
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model


def _images(members: int, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(members, batch, 1, 28, 28, generator=g).to(DEVICE)


def _loss(logits: torch.Tensor, seed: int, select: slice | None = None) -> torch.Tensor:
    """Cross-entropy per member, summed (as the engine backpropagates it). Labels are drawn for
    a pack of 3 and ``select`` picks members' rows, so a member alone sees its pack labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (3, logits.shape[1]), generator=g).to(logits.device)
    y = y[:logits.shape[0]] if select is None else y[select]
    return F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none").mean(1).sum()


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def pair() -> tuple[LeNet5, FusedLeNet5, torch.Tensor]:
    """Reference and fused model after one forward/backward on the same images."""
    ref = _reference(2)
    fused = FusedLeNet5.from_lenet(ref)
    x = _images(2, 3, seed=1)
    for m in (ref, fused):
        m.zero_grad(set_to_none=True)
        fe, logits = m(x)
        m.out = (fe.detach(), logits.detach())
        _loss(logits, seed=2).backward()
    return ref, fused, x


def test_forward_equals_reference(pair) -> None:
    ref, fused, _ = pair
    for a, b in zip(ref.out, fused.out):
        torch.testing.assert_close(b, a, **FP32)


def test_every_gradient_equals_reference(pair) -> None:
    ref, fused, _ = pair
    want, got = _grads(ref), _grads(fused)
    assert list(got) == list(want)
    for name in want:
        scale = want[name].abs().max().item()
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5 * scale, msg=name)


def test_gradients_are_written_into_the_flat_buffer(pair) -> None:
    """No copy between backward and the optimizer: autograd adopted the flat_grad views."""
    _, fused, _ = pair
    for p, view in zip(fused.parameters(), fused.layout.views(fused.flat_grad)):
        assert p.grad.data_ptr() == view.data_ptr()
        assert torch.equal(p.grad, view)


def _reference_pool(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per member: max_pool2d(conv2d + bias) and the argmax as the window cell dy*2 + dx."""
    ys, cells = [], []
    for p in range(x.shape[0]):
        z = F.conv2d(x[p], w[p], b[p])
        y, idx = F.max_pool2d(z, 2, return_indices=True)  # idx: flat position in z's plane
        row, col = idx // z.shape[-1], idx % z.shape[-1]
        ys.append(y)
        cells.append((row % 2) * 2 + col % 2)
    return torch.stack(ys), torch.stack(cells)


@pytest.mark.parametrize("c_in, c_out, side", [(1, 20, 28), (20, 50, 12), (3, 5, 9)])
def test_pool_keeps_pytorchs_first_maximum(c_in: int, c_out: int, side: int) -> None:
    """Small integers make windows full of ties: the kernel's values and argmax equal
    max_pool2d's on a float64 reference (an odd side also checks floor-mode pooling).

    Tolerance: none. Every product and partial sum here is a small integer (|z| <= 502 <
    2^24), exact in fp32 and float64 in any order, so the kernel's fp32 result must equal the
    float64 reference exactly. The reference runs on the CPU in float64: cuDNN's fp32
    convolution is exact only for its GEMM-type algorithms (Winograd and FFT round), so it is
    no reference for bit-equality."""
    g = torch.Generator().manual_seed(c_in)
    x = torch.randint(-1, 2, (2, 2, c_in, side, side), generator=g).float().to(DEVICE)
    w = torch.randint(-1, 2, (2, c_out, c_in, 5, 5), generator=g).float().to(DEVICE)
    b = torch.randint(-2, 3, (2, c_out), generator=g).float().to(DEVICE)
    y, arg = fk.conv_pool_forward(x, w, b)
    want_y, want_cell = _reference_pool(*(t.double().cpu() for t in (x, w, b)))
    assert y.dtype == torch.float32
    assert torch.equal(y.double().cpu(), want_y)
    assert torch.equal(arg.long().cpu(), want_cell)
    assert arg.dtype == torch.int8


def test_pool_lets_nan_through_as_pytorch_does() -> None:
    """A NaN input (a diverging member) spreads to its outputs; in a window a NaN beats numbers
    and a later NaN beats an earlier one, as in max_pool2d, so the argmax cells agree too."""
    g = torch.Generator().manual_seed(19)
    x = torch.randn(2, 2, 1, 12, 12, generator=g)
    x[1, 0, 0, 5, 6] = float("nan")
    x, w, b = x.to(DEVICE), torch.randn(2, 3, 1, 5, 5, generator=g).to(DEVICE), torch.zeros(2, 3, device=DEVICE)
    y, arg = fk.conv_pool_forward(x, w, b)
    want_y, want_cell = _reference_pool(x, w, b)
    assert y.isnan().any() and not y[0].isnan().any()
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert torch.equal(arg.long()[y.isnan()], want_cell[y.isnan()])


def test_input_gradient_of_an_odd_sized_input() -> None:
    """conv_pool_grad_input against autograd where the last conv row/column is not pooled."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2, 3, 9, 9, generator=g).to(DEVICE).requires_grad_()
    w = torch.randn(2, 4, 3, 5, 5, generator=g).to(DEVICE).requires_grad_()
    b = torch.randn(2, 4, generator=g).to(DEVICE).requires_grad_()
    gy = torch.randn(2, 2, 4, 2, 2, generator=g).to(DEVICE)
    want_y, _ = _reference_pool(x, w, b)
    want = torch.autograd.grad(want_y, (x, w, b), gy)
    y, arg = fk.conv_pool_forward(x.detach(), w.detach(), b.detach())
    got = (fk.conv_pool_grad_input(w.detach(), gy, arg, x.shape, x.dtype),
           fk.conv_pool_grad_weight(x.detach(), gy, arg, w.shape))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, **FP32)


def _train(model, opt, steps: int, members: int, lrs: torch.Tensor, seed: int, select=None) -> None:
    """``steps`` SGD steps on fixed batches; ``select`` picks members' images out of a pack's."""
    for t in range(steps):
        x = _images(3, 2, seed=seed + t)
        x = x if select is None else x[select]
        opt.zero_grad()
        _, logits = model(x)
        _loss(logits, seed=seed + 100 + t, select=select).backward()
        opt.step(lrs * (0.9 ** t))  # a changing lr, as under the inv / multistep policies


def _optim_args(members: int) -> dict[str, torch.Tensor]:
    m = torch.tensor([0.9, 0.5, 0.0][:members], device=DEVICE)
    wd = torch.tensor([5e-4, 1e-2, 0.0][:members], device=DEVICE)
    return {"momentum": m, "weight_decay": wd, "bias_lr_factor": torch.full((members,), 2.0, device=DEVICE)}


def test_sgd_step_equals_packed_sgd_bit_for_bit() -> None:
    """Fed the same gradients, FusedSGD and PackedSGD give the same bits (first step included):
    both round each addcmul_ once (PyTorch's CPU kernel is a vectorised fmadd). On a GPU,
    within a few ulp: whether PyTorch's CUDA addcmul rounds once is nvcc's choice."""
    same = torch.equal if DEVICE == "cpu" else (
        lambda a, b: torch.allclose(a, b, rtol=1e-6, atol=1e-9))
    ref = _reference(3, seed=4)
    fused = FusedLeNet5.from_lenet(ref)
    a = _optim_args(3)
    opt_ref = PackedSGD(list(ref.parameters()), 3, a["momentum"], a["weight_decay"], a["bias_lr_factor"],
                        ref.bias_parameters())
    opt_fused = FusedSGD(fused, **a)
    g = torch.Generator().manual_seed(5)
    lr = torch.tensor([0.1, 0.01, 0.05], device=DEVICE)
    for t in range(3):
        for p, q in zip(ref.parameters(), fused.parameters()):
            p.grad = torch.randn(p.shape, generator=g).to(DEVICE)
            q.grad = p.grad.clone()  # not the flat view: gather_grads copies it
        opt_ref.step(lr / (t + 1))
        opt_fused.step(lr / (t + 1))
        for (n, p), q in zip(ref.named_parameters(), fused.parameters()):
            assert same(p, q), f"step {t}: {n}"
        for b, c in zip(opt_ref.state(), opt_fused.state()):
            assert same(b, c)


def test_training_steps_equal_reference() -> None:
    """Three steps of forward, backward and SGD (momentum, wd, per-member lr, biases at 2x lr)."""
    ref = _reference(3, seed=6)
    fused = FusedLeNet5.from_lenet(ref)
    a = _optim_args(3)
    lrs = torch.tensor([0.02, 0.005, 0.01], device=DEVICE)  # around the MNIST recipe's 0.01
    _train(ref, PackedSGD(list(ref.parameters()), 3, a["momentum"], a["weight_decay"], a["bias_lr_factor"],
                          ref.bias_parameters()), 3, 3, lrs, seed=7)
    opt = FusedSGD(fused, **a)
    _train(fused, opt, 3, 3, lrs, seed=7)
    for (n, p), q in zip(ref.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6 * p.abs().max().item(), msg=n)


def test_member_trained_in_a_pack_equals_it_trained_alone() -> None:
    pack = FusedLeNet5.from_lenet(_reference(3, seed=8))
    alone = FusedLeNet5(1, device=DEVICE)
    alone.load_member_state(0, pack.member_state(1))
    a = _optim_args(3)
    lrs = torch.tensor([0.02, 0.005, 0.01], device=DEVICE)
    _train(pack, FusedSGD(pack, **a), 2, 3, lrs, seed=9)
    one = {k: v[1:2] for k, v in a.items()}
    _train(alone, FusedSGD(alone, **one), 2, 1, lrs[1:2], seed=9, select=slice(1, 2))
    # The kernels do the same work per member whatever P is: equal bits under the interpreter.
    # (On a GPU cuBLAS may pick another batched-GEMM algorithm for another batch count.)
    tol = {"rtol": 0.0, "atol": 0.0} if DEVICE == "cpu" else {"rtol": 1e-6, "atol": 1e-7}
    for k, v in alone.member_state(0).items():
        torch.testing.assert_close(v, pack.member_state(1)[k], **tol, msg=k)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).abs().max() / want.abs().max()).item()


def test_fp16_arithmetic_within_tolerance(pair) -> None:
    """fp16 activations and operands, fp32 accumulation, fp32 master weights and gradients.

    Tolerance: logits within 1e-2 of the largest fp32 logit (measured 8e-4); every gradient
    no further from fp32 than PyTorch's own autocast(float16) path on the same model, times
    1.5, plus 1e-3. (Both are measured at 3 % for conv1.weight and 8 % for conv2.weight, of
    the largest fp32 value: 16-bit rounding of the convolution outputs moves pooling argmaxes
    between near-equal cells, and LeNet's conv gradients are sums with much cancellation.)
    """
    ref, _, x = pair
    half = FusedLeNet5.from_lenet(ref, compute_dtype=torch.float16)
    fe, logits = half(x)
    assert logits.dtype == torch.float16 and half.conv1.weight.dtype == torch.float32
    _loss(logits, seed=2).backward()
    assert _relative_error(logits, ref.out[1]) <= 1e-2
    stock = LeNet5(2).to(DEVICE)
    stock.load_state_dict(ref.state_dict())
    with torch.autocast(DEVICE, dtype=torch.float16):
        _, stock_logits = stock(x)
    _loss(stock_logits, seed=2).backward()
    want = _grads(ref)
    for (n, p), q in zip(half.named_parameters(), stock.parameters()):
        assert p.grad.dtype == torch.float32
        err, bound = _relative_error(p.grad, want[n]), 1.5 * _relative_error(q.grad, want[n]) + 1e-3
        assert err <= bound, f"{n}: {err:.2e} > {bound:.2e}"


def test_layout_and_state_are_lenet5s(pair) -> None:
    """Same state_dict keys and shapes; member states, checkpoints and optimizer states pass
    both ways; moving the model keeps the parameters views of the flat buffer."""
    ref, fused, _ = pair
    assert {k: v.shape for k, v in fused.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    for k, v in ref.member_state(1).items():
        assert torch.equal(fused.member_state(1)[k], v)
    other = FusedLeNet5(2, device=DEVICE)
    other.load_state_dict(ref.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), ref.parameters()))
    other.to(DEVICE)
    flat = other.layout.views(other.flat)
    assert all(p.data_ptr() == v.data_ptr() for p, v in zip(other.parameters(), flat))
    with pytest.raises(TypeError):
        other.half()
    a = _optim_args(2)
    opt = FusedSGD(other, **a)
    assert opt.state() == [None] * 8
    packed = PackedSGD(list(ref.parameters()), 2, a["momentum"], a["weight_decay"])
    packed.load_state([torch.full(p.shape, float(i)) for i, p in enumerate(ref.parameters())], torch.device(DEVICE))
    opt.load_state(packed.state(), torch.device(DEVICE))
    assert all(torch.equal(b, c) for b, c in zip(opt.state(), packed.state()))


def test_a_second_backward_accumulates() -> None:
    """With .grad already set, the kernels leave flat_grad alone and autograd adds as usual."""
    fused = FusedLeNet5.from_lenet(_reference(2, seed=11))
    x = _images(2, 2, seed=12)
    _loss(fused(x)[1], seed=13).backward()
    once = _grads(fused)
    _loss(fused(x)[1], seed=13).backward()
    fused.gather_grads()
    for n, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, 2 * once[n], msg=n)
    assert torch.equal(fused.flat_grad[:fused.layout.segments[0].numel], fused.conv1.weight.grad.flatten())


def test_sixteen_bit_copy_follows_the_master_weights() -> None:
    """The fp16 copy the fc layers read is written by the SGD pass and re-cast after any other
    change of the parameters (seen through the version counter)."""
    ref = _reference(2, seed=14)
    half = FusedLeNet5.from_lenet(ref, compute_dtype=torch.float16)
    opt = FusedSGD(half, **_optim_args(2))
    x = _images(2, 2, seed=15)
    opt.zero_grad()
    _loss(half(x)[1], seed=16).backward()
    opt.step(torch.tensor([0.01, 0.02], device=DEVICE))
    assert half.flat16_version == half.flat._version  # no re-cast needed before the next forward
    for w, w16 in zip(half.layout.views(half.flat), half.layout.views(half.flat16)):
        assert torch.equal(w16, w.half())
    half.load_member_state(1, ref.member_state(0))
    fresh = FusedLeNet5.from_lenet(ref, compute_dtype=torch.float16)
    fresh.load_member_state(1, ref.member_state(0))
    fresh.load_member_state(0, half.member_state(0))
    with torch.no_grad():
        assert torch.equal(half(x)[1], fresh(x)[1])


def test_packed_sgd_steps_a_fused_model_in_place() -> None:
    """Head-only stages (FusedSGD steps every parameter) keep PackedSGD: it updates the views in
    place, so the flat buffer and the 16-bit copy follow."""
    ref = _reference(2, seed=17)
    half = FusedLeNet5.from_lenet(ref, compute_dtype=torch.float16)
    half.refresh_compute_copy()
    a = _optim_args(2)
    heads = [ref.fc2.weight, ref.fc2.bias], [half.fc2.weight, half.fc2.bias]
    opts = [PackedSGD(h, 2, a["momentum"], a["weight_decay"], a["bias_lr_factor"], h[1:]) for h in heads]
    g = torch.Generator().manual_seed(18)
    for p, q in zip(*heads):
        p.grad = torch.randn(p.shape, generator=g).to(DEVICE)
        q.grad = p.grad.clone()
    for opt in opts:
        opt.step(torch.tensor([0.1, 0.2], device=DEVICE))
    assert all(torch.equal(p, q) for p, q in zip(*heads))
    assert torch.equal(half.layout.view(half.flat, 6), half.fc2.weight)
    assert half.flat16_version != half.flat._version  # stale: the next forward re-casts
    half.refresh_compute_copy()
    assert torch.equal(half.layout.view(half.flat16, 6), half.fc2.weight.half())
