"""Tests for workers.losses: CE, focal, LDAM and deferred re-weighting on packs."""

from __future__ import annotations

import math

import pytest
import torch

from sweep.core.spec import Head, Loss, Method
from workers.losses import PackedLoss, class_balanced_weights, ldam_margins

# Two members, three classes, two samples each.
LOGITS = [
    [[2.0, 0.0, -1.0], [0.5, 1.0, 0.0]],
    [[0.0, 0.0, 0.0], [1.0, -1.0, 3.0]],
]
TARGETS = [[0, 2], [1, 2]]
COUNTS = [[100.0, 10.0, 1.0], [50.0, 50.0, 5.0]]


def _ce(z: list[float], y: int) -> float:
    """-log softmax(z)_y, written out."""
    return math.log(sum(math.exp(v) for v in z)) - z[y]


def _logits() -> torch.Tensor:
    return torch.tensor(LOGITS, dtype=torch.float64, requires_grad=True)


def _targets() -> torch.Tensor:
    return torch.tensor(TARGETS)


def _counts() -> torch.Tensor:
    return torch.tensor(COUNTS)


def test_ce_by_hand() -> None:
    loss = PackedLoss([Loss.CE, Loss.CE], _counts())(_logits(), _targets(), 0)
    # Member 1, sample 0 is uniform over 3 classes: CE = log 3.
    assert _ce(LOGITS[1][0], 1) == pytest.approx(math.log(3))
    expected = [
        (_ce(LOGITS[0][0], 0) + _ce(LOGITS[0][1], 2)) / 2,
        (math.log(3) + _ce(LOGITS[1][1], 2)) / 2,
    ]
    assert loss.shape == (2,)
    assert loss.tolist() == pytest.approx(expected, rel=1e-12)
    # The same as PyTorch's cross-entropy per member.
    ref = [torch.nn.functional.cross_entropy(_logits()[p], _targets()[p]).item() for p in range(2)]
    assert loss.tolist() == pytest.approx(ref, rel=1e-12)


def test_focal_by_hand() -> None:
    gamma = [2.0, 0.5]
    loss = PackedLoss([Loss.FOCAL] * 2, _counts(), focal_gamma=torch.tensor(gamma, dtype=torch.float64))(_logits(), _targets(), 0)
    expected = []
    for p in range(2):
        terms = []
        for z, y in zip(LOGITS[p], TARGETS[p]):
            ce = _ce(z, y)
            p_t = math.exp(z[y]) / sum(math.exp(v) for v in z)
            terms.append((1 - p_t) ** gamma[p] * ce)  # Lin et al. eq. 4, alpha = 1
        expected.append(sum(terms) / 2)
    assert loss.tolist() == pytest.approx(expected, rel=1e-10)


def test_focal_gamma_zero_is_ce() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 16, 5, dtype=torch.float64) * 4
    targets = torch.randint(0, 5, (3, 16))
    counts = torch.randint(1, 50, (3, 5)).double()
    focal = PackedLoss([Loss.FOCAL] * 3, counts, focal_gamma=0.0)(logits, targets, 0)
    ce = PackedLoss([Loss.CE] * 3, counts)(logits, targets, 0)
    torch.testing.assert_close(focal, ce, rtol=1e-14, atol=0)


def test_ldam_margins_follow_n_to_minus_quarter() -> None:
    counts = torch.tensor([[100.0, 10.0, 1.0], [5000.0, 500.0, 50.0]])
    m = ldam_margins(counts, torch.tensor([0.5, 0.3]))
    assert m.amax(dim=1).tolist() == pytest.approx([0.5, 0.3])
    # Ratios m_a / m_b = (n_b / n_a)^(1/4): a factor 10 in counts is 10^(1/4).
    q = 10 ** 0.25
    assert (m[:, 1] / m[:, 0]).tolist() == pytest.approx([q, q])
    assert (m[:, 2] / m[:, 1]).tolist() == pytest.approx([q, q])
    assert m[0].tolist() == pytest.approx([0.5 / 100 ** 0.25, 0.5 / 10 ** 0.25, 0.5])
    # A class with no examples gets margin 0 and does not affect the others.
    m0 = ldam_margins(torch.tensor([[16.0, 1.0, 0.0]]), 0.5)
    assert m0[0].tolist() == pytest.approx([0.25, 0.5, 0.0])


def test_ldam_by_hand() -> None:
    scale = [30.0, 2.0]
    max_margin = [0.5, 0.4]
    loss = PackedLoss(
        [Loss.LDAM] * 2, _counts(), ldam_max_margin=max_margin, ldam_scale=torch.tensor(scale, dtype=torch.float64)
    )(_logits(), _targets(), 0)
    expected = []
    for p in range(2):
        n_min = min(COUNTS[p])
        margins = [max_margin[p] * (n_min / n) ** 0.25 for n in COUNTS[p]]
        terms = []
        for z, y in zip(LOGITS[p], TARGETS[p]):
            zm = [v - (margins[y] if c == y else 0.0) for c, v in enumerate(z)]
            terms.append(_ce([scale[p] * v for v in zm], y))
        expected.append(sum(terms) / 2)
    assert loss.tolist() == pytest.approx(expected, rel=1e-10)


