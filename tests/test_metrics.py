"""Tests for workers.metrics: batched ROC AUC, accuracy metrics, thresholding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from workers.metrics import classification_metrics, evaluate, roc_auc_ovr, threshold_scores


def _sklearn_per_class(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[P, K] one-vs-rest AUCs from sklearn, NaN where a class is absent."""
    p, _n, k = scores.shape
    out = np.full((p, k), np.nan)
    for m in range(p):
        lab = labels if labels.ndim == 1 else labels[m]
        for c in range(k):
            y = lab == c
            if y.any() and not y.all():
                out[m, c] = roc_auc_score(y, scores[m, :, c])
    return out


@pytest.mark.parametrize("decimals", [0, 1, 2, 6])
def test_roc_auc_matches_sklearn_with_ties(decimals: int) -> None:
    rng = np.random.default_rng(decimals)
    p, n, k = 5, 300, 4
    # Rounding makes many ties; decimals=0 leaves only a handful of distinct values.
    scores = np.round(rng.normal(size=(p, n, k)) + 0.7 * np.eye(k)[rng.integers(0, k, n)], decimals)
    labels = rng.integers(0, k, size=n)
    labels[: 3 * k] = np.arange(3 * k) % k  # every class present
    scores[:, :, 1] += 0.5 * (labels == 1)  # make AUCs differ from 0.5
    macro, per_class = roc_auc_ovr(torch.from_numpy(scores), torch.from_numpy(labels))
    expected = _sklearn_per_class(scores, labels)
    assert per_class.shape == (p, k) and macro.shape == (p,)
    assert per_class.dtype == torch.float64
    np.testing.assert_allclose(per_class.numpy(), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(macro.numpy(), expected.mean(axis=1), rtol=0, atol=1e-12)


def test_roc_auc_per_member_labels_and_float32() -> None:
    rng = np.random.default_rng(1)
    p, n, k = 3, 200, 3
    scores = np.round(rng.random((p, n, k)), 2).astype(np.float32)
    labels = rng.integers(0, k, size=(p, n))
    macro, per_class = roc_auc_ovr(torch.from_numpy(scores), torch.from_numpy(labels))
    expected = _sklearn_per_class(scores.astype(np.float64), labels)
    np.testing.assert_allclose(per_class.numpy(), expected, atol=1e-12)
    np.testing.assert_allclose(macro.numpy(), expected.mean(1), atol=1e-12)


def test_roc_auc_hand_example() -> None:
    # Class 0 positives at scores {0.9, 0.5}, negatives {0.5, 0.1}: pairs
    # (0.9>0.5), (0.9>0.1), (0.5=0.5 -> 1/2), (0.5>0.1) -> 3.5 / 4.
    s0 = torch.tensor([0.9, 0.5, 0.5, 0.1])
    scores = torch.stack([s0, 1 - s0], dim=1)[None]
    labels = torch.tensor([0, 0, 1, 1])
    macro, per_class = roc_auc_ovr(scores, labels)
    assert per_class[0, 0].item() == pytest.approx(3.5 / 4)
    assert per_class[0, 1].item() == pytest.approx(3.5 / 4)
    assert macro[0].item() == pytest.approx(3.5 / 4)


def test_roc_auc_absent_class_is_nan_and_excluded() -> None:
    rng = np.random.default_rng(2)
    p, n, k = 2, 100, 4
    scores = rng.random((p, n, k))
    labels = rng.integers(0, 3, size=n)  # class 3 never occurs
    macro, per_class = roc_auc_ovr(torch.from_numpy(scores), torch.from_numpy(labels))
    assert torch.isnan(per_class[:, 3]).all()
    expected = _sklearn_per_class(scores, labels)[:, :3]
    np.testing.assert_allclose(per_class[:, :3].numpy(), expected, atol=1e-12)
    np.testing.assert_allclose(macro.numpy(), expected.mean(1), atol=1e-12)


def test_nan_member_gives_nan_not_exception() -> None:
    rng = np.random.default_rng(3)
    scores = torch.from_numpy(rng.random((3, 50, 3)))
    labels = torch.from_numpy(rng.integers(0, 3, size=50))
    scores[1, 7, 2] = float("nan")
    scores[2, 0, 0] = float("inf")
    macro, per_class = roc_auc_ovr(scores, labels)
    assert torch.isfinite(macro[0]) and torch.isfinite(per_class[0]).all()
    assert torch.isnan(macro[1:]).all() and torch.isnan(per_class[1:]).all()
    m = classification_metrics(scores, labels, 3)
    assert torch.isfinite(m["accuracy"][0])
    for key in ("accuracy", "balanced_accuracy", "class_accuracy"):
        assert torch.isnan(m[key][1:]).all(), key
    assert (m["predictions"][1:] == -1).all()
    logits = torch.from_numpy(rng.normal(size=(3, 50, 3)))
    logits[1, 3, 1] = float("nan")
    out = evaluate(logits, labels, torch.full((3, 3), 1 / 3), 3)
    for name in ("raw", "threshold"):
        assert out[name]["confusion"][1].sum() == 0 and out[name]["confusion"][0].sum() == 50
        for key, v in out[name].items():
            if key == "confusion":  # counts: a diverged member has none (checked above)
                continue
            assert torch.isnan(v[1]).all(), (name, key)
            assert torch.isfinite(v[0]).all() and torch.isfinite(v[2]).all(), (name, key)


def test_balanced_accuracy_by_hand() -> None:
    # labels: three of class 0, one of class 1, two of class 2; class 3 absent.
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    pred = torch.tensor([0, 0, 1, 1, 2, 0])
    scores = torch.nn.functional.one_hot(pred, 4).double()[None]
    m = classification_metrics(scores, labels, 4)
    assert m["predictions"].tolist() == [pred.tolist()]
    assert m["accuracy"].item() == pytest.approx(4 / 6)
    ca = m["class_accuracy"][0]
    assert ca[:3].tolist() == pytest.approx([2 / 3, 1.0, 1 / 2])
    assert math.isnan(ca[3].item())
    assert m["balanced_accuracy"].item() == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)


