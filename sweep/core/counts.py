"""Class-count arithmetic: how many images of each class a training set has.

Floor: sweep.core (pure: numpy only; no torch, no store). Grid expansion, size
estimates and the workers all ask these numbers; the workers draw the images.
"""

from __future__ import annotations

import math

import numpy as np

from sweep.core.catalog import DATASETS
from sweep.core.spec import Imbalance, ImbalanceKind, Method


def majority_count(cap: int | None, smallest: int, largest: int, catalog_smallest: int | None = None) -> int:
    """The majority count n_max of a training set: the rule, written once.

    ``cap`` is the grid's max_per_class (None: no cap); ``smallest`` and ``largest`` are the
    sizes of the smallest and largest class there are. Every class is first capped, so
    n_max is the cap, at most the smallest class (Buda MNIST: 5,000 of at least 5,421)...
    unless the cap is above the dataset's usual smallest class (``catalog_smallest``;
    Buda's ImageNet: 1,000 of 732..1,300 images), where n_max is the cap, at most the
    largest class, and a smaller class keeps all it has. A dataset the catalog does not know
    (``catalog_smallest`` None) has no such exception.
    """
    if cap is not None and catalog_smallest is not None and cap > catalog_smallest:
        return min(cap, largest)
    return min(cap or smallest, smallest)


def catalog_majority_count(dataset: str, cap: int | None) -> int:
    """:func:`majority_count` from the catalog's class sizes (no data loaded): what grid
    expansion and size estimates use."""
    info = DATASETS[dataset]
    return majority_count(cap, info.train_per_class, info.max_cap, info.train_per_class)


def class_counts(imbalance: Imbalance, num_classes: int, n_max: int) -> np.ndarray:
    """Per-class training counts (indexed by label) for an imbalance and a majority count.

    ``n_max`` is the count of the largest class (Buda: 5,000 on MNIST after capping).
    Counts are rounded to the nearest integer and never below 1.
    """
    counts = np.full(num_classes, n_max, dtype=np.int64)
    kind, rho = imbalance.kind, float(imbalance.rho)
    if rho < 1:
        raise ValueError(f"imbalance ratio rho must be >= 1, got {rho}")
    if kind == ImbalanceKind.NONE:
        return counts
    if kind == ImbalanceKind.STEP:
        minority = max(1, round(n_max / rho))
        counts[list(imbalance.classes)] = minority
        return counts
    order = list(imbalance.classes)  # labels from most to fewest examples
    if sorted(order) != list(range(num_classes)):
        raise ValueError(f"{kind} imbalance needs an order of all {num_classes} labels, got {order}")
    positions = np.arange(num_classes, dtype=np.float64) / (num_classes - 1)
    if kind == ImbalanceKind.LINEAR:
        # Constant difference between consecutive classes, from n_max down to n_max/rho.
        n_min = n_max / rho
        ranked = n_max - positions * (n_max - n_min)
    elif kind == ImbalanceKind.EXPONENTIAL:
        ranked = n_max * rho ** (-positions)
    else:  # pragma: no cover - enum is closed
        raise ValueError(f"unknown imbalance kind {kind!r}")
    if imbalance.rounding == "truncate":
        # Cao et al.'s arithmetic to the letter: int(img_max * imb_factor**(c / (C - 1.0)))
        ranked = np.array([int(n_max * (1.0 / rho) ** (c / (num_classes - 1.0))) for c in range(num_classes)],
                          dtype=np.float64) if kind == ImbalanceKind.EXPONENTIAL else np.floor(ranked)
    elif imbalance.rounding != "nearest":
        raise ValueError(f"unknown rounding {imbalance.rounding!r} (allowed: nearest, truncate)")
    counts[order] = np.maximum(1, np.round(ranked)).astype(np.int64)
    return counts


def resampled_counts(counts: np.ndarray, method: Method, ratio: float = 1.0) -> np.ndarray:
    """Per-class counts after re-sampling to leave an imbalance of at most ``ratio``.

    Over-sampling raises every class to at least max/ratio; under-sampling lowers every
    class to at most min*ratio (Buda Fig. 7's partial levels; ratio 1 = full balance).
    """
    if ratio < 1:
        raise ValueError(f"resample ratio must be >= 1, got {ratio}")
    if method == Method.OVERSAMPLING:
        floor = math.ceil(counts.max() / ratio)
        return np.maximum(counts, floor)
    if method == Method.UNDERSAMPLING:
        ceiling = int(counts[counts > 0].min() * ratio)
        return np.minimum(counts, ceiling)
    return counts.copy()
