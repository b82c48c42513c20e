"""Tests for the packed models: shapes, packed == alone, member state, head, isolation."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from workers.models import MODELS, AllCNN, PackedNet, ResNet10, ResNet32, build_model
from workers.optim import PackedSGD
from workers.packed_layers import pad_shortcut

P = 3
B = 4
SEEDS = [11, 22, 33]

# name -> (factory, num_classes, small input shape, FE width). Small inputs keep the
# suite fast on a CPU; the models take any square size (All-CNN: 16 -> 2x2 before pooling).
CASES = {
    "allcnn": (lambda p, k, s, **kw: AllCNN(p, k, s, dropout=False, **kw), 10, (3, 16, 16), 192),
    "resnet32": (ResNet32, 10, (3, 16, 16), 64),
    "resnet10": (ResNet10, 7, (3, 64, 64), 512),  # 64 -> 2x2 in the last stage
}
NAMES = list(CASES)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These are tiny kernels: on a busy CPU, OpenMP threads spinning on each other make
    # them 10-100x slower than one thread.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _make(name: str, members: int, seeds: list[int], **kw) -> PackedNet:
    factory, k, shape, _ = CASES[name]
    model = factory(members, k, shape, **kw) if kw else factory(members, k, shape)
    model.reset_parameters("kaiming" if name != "allcnn" else "xavier", seeds)
    return model


def _inputs(name: str, members: int = P, seed: int = 0) -> torch.Tensor:
    _, _, shape, _ = CASES[name]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(members, B, *shape, generator=g)


def _member_view(t: torch.Tensor, members: int) -> torch.Tensor:
    """Parameters are [P, ...] or BatchNorm's [P*C]: both split by member as [P, -1]."""
    return t.reshape(members, -1)


@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_registry(name: str) -> None:
    _, k, shape, width = CASES[name]
    assert name in MODELS
    model = build_model(name, P, k, shape)
    model.reset_parameters("kaiming", SEEDS)
    fe, logits = model(_inputs(name))
    assert fe.shape == (P, B, width)
    assert logits.shape == (P, B, k)
    assert torch.isfinite(logits).all()
    assert (fe >= 0).all()  # FE is taken after a ReLU
    clf = model.classifier()
    if name == "allcnn":  # Buda's All-CNN: a ReLU after conv9, so no W_C (see its own test)
        assert clf is None
        return
    assert clf is not None and clf.weight.shape == (P, width, k)
    # The features are exactly what W_C sees: logits = FE @ W_C + b.
    torch.testing.assert_close(logits, torch.baddbmm(clf.bias.unsqueeze(1), fe, clf.weight))


def test_feature_widths_match_catalog() -> None:
    from sweep.core.catalog import FEATURE_WIDTH
    for name, (_, _, _, width) in CASES.items():
        assert FEATURE_WIDTH[name] == width


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_packed_equals_alone(name: str, train: bool, dtype: torch.dtype) -> None:
    """Member 1 of a pack == the same seed built alone, BatchNorm batch statistics included.

    In float32 the grouped and the plain convolution kernels round differently
    (~1e-6), and batch statistics over few values magnify that (ResNet-10 at 32x32,
    1x1 in its last stage: up to 2e-5); float64 shows the two compute the same function.
    """
    atol, rtol = (2e-5, 1e-4) if dtype == torch.float32 else (1e-10, 1e-9)
    pack = _make(name, P, SEEDS).to(dtype).train(train)
    alone = _make(name, 1, [SEEDS[1]]).to(dtype).train(train)
    x = _inputs(name).to(dtype)
    fe, logits = pack(x)
    fe1, logits1 = alone(x[1:2])
    torch.testing.assert_close(logits[1], logits1[0], atol=atol, rtol=rtol)
    torch.testing.assert_close(fe[1], fe1[0], atol=atol, rtol=rtol)
    if train:
        # Running statistics were updated per member, identically.
        for k, v in alone.member_state(0).items():
            torch.testing.assert_close(pack.member_state(1)[k], v, atol=atol, rtol=rtol)


