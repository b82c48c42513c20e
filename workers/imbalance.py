"""Imbalanced training subsets and their re-sampling, as index arrays.

An imbalanced training set is never a copy of the data: it is an array of
indices into the full training tensor. Everything here is a pure function of
its arguments and a ``numpy.random.Generator``, so the same spec draws the same
subset on any machine. How many images of each class: :mod:`sweep.core.counts`.

Floor: workers (imports sweep.core and sweep.store only).
"""

from __future__ import annotations

import numpy as np


def draw_subset(
    labels: np.ndarray, counts: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Indices of a random subset with ``counts[c]`` examples of each class c, sorted."""
    chosen = []
    for c, n in enumerate(counts):
        pool = np.flatnonzero(labels == c)
        if n > len(pool):
            raise ValueError(f"class {c} has {len(pool)} training images, {n} requested")
        chosen.append(rng.choice(pool, size=int(n), replace=False))
    return np.sort(np.concatenate(chosen))


def resample(
    subset: np.ndarray, labels: np.ndarray, target: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Re-sample an index set to ``target[c]`` examples per class.

    Over-sampling keeps every original example and adds random replicates
    (random minority over-sampling); under-sampling keeps a random subset
    (random majority under-sampling).
    """
    sub_labels = labels[subset]
    parts = []
    for c, n in enumerate(target):
        members = subset[sub_labels == c]
        n = int(n)
        if n <= len(members):
            parts.append(rng.choice(members, size=n, replace=False) if n < len(members) else members)
        else:
            extra = rng.choice(members, size=n - len(members), replace=True)
            parts.append(np.concatenate([members, extra]))
    return np.sort(np.concatenate(parts))
