"""Tests for workers.latent: Dablain et al. latent statistics on hand-built features and weights.

Every expected number in the hand-built tests is worked out in the comments
(notation of the workers.latent module docstring: ce[c, h] = fe[h] * W[h, c],
LG[c] = sum_h ce[c, h] + b[c], need = LG_A - b_r, top-K = smallest k with
S_k > need).
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pandas as pd
import pytest
import torch

from workers import latent
from workers.latent import COLUMNS, STATISTICS, latent_statistics, statistics_table, tp_fp_statistics

# -- the hand-built pack: P = 2 members, N = 4 instances, F = H = 3 features, K = 2 classes --------
#
# Member 0: W[:, 0] = [2, 1, 0], W[:, 1] = [0, 1, 3], no bias.
# Member 1: W[:, 0] = [1, 0, 1], W[:, 1] = [0, 1, -1], b = [0.5, 0].
W = torch.tensor([
    [[2.0, 0.0], [1.0, 1.0], [0.0, 3.0]],
    [[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]],
])
B = torch.tensor([[0.0, 0.0], [0.5, 0.0]])
FE = torch.tensor([
    # Member 0
    [[2.0, 1.0, 0.0],  # n0 label 0: LG = [4+1, 1] = [5, 1] -> pred 0 (TP); ce_0 = [4, 1, 0], need 1: S_1 = 4 > 1, top-K 1
     [1.0, 1.0, 1.0],  # n1 label 0: LG = [2+1, 1+3] = [3, 4] -> pred 1 (misclassified, left out)
     [0.0, 1.0, 1.0],  # n2 label 1: LG = [1, 4] -> pred 1 (TP); ce_1 = [0, 1, 3], need 1: S_1 = 3 > 1, top-K 1
     [1.0, 2.0, 1.0]],  # n3 label 1: LG = [4, 5] -> pred 1 (TP); ce_1 = [0, 2, 3], need 4: S_1 = 3, S_2 = 5, top-K 2
    # Member 1
    [[1.0, 0.0, 0.0],  # n0 label 0: LG = [1+.5, 0] -> pred 0; need = 0 - .5 < 0: the bias alone wins, top-K 0
     [0.0, 1.0, 0.0],  # n1 label 1: LG = [.5, 1] -> pred 1; ce_1 = [0, 1, 0], need .5: S_1 = 1, top-K 1
     [0.0, 0.5, 0.0],  # n2 label 0: LG = [.5, .5] tie -> pred 0; ce_0 = 0, need 0: never (top-K = H+1 = 4)
     [2.0, 1.0, 1.0]],  # n3 label 1: LG = [2+1+.5, 1-1] = [3.5, 0] -> pred 0 (misclassified)
])
LABELS = torch.tensor([0, 0, 1, 1])
LABELS_M1 = torch.tensor([0, 1, 0, 1])  # member 1 uses its own labels: [P, N] labels


def _labels() -> torch.Tensor:
    return torch.stack([LABELS, LABELS_M1])


def _index(rows: list[dict]) -> dict:
    """(member, class, statistic, k, feature) -> value."""
    out = {}
    for r in rows:
        key = (r["member"], r["class"], r["statistic"], r["k"], r["feature"])
        assert key not in out, f"duplicate row {key}"
        out[key] = r["value"]
    return out


def _scalar(idx: dict, member: int, cls: int, stat: str) -> float:
    return idx[(member, cls, stat, None, None)]


def _curve(idx: dict, member: int, cls: int, stat: str) -> list[float]:
    """Values of a statistic indexed by k (feature null), in k order."""
    pts = sorted((k, v) for (m, c, s, k, f), v in idx.items() if (m, c, s) == (member, cls, stat) and f is None)
    return [v for _k, v in pts]


def _ranked(idx: dict, member: int, cls: int, stat: str) -> list[tuple[int, int, float]]:
    """(rank, feature, value) rows of a ranked statistic, by rank."""
    return sorted((k, f, v) for (m, c, s, k, f), v in idx.items() if (m, c, s) == (member, cls, stat))


@pytest.fixture(scope="module")
def hand() -> dict:
    return _index(latent_statistics(FE, W, B, _labels(), "train"))


def test_rows_have_the_tidy_columns(hand: dict) -> None:
    rows = latent_statistics(FE, W, B, _labels(), "test", top=2)
    assert rows and all(tuple(r) == COLUMNS for r in rows)
    assert {r["split"] for r in rows} == {"test"}
    assert {r["statistic"] for r in rows} <= set(STATISTICS)
    assert all(isinstance(r["value"], float) for r in rows)
    # wc_magnitude is emitted once per network: with the training split by default.
    assert not any(r["statistic"] == "wc_magnitude" for r in rows)
    assert any(r["statistic"] == "wc_magnitude" for r in latent_statistics(FE, W, B, _labels(), "test",
                                                                           include_weights=True))


def test_accuracy(hand: dict) -> None:
    # Member 0: class 0 has n0 right and n1 wrong -> 1/2; class 1 n2, n3 right -> 1.
    assert _scalar(hand, 0, 0, "accuracy") == 0.5
    assert _scalar(hand, 0, 1, "accuracy") == 1.0
    assert _scalar(hand, 0, -1, "accuracy") == 0.75  # 3 of 4
    assert _scalar(hand, 0, -1, "balanced_accuracy") == 0.75  # (1/2 + 1) / 2
    # Member 1 (labels [0, 1, 0, 1]): class 0 n0, n2 right (n2 by the tie going to class 0) -> 1;
    # class 1 n1 right, n3 wrong -> 1/2.
    assert _scalar(hand, 1, 0, "accuracy") == 1.0
    assert _scalar(hand, 1, 1, "accuracy") == 0.5
    assert _scalar(hand, 1, -1, "accuracy") == 0.75


def test_instance_counts_use_correct_instances_only(hand: dict) -> None:
    assert [_scalar(hand, 0, c, "instances") for c in (0, 1, -1)] == [1, 2, 3]
    assert [_scalar(hand, 1, c, "instances") for c in (0, 1, -1)] == [2, 1, 3]


def test_topk_coverage(hand: dict) -> None:
    # Member 0, top-Ks: class 0 {1}, class 1 {1, 2}.
    assert _curve(hand, 0, 0, "topk_coverage") == [1.0, 1.0, 1.0]  # K = 1, 2, 3
    assert _curve(hand, 0, 1, "topk_coverage") == [0.5, 1.0, 1.0]
    assert _curve(hand, 0, -1, "topk_coverage") == pytest.approx([2 / 3, 1.0, 1.0])  # {1, 1, 2}
    # Member 1: class 0 {0 (bias alone), never}: covered from K = 1 on for n0, never for n2.
    assert _curve(hand, 1, 0, "topk_coverage") == [0.5, 0.5, 0.5]
    assert _curve(hand, 1, 1, "topk_coverage") == [1.0, 1.0, 1.0]  # {1}
    assert _curve(hand, 1, -1, "topk_coverage") == pytest.approx([2 / 3] * 3)  # {0, never, 1}


def test_topk_mean_and_never(hand: dict) -> None:
    assert _scalar(hand, 0, 0, "topk_mean") == 1.0
    assert _scalar(hand, 0, 1, "topk_mean") == 1.5  # (1 + 2) / 2
    assert _scalar(hand, 0, -1, "topk_mean") == pytest.approx(4 / 3)
    assert _scalar(hand, 0, -1, "topk_never_fraction") == 0.0
    # Member 1: the never instance is left out of the mean, counted in the fraction.
    assert _scalar(hand, 1, 0, "topk_mean") == 0.0  # n0 only: top-K 0
    assert _scalar(hand, 1, 0, "topk_never_fraction") == 0.5
    assert _scalar(hand, 1, -1, "topk_mean") == 0.5  # (0 + 1) / 2
    assert _scalar(hand, 1, -1, "topk_never_fraction") == pytest.approx(1 / 3)


def test_class_topk_members(hand: dict) -> None:
    # Member 0 ce sets: n0 {f0}; n2 {f2}; n3 {f2, f1} (ce_1 sorted 3 (f2), 2 (f1)).
    assert _ranked(hand, 0, 0, "class_topk_ce_frequency") == [(1, 0, 1.0)]
    assert _ranked(hand, 0, 1, "class_topk_ce_frequency") == [(1, 2, 1.0), (2, 1, 0.5)]
    assert _scalar(hand, 0, 0, "class_topk_ce_needed") == 1
    assert _scalar(hand, 0, 1, "class_topk_ce_needed") == 2
    # fe sets (the instance's top-K largest fe, ties to the lower id): n0 fe [2, 1, 0], K 1 -> {f0};
    # n2 fe [0, 1, 1], K 1 -> f1 and f2 tie -> {f1}; n3 fe [1, 2, 1], K 2 -> f1, then f0/f2 tie -> {f1, f0}.
    assert _ranked(hand, 0, 0, "class_topk_fe_frequency") == [(1, 0, 1.0)]
    assert _ranked(hand, 0, 1, "class_topk_fe_frequency") == [(1, 1, 1.0), (2, 0, 0.5)]
    assert _scalar(hand, 0, 1, "class_topk_fe_needed") == 2
    # Member 1: class 0 instances add no members (top-K 0, never) -> no frequency rows, 0 needed.
    assert _ranked(hand, 1, 0, "class_topk_ce_frequency") == []
    assert _scalar(hand, 1, 0, "class_topk_ce_needed") == 0
    assert _scalar(hand, 1, 0, "class_topk_fe_needed") == 0
    assert _ranked(hand, 1, 1, "class_topk_ce_frequency") == [(1, 1, 1.0)]  # n1: ce_1 = [0, 1, 0]
    assert _ranked(hand, 1, 1, "class_topk_fe_frequency") == [(1, 1, 1.0)]  # n1: fe = [0, 1, 0]


def test_magnitudes(hand: dict) -> None:
    # Member 0 class means of fe: class 0 (n0) [2, 1, 0]; class 1 (n2, n3) [.5, 1.5, 1].
    assert _ranked(hand, 0, 0, "fe_mean_magnitude") == [(1, 0, 2.0), (2, 1, 1.0), (3, 2, 0.0)]
    assert _ranked(hand, 0, 1, "fe_mean_magnitude") == [(1, 1, 1.5), (2, 2, 1.0), (3, 0, 0.5)]
    # ce means = fe means * own column: class 0 [2*2, 1*1, 0*0] = [4, 1, 0]; class 1 [0, 1.5, 3].
    assert _ranked(hand, 0, 0, "ce_mean_magnitude") == [(1, 0, 4.0), (2, 1, 1.0), (3, 2, 0.0)]
    assert _ranked(hand, 0, 1, "ce_mean_magnitude") == [(1, 2, 3.0), (2, 1, 1.5), (3, 0, 0.0)]
    assert _ranked(hand, 0, 0, "wc_magnitude") == [(1, 0, 2.0), (2, 1, 1.0), (3, 2, 0.0)]
    assert _ranked(hand, 0, 1, "wc_magnitude") == [(1, 2, 3.0), (2, 1, 1.0), (3, 0, 0.0)]
    # Member 1: class 0 (n0, n2) fe mean [.5, .25, 0]; ce mean * W[:, 0] = [.5, 0, 0] (f1, f2 tie at 0).
    assert _ranked(hand, 1, 0, "fe_mean_magnitude") == [(1, 0, 0.5), (2, 1, 0.25), (3, 2, 0.0)]
    assert _ranked(hand, 1, 0, "ce_mean_magnitude") == [(1, 0, 0.5), (2, 1, 0.0), (3, 2, 0.0)]
    # Weights by value, not |w|: W[:, 0] = [1, 0, 1] (f0/f2 tie -> f0 first); W[:, 1] = [0, 1, -1].
    assert _ranked(hand, 1, 0, "wc_magnitude") == [(1, 0, 1.0), (2, 2, 1.0), (3, 1, 0.0)]
    assert _ranked(hand, 1, 1, "wc_magnitude") == [(1, 1, 1.0), (2, 0, 0.0), (3, 2, -1.0)]


def test_top_ce_logit_share(hand: dict) -> None:
    # Member 0: n0 ce [4, 1, 0] / 5; n2 [3, 1, 0] / 4; n3 [3, 2, 0] / 5.
    assert _curve(hand, 0, 0, "top_ce_logit_share") == pytest.approx([0.8, 0.2, 0.0])
    assert _curve(hand, 0, 1, "top_ce_logit_share") == pytest.approx([0.675, 0.325, 0.0])  # (.75+.6)/2, (.25+.4)/2
    assert _curve(hand, 0, -1, "top_ce_logit_share") == pytest.approx([2.15 / 3, 0.85 / 3, 0.0])
    # Member 1: n2's ce sum is 0 (no share): class 0 is n0 alone, [1, 0, 0] / 1.
    assert _curve(hand, 1, 0, "top_ce_logit_share") == pytest.approx([1.0, 0.0, 0.0])


def test_fixed_k_sets() -> None:
    idx = _index(latent_statistics(FE, W, B, _labels(), "train", fixed_k=2))
    # Member 0, K = 2 for everyone: ce sets n0 {f0, f1}; n2 {f2, f1}; n3 {f2, f1}.
    assert _ranked(idx, 0, 0, "class_topk_ce_frequency") == [(1, 0, 1.0), (2, 1, 1.0)]
    assert _ranked(idx, 0, 1, "class_topk_ce_frequency") == [(1, 1, 1.0), (2, 2, 1.0)]
    # fe sets: n2 fe [0, 1, 1] -> {f1, f2}; n3 fe [1, 2, 1] -> {f1, f0}: f1 1, f0 .5, f2 .5.
    assert _ranked(idx, 0, 1, "class_topk_fe_frequency") == [(1, 1, 1.0), (2, 0, 0.5), (3, 2, 0.5)]
    assert _scalar(idx, 0, 1, "class_topk_fe_needed") == 3
    # Member 1 class 0: n0 fe [1, 0, 0] -> {f0} (zeros are never members); n2 fe [0, .5, 0] -> {f1}.
    assert _ranked(idx, 1, 0, "class_topk_fe_frequency") == [(1, 0, 0.5), (2, 1, 0.5)]
    # ce_0 of n0 = [1, 0, 0] -> {f0}; n2 ce_0 = 0 -> {}.
    assert _ranked(idx, 1, 0, "class_topk_ce_frequency") == [(1, 0, 0.5)]
    # The instance top-K itself does not depend on fixed_k.
    assert _curve(idx, 0, 1, "topk_coverage") == [0.5, 1.0, 1.0]


def test_top_limits_ranked_rows() -> None:
    idx = _index(latent_statistics(FE, W, B, _labels(), "train", top=1))
    assert _ranked(idx, 0, 1, "fe_mean_magnitude") == [(1, 1, 1.5)]
    assert _ranked(idx, 0, 1, "class_topk_ce_frequency") == [(1, 2, 1.0)]
    assert _curve(idx, 0, 1, "top_ce_logit_share") == pytest.approx([0.675])
    # The number needed still counts every member, not just the top one kept.
    assert _scalar(idx, 0, 1, "class_topk_ce_needed") == 2


def test_bias_none_is_zero_bias() -> None:
    a = latent_statistics(FE[:1], W[:1], None, LABELS, "train")
    b = latent_statistics(FE[:1], W[:1], torch.zeros(1, 2), LABELS, "train")
    assert a == b


# -- tp_fp_statistics, §5.7 -------------------------------------------------------------------
# Member 0's weights; training set = member 0's four instances above (train TPs: class 0 {n0},
# class 1 {n2, n3}; class means [2, 1, 0] and [.5, 1.5, 1]; training members: fe c0 {f0},
# c1 f1 (1.0), f0 (.5); ce c0 {f0}, c1 f2 (1.0), f1 (.5)).
TEST_FE = torch.tensor([[
    [3.0, 0.0, 0.0],  # label 0: LG [6, 0] -> pred 0, TP; ce_0 [6, 0, 0] need 0 -> K 1, ce {f0}, fe {f0}
    [0.0, 1.0, 2.0],  # label 0: LG [1, 7] -> pred 1, FP; ce_1 [0, 1, 6] need 1 -> K 1, ce {f2}, fe {f2}
    [0.0, 2.0, 1.0],  # label 1: LG [2, 5] -> pred 1, TP; ce_1 [0, 2, 3] need 2 -> K 1, ce {f2}, fe {f1}
    [2.0, 0.0, 0.0],  # label 1: LG [4, 0] -> pred 0, FP; ce_0 [4, 0, 0] need 0 -> K 1, ce {f0}, fe {f0}
]])
TEST_LABELS = torch.tensor([0, 0, 1, 1])
TEST_PRED = torch.tensor([[0, 1, 1, 0]])
TRAIN_PRED = torch.tensor([[0, 1, 1, 1]])


@pytest.fixture(scope="module")
def tpfp() -> dict:
    rows = tp_fp_statistics(FE[:1], LABELS, TRAIN_PRED, TEST_FE, TEST_LABELS, TEST_PRED, W[:1], bias=B[:1])
    assert {r["split"] for r in rows} == {"test"}
    assert {r["statistic"] for r in rows} <= set(STATISTICS)
    return _index(rows)


def test_tp_fp_counts(tpfp: dict) -> None:
    assert [_scalar(tpfp, 0, c, "tp_instances") for c in (0, 1, -1)] == [1, 1, 2]
    assert [_scalar(tpfp, 0, c, "fp_instances") for c in (0, 1, -1)] == [1, 1, 2]


def test_frobenius_norms(tpfp: dict) -> None:
    # TP means: c0 [3, 0, 0], c1 [0, 2, 1]; FP means (by label): c0 [0, 1, 2], c1 [2, 0, 0].
    # TP: c0 ||[2,1,0]-[3,0,0]|| = sqrt(2); c1 ||[.5,1.5,1]-[0,2,1]|| = sqrt(.5); all sqrt(2.5).
    assert _scalar(tpfp, 0, 0, "fe_frobenius_tp") == pytest.approx(math.sqrt(2))
    assert _scalar(tpfp, 0, 1, "fe_frobenius_tp") == pytest.approx(math.sqrt(0.5))
    assert _scalar(tpfp, 0, -1, "fe_frobenius_tp") == pytest.approx(math.sqrt(2.5))
    # FP: c0 ||[2, 0, -2]|| = sqrt(8); c1 ||[-1.5, 1.5, 1]|| = sqrt(5.5); all sqrt(13.5).
    assert _scalar(tpfp, 0, 0, "fe_frobenius_fp") == pytest.approx(math.sqrt(8))
    assert _scalar(tpfp, 0, 1, "fe_frobenius_fp") == pytest.approx(math.sqrt(5.5))
    assert _scalar(tpfp, 0, -1, "fe_frobenius_fp") == pytest.approx(math.sqrt(13.5))
    # Restricted to the training fe members, c0 {f0}, c1 {f1, f0}:
    # TP c0 |2-3| = 1; c1 (1.5-2, .5-0) -> sqrt(.5); all sqrt(1.5).
    assert _scalar(tpfp, 0, 0, "fe_members_frobenius_tp") == pytest.approx(1.0)
    assert _scalar(tpfp, 0, 1, "fe_members_frobenius_tp") == pytest.approx(math.sqrt(0.5))
    assert _scalar(tpfp, 0, -1, "fe_members_frobenius_tp") == pytest.approx(math.sqrt(1.5))
    # FP c0 |2-0| = 2; c1 (1.5-0, .5-2) -> sqrt(4.5); all sqrt(8.5).
    assert _scalar(tpfp, 0, 0, "fe_members_frobenius_fp") == pytest.approx(2.0)
    assert _scalar(tpfp, 0, 1, "fe_members_frobenius_fp") == pytest.approx(math.sqrt(4.5))
    assert _scalar(tpfp, 0, -1, "fe_members_frobenius_fp") == pytest.approx(math.sqrt(8.5))


def test_member_means_fig10(tpfp: dict) -> None:
    assert _ranked(tpfp, 0, 0, "fe_member_mean_train") == [(1, 0, 2.0)]
    assert _ranked(tpfp, 0, 1, "fe_member_mean_train") == [(1, 1, 1.5), (2, 0, 0.5)]
    assert _ranked(tpfp, 0, 0, "fe_member_mean_tp") == [(1, 0, 3.0)]
    assert _ranked(tpfp, 0, 1, "fe_member_mean_tp") == [(1, 1, 2.0), (2, 0, 0.0)]
    assert _ranked(tpfp, 0, 0, "fe_member_mean_fp") == [(1, 0, 0.0)]
    assert _ranked(tpfp, 0, 1, "fe_member_mean_fp") == [(1, 1, 0.0), (2, 0, 2.0)]


def test_identity_overlaps(tpfp: dict) -> None:
    # fe TP: c0 {f0} vs {f0} -> 1; c1 {f1} vs {f1, f0} -> 1/2; all mean .75.
    assert [_scalar(tpfp, 0, c, "fe_identity_overlap_tp") for c in (0, 1, -1)] == [1.0, 0.5, 0.75]
    # fe FP: c0 {f2} vs {f0} -> 0; c1 {f0} vs {f1, f0} -> 1/2; all .25.
    assert [_scalar(tpfp, 0, c, "fe_identity_overlap_fp") for c in (0, 1, -1)] == [0.0, 0.5, 0.25]
    # ce TP: c0 {f0} vs {f0} -> 1; c1 {f2} vs {f2, f1} -> 1/2.
    assert [_scalar(tpfp, 0, c, "ce_identity_overlap_tp") for c in (0, 1, -1)] == [1.0, 0.5, 0.75]
    # ce FP: the ce counted are the wrongly predicted class's: c0 {f2} vs {f0}; c1 {f0} vs {f2, f1}.
    assert [_scalar(tpfp, 0, c, "ce_identity_overlap_fp") for c in (0, 1, -1)] == [0.0, 0.0, 0.0]


def test_tp_fp_empty_groups_are_nan() -> None:
    # Every test instance right: no FPs, so FP norms and overlaps are NaN, TP ones defined.
    pred = torch.tensor([[0, 0, 1, 1]])
    fe = TEST_FE.clone()
    fe[0, 1] = torch.tensor([1.0, 0.0, 0.0])  # label 0, now LG [2, 0] -> 0
    fe[0, 3] = torch.tensor([0.0, 0.0, 1.0])  # label 1, LG [0, 3] -> 1
    idx = _index(tp_fp_statistics(FE[:1], LABELS, TRAIN_PRED, fe, TEST_LABELS, pred, W[:1], bias=None))
    assert _scalar(idx, 0, -1, "fp_instances") == 0
    assert math.isnan(_scalar(idx, 0, 0, "fe_frobenius_fp"))
    assert math.isnan(_scalar(idx, 0, -1, "fe_frobenius_fp"))
    assert math.isnan(_scalar(idx, 0, 1, "ce_identity_overlap_fp"))
    assert not math.isnan(_scalar(idx, 0, -1, "fe_frobenius_tp"))
    assert _ranked(idx, 0, 0, "fe_member_mean_fp") == []


# -- batching, blocks, the topk fast path and a naive reference ---------------------------------
def _random_pack(seed: int, p: int = 4, n: int = 120, h: int = 40, k: int = 4, decimals: int = 1):
    """Features with many exact ties (rounded), partly zero (ReLU), and weights of both signs."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (p, n), generator=g)
    proto = torch.rand(k, h, generator=g) * (torch.rand(k, h, generator=g) < 0.3)
    fe = torch.relu(torch.randn(p, n, h, generator=g) * 0.5 + 2 * proto[y])
    fe = torch.round(fe * 10**decimals) / 10**decimals
    w = torch.round((proto.T[None] + 0.3 * torch.randn(p, h, k, generator=g)) * 4) / 4
    b = torch.round(torch.randn(p, k, generator=g)) / 4
    y[:, :5] = -1  # instances a member does not use
    return fe.double(), w.double(), b.double(), y