def test_threshold_keeps_auc_changes_accuracy() -> None:
    # A network trained on 90% class 0 / 10% class 1 leans to class 0: every
    # sample's p(0) is high, but p(1) still ranks the class-1 samples first.
    probs = torch.tensor([[[0.95, 0.05], [0.92, 0.08], [0.7, 0.3], [0.6, 0.4]]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    priors = torch.tensor([[0.9, 0.1]], dtype=torch.float64)
    thr = threshold_scores(probs, priors)
    assert torch.allclose(thr, probs / priors[:, None, :])
    auc_raw, cls_raw = roc_auc_ovr(probs, labels)
    auc_thr, cls_thr = roc_auc_ovr(thr, labels)
    assert torch.equal(auc_raw, auc_thr) and torch.equal(cls_raw, cls_thr)
    assert auc_raw.item() == 1.0
    raw = classification_metrics(probs, labels, 2)
    th = classification_metrics(thr, labels, 2)
    assert raw["accuracy"].item() == 0.5  # always predicts class 0
    # Divided by priors: 0.95/0.9 > 0.05/0.1, 0.92/0.9 > 0.08/0.1, 0.7/0.9 < 0.3/0.1, 0.6/0.9 < 0.4/0.1.
    assert th["accuracy"].item() == 1.0
    # evaluate() from logits gives the same picture.
    out = evaluate(probs.log(), labels, priors, 2)
    assert out["raw"]["accuracy"].item() == 0.5
    assert out["threshold"]["accuracy"].item() == 1.0
    assert torch.equal(out["raw"]["roc_auc"], out["threshold"]["roc_auc"])


def test_threshold_rejects_zero_prior() -> None:
    probs = torch.full((2, 3, 3), 1 / 3)
    with pytest.raises(ValueError, match="prior"):
        threshold_scores(probs, torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]))
    with pytest.raises(ValueError, match="prior"):
        evaluate(probs.log(), torch.tensor([0, 1, 2]), torch.tensor([[0.5, 0.5, 0.0]] * 2), 3)


