"""Rough sizes of what a grid will write to the store (`sweep expand` prints them)."""

from __future__ import annotations

from collections.abc import Sequence

from sweep.catalog import DATASETS, FEATURE_WIDTH
from sweep.spec import TrialSpec

# Compressed Parquet bytes per row, measured on demo stores (spec_json dominates trials).
TRIAL_ROW_BYTES = 700
CLASS_ROW_BYTES = 40
CURVE_ROW_BYTES = 30
LATENT_ROWS_PER_CLASS = 60  # top-K coverage, magnitudes, norms ... per class and split
LATENT_ROW_BYTES = 30
FLOAT_BYTES = 4


def estimate_store_bytes(specs: Sequence[TrialSpec]) -> int:
    total = 0
    for s in specs:
        info = DATASETS[s.dataset]
        k = info.num_classes
        evals = len(s.evaluations)
        total += evals * (TRIAL_ROW_BYTES + k * CLASS_ROW_BYTES)
        if s.recipe.eval_every:
            total += 2 * (s.recipe.iters // s.recipe.eval_every) * CURVE_ROW_BYTES
        if s.latent:
            total += 2 * k * LATENT_ROWS_PER_CLASS * LATENT_ROW_BYTES
        if s.embeddings:
            width = FEATURE_WIDTH[s.model]
            images = k * (min(s.imbalance.max_per_class or info.train_per_class, info.train_per_class)
                          + info.test_per_class)
            total += images * (width * FLOAT_BYTES + 16) + width * k * FLOAT_BYTES
    return total
