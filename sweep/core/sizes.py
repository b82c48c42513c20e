"""Rough sizes of what a grid will write to the store (`sweep expand` prints them).

Floor: sweep.core (what a study is; pure: imports sweep.core only, no torch, no store).

Bytes per row are compressed Parquet (zstd) as measured on the demo store
(`sweep run grids/demo.yaml`, 2026-11-27): 30 LeNet-5s, 60 trials rows (45 KB),
76,358 latent_stats rows (615 KB), 51,000 embedding rows of 500 floats (57 MB).
"""

from __future__ import annotations

from collections.abc import Sequence

from sweep.core.catalog import DATASETS, FEATURE_WIDTH
from sweep.core.counts import catalog_majority_count, class_counts
from sweep.core.spec import TrialSpec

TRIAL_ROW_BYTES = 750  # spec_json dominates
CLASS_ROW_BYTES = 40
CURVE_ROW_BYTES = 30
LATENT_ROW_BYTES = 8
# topk_coverage rows per curve: stored up to the K where the curve stops rising
# (workers.latent_tables); 42 on average in the demo store (LeNet-5, H = 500).
COVERAGE_ROWS_PER_CURVE = 42
LATENT_TOP = 10  # ranked entries per class (workers.latent_tables.TOP)
FLOAT_BYTES = 4
FE_COMPRESSION = 0.55  # zstd on post-ReLU features: many exact zeros (demo store)


def latent_rows(num_classes: int, width: int) -> int:
    """latent_stats rows of one network, both splits (bounds from workers.latent's docstring)."""
    c, t = num_classes, LATENT_TOP
    per_split = (c + 1) * (min(width, COVERAGE_ROWS_PER_CURVE) + 4) + 6 * c * t + 2 * c + 1
    return 2 * per_split + c * t + 15 * (c + 1) + 3 * c * t  # + W_C ranks + the test TP/FP rows


def embedding_images(spec: TrialSpec) -> int:
    """Images whose FE a network with ``embeddings`` stores: its training subset and the test set."""

    info = DATASETS[spec.dataset]
    n_max = catalog_majority_count(spec.dataset, spec.imbalance.max_per_class)
    return int(class_counts(spec.imbalance, info.num_classes, n_max).sum()) + info.num_classes * info.test_per_class


def estimate_store_bytes(specs: Sequence[TrialSpec]) -> int:
    total = 0.0
    for s in specs:
        k = DATASETS[s.dataset].num_classes
        width = FEATURE_WIDTH[s.model]
        total += len(s.evaluations) * (TRIAL_ROW_BYTES + k * CLASS_ROW_BYTES)
        if s.recipe.eval_every:
            total += 2 * (s.recipe.iters // s.recipe.eval_every) * CURVE_ROW_BYTES
        if s.latent:
            total += latent_rows(k, width) * LATENT_ROW_BYTES
        if s.embeddings:
            total += embedding_images(s) * (width * FLOAT_BYTES * FE_COMPRESSION + 24)
            total += k * (width + 1) * FLOAT_BYTES  # W_C and bias
    return round(total)
