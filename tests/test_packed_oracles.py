"""Oracle tests in HFTA's manner: every packed layer and the packed optimizer against the
plain PyTorch they stand for.

HFTA (Wang et al., MLSys 2021) tests each fused operator by building P unfused
``torch.nn`` modules with the same weights, running both on the same inputs and comparing
outputs and gradients. Here: each layer of ``workers.packed_layers`` alone (P = 1) and as
member 1 of a pack of 3 (whose other members get other weights and inputs), against its
``torch.nn`` counterpart; then ``PackedSGD`` as ``workers.compute.new_optimizer`` builds it,
with Buda et al.'s MNIST recipe (``sweep.core.recipes``: momentum 0.9, weight decay 5e-4,
Caffe's lr_mult 2 on biases, lr = 0.01 * (1 + 1e-4 t)^-0.75), against ``torch.optim.SGD``
with ``LambdaLR`` over 20 steps.

Tolerances. Everything is compared in float64, where a packed layer and its counterpart
differ only in summation order (grouped vs plain convolution, batched vs single matmul):
each result is within a few units of 2^-52 of the sum's magnitude, so ``rtol = atol =
1e-12`` (four orders above that, and many below any real mistake: a transposed weight, a
missing bias, a wrong normalisation axis, a member's slice taken from another). The
optimizer, given float64 hyper-parameters (``workers.optim.lr_at``'s schedule before the
table's rounding), matches ``torch.optim.SGD`` + ``LambdaLR`` to the same 1e-12 after 20
steps of a LeNet-5 (measured: 1e-16). As the engine runs it, its per-member momentum, weight
decay, bias factor and lr table are float32 device vectors (0.9 is 0.8999999762 there), so
the weights are compared within 1e-6 of the distance each parameter moved (measured: 3e-7);
a wrong momentum, decay, bias factor or schedule moves them by 1e-4 of that or more.

``PackedSGD`` is PyTorch's SGD form (buf = m*buf + g + wd*w; w -= lr*buf), not Caffe's
(v = m*v + lr*(g + wd*w); w -= v; ``workers.optim``'s docstring), so the oracle is
``torch.optim.SGD`` itself; a last test checks the documented gap between the two forms
under the inv policy, with Caffe's form written from torch ops.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sweep.core.recipes import RECIPES
from sweep.core.spec import LrPolicy
from workers import noise
from workers.compute import new_optimizer
from workers.models import LeNet5
from workers.optim import PackedSGD, lr_at, lr_table
from workers.packed_layers import (
    PackedBasicBlock,
    PackedBatchNorm2d,
    PackedConv2d,
    PackedCosineLinear,
    PackedLinear,
    from_grouped,
    grouped_avg_pool,
    to_grouped,
)

F64 = torch.float64
TIGHT = {"rtol": 1e-12, "atol": 1e-12}  # float64, summation order only (module docstring)
B = 4
MEMBER = 1  # the member of a pack of 3 compared with its torch.nn counterpart
PACKS = [pytest.param(1, id="P1"), pytest.param(3, id="P3-member1")]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny kernels: OpenMP threads would only contend
    yield
    torch.set_num_threads(n)


def _randomise(module: nn.Module, seed: int) -> None:
    """Every parameter and float buffer at random (zeros would hide a missing bias)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]:
            t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) + 0.5 if "var" in _name(module, t)
                    else torch.randn(t.shape, generator=g, dtype=t.dtype))


def _name(module: nn.Module, t: torch.Tensor) -> str:
    return next((n for n, b in list(module.named_parameters()) + list(module.named_buffers()) if b is t), "")