def test_allcnn_dropout_is_per_member_and_off_in_eval() -> None:
    pack = AllCNN(P, 10, (3, 16, 16))  # dropout on by default
    pack.reset_parameters("xavier", SEEDS)
    alone = AllCNN(1, 10, (3, 16, 16))
    alone.reset_parameters("xavier", [SEEDS[1]])
    x = _inputs("allcnn")
    pack.eval(), alone.eval()
    torch.testing.assert_close(pack(x)[1][1], alone(x[1:2])[1][0], atol=1e-5, rtol=1e-4)
    # Two members with the same weights and images still get different dropout masks.
    pack.load_member_state(2, pack.member_state(0))
    same = x[:1].expand(P, *x.shape[1:])
    with torch.no_grad():
        _, logits = pack.eval()(same)
        torch.testing.assert_close(logits[0], logits[2])
        _, logits = pack.train()(same)
    assert not torch.allclose(logits[0], logits[2])


def test_allcnn_dropout_masks_are_the_members_own_alone_or_packed() -> None:
    """Each member's masks come from its own seeded stream: a member trained in a pack
    sees the same masks as alone, and a rerun sees the same masks again."""
    pack = AllCNN(P, 10, (3, 16, 16))
    pack.reset_parameters("xavier", SEEDS)
    pack.seed_noise([100 + p for p in range(P)])
    alone = AllCNN(1, 10, (3, 16, 16))
    alone.reset_parameters("xavier", [SEEDS[2]])
    alone.seed_noise([102])
    x = _inputs("allcnn")
    with torch.no_grad():
        packed = pack.train()(x)[1]
        single = alone.train()(x[2:3])[1]
        torch.testing.assert_close(packed[2], single[0], atol=1e-5, rtol=1e-4)
        state = pack.noise_state()
        again = pack(x)[1]  # the streams moved on: other masks
        assert not torch.allclose(again, packed)
        pack.load_noise_state(state, x.device)  # a checkpoint restores them
        torch.testing.assert_close(pack(x)[1], again)


