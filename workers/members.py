"""From a TrialSpec to the index sets its network trains, validates and is judged on.

Floor: workers (trial execution; imports sweep.core and sweep.store only).

All draws are seeded from the spec: the imbalanced subset from the training-set
seed (``TrialSpec.training_set_seed``, shared by every method on that set, so methods
are compared on the same images), the re-sampling and the batch order from the
network's own id.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sweep.core.catalog import DATASETS
from sweep.core.counts import class_counts, majority_count, resampled_counts
from sweep.core.spec import Method, TrialSpec, derive_seed
from workers.imbalance import draw_subset, resample


@dataclass(frozen=True)
class MemberData:
    subset: np.ndarray  # the imbalanced training subset (indices into the training set)
    validation: np.ndarray  # carved from the subset when the recipe asks for it
    train_indices: np.ndarray  # what the sampler walks: the subset after re-sampling
    counts: np.ndarray  # [K] per-class counts of the subset (validation removed)
    sampled_counts: np.ndarray  # [K] per-class counts of train_indices

    @property
    def priors(self) -> np.ndarray:
        """Class priors of the imbalanced training set before re-sampling (thresholding)."""
        return self.counts / self.counts.sum()


def member_data(spec: TrialSpec, labels: np.ndarray, num_classes: int,
                cache: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> MemberData:
    """The index sets of one network; ``cache`` shares subsets between a pack's methods."""
    cache = {} if cache is None else cache
    key = spec.training_set_key
    if key not in cache:
        cache[key] = training_set(spec, labels, num_classes)
    subset, validation = cache[key]
    counts = np.bincount(labels[subset], minlength=num_classes)
    method = spec.method.sampling
    rng = np.random.default_rng(derive_seed(spec.stream_id, "resample"))
    if method == Method.CLASSIFIER_RETRAINING:
        train = balanced_full_set(spec, labels, num_classes, validation, rng)
    elif method.resamples:
        target = resampled_counts(counts, method, spec.resample_ratio)
        train = resample(subset, labels, target, rng)
    else:
        train = subset
    return MemberData(subset, validation, train, counts,
                      np.bincount(labels[train], minlength=num_classes))


def trained_multiset(m: MemberData, cap: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(distinct images, how often each occurs) of the multiset a network trains on: what its
    sampler walks, ``train_indices`` (an under-sampled network's under-sampled images, an
    over-sampled network's subset with each image as often as the balanced stream holds it,
    the baseline's and a two-phase phase 2's imbalanced subset, re-training's balanced set).

    Evaluating each distinct image once and weighting it by its count gives the metrics of
    the multiset without duplicated tensors. A multiset of more than ``cap`` elements is a
    uniform sample of ``cap`` of its elements (each replicate as likely as any other),
    seeded by ``seed``.
    """
    stream = m.train_indices
    if len(stream) > cap:
        stream = np.random.default_rng(seed).choice(stream, cap, replace=False)
    images, counts = np.unique(stream, return_counts=True)
    return images, counts


def balanced_full_set(spec: TrialSpec, labels: np.ndarray, num_classes: int, validation: np.ndarray,
                      rng: np.random.Generator) -> np.ndarray:
    """Dablain RQ1: the *balanced full* training set classifier re-training trains W_C on.

    The same number of images of every class, as many as the cap and the images outside
    the validation split allow: the images that select the re-trained classifier are never
    among those it is trained on.
    """
    pool = labels.copy()
    pool[validation] = -1  # never drawn
    available = np.bincount(pool[pool >= 0], minlength=num_classes)
    n = min(_n_max(spec, labels, num_classes), int(available.min()))
    return draw_subset(pool, np.full(num_classes, n, dtype=np.int64), rng)


def training_set(spec: TrialSpec, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(imbalanced training subset, validation split carved from it), from the set's seed."""
    counts = class_counts(spec.imbalance, num_classes, _n_max(spec, labels, num_classes))
    counts = _available(counts, labels, num_classes)
    subset = draw_subset(labels, counts, np.random.default_rng(derive_seed(spec.training_set_seed, "subset")))
    fraction = spec.recipe.validation_fraction
    if fraction <= 0:
        return subset, np.empty(0, dtype=np.int64)
    rng = np.random.default_rng(derive_seed(spec.training_set_seed, "validation"))
    val = []
    for c in range(num_classes):
        members = subset[labels[subset] == c]
        k = min(int(round(len(members) * fraction)), len(members) - 1)  # keep >= 1 to train on
        if k > 0:
            val.append(rng.choice(members, size=k, replace=False))
    validation = np.sort(np.concatenate(val)) if val else np.empty(0, dtype=np.int64)
    return np.setdiff1d(subset, validation), validation


def _n_max(spec: TrialSpec, labels: np.ndarray, num_classes: int) -> int:
    """The majority count (sweep.core.counts.majority_count) from the classes there are."""
    available = np.bincount(labels, minlength=num_classes)
    info = DATASETS.get(spec.dataset)
    return majority_count(spec.imbalance.max_per_class, int(available.min()), int(available.max()),
                          None if info is None else info.train_per_class)


def _available(counts: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Targets clipped to the images there are: a class smaller than the cap keeps all it has
    (Buda's ImageNet: classes under 1,000 images; the paper made them minority instead)."""
    return np.minimum(counts, np.bincount(labels, minlength=num_classes))