def _inputs(members: int, *shape: int, seed: int = 7) -> torch.Tensor:
    """``[P, B, *shape]``: every member its own inputs."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(members, B, *shape, generator=g, dtype=F64)


def _grad_out(shape: torch.Size, seed: int = 9) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _member(p: int, members: int) -> int:
    return 0 if members == 1 else p


def _close(got: torch.Tensor, want: torch.Tensor, what: str, **tol: float) -> None:
    torch.testing.assert_close(got, want, **(tol or TIGHT), msg=lambda m: f"{what}: {m}")


def _forward_and_input_gradient_agree(y: torch.Tensor, y_ref: torch.Tensor, x: torch.Tensor,
                                      x_ref: torch.Tensor, p: int) -> None:
    """Member ``p``'s output equals the torch.nn reference's, and so does its input gradient
    for the same random output gradient (the packed side's weights get their gradients too)."""
    _close(y[p], y_ref, "forward")
    g = _grad_out(y.shape)
    y.backward(g)
    y_ref.backward(g[p])
    _close(x.grad[p], x_ref.grad, "input gradient")


# -- convolution --------------------------------------------------------------------------

CONVS = [  # (c_in, c_out, kernel, stride, padding, bias, side)
    pytest.param(1, 20, 5, 1, 0, True, 28, id="lenet-conv1"),  # the CPU's per-member loop (c_in <= 3)
    pytest.param(20, 50, 5, 1, 0, True, 12, id="lenet-conv2"),  # one grouped convolution
    pytest.param(16, 32, 3, 2, 1, False, 9, id="resnet-stride2"),
]


@pytest.mark.parametrize("members", PACKS)
@pytest.mark.parametrize("c_in, c_out, kernel, stride, padding, bias, side", CONVS)
def test_packed_conv2d_is_torch_conv2d(members, c_in, c_out, kernel, stride, padding, bias, side) -> None:
    packed = PackedConv2d(members, c_in, c_out, kernel, stride, padding, bias).to(F64)
    _randomise(packed, 1)
    p = _member(MEMBER, members)
    ref = nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=bias).to(F64)
    with torch.no_grad():
        ref.weight.copy_(packed.weight[p])
        if bias:
            ref.bias.copy_(packed.bias[p])
    x = _inputs(members, c_in, side, side).requires_grad_()
    x_ref = x[p].detach().clone().requires_grad_()

    y = from_grouped(packed(to_grouped(x)), members).reshape(members, B, c_out, *ref(x_ref).shape[2:])
    y_ref = ref(x_ref)
    _forward_and_input_gradient_agree(y, y_ref, x, x_ref, p)
    _close(packed.weight.grad[p], ref.weight.grad, "weight gradient")
    if bias:
        _close(packed.bias.grad[p], ref.bias.grad, "bias gradient")


# -- linear layers ------------------------------------------------------------------------

@pytest.mark.parametrize("members", PACKS)
def test_packed_linear_is_torch_linear(members) -> None:
    packed = PackedLinear(members, 50, 10).to(F64)
    _randomise(packed, 2)
    p = _member(MEMBER, members)
    ref = nn.Linear(50, 10).to(F64)
    with torch.no_grad():
        ref.weight.copy_(packed.weight[p].T)  # packed: x @ W [in, out]; torch: x @ W.T [out, in]
        ref.bias.copy_(packed.bias[p])
    x = _inputs(members, 50).requires_grad_()
    x_ref = x[p].detach().clone().requires_grad_()
    y, y_ref = packed(x), ref(x_ref)
    _forward_and_input_gradient_agree(y, y_ref, x, x_ref, p)
    _close(packed.weight.grad[p], ref.weight.grad.T, "weight gradient")
    _close(packed.bias.grad[p], ref.bias.grad, "bias gradient")


class NormedLinear(nn.Module):
    """The oracle of the cosine head: a plain bias-free linear layer on unit-norm inputs with
    unit-norm class weights, times ``s`` (Cao et al.'s NormedLinear with LDAM's scale)."""

    def __init__(self, f_in: int, f_out: int, s: float) -> None:
        super().__init__()
        self.linear = nn.Linear(f_in, f_out, bias=False)
        self.s = s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.s * F.linear(F.normalize(x, dim=1), F.normalize(self.linear.weight, dim=1))