def _by_member(rows: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        out[r["member"]].append(r)
    return out


def _same_rows(a: list[dict], b: list[dict]) -> None:
    def key(r: dict) -> tuple:
        return (r["split"], r["class"], r["statistic"], -1 if r["k"] is None else r["k"],
                -1 if r["feature"] is None else r["feature"])
    a, b = sorted(a, key=key), sorted(b, key=key)
    assert [key(r) for r in a] == [key(r) for r in b]
    np.testing.assert_allclose([r["value"] for r in a], [r["value"] for r in b], rtol=1e-12, atol=1e-12)


def test_batched_equals_per_member() -> None:
    fe, w, b, y = _random_pack(0)
    rows = _by_member(latent_statistics(fe, w, b, y, "train"))
    for m in range(fe.shape[0]):
        alone = latent_statistics(fe[m:m + 1], w[m:m + 1], b[m:m + 1], y[m], "train")
        _same_rows(rows[m], [{**r, "member": m} for r in alone])


def test_tp_fp_batched_equals_per_member() -> None:
    fe, w, b, y = _random_pack(1)
    fe2, _, _, y2 = _random_pack(2)
    pred = (fe @ w + b[:, None]).argmax(2)
    pred2 = (fe2 @ w + b[:, None]).argmax(2)
    rows = _by_member(tp_fp_statistics(fe, y, pred, fe2, y2, pred2, w, bias=b))
    for m in range(fe.shape[0]):
        alone = tp_fp_statistics(fe[m:m + 1], y[m], pred[m], fe2[m:m + 1], y2[m], pred2[m], w[m:m + 1],
                                 bias=b[m:m + 1])
        _same_rows(rows[m], [{**r, "member": m} for r in alone])


@pytest.mark.parametrize(("fixed_k", "top"), [(None, 10), (3, 10), (None, 1)])
def test_fast_path_and_blocks_match_full_sort(monkeypatch: pytest.MonkeyPatch, fixed_k: int | None,
                                              top: int) -> None:
    # Coarse rounding makes ties at the topk cut common: the redo must make them exact.
    fe, w, b, y = _random_pack(3, decimals=0)
    pred = (fe @ w + b[:, None]).argmax(2)
    wrong = torch.zeros_like(y)  # predictions that are not the arg-max: many never exceed

    def run() -> tuple[list[dict], list[dict]]:
        return (latent_statistics(fe, w, b, y, "train", top=top, fixed_k=fixed_k),
                tp_fp_statistics(fe, y, pred, fe, y, wrong, w, top=top, bias=b, fixed_k=fixed_k))

    monkeypatch.setattr(latent, "_FIRST_PASS", 10**6)  # full stable sort of every instance
    monkeypatch.setattr(latent, "_CHUNK_ELEMENTS", 1 << 30)
    reference = run()
    # topk of max(2, top, fixed_k) ranks: with top = 1 many instances need more and are
    # redone, as are ties at the cut; blocks of one member and 50 instances.
    monkeypatch.setattr(latent, "_FIRST_PASS", 2)
    monkeypatch.setattr(latent, "_CHUNK_ELEMENTS", 40 * 50)
    fast = run()
    _same_rows(fast[0], reference[0])
    _same_rows(fast[1], reference[1])


def _naive(fe: np.ndarray, w: np.ndarray, b: np.ndarray, y: np.ndarray, top: int) -> dict:
    """Instance-by-instance reference for one member, straight from the definitions."""
    n, h = fe.shape
    k_classes = w.shape[1]
    out: dict = {}
    kstars: dict[int, list[int]] = defaultdict(list)
    ce_sets: dict[int, list[set]] = defaultdict(list)
    fe_sets: dict[int, list[set]] = defaultdict(list)
    for i in range(n):
        if y[i] < 0:
            continue
        lg = fe[i] @ w + b
        r = int(np.argmax(lg))
        if r != y[i]:
            continue
        lg_a = max(lg[c] for c in range(k_classes) if c != r)
        ce = fe[i] * w[:, r]
        order = sorted(range(h), key=lambda j: (-ce[j], j))
        kstar = h + 1
        for kk in range(h + 1):
            if b[r] + sum(ce[j] for j in order[:kk]) > lg_a:
                kstar = kk
                break
        kstars[r].append(kstar)
        kset = 0 if kstar > h else kstar
        ce_sets[r].append({j for j in order[:kset] if ce[j] > 0})
        fe_order = sorted(range(h), key=lambda j: (-fe[i, j], j))
        fe_sets[r].append({j for j in fe_order[:kset] if fe[i, j] > 0})
    for c, ks in kstars.items():
        out[(c, "coverage")] = [np.mean([kk <= big for kk in ks]) for big in range(1, h + 1)]
        for kind, sets in (("ce", ce_sets[c]), ("fe", fe_sets[c])):
            freq = {j: sum(j in s for s in sets) / len(sets) for j in range(h)}
            ranked = sorted((j for j in range(h) if freq[j] > 0), key=lambda j: (-freq[j], j))[:top]
            out[(c, kind)] = [(rank + 1, j, freq[j]) for rank, j in enumerate(ranked)]
            out[(c, kind + "_needed")] = sum(freq[j] > 0 for j in range(h))
    return out


def _same_ranking(got: list[tuple[int, int, float]], want: list[tuple[int, int, float]]) -> None:
    """Ranks and features exactly, frequencies within float tolerance (pytest 9's approx
    takes no nested tuples)."""
    assert [(k, f) for k, f, _ in got] == [(k, f) for k, f, _ in want]
    assert [v for *_, v in got] == pytest.approx([v for *_, v in want])


def test_matches_naive_reference() -> None:
    fe, w, b, y = _random_pack(4, p=2, n=60, h=12, k=3, decimals=0)
    idx = _index(latent_statistics(fe, w, b, y, "train", top=5))
    for m in range(2):
        ref = _naive(fe[m].numpy(), w[m].numpy(), b[m].numpy(), y[m].numpy(), top=5)
        classes = {c for c, _ in ref}
        assert classes, "the random pack should classify some instances correctly"
        for c in classes:
            assert _curve(idx, m, c, "topk_coverage") == pytest.approx(ref[(c, "coverage")])
            _same_ranking(_ranked(idx, m, c, "class_topk_ce_frequency"), ref[(c, "ce")])
            _same_ranking(_ranked(idx, m, c, "class_topk_fe_frequency"), ref[(c, "fe")])
            assert _scalar(idx, m, c, "class_topk_ce_needed") == ref[(c, "ce_needed")]
            assert _scalar(idx, m, c, "class_topk_fe_needed") == ref[(c, "fe_needed")]


def test_float32_matches_float64() -> None:
    fe, w, b, y = _random_pack(5)
    a = latent_statistics(fe, w, b, y, "train")
    c = latent_statistics(fe.float(), w.float(), b.float(), y, "train")
    # The inputs are exact in float32 (rounded to 0.1 / 0.25): everything runs in float64.
    _same_rows(a, c)


def test_half_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="full precision"):
        latent_statistics(FE.half(), W, B, LABELS, "train")
    with pytest.raises(ValueError, match="full precision"):
        latent_statistics(FE, W.bfloat16(), B, LABELS, "train")