def test_evaluate_matches_components_and_keys() -> None:
    rng = np.random.default_rng(4)
    p, n, k = 4, 120, 5
    logits = torch.from_numpy(rng.normal(size=(p, n, k))).float()
    labels = torch.from_numpy(rng.integers(0, k, size=n))
    counts = torch.from_numpy(rng.integers(1, 100, size=(p, k))).double()
    priors = counts / counts.sum(1, keepdim=True)
    out = evaluate(logits, labels, priors, k)
    assert set(out) == {"raw", "threshold"}
    keys = {"roc_auc", "class_roc_auc", "accuracy", "balanced_accuracy", "class_accuracy", "confusion"}
    assert set(out["raw"]) == keys and set(out["threshold"]) == keys
    probs = torch.softmax(logits.double(), dim=2)
    macro, per_class = roc_auc_ovr(probs, labels)
    torch.testing.assert_close(out["raw"]["roc_auc"], macro)
    torch.testing.assert_close(out["raw"]["class_roc_auc"], per_class)
    torch.testing.assert_close(out["threshold"]["roc_auc"], macro)
    raw = classification_metrics(probs, labels, k)
    thr = classification_metrics(threshold_scores(probs, priors), labels, k)
    for key in ("accuracy", "balanced_accuracy", "class_accuracy"):
        torch.testing.assert_close(out["raw"][key], raw[key])
        torch.testing.assert_close(out["threshold"][key], thr[key])
    assert set(evaluate(logits, labels, None, k)) == {"raw"}


def test_confusion_counts_match_sklearn_and_the_recalls() -> None:
    from sklearn.metrics import confusion_matrix

    rng = np.random.default_rng(7)
    p, n, k = 3, 200, 4
    logits = torch.from_numpy(rng.normal(size=(p, n, k)))
    labels = torch.from_numpy(rng.integers(0, k, size=n))
    priors = torch.tensor([[0.7, 0.1, 0.1, 0.1]] * p)
    out = evaluate(logits, labels, priors, k)
    for ev in ("raw", "threshold"):
        conf = out[ev]["confusion"]
        assert conf.dtype == torch.int64 and conf.shape == (p, k, k)
        scores = logits.log_softmax(2) - (priors.log()[:, None, :] if ev == "threshold" else 0)
        for i in range(p):
            expected = confusion_matrix(labels.numpy(), scores[i].argmax(1).numpy(), labels=range(k))
            np.testing.assert_array_equal(conf[i].numpy(), expected)
        # The diagonal over the row sums is class_accuracy (per-class recall).
        recall = conf.diagonal(dim1=1, dim2=2).double() / conf.sum(2).double()
        torch.testing.assert_close(recall, out[ev]["class_accuracy"])
    assert not torch.equal(out["raw"]["confusion"], out["threshold"]["confusion"])


def test_confusion_of_a_diverged_member_is_empty() -> None:
    logits = torch.zeros(2, 5, 3)
    logits[1, 0, 0] = float("nan")
    conf = evaluate(logits, torch.tensor([0, 1, 2, 0, 1]), None, 3)["raw"]["confusion"]
    assert conf[0].sum() == 5 and conf[1].sum() == 0


def test_chunking_gives_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    import workers.metrics as wm

    rng = np.random.default_rng(5)
    scores = torch.from_numpy(np.round(rng.random((7, 60, 3)), 1))
    labels = torch.from_numpy(rng.integers(0, 3, size=(7, 60)))
    full = roc_auc_ovr(scores, labels)
    monkeypatch.setattr(wm, "_CHUNK_ELEMENTS", 2 * 60 * 3)  # two members per chunk
    chunked = roc_auc_ovr(scores, labels)
    torch.testing.assert_close(full[0], chunked[0], equal_nan=True)
    torch.testing.assert_close(full[1], chunked[1], equal_nan=True)


def test_large_pack_is_exact() -> None:
    """A pack of 256 members over 10,000 images (speed is bench/'s business, not a test's)."""
    gen = torch.Generator().manual_seed(0)
    p, n, k = 256, 10_000, 10
    logits = torch.randn(p, n, k, generator=gen)
    labels = torch.randint(0, k, (n,), generator=gen)
    priors = torch.full((p, k), 1.0 / k)
    out = evaluate(logits, labels, priors, k)
    assert out["raw"]["roc_auc"].shape == (p,)
    assert torch.allclose(out["raw"]["roc_auc"], torch.tensor(0.5, dtype=torch.float64), atol=0.03)