@pytest.mark.parametrize("name", NAMES)
def test_member_state_round_trip(name: str) -> None:
    pack = _make(name, P, SEEDS).train()
    # Give members different running statistics first.
    with torch.no_grad():
        pack(_inputs(name, seed=1))
    state = pack.member_state(0)
    pack.load_member_state(2, state)
    for k, v in pack.member_state(2).items():
        assert torch.equal(v, state[k]), k
    x = _inputs(name, seed=2)
    x[2] = x[0]
    for train in (False, True):
        pack.train(train)
        with torch.no_grad():
            fe, logits = pack(x)
        torch.testing.assert_close(logits[2], logits[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(fe[2], fe[0], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(logits[1], logits[0])
    # A member's state moves into a model of another size (stage 2 packs are re-planned).
    alone = _make(name, 1, [0]).eval()
    alone.load_member_state(0, pack.member_state(1))
    pack.eval()
    with torch.no_grad():
        torch.testing.assert_close(alone(x[1:2])[1][0], pack(x)[1][1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_head_parameters_are_the_head(name: str) -> None:
    model = _make(name, P, SEEDS)
    expected = {"allcnn": ("conv8.", "fc."), "resnet32": ("fc.",), "resnet10": ("fc.",)}[name]
    head = {id(p) for p in model.head_parameters()}
    named = dict(model.named_parameters())
    want = {id(p) for n, p in named.items() if n.startswith(expected)}
    assert head == want and len(head) == len(model.head_parameters())
    assert len(want) == 2 * len(expected)  # weight and bias of each head layer
    # Phase 2: body frozen (no_grad, eval), the head gets every gradient it needs.
    model.eval()
    with torch.no_grad():
        z = model.body(_inputs(name))
    _, logits = model.head(z)
    logits.sum().backward()
    for n, p in named.items():
        if id(p) in head:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


@pytest.mark.parametrize("name", NAMES)
def test_gradient_isolation_and_sgd_step(name: str) -> None:
    """Member p's loss reaches only member p's parameters; an SGD step moves only them."""
    model = _make(name, P, SEEDS).train()
    _, k, _, _ = CASES[name]
    y = torch.randint(0, k, (P, B), generator=torch.Generator().manual_seed(3))
    _, logits = model(_inputs(name))
    member = 1
    F.cross_entropy(logits[member], y[member]).backward()
    for n, prm in model.named_parameters():
        g = _member_view(prm.grad, P)
        for q in range(P):
            if q == member:
                assert g[q].abs().sum() > 0, n
            else:
                assert torch.count_nonzero(g[q]) == 0, (n, q)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = PackedSGD(list(model.parameters()), P, torch.full((P,), 0.9), torch.full((P,), 1e-3))
    # Weight decay and momentum act on every member; a zero gradient with lr 0 elsewhere
    # must leave the others untouched, and member 1 moves.
    opt.step(torch.tensor([0.0, 0.1, 0.0]))
    for n, prm in model.named_parameters():
        now, was = _member_view(prm.detach(), P), _member_view(before[n], P)
        assert torch.equal(now[0], was[0]) and torch.equal(now[2], was[2]), n
        assert not torch.equal(now[1], was[1]), n


def test_parameter_counts_match_standard_architectures() -> None:
    def count(model: PackedNet) -> int:
        return sum(p.numel() for p in model.parameters())

    # All-CNN-C, 10 classes: 3x3 convs (weights + biases) 2,688 + 2 x 83,040 + 166,080
    # + 3 x 331,968; 1x1 conv8 37,056; conv9/fc 1,930 -> 1,369,738 (Springenberg: 1.4M).
    assert count(AllCNN(1, 10, (3, 32, 32))) == 1_369_738
    # ResNet-32, option A, 10 classes: stem 432 + BN 32; stage 1 23,360; stage 2 88,192;
    # stage 3 351,488; fc 650 -> 464,154 (He et al. Table 6: 0.46M).
    assert count(ResNet32(1, 10, (3, 32, 32))) == 464_154
    # ResNet-10, 1000 classes: stem 9,408 + BN 128; blocks 73,984 + 230,144 + 919,040
    # + 3,673,088 (projections and BN included); fc 513,000 -> 5,418,792.
    assert count(ResNet10(1, 1000, (3, 224, 224))) == 5_418_792
    # Every member has its own copy.
    assert count(ResNet32(P, 10, (3, 32, 32))) == P * 464_154


def test_resnet32_projection_variant_and_bad_shortcut() -> None:
    # Option B adds 1x1 conv + BN on the two widening blocks: 16*32 + 64 + 32*64 + 128.
    assert sum(p.numel() for p in ResNet32(1, 10, shortcut="projection").parameters()) == 464_154 + 2_752
    with pytest.raises(ValueError):
        ResNet32(1, 10, shortcut="zeros")


def test_pad_shortcut_matches_per_member_option_a() -> None:
    x = torch.randn(2, P * 16, 8, 8)
    out = pad_shortcut(x, P, 16, 32, 2)
    ref = torch.cat([F.pad(x[:, p * 16:(p + 1) * 16, ::2, ::2], (0, 0, 0, 0, 8, 8)) for p in range(P)], 1)
    assert torch.equal(out, ref)
    cl = pad_shortcut(x.contiguous(memory_format=torch.channels_last), P, 16, 32, 2)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, ref)


@pytest.mark.parametrize("relu_logits", [True, False])
def test_allcnn_head_is_conv9_relu_then_pool_as_buda_released_it(relu_logits: bool) -> None:
    """Revision 2 (Buda's Caffe model): 1x1 conv9, ReLU, global average pooling, per member.
    Revision 1: no ReLU, where pooling commutes with the 1x1 conv (fc on pooled FE)."""
    model = AllCNN(P, 10, (3, 16, 16), dropout=False, relu_logits=relu_logits)
    model.reset_parameters("xavier", SEEDS)
    model.eval()
    with torch.no_grad():
        z = model.body(_inputs("allcnn"))
        _, logits = model.head(z)
        refs = []
        for p in range(P):  # each member alone, as a plain network
            h = F.relu(F.conv2d(z[:, p * 192:(p + 1) * 192], model.conv8.weight[p], model.conv8.bias[p]))
            conv9 = F.conv2d(h, model.fc.weight[p].T[:, :, None, None], model.fc.bias[p])
            refs.append((F.relu(conv9) if relu_logits else conv9).mean(dim=(2, 3)))
        ref = torch.stack(refs)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    assert (logits >= 0).all() == relu_logits
    assert (model.classifier() is None) == relu_logits


def test_allcnn_revision_is_part_of_the_identity_and_refuses_latent() -> None:
    from sweep.core.grid import GridError, expand
    from sweep.core.spec import TrialSpec

    doc = {"name": "a", "dataset": "cifar10", "model": "allcnn", "recipe": "buda_cifar10",
           "imbalance": {"step": {"rho": [10], "mu": [0.5]}}}
    spec = expand(doc).specs[0]
    assert spec.model_revision == 2 and spec.identity()["model_revision"] == 2
    old = json.loads(spec.to_json())
    old.pop("model_revision")  # a spec stored before the revision existed: revision 1
    assert TrialSpec.from_dict(old).model_revision == 1 and TrialSpec.from_dict(old).network_id != spec.network_id
    assert isinstance(build_model("allcnn", 1, 10, (3, 16, 16), 1).classifier(), torch.nn.Module)
    with pytest.raises(GridError, match="latent"):
        expand({**doc, "latent": True})
    lenet = expand({**doc, "dataset": "mnist", "model": "lenet5", "recipe": "buda_mnist"}).specs[0]
    assert "model_revision" not in lenet.identity()  # unrevised models keep their ids


@pytest.mark.parametrize("name", NAMES)
def test_channels_last_layout_gives_the_same_numbers(name: str) -> None:
    ref = _make(name, P, SEEDS).train()
    cl = _make(name, P, SEEDS, channels_last=True).train()
    x = _inputs(name)
    # The layout survives the whole body (residual adds and option-A shortcuts included).
    last = cl.conv7 if name == "allcnn" else cl.blocks[-1]
    seen = []
    last.register_forward_hook(lambda m, i, o: seen.append(o.is_contiguous(memory_format=torch.channels_last)))
    torch.testing.assert_close(cl(x)[1], ref(x)[1], atol=2e-5, rtol=1e-4)
    assert seen == [True]


def test_tiny_training_run_learns() -> None:
    """A pack of two ResNet-32s fits 16 fixed images in a few dozen steps."""
    torch.manual_seed(0)
    model = _make("resnet32", 2, [1, 2]).train()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 16, 3, 16, 16, generator=g)
    y = torch.randint(0, 10, (2, 16), generator=g)
    opt = PackedSGD(list(model.parameters()), 2, torch.full((2,), 0.9), torch.full((2,), 1e-4))
    first = None
    for _ in range(25):
        _, logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, 10), y.reshape(-1), reduction="none").view(2, -1).mean(1)
        first = loss.detach() if first is None else first
        opt.zero_grad()
        loss.sum().backward()
        opt.step(torch.full((2,), 0.05))
    assert (loss.detach() < 0.5 * first).all(), (first, loss)


def _lenet(members: int) -> PackedNet:
    model = build_model("lenet5", members, 10, (1, 28, 28))
    model.reset_parameters("xavier", list(range(1, members + 1)))
    return model.train()


def test_bias_lr_factor_scales_only_conv_and_linear_biases() -> None:
    """Caffe's lr_mult 2 on biases: their first step is exactly twice as long, weights unchanged."""
    steps = {}
    for factor in (1.0, 2.0):
        model = _lenet(2)
        for b in model.bias_parameters():  # zero-initialised: give them a gradient-free start
            assert torch.count_nonzero(b) == 0
        x = torch.randn(2, 4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        y = torch.randint(0, 10, (2, 4), generator=torch.Generator().manual_seed(1))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        _, logits = model(x)
        F.cross_entropy(logits.reshape(-1, 10), y.reshape(-1)).backward()
        opt = PackedSGD(list(model.parameters()), 2, torch.full((2,), 0.9), torch.full((2,), 5e-4),
                        torch.full((2,), factor), model.bias_parameters())
        opt.step(torch.full((2,), 0.01))
        steps[factor] = {n: (p.detach() - before[n]) for n, p in model.named_parameters()}
    bias_names = {n for n, _ in _lenet(2).named_parameters() if n.endswith("bias")}
    assert bias_names == {"conv1.bias", "conv2.bias", "fc1.bias", "fc2.bias"}
    for n, step in steps[2.0].items():
        if n in bias_names:
            assert step.abs().sum() > 0, n
            torch.testing.assert_close(step, 2 * steps[1.0][n], rtol=1e-6, atol=1e-12)
        else:
            assert torch.equal(step, steps[1.0][n]), n


def test_cosine_head_logits_are_s_times_a_cosine_and_bounded_by_s() -> None:
    """Cao et al.'s normalised head: logits in [-s, s], equal to s * cos(FE, W_C[:, c])."""
    from sweep.core.spec import Head
    from workers.packed_layers import PackedCosineLinear

    model = build_model("resnet32", 2, 10, (3, 16, 16), head=str(Head.COSINE))
    model.reset_parameters("kaiming", [1, 2])
    head = model.classifier()
    assert isinstance(head, PackedCosineLinear) and head.bias is None
    head.scale.copy_(torch.tensor([30.0, 10.0]))
    x = 100 * torch.randn(2, 4, 3, 16, 16, generator=torch.Generator().manual_seed(3))  # large inputs
    fe, logits = model(x)
    w = head.weight.detach()
    cos = torch.einsum("pbf,pfk->pbk", F.normalize(fe, dim=-1), w / w.norm(dim=1, keepdim=True))
    torch.testing.assert_close(logits, torch.tensor([30.0, 10.0])[:, None, None] * cos)
    assert (logits[0].abs() <= 30 + 1e-4).all() and (logits[1].abs() <= 10 + 1e-4).all()
    assert logits[0].abs().max() > 1  # not trivially bounded
    # What the latent statistics multiply gives the same logits as a linear layer.
    f, wc, b = head.linear_form(fe)
    torch.testing.assert_close(torch.baddbmm(b[:, None], f, wc), logits)
    # Initialisation as Cao et al.: unit columns, from each member's own stream.
    torch.testing.assert_close(w.norm(dim=1), torch.ones(2, 10))
    alone = build_model("resnet32", 1, 10, (3, 16, 16), head="cosine")
    alone.reset_parameters("kaiming", [2])
    assert torch.equal(alone.classifier().weight[0], w[1])


def test_model_for_specs_sets_each_member_s() -> None:
    import dataclasses

    from sweep.core.grid import expand
    from workers.models import model_for

    g = expand({"name": "c", "dataset": "cifar10", "model": "resnet32", "recipe": "ldam_drw",
                "losses": ["ldam"], "imbalance": {"exponential": {"rho": [10, 100]}}})
    specs = [g.specs[0], dataclasses.replace(g.specs[1], recipe=dataclasses.replace(g.specs[1].recipe, ldam_scale=5.0))]
    assert {s.head for s in specs} == {"cosine"}
    model = model_for(specs, 10, (3, 32, 32))
    assert model.classifier().scale.tolist() == [30.0, 5.0]
    with pytest.raises(ValueError, match="allcnn has no cosine head"):
        build_model("allcnn", 1, 10, (3, 16, 16), head="cosine")