def test_bad_shapes_and_labels() -> None:
    with pytest.raises(ValueError, match="weight"):
        latent_statistics(FE, W[:, :2], B, LABELS, "train")
    with pytest.raises(ValueError, match="labels"):
        latent_statistics(FE, W, B, torch.tensor([0, 1, 2, 0]), "train")
    with pytest.raises(ValueError, match="two classes"):
        latent_statistics(FE, W[:, :, :1], B[:, :1], torch.zeros(4, dtype=torch.long), "train")
    with pytest.raises(ValueError, match="fixed_k"):
        latent_statistics(FE, W, B, LABELS, "train", fixed_k=4)


def test_diverged_member_gets_no_rows() -> None:
    fe = FE.clone()
    fe[1, 2, 0] = float("nan")
    rows = latent_statistics(fe, W, B, _labels(), "train")
    assert {r["member"] for r in rows} == {0}
    _same_rows(rows, latent_statistics(FE[:1], W[:1], B[:1], LABELS, "train"))
    w = W.clone()
    w[0, 0, 0] = float("inf")
    rows = tp_fp_statistics(FE, _labels(), torch.zeros(2, 4, dtype=torch.long), FE, _labels(),
                            torch.zeros(2, 4, dtype=torch.long), w, bias=B)
    assert {r["member"] for r in rows} == {1}