def test_drw_weights_by_hand() -> None:
    w = class_balanced_weights(torch.tensor([[100.0, 10.0, 1.0]] * 2), torch.tensor([0.9, 0.9999], dtype=torch.float64))
    # beta = 0.9: raw (1-b)/(1-b^n) = 0.1/(1-0.9^100), 0.1/(1-0.9^10), 0.1/0.1
    #           = 0.10000266, 0.15353399, 1.0; times 3 / 1.25353665.
    assert w[0].tolist() == pytest.approx([0.23932924, 0.36744197, 2.39322879], rel=1e-7)
    # beta = 0.9999: 0.01004958, 0.10004501, 1.0; times 3 / 1.11009459.
    assert w[1].tolist() == pytest.approx([0.02715872, 0.27036887, 2.70247240], rel=1e-7)
    assert w.sum(dim=1).tolist() == pytest.approx([3.0, 3.0])
    # beta = 0 is uniform; beta = 1 is inverse frequency; empty classes weigh 0.
    assert class_balanced_weights(torch.tensor([[100.0, 10.0, 1.0]]), 0.0)[0].tolist() == pytest.approx([1, 1, 1])
    inv = class_balanced_weights(torch.tensor([[100.0, 10.0, 1.0]]), 1.0)[0]
    assert inv.tolist() == pytest.approx([3 * x / 1.11 for x in (0.01, 0.1, 1.0)])
    z = class_balanced_weights(torch.tensor([[10.0, 0.0, 10.0]]), 0.99)[0]
    assert z.tolist() == pytest.approx([1.5, 0.0, 1.5])


def test_drw_switches_on_at_start_iter() -> None:
    beta = 0.9
    fn = PackedLoss([Loss.CE, Loss.CE], _counts(), drw_beta=beta, drw_start_iter=[5, None])
    before = fn(_logits(), _targets(), 4)
    after = fn(_logits(), _targets(), 5)
    plain = PackedLoss([Loss.CE, Loss.CE], _counts())(_logits(), _targets(), 5)
    assert before.tolist() == pytest.approx(plain.tolist(), rel=1e-12)
    assert after[1].item() == pytest.approx(plain[1].item(), rel=1e-12)  # member 1: never
    # Member 0: sum(w_i l_i) / sum(w_i) with w = class_balanced_weights(counts, 0.9).
    w = [0.23932924, 0.36744197, 2.39322879]
    l0, l1 = _ce(LOGITS[0][0], 0), _ce(LOGITS[0][1], 2)
    expected = (w[0] * l0 + w[2] * l1) / (w[0] + w[2])
    assert after[0].item() == pytest.approx(expected, rel=1e-7)
    # Matches PyTorch's cross_entropy(weight=...) mean reduction (Cao et al.'s DRW).
    ref = torch.nn.functional.cross_entropy(
        _logits()[0], _targets()[0], weight=fn.drw_weights[0]
    )
    assert after[0].item() == pytest.approx(ref.item(), rel=1e-12)


