"""Evaluation metrics for a pack of P networks, batched over members.

Floor: workers (trial execution; imports sweep.core and sweep.store only).

Every function takes scores with a leading member dimension P, ``[P, N, K]``,
and returns one value per member (or per member and class). Labels are either
shared by all members, ``[N]``, or per member, ``[P, N]``.

Metrics follow the two papers the sweep reproduces:

* Buda et al. (2018), sec. 3.4: multi-class ROC AUC = mean over classes of the
  one-vs-rest ROC AUC; thresholding = network outputs divided by the class
  priors of the imbalanced training set (estimated before re-sampling).
* Dablain et al.: balanced accuracy (BAC) = mean per-class recall.

A member whose scores are not all finite (a diverged network) gets NaN for
every metric rather than raising, so one bad member does not lose the pack.
Work is split into chunks of members so that memory stays bounded at e.g.
P = 256, N = 10,000, K = 10 on any device.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["roc_auc_ovr", "classification_metrics", "confusion_counts", "threshold_scores", "evaluate"]

# Elements of a [members, N, K] chunk processed at once. The AUC of one chunk
# holds about 8 such arrays of 8 bytes (sort values/indices, ranks, labels), so
# 2^22 elements is ~256 MiB of temporaries whatever P is.
_CHUNK_ELEMENTS = 1 << 22


def _member_chunks(p: int, n: int, k: int) -> list[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(1, n * k))
    return [slice(i, min(p, i + step)) for i in range(0, p, step)]


def _check(scores: Tensor, labels: Tensor, num_classes: int | None = None) -> Tensor:
    """Validate shapes and return labels as int64 on the scores' device."""
    if scores.ndim != 3:
        raise ValueError(f"scores must be [P, N, K], got shape {tuple(scores.shape)}")
    p, n, k = scores.shape
    if num_classes is not None and k != num_classes:
        raise ValueError(f"scores have {k} classes, num_classes is {num_classes}")
    labels = torch.as_tensor(labels, device=scores.device).long()
    if labels.shape not in ((n,), (p, n)):
        raise ValueError(f"labels must be [{n}] or [{p}, {n}], got {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"labels must be in [0, {k})")
    return labels


def _labels_for(labels: Tensor, chunk: slice) -> Tensor:
    return labels if labels.ndim == 1 else labels[chunk]


def _finite_members(scores: Tensor) -> Tensor:
    """[P] bool: members whose scores are all finite."""
    return torch.isfinite(scores).flatten(1).all(dim=1)


@torch.no_grad()
def _auc_chunk(scores: Tensor, labels: Tensor) -> Tensor:
    """One-vs-rest AUC [Pc, K] of a chunk of members (Mann-Whitney U).

    AUC_k = (R_k - n_k (n_k + 1) / 2) / (n_k (N - n_k)), where R_k is the sum of
    the ranks of class k's samples among all N scores for class k, with tied
    scores given their average rank. This is exactly the area under the
    empirical ROC curve with ties counted as 1/2, i.e. what
    ``sklearn.metrics.roc_auc_score`` computes by the trapezoidal rule.
    """
    pc, n, k = scores.shape
    cols = scores.transpose(1, 2)  # [Pc, K, N]: one row per (member, class)
    vals, order = torch.sort(cols, dim=2)
    idx = torch.arange(n, device=scores.device)
    # Tie groups in sorted order: the average 1-based rank of a group spanning
    # positions first..last is (first + last) / 2 + 1.
    differs = vals[..., 1:] != vals[..., :-1]
    del vals
    edge = torch.ones_like(differs[..., :1])
    starts = torch.cat([edge, differs], dim=2)
    ends = torch.cat([differs, edge], dim=2)
    del differs
    first = torch.where(starts, idx, 0).cummax(dim=2).values
    last = torch.where(ends, idx, n - 1).flip(2).cummin(dim=2).values.flip(2)
    del starts, ends
    ranks = (first + last).double() * 0.5 + 1.0
    del first, last
    if labels.ndim == 1:
        sorted_labels = labels[order]
    else:
        sorted_labels = labels[:, None, :].expand(pc, k, n).gather(2, order)
    del order
    is_pos = sorted_labels == torch.arange(k, device=scores.device)[None, :, None]
    rank_sum = (ranks * is_pos).sum(dim=2)  # float64 [Pc, K]
    n_pos = is_pos.sum(dim=2).double()
    n_neg = n - n_pos
    auc = (rank_sum - n_pos * (n_pos + 1) * 0.5) / (n_pos * n_neg)
    # A class absent from the labels (or the only class present) has no ROC curve.
    return torch.where((n_pos > 0) & (n_neg > 0), auc, float("nan"))


@torch.no_grad()
def roc_auc_ovr(scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Multi-class ROC AUC (Buda et al.): ``(macro [P], per_class [P, K])``, float64.

    ``per_class[p, k]`` is the one-vs-rest AUC of column k of member p's scores,
    equal to ``sklearn.metrics.roc_auc_score(labels == k, scores[p, :, k])``
    including ties. It is NaN when class k is absent from the labels (or is the
    only class present); ``macro`` is the mean over the other classes. A member
    with any non-finite score gets NaN throughout.
    """
    labels = _check(scores, labels)
    p, n, k = scores.shape
    per_class = torch.empty(p, k, dtype=torch.float64, device=scores.device)
    for chunk in _member_chunks(p, n, k):
        per_class[chunk] = _auc_chunk(scores[chunk], _labels_for(labels, chunk))
    per_class[~_finite_members(scores)] = float("nan")
    return per_class.nanmean(dim=1), per_class


@torch.no_grad()
def classification_metrics(scores: Tensor, labels: Tensor, num_classes: int) -> dict[str, Tensor]:
    """Accuracy-type metrics of the arg-max decision, batched over members.

    Returns float64 ``accuracy`` [P], ``balanced_accuracy`` [P] (Dablain et al.'s
    BAC: the mean of per-class recall over the classes present in the labels),
    ``class_accuracy`` [P, K] (recall of each class; NaN for a class absent from
    the labels) and int64 ``predictions`` [P, N]. A member with non-finite
    scores gets NaN metrics and predictions of -1.
    """
    labels = _check(scores, labels, num_classes)
    p, n, k = scores.shape
    finite = _finite_members(scores)
    predictions = scores.argmax(dim=2)
    predictions[~finite] = -1
    lab = labels.expand(p, n)
    correct = (predictions == lab).double()
    counts = torch.zeros(p, k, dtype=torch.float64, device=scores.device)
    counts.scatter_add_(1, lab, torch.ones_like(correct))
    hits = torch.zeros_like(counts).scatter_add_(1, lab, correct)
    class_accuracy = torch.where(counts > 0, hits / counts.clamp_min(1), float("nan"))
    accuracy = correct.mean(dim=1) if n else torch.full((p,), float("nan"), device=scores.device,
                                                          dtype=torch.float64)
    accuracy = torch.where(finite, accuracy, float("nan"))
    class_accuracy[~finite] = float("nan")
    return {
        "accuracy": accuracy,
        "balanced_accuracy": class_accuracy.nanmean(dim=1),
        "class_accuracy": class_accuracy,
        "predictions": predictions,
    }


@torch.no_grad()
def confusion_counts(predictions: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Confusion counts [P, K, K] (int64): ``[p, t, q]`` = images of true class t that member p
    predicted as q, equal to ``sklearn.metrics.confusion_matrix(labels, predictions[p])``
    with ``labels=range(K)``.

    ``predictions`` is ``[P, N]`` (from :func:`classification_metrics`); a member with a
    prediction of -1 (non-finite scores) gets all zeros: it has no decisions to count.
    """
    p, n = predictions.shape
    k = num_classes
    lab = labels.to(predictions.device).long().expand(p, n)
    valid = (predictions >= 0).all(dim=1, keepdim=True).expand(p, n)
    # One flat bin per (member, true, predicted): a single bincount for the whole chunk.
    flat = (torch.arange(p, device=predictions.device)[:, None] * k + lab) * k + predictions.clamp_min(0)
    counts = torch.bincount(flat[valid], minlength=p * k * k)
    return counts.view(p, k, k)


def member_balanced_accuracy(scores: Tensor, labels: Tensor, weights: Tensor | None = None) -> Tensor:
    """Balanced accuracy [P] (float64) when members are judged on different images.

    ``labels`` is ``[P, N]`` with -1 for padding (a member's split shorter than the
    longest): padded positions count nowhere. ``weights`` ``[P, N]`` (>= 0) count image n
    of member p that many times (a multiset: how often an over-sampled stream holds the
    image); None: once each. A member with non-finite scores gets NaN.
    """
    if scores.ndim != 3 or labels.shape != scores.shape[:2]:
        raise ValueError(f"scores [P, N, K] and labels [P, N] expected, got {tuple(scores.shape)} and "
                         f"{tuple(labels.shape)}")
    if weights is not None and weights.shape != labels.shape:
        raise ValueError(f"weights must be {tuple(labels.shape)}, got {tuple(weights.shape)}")
    p, _, k = scores.shape
    valid = labels >= 0
    lab = labels.clamp_min(0)
    w = valid.double() if weights is None else torch.where(valid, weights.double(), 0.0)
    counts = torch.zeros(p, k, dtype=torch.float64, device=scores.device).scatter_add_(1, lab, w)
    hits = torch.zeros_like(counts).scatter_add_(1, lab, w * (scores.argmax(dim=2) == labels).double())
    recall = torch.where(counts > 0, hits / counts.clamp_min(1), float("nan"))
    return torch.where(_finite_members(scores), recall.nanmean(dim=1), float("nan"))


def _check_priors(priors: Tensor, p: int, k: int, device: torch.device) -> Tensor:
    priors = torch.as_tensor(priors, device=device)
    if priors.shape not in ((k,), (p, k)):
        raise ValueError(f"priors must be [{k}] or [{p}, {k}], got {tuple(priors.shape)}")
    if not torch.isfinite(priors).all() or (priors <= 0).any():
        raise ValueError(
            "priors must be finite and > 0: a class with no training examples has prior 0 "
            "and thresholding (division by the prior) is undefined for it"
        )
    return priors.expand(p, k)


def threshold_scores(probs: Tensor, priors: Tensor) -> Tensor:
    """Buda et al.'s thresholding: ``probs / priors`` per member and class.

    ``priors`` [P, K] (or [K] shared) are each member's class frequencies in its
    imbalanced training set *before* re-sampling. Scaling priors by a constant
    per member (e.g. passing counts) does not change the arg-max or any AUC.
    Raises ValueError for a zero (or negative / non-finite) prior.
    """
    if probs.ndim != 3:
        raise ValueError(f"probs must be [P, N, K], got shape {tuple(probs.shape)}")
    p, _n, k = probs.shape
    priors = _check_priors(priors, p, k, probs.device)
    return probs / priors.to(probs.dtype)[:, None, :]


def _summary(scores: Tensor, labels: Tensor, num_classes: int, auc: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
    m = classification_metrics(scores, labels, num_classes)
    return {
        "roc_auc": auc[0],
        "class_roc_auc": auc[1],
        "accuracy": m["accuracy"],
        "balanced_accuracy": m["balanced_accuracy"],
        "class_accuracy": m["class_accuracy"],
        "confusion": confusion_counts(m["predictions"], labels, num_classes),
    }


@torch.no_grad()
def evaluate(
    logits: Tensor, labels: Tensor, priors: Tensor | None, num_classes: int
) -> dict[str, dict[str, Tensor]]:
    """The metrics the worker stores per evaluation of a pack.

    Returns ``{"raw": ..., "threshold": ...}`` (``"threshold"`` only when
    ``priors`` is given), each ``{"roc_auc" [P], "class_roc_auc" [P, K],
    "accuracy" [P], "balanced_accuracy" [P], "class_accuracy" [P, K]}``, float64, and
    ``"confusion"`` [P, K, K], int64 (:func:`confusion_counts`; the ``confusion`` table).

    "raw" scores are softmax probabilities, "threshold" the probabilities
    divided by the priors (:func:`threshold_scores`). Both are computed in log
    space in float64 (log p, and log p - log prior): the logarithm is monotone,
    so arg-max decisions and ranks are those of p and p / prior, without the
    spurious ties that float32 softmax saturating at 0 or 1 would add. Dividing
    a class column by a positive constant does not change its ranking, so the
    threshold AUC equals the raw AUC (Buda et al. sec. 4.1) and is computed
    once and shared.
    """
    labels = _check(logits, labels, num_classes)
    p, n, k = logits.shape
    log_priors = None
    if priors is not None:
        log_priors = _check_priors(priors, p, k, logits.device).double().log()

    parts: dict[str, list[dict[str, Tensor]]] = {"raw": [], "threshold": []}
    for chunk in _member_chunks(p, n, k):
        logp = torch.log_softmax(logits[chunk].double(), dim=2)
        # A diverged member (inf/NaN logits) gets NaN log-probs, hence NaN metrics.
        logp[~_finite_members(logits[chunk])] = float("nan")
        lab = _labels_for(labels, chunk)
        auc = roc_auc_ovr(logp, lab)
        parts["raw"].append(_summary(logp, lab, k, auc))
        if log_priors is not None:
            parts["threshold"].append(_summary(logp - log_priors[chunk, None, :], lab, k, auc))
    return {
        name: {key: torch.cat([d[key] for d in ds]) for key in ds[0]}
        for name, ds in parts.items()
        if ds
    }