def test_row_count_bound() -> None:
    fe, w, b, y = _random_pack(6, p=2, n=200, h=40, k=4)
    c, h, t = 4, 40, 10
    rows = _by_member(latent_statistics(fe, w, b, y, "train", top=t))
    bound = (c + 1) * (h + 4) + 6 * c * t + 2 * c + 1 + c * t  # module docstring, wc included
    assert all(len(r) <= bound for r in rows.values())
    assert all(sum(x["statistic"] == "topk_coverage" for x in r) == (c + 1) * h for r in rows.values())


def test_statistics_table() -> None:
    rows = latent_statistics(FE, W, B, _labels(), "train")
    table = statistics_table(rows, ["net-a", "net-b"])
    assert list(table.columns) == ["network_id", "split", "class", "statistic", "k", "feature", "value"]
    assert len(table) == len(rows)
    assert set(table["network_id"]) == {"net-a", "net-b"}
    assert str(table["k"].dtype) == "Int64" and str(table["feature"].dtype) == "Int64"
    assert table["class"].dtype == np.int64 and table["value"].dtype == np.float64
    acc = table[(table.network_id == "net-b") & (table.statistic == "accuracy") & (table["class"] == 1)]
    assert acc["value"].tolist() == [0.5] and acc["k"].isna().all()
    same = statistics_table(rows, {0: "net-a", 1: "net-b"})
    pd.testing.assert_frame_equal(table, same)
    with pytest.raises(ValueError, match="member"):
        statistics_table(rows, {0: "net-a"})
    empty = statistics_table([], [])
    assert list(empty.columns) == list(table.columns) and empty.empty