@pytest.mark.parametrize("members", PACKS)
def test_packed_cosine_head_is_a_scaled_normalised_linear(members) -> None:
    packed = PackedCosineLinear(members, 64, 10).to(F64)
    _randomise(packed, 3)
    with torch.no_grad():
        packed.scale.copy_(torch.tensor([30.0, 16.0, 8.0][:members], dtype=F64))
    p = _member(MEMBER, members)
    ref = NormedLinear(64, 10, float(packed.scale[p])).to(F64)
    with torch.no_grad():
        ref.linear.weight.copy_(packed.weight[p].T)
    x = _inputs(members, 64).requires_grad_()
    x_ref = x[p].detach().clone().requires_grad_()
    y, y_ref = packed(x), ref(x_ref)
    assert y.abs().max() <= packed.scale.max() * (1 + 1e-12)
    _forward_and_input_gradient_agree(y, y_ref, x, x_ref, p)
    _close(packed.weight.grad[p], ref.linear.weight.grad.T, "weight gradient")


# -- batch normalisation ------------------------------------------------------------------

@pytest.mark.parametrize("members", PACKS)
def test_packed_batchnorm_is_torch_batchnorm_in_training_and_in_eval(members) -> None:
    c = 6
    packed = PackedBatchNorm2d(members, c).to(F64)
    _randomise(packed, 4)
    p = _member(MEMBER, members)
    own = slice(p * c, (p + 1) * c)  # member p's channels of the P*C
    ref = nn.BatchNorm2d(c).to(F64)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(ref, name).copy_(getattr(packed, name)[own])
    x = _inputs(members, c, 5, 5).requires_grad_()
    x_ref = x[p].detach().clone().requires_grad_()
    for step in range(2):  # two steps: running statistics compound
        y = packed(to_grouped(x)).unflatten(1, (members, c)).transpose(0, 1)  # [P, B, C, H, W]
        y_ref = ref(x_ref)
        _close(y[p], y_ref, f"training forward, step {step}")
        g = _grad_out(y.shape, seed=step)
        y.backward(g)
        y_ref.backward(g[p])
    _close(x.grad[p], x_ref.grad, "input gradient")
    _close(packed.weight.grad[own], ref.weight.grad, "weight gradient")
    _close(packed.bias.grad[own], ref.bias.grad, "bias gradient")
    _close(packed.running_mean[own], ref.running_mean, "running mean")
    _close(packed.running_var[own], ref.running_var, "running variance")
    packed.eval(), ref.eval()
    with torch.no_grad():
        y = packed(to_grouped(x)).unflatten(1, (members, c)).transpose(0, 1)
        _close(y[p], ref(x[p]), "eval forward")


# -- the residual block and pooling (compositions of the above, as ResNets use them) ---------