def _random_pack(p: int, b: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(p, b, k, generator=gen, dtype=torch.float64) * 3
    targets = torch.randint(0, k, (p, b), generator=gen)
    counts = torch.randint(1, 500, (p, k), generator=gen).double()
    return logits, targets, counts


def test_mixed_pack_equals_separate_calls() -> None:
    kinds = [Loss.CE, Loss.FOCAL, Loss.LDAM, Loss.FOCAL, Loss.LDAM, Loss.CE]
    gamma = [1.0, 2.0, 1.0, 0.5, 1.0, 1.0]
    margin = [0.5, 0.5, 0.5, 0.5, 0.3, 0.5]
    scale = [30.0, 30.0, 30.0, 30.0, 10.0, 30.0]
    beta = [0.9999, 0.999, 0.9999, 0.99, 0.9, 0.9999]
    starts = [None, 3, 3, None, 0, 10]
    logits, targets, counts = _random_pack(len(kinds), 8, 4, seed=1)
    pack = PackedLoss(kinds, counts, torch.tensor(gamma), margin, scale, beta, starts)
    for it in (0, 3, 10):
        together = pack(logits, targets, it)
        for p in range(len(kinds)):
            alone = PackedLoss(
                [kinds[p]], counts[p : p + 1], gamma[p], margin[p], scale[p], beta[p], [starts[p]]
            )(logits[p : p + 1], targets[p : p + 1], it)
            assert together[p].item() == pytest.approx(alone.item(), rel=1e-12), (it, p, kinds[p])


def test_from_specs_reads_recipe_fields() -> None:
    from types import SimpleNamespace

    rec = SimpleNamespace(focal_gamma=2.0, ldam_max_margin=0.4, ldam_scale=10.0, drw_beta=0.99, drw_start_iter=2)
    specs = [_spec(Loss.LDAM, rec), _spec(Loss.FOCAL, rec)]
    logits, targets, counts = _random_pack(2, 5, 3, seed=2)
    a = PackedLoss.from_specs(specs, counts)(logits, targets, 2)
    b = PackedLoss([Loss.LDAM, Loss.FOCAL], counts, 2.0, 0.4, 10.0, 0.99, [2, 2])(logits, targets, 2)
    torch.testing.assert_close(a, b)


def _spec(loss: Loss, recipe, method: Method = Method.BASELINE, head: Head = Head.LINEAR):
    from types import SimpleNamespace

    return SimpleNamespace(loss=loss, recipe=recipe, method=method, head=head)


def test_ldam_on_a_cosine_head_is_cao_et_al_s_formula() -> None:
    # The cosine head already outputs s * cos; the loss must be CE(s * (cos - m_y e_y)), with
    # m_y the LDAM margins of the counts, without scaling by s a second time.
    from types import SimpleNamespace

    rec = SimpleNamespace(focal_gamma=1.0, ldam_max_margin=0.5, ldam_scale=30.0, drw_beta=0.9999, drw_start_iter=None)
    counts = torch.tensor([[500.0, 50.0, 5.0]])
    cos = torch.rand(1, 8, 3, generator=torch.Generator().manual_seed(4)) * 2 - 1
    targets = torch.tensor([[0, 1, 2, 2, 1, 0, 2, 1]])
    got = PackedLoss.from_specs([_spec(Loss.LDAM, rec, head=Head.COSINE)], counts)(30.0 * cos, targets, 0)
    m = 0.5 * counts[0] ** -0.25 / (counts[0] ** -0.25).max()  # Cao et al.: C / n^(1/4), max 0.5
    z = cos[0] - torch.nn.functional.one_hot(targets[0], 3) * m
    want = torch.nn.functional.cross_entropy(30.0 * z, targets[0])
    torch.testing.assert_close(got, want.reshape(1))


def test_classifier_retraining_trains_with_plain_cross_entropy() -> None:
    # LDAM margins and DRW weights come from the imbalanced counts: re-training on the
    # balanced set uses neither.
    from types import SimpleNamespace

    rec = SimpleNamespace(focal_gamma=1.0, ldam_max_margin=0.5, ldam_scale=30.0, drw_beta=0.9999, drw_start_iter=0)
    logits, targets, counts = _random_pack(2, 6, 4, seed=5)
    specs = [_spec(Loss.LDAM, rec, Method.CLASSIFIER_RETRAINING), _spec(Loss.FOCAL, rec, Method.CLASSIFIER_RETRAINING)]
    got = PackedLoss.from_specs(specs, counts)(logits, targets, 10)
    want = torch.stack([torch.nn.functional.cross_entropy(logits[p], targets[p]) for p in range(2)])
    torch.testing.assert_close(got, want)


def test_gradient_only_reaches_own_member() -> None:
    kinds = [Loss.CE, Loss.FOCAL, Loss.LDAM]
    logits, targets, counts = _random_pack(3, 6, 4, seed=3)
    fn = PackedLoss(kinds, counts, drw_start_iter=[0, 0, 0])
    for p in range(3):
        x = logits.clone().requires_grad_(True)
        fn(x, targets, 1)[p].backward()
        others = [q for q in range(3) if q != p]
        assert torch.isfinite(x.grad).all()
        assert x.grad[p].abs().sum() > 0
        assert (x.grad[others] == 0).all()


def test_float32_and_saturated_logits_are_finite() -> None:
    logits = torch.tensor([[[200.0, 0.0, 0.0]], [[0.0, 200.0, 0.0]]], requires_grad=True)
    targets = torch.tensor([[0], [1]])
    fn = PackedLoss([Loss.FOCAL, Loss.FOCAL], torch.ones(2, 3), focal_gamma=[0.5, 1.0])
    loss = fn(logits, targets, 0)
    loss.sum().backward()
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss).all() and torch.isfinite(logits.grad).all()


def test_rejects_bad_shapes() -> None:
    fn = PackedLoss([Loss.CE, Loss.CE], _counts())
    with pytest.raises(ValueError):
        fn(torch.zeros(3, 2, 3), torch.zeros(3, 2, dtype=torch.long), 0)
    with pytest.raises(ValueError):
        PackedLoss([Loss.CE], _counts())
    with pytest.raises(ValueError):
        PackedLoss([Loss.CE, Loss.CE], _counts(), drw_start_iter=[None])