class BasicBlock(nn.Module):
    """He et al.'s basic block in plain torch.nn; ``pad`` is LDAM-DRW's option-A shortcut
    (``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4))``)."""

    def __init__(self, c_in: int, c_out: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.kind = "identity" if stride == 1 and c_in == c_out else shortcut
        if self.kind == "projection":
            self.short = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        self.pad = (c_out - c_in) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.kind == "identity":
            short = x
        elif self.kind == "pad":
            short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        else:
            short = self.short(x)
        return F.relu(out + short)


def _copy_layers(pairs: list[tuple[nn.Module, nn.Module]], p: int) -> None:
    """Member ``p`` of each packed convolution or BatchNorm into its torch.nn counterpart."""
    with torch.no_grad():
        for a, b in pairs:
            if isinstance(a, PackedConv2d):
                b.weight.copy_(a.weight[p])
                continue
            own = slice(p * a.channels, (p + 1) * a.channels)
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(b, name).copy_(getattr(a, name)[own])


def _copy_block(packed: PackedBasicBlock, ref: BasicBlock, p: int) -> None:
    pairs = [(packed.conv1, ref.conv1), (packed.bn1, ref.bn1), (packed.conv2, ref.conv2), (packed.bn2, ref.bn2)]
    if ref.kind == "projection":
        pairs += [(packed.short_conv, ref.short[0]), (packed.short_bn, ref.short[1])]
    _copy_layers(pairs, p)


@pytest.mark.parametrize("members", PACKS)
@pytest.mark.parametrize("c_in, c_out, stride, shortcut", [
    pytest.param(8, 8, 1, "pad", id="identity"),
    pytest.param(8, 16, 2, "pad", id="option-A"),
    pytest.param(8, 16, 2, "projection", id="option-B"),
])
def test_packed_basic_block_and_pooling_are_their_torch_nn_composition(members, c_in, c_out, stride,
                                                                      shortcut) -> None:
    packed = PackedBasicBlock(members, c_in, c_out, stride, shortcut).to(F64)
    _randomise(packed, 5)
    p = _member(MEMBER, members)
    ref = BasicBlock(c_in, c_out, stride, shortcut).to(F64)
    _copy_block(packed, ref, p)
    x = _inputs(members, c_in, 8, 8).requires_grad_()
    x_ref = x[p].detach().clone().requires_grad_()
    z = packed(to_grouped(x))
    y, y_ref = grouped_avg_pool(z, members), nn.AdaptiveAvgPool2d(1)(ref(x_ref)).flatten(1)  # FE [P, B, C]
    _forward_and_input_gradient_agree(y, y_ref, x, x_ref, p)
    _close(packed.conv1.weight.grad[p], ref.conv1.weight.grad, "conv1 weight gradient")
    own = slice(p * c_out, (p + 1) * c_out)
    _close(packed.bn2.weight.grad[own], ref.bn2.weight.grad, "bn2 weight gradient")


class PreActBlock(nn.Module):
    """The ResNet-10 reference's pre-activation basic block (cvjena ResNet10_cvgj) in plain
    torch.nn: ``a = relu(bn(x))`` (none in the first block), ``conv2(relu(bn(conv1(a))))``
    plus ``a`` or its 1x1 convolution (no BatchNorm), no ReLU after the sum."""

    def __init__(self, c_in: int, c_out: int, stride: int, first: bool) -> None:
        super().__init__()
        self.pre_bn = None if first else nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.expand = None if stride == 1 and c_in == c_out else nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x if self.pre_bn is None else F.relu(self.pre_bn(x))
        return self.conv2(F.relu(self.bn(self.conv1(a)))) + (a if self.expand is None else self.expand(a))


@pytest.mark.parametrize("members", PACKS)
@pytest.mark.parametrize("c_in, c_out, stride, first", [
    pytest.param(8, 8, 1, True, id="first"),
    pytest.param(8, 8, 1, False, id="identity"),
    pytest.param(8, 16, 2, False, id="conv-expand"),
])
def test_packed_preactivation_block_is_its_torch_nn_composition(members, c_in, c_out, stride, first) -> None:
    from workers.models import _PreActBlock

    packed = _PreActBlock(members, c_in, c_out, stride, first).to(F64)
    _randomise(packed, 6)
    p = _member(MEMBER, members)
    ref = PreActBlock(c_in, c_out, stride, first).to(F64)
    pairs = [(packed.conv1, ref.conv1), (packed.bn, ref.bn), (packed.conv2, ref.conv2)]
    pairs += [] if first else [(packed.pre_bn, ref.pre_bn)]
    pairs += [] if ref.expand is None else [(packed.expand, ref.expand)]
    _copy_layers(pairs, p)
    x = _inputs(members, c_in, 8, 8).requires_grad_()
    x_ref = x[p].detach().clone().requires_grad_()
    y = packed(to_grouped(x)).unflatten(1, (members, c_out)).transpose(0, 1)
    y_ref = ref(x_ref)
    _forward_and_input_gradient_agree(y, y_ref, x, x_ref, p)
    _close(packed.conv1.weight.grad[p], ref.conv1.weight.grad, "conv1 weight gradient")
    if ref.expand is not None:
        _close(packed.expand.weight.grad[p], ref.expand.weight.grad, "conv_expand weight gradient")


# -- dropout --------------------------------------------------------------------------------

@pytest.mark.parametrize("members", PACKS)
def test_member_dropout_is_torch_dropout_given_its_mask(members) -> None:
    """As far as comparable: the masks are counter-based per member (``workers.noise``), not
    torch's generator, so the oracle is torch's dropout *given the mask*
    (``aten.native_dropout_backward``: x * mask / keep) on forward and gradient; the kept
    fraction is the keep probability (to 5 sigma), a member's mask is its own in any pack,
    and in evaluation the layer is the identity, as ``nn.Dropout``'s."""
    rate, c, side = 0.5, 8, 16
    keep = 1.0 - rate
    seeds = [101, 202, 303][:members]
    p = _member(MEMBER, members)
    x = _inputs(members, c, side, side).requires_grad_()
    z = to_grouped(x)  # [B, P*C, H, W]: the packed layout dropout runs on
    keys, draws = noise.member_keys(seeds, x.device), torch.zeros((), dtype=torch.int64)
    y = noise.member_dropout(z, members, keys, draws, keep).unflatten(1, (members, c)).transpose(0, 1)
    kept = y[p] != 0
    want = torch.ops.aten.native_dropout_backward(x[p].detach(), kept, 1.0 / keep)
    _close(y[p], want, "forward")
    g = _grad_out(y.shape)
    y.backward(g)
    _close(x.grad[p], torch.ops.aten.native_dropout_backward(g[p], kept, 1.0 / keep), "input gradient")
    n = kept.numel()
    assert abs(kept.float().mean().item() - keep) < 5 * math.sqrt(keep * rate / n)
    alone = noise.member_dropout(to_grouped(x[p:p + 1].detach()), 1, noise.member_keys([seeds[p]], x.device),
                                 draws, keep)
    assert torch.equal(alone.unflatten(1, (1, c)).transpose(0, 1)[0] != 0, kept)  # its own mask, alone or packed
    model = LeNet5(members).eval()  # evaluation: the identity, whatever the rate
    assert model.member_dropout(z, rate) is z


# -- the optimizer and its schedule ----------------------------------------------------------

RECIPE = RECIPES["buda_mnist"]
STEPS = 20
OPT_REL = 1e-6  # float32 hyper-parameters vs the oracle's float64, relative to the distance moved


class TorchLeNet5(nn.Module):
    """Caffe's LeNet-5 as Buda et al. train it, in plain torch.nn (the oracle of LeNet5)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 20, 5), nn.Conv2d(20, 50, 5)
        self.fc1, self.fc2 = nn.Linear(800, 500), nn.Linear(500, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.max_pool2d(self.conv2(F.max_pool2d(self.conv1(x), 2)), 2)
        return self.fc2(F.relu(self.fc1(z.flatten(1))))


def _torch_copy(packed: LeNet5, p: int) -> TorchLeNet5:
    ref = TorchLeNet5().to(F64)
    with torch.no_grad():
        for name in ("conv1", "conv2", "fc1", "fc2"):
            a, b = getattr(packed, name), getattr(ref, name)
            b.weight.copy_(a.weight[p].T if isinstance(b, nn.Linear) else a.weight[p])
            b.bias.copy_(a.bias[p])
    return ref


def _inv_lambda(t: int) -> float:
    """The recipe's inv policy as LambdaLR's factor of the base lr: (1 + gamma t)^-power."""
    assert RECIPE.lr_policy == LrPolicy.INV
    return (1.0 + RECIPE.lr_gamma * t) ** -RECIPE.lr_power


def test_the_buda_mnist_schedule_is_the_inv_policy() -> None:
    assert (RECIPE.base_lr, RECIPE.lr_gamma, RECIPE.lr_power) == (0.01, 1e-4, 0.75)
    assert (RECIPE.momentum, RECIPE.weight_decay, RECIPE.bias_lr_factor) == (0.9, 5e-4, 2.0)
    t = np.arange(10_001)  # 0-based iterations; t = 10,000 only to see the policy's end point
    table = lr_table([RECIPE], [RECIPE.base_lr], 10_001)[:, 0]
    assert table.dtype == np.float32  # the engine's device table
    np.testing.assert_array_equal(table, (0.01 * (1 + 1e-4 * t) ** -0.75).astype(np.float32))
    assert table[0] == np.float32(0.01) and abs(table[-1] / 0.01 - 2 ** -0.75) < 1e-7  # (1 + 1)^-0.75
    assert [_inv_lambda(int(i)) * 0.01 for i in (0, 10_000)] == pytest.approx([table[0], table[-1]], rel=1e-7)


def _train_both(members: int, hyper: torch.dtype = F64, steps: int = STEPS):
    """``steps`` SGD steps of a packed LeNet-5 (PackedSGD from new_optimizer) and of member
    ``p`` as torch.nn + torch.optim.SGD + LambdaLR, on the same float64 batches. ``hyper``:
    the dtype of the packed optimizer's per-member vectors and lr table (float32 as the
    engine holds them, or float64 like the oracle's Python floats). Returns the packed
    member's weights, the oracle's, and the weights both started from, by parameter name."""
    p = _member(MEMBER, members)
    packed = LeNet5(members).to(F64)
    packed.reset_parameters(RECIPE.init, [5 + i for i in range(members)])
    with torch.no_grad():  # Caffe's biases start at zero; random ones test the bias lr factor from step 0
        for b in packed.bias_parameters():
            b.copy_(0.1 * torch.randn(b.shape, generator=torch.Generator().manual_seed(b.numel()), dtype=F64))
    ref = _torch_copy(packed, p)
    start = {n: t.detach().clone() for n, t in _named(ref).items()}
    # The other members train with other hyper-parameters and lrs: none may leak into member p.
    def per_member(others: tuple[float, float], mine: float) -> list[float]:
        return [others[0], mine, others[1]] if members > 1 else [mine]

    momentum = torch.tensor(per_member((0.5, 0.0), RECIPE.momentum), dtype=hyper)
    decay = torch.tensor(per_member((1e-2, 0.0), RECIPE.weight_decay), dtype=hyper)
    factor = torch.tensor(per_member((1.0, 3.0), RECIPE.bias_lr_factor), dtype=hyper)
    base_lrs = per_member((0.05, 0.001), RECIPE.base_lr)
    if hyper == torch.float32:  # the engine's [steps, P] device table
        lrs = torch.from_numpy(lr_table([RECIPE] * members, base_lrs, steps))
    else:  # the same schedule before the table's rounding
        lrs = torch.from_numpy(np.stack([lr_at(RECIPE, b, np.arange(steps)) for b in base_lrs], axis=1))
    assert lrs.dtype == hyper
    opt = new_optimizer(packed, list(packed.parameters()), momentum, decay, factor)
    assert type(opt) is PackedSGD

    biases = [ref.conv1.bias, ref.conv2.bias, ref.fc1.bias, ref.fc2.bias]
    weights = [ref.conv1.weight, ref.conv2.weight, ref.fc1.weight, ref.fc2.weight]
    # Caffe's lr_mult 2 on biases, decay_mult 1 on both: two groups, one schedule.
    sgd = torch.optim.SGD([{"params": weights, "lr": RECIPE.base_lr},
                           {"params": biases, "lr": RECIPE.base_lr * RECIPE.bias_lr_factor}],
                          lr=RECIPE.base_lr, momentum=RECIPE.momentum, weight_decay=RECIPE.weight_decay,
                          dampening=0.0, nesterov=False, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(sgd, _inv_lambda)
    g = torch.Generator().manual_seed(3)
    for t in range(steps):
        x = torch.rand(members, 8, 1, 28, 28, generator=g, dtype=F64)
        y = torch.randint(0, 10, (members, 8), generator=g)
        _, logits = packed(x)
        loss = sum(F.cross_entropy(logits[i], y[i]) for i in range(members))
        opt.zero_grad()
        loss.backward()
        opt.step(lrs[t])
        sgd.zero_grad()
        F.cross_entropy(ref(x[p]), y[p]).backward()
        assert sgd.param_groups[1]["lr"] == pytest.approx(2 * float(lrs[t, p]), rel=1e-7, abs=0)
        sgd.step()
        sched.step()
    return _named(_torch_copy(packed, p)), _named(ref), start


def _named(model: TorchLeNet5) -> dict[str, torch.Tensor]:
    return {n: t.detach() for n, t in model.named_parameters()}


@pytest.mark.parametrize("members", PACKS)
def test_packed_sgd_with_its_schedule_is_torch_sgd_with_lambda_lr(members) -> None:
    """The same update rule: with float64 hyper-parameters both sides compute the same
    float64 numbers but for the models' summation order."""
    got, want, _ = _train_both(members, hyper=F64)
    for name in want:
        _close(got[name], want[name], name)


@pytest.mark.parametrize("members", PACKS)
def test_packed_sgd_as_the_engine_runs_it_is_torch_sgd_to_float32_hyper_parameters(members) -> None:
    """With the engine's float32 momentum, decay, bias factor and lr table, every weight is
    within 1e-6 of the distance its parameter moved (module docstring; measured: 3e-7)."""
    got, want, start = _train_both(members, hyper=torch.float32)
    for name in want:
        moved = (want[name] - start[name]).abs().max().item()
        assert moved > 1e-4  # the weights did move: the comparison is not of two starts
        _close(got[name], want[name], name, rtol=0.0, atol=OPT_REL * moved)


class _CaffeSGD:
    """Caffe's SGDSolver written from torch ops (the form Buda et al. trained with): the lr
    inside the history, v = m*v + lr*mult*(g + wd*w); w -= v."""

    def __init__(self, w: torch.Tensor, mult: torch.Tensor) -> None:
        self.w, self.mult, self.v = w, mult, torch.zeros_like(w)

    def step(self, grad: torch.Tensor, lr: float) -> None:
        self.v.mul_(RECIPE.momentum).add_((grad + RECIPE.weight_decay * self.w) * self.mult, alpha=lr)
        self.w.sub_(self.v)


@pytest.mark.parametrize("policy", ["inv", "constant"])
def test_packed_sgd_steps_differ_from_caffes_solver_only_as_documented(policy) -> None:
    """workers.optim: PyTorch's form (PackedSGD, = torch.optim.SGD above) and Caffe's agree
    under a constant lr; under the inv policy Caffe's history keeps each step's own lr, which
    falls by at most 0.75e-4 per step, and momentum 0.9 remembers m/(1-m) = 9 steps: the two
    forms' steps differ by at most 0.75e-4 * 9 = 6.75e-4 of a step's size. Fed the same
    gradients (one fixed direction: the case that attains the bound) for 300 steps."""
    n = 1000
    g = torch.Generator().manual_seed(4)
    grad = torch.randn(n, generator=g, dtype=F64)
    mult = torch.ones(n, dtype=F64)
    mult[-100:] = RECIPE.bias_lr_factor  # the last 100 elements are a bias (Caffe's lr_mult 2)
    w0 = torch.randn(n, generator=g, dtype=F64)
    weight, bias = nn.Parameter(w0[None, :-100].clone()), nn.Parameter(w0[None, -100:].clone())  # one member
    opt = PackedSGD([weight, bias], 1, torch.tensor([RECIPE.momentum], dtype=F64),
                    torch.tensor([RECIPE.weight_decay], dtype=F64),
                    torch.tensor([RECIPE.bias_lr_factor], dtype=F64), biases=[bias])
    caffe = _CaffeSGD(w0.clone(), mult)

    def packed() -> torch.Tensor:
        return torch.cat([weight.detach()[0], bias.detach()[0]])

    worst, first = 0.0, None
    for t in range(300):
        lr = RECIPE.base_lr * (_inv_lambda(t) if policy == "inv" else 1.0)
        before_p, before_c = packed(), caffe.w.clone()
        weight.grad, bias.grad = grad[None, :-100].clone(), grad[None, -100:].clone()
        opt.step(torch.tensor([lr], dtype=F64))
        caffe.step(grad, lr)
        step_p, step_c = before_p - packed(), before_c - caffe.w
        gap = ((step_p - step_c).norm() / step_p.norm()).item()
        first = gap if first is None else first
        worst = max(worst, gap)
    assert first < 1e-15  # the first step is the same in both forms
    if policy == "constant":
        assert worst < 1e-12
    else:
        assert 1e-4 < worst <= 0.75e-4 * RECIPE.momentum / (1 - RECIPE.momentum)
