"""The store's contract: its tables, the statuses of a trial, and the one way a spec and
its measurements become a row.

Floor: sweep.store (imports sweep.core only; no torch). Writers (workers.run_pack,
ResultStore.record_failure) and readers (analysis, status) name tables, statuses and
spec columns from here, so a column means the same everywhere. docs/store.md describes
every column.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from sweep.core.errors import UserError
from sweep.core.spec import Evaluation, ImbalanceKind, TrialSpec

# Table names (also the SQL view names of ``sweep query``).
TRIALS = "trials"  # one row per evaluation of a network
CLASS_METRICS = "class_metrics"  # one row per trial and class
CONFUSION = "confusion"  # one row per trial, true class and predicted class with a count > 0
CURVES = "curves"  # one row per network, evaluation point and split
# The curves' ``curve_set`` column: which images a ``split`` row was measured on.
CURVE_SET_TEST = "test"  # the balanced test set
# The multiset the network trains on (its sampler's stream: the under-sampled images, the
# over-sampled subset with each image counted as often as the stream holds it, the baseline's
# subset), at most workers.run_pack.TRAIN_CURVE_IMAGES elements of it.
CURVE_SET_TRAINED = "trained"
# Stores written before the column have none; their "train" rows were measured on the
# imbalanced subset before re-sampling, each image once (CURVE_SET_LEGACY_TRAIN).
CURVE_SET_LEGACY_TRAIN = "subset"
CURVE_SETS = (CURVE_SET_TEST, CURVE_SET_TRAINED, CURVE_SET_LEGACY_TRAIN)


def curve_set(split: str, stored: str | None) -> str:
    """The set a curves row was measured on, for rows of any store (``stored``: the row's
    ``curve_set``, None or NaN in stores written before the column)."""
    if isinstance(stored, str) and stored:
        return stored
    return CURVE_SET_TEST if split == "test" else CURVE_SET_LEGACY_TRAIN
LATENT_STATS = "latent_stats"  # Dablain et al.'s statistics, tidy (workers.latent_tables)
EMBEDDINGS = "embeddings"  # raw FE vectors of the first networks of a grid
CLASSIFIER_WEIGHTS = "classifier_weights"  # W_C and bias of those networks
FAILURES = "failures"  # one row per network of a pack that finally failed
LATENT_TABLES = (LATENT_STATS, EMBEDDINGS, CLASSIFIER_WEIGHTS)
# The latent tables' ``feature_scale`` column (workers.latent_tables): FE and W_C as the
# network computes them before any normalisation (every network; Dablain et al.'s scale),
# or as a normalised (cosine, LDAM) head multiplies them (unit FE, s * unit W_C columns).
FEATURE_SCALE_RAW = "raw"
FEATURE_SCALE_NORMALISED = "normalised"


def feature_scale(stored: str | None, head: str | None) -> str:
    """The scale of a latent row of any store: its ``feature_scale``, or, in stores written
    before the column, the one scale they held (normalised for a cosine head, else raw)."""
    if isinstance(stored, str) and stored:
        return stored
    return FEATURE_SCALE_NORMALISED if head == "cosine" else FEATURE_SCALE_RAW
PARTITION = "grid"  # every table is hive-partitioned by the grid's name


class StoreError(UserError, RuntimeError):
    """A results store cannot be read or written; the message names the path."""


class Status(StrEnum):
    """What became of one evaluation of a network."""

    OK = "ok"  # trained and evaluated
    DIVERGED = "diverged"  # its loss became non-finite; the metrics are of the last finite state
    FAILED = "failed"  # never produced results (the pack failed, or its phase-1 network did)
    # Left behind at a rung of a learning-rate search with early stopping (sweep.core.lr_search):
    # its metrics are of the network at that rung (``stopped_at_iter``), not of a trained one.
    STOPPED = "stopped"


COMPLETED = (Status.OK, Status.DIVERGED, Status.STOPPED)  # what resume skips: training again gives the same


@dataclass(frozen=True)
class Measurement:
    """What a worker measured of one network, for all its evaluations."""

    status: Status
    error: str | None = None
    diverged_at_iter: int | None = None
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # evaluation -> metric -> value
    best_iter: int | None = None
    val_balanced_accuracy: float | None = None
    train_seconds: float = 0.0  # this network's share of the pack's time
    eval_seconds: float = 0.0
    latent_seconds: float = 0.0
    # A learning-rate search's rungs: the last rung this network was ranked at (0-based), the
    # iteration it stopped at (None: it went on to the end) and its rung metric there.
    rung: int | None = None
    stopped_at_iter: int | None = None
    rung_metric: float | None = None

    @classmethod
    def failed(cls, error: str) -> "Measurement":
        return cls(Status.FAILED, error=error)


def spec_columns(spec: TrialSpec, evaluation: Evaluation) -> dict[str, Any]:
    """The columns that say which trial a row is: ids and the spec's settings, flat."""
    imb = spec.imbalance
    return {
        "trial_id": spec.trial_id(evaluation), "network_id": spec.network_id, "parent_id": spec.parent_id,
        "evaluation": str(evaluation), "dataset": spec.dataset, "model": spec.model,
        "method": str(spec.method), "loss": str(spec.loss), "imbalance": str(imb.kind),
        "rho": float(imb.rho), "mu": imb.mu,
        "n_minority": len(imb.classes) if imb.kind == ImbalanceKind.STEP else None,
        "classes": list(imb.classes), "resample_ratio": float(spec.resample_ratio),
        "repeat": spec.repeat, "seed": spec.seed, "lr_run": spec.lr_run, "base_lr": spec.recipe.base_lr,
        "iters": spec.recipe.iters, "batch_size": spec.recipe.batch_size, "selection": str(spec.selection),
        "head": str(spec.head), "normalization": str(spec.normalization),
        "augmentation": str(spec.recipe.augmentation),
    }


def trial_row(spec: TrialSpec, evaluation: Evaluation, pack_id: str, measurement: Measurement,
              created_at: dt.datetime, *, class_counts: list[int] | None = None,
              sampled_counts: list[int] | None = None, resumed_from_iter: int = 0,
              provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """One ``trials`` row: the spec's columns, the measurement and provenance."""
    met = measurement.metrics.get(str(evaluation))
    nan = float("nan")
    return {
        **spec_columns(spec, evaluation), "pack_id": pack_id,
        "class_counts": class_counts, "sampled_counts": sampled_counts,
        "status": str(measurement.status), "error": measurement.error,
        "diverged_at_iter": measurement.diverged_at_iter,
        "roc_auc": float(met["roc_auc"]) if met else nan,
        "accuracy": float(met["accuracy"]) if met else nan,
        "balanced_accuracy": float(met["balanced_accuracy"]) if met else nan,
        "val_balanced_accuracy": measurement.val_balanced_accuracy, "best_iter": measurement.best_iter,
        "rung": measurement.rung, "stopped_at_iter": measurement.stopped_at_iter,
        "rung_metric": measurement.rung_metric,
        "resumed_from_iter": resumed_from_iter, "train_seconds": measurement.train_seconds,
        "eval_seconds": measurement.eval_seconds, "latent_seconds": measurement.latent_seconds,
        **(provenance or {}), "created_at": created_at, "spec_json": spec.to_json(),
    }


def class_rows(spec: TrialSpec, evaluation: Evaluation, measurement: Measurement, train_counts: list[int],
               sampled_counts: list[int], test_counts: list[int]) -> list[dict[str, Any]]:
    """The ``class_metrics`` rows of one trial, one per class."""
    met = measurement.metrics.get(str(evaluation))
    nan = float("nan")
    tid = spec.trial_id(evaluation)
    return [{
        "trial_id": tid, "network_id": spec.network_id, "evaluation": str(evaluation), "class": c,
        "train_count": int(train_counts[c]), "sampled_count": int(sampled_counts[c]),
        "test_count": int(test_counts[c]),
        "accuracy": float(met["class_accuracy"][c]) if met else nan,
        "roc_auc": float(met["class_roc_auc"][c]) if met else nan,
    } for c in range(len(train_counts))]


def confusion_rows(spec: TrialSpec, evaluation: Evaluation, measurement: Measurement) -> list[dict[str, Any]]:
    """The ``confusion`` rows of one trial: one per (true, predicted) class pair with a count.

    Zero cells are left out, so a 1000-class test set stores at most one row per image
    rather than a million per trial. A trial without a measured confusion matrix (a failed
    pack, or a member whose scores were not finite: all zeros) has no rows.
    """
    met = measurement.metrics.get(str(evaluation))
    if not met or met.get("confusion") is None:
        return []
    counts = np.asarray(met["confusion"])
    true, pred = np.nonzero(counts)
    tid = spec.trial_id(evaluation)
    return [{"trial_id": tid, "network_id": spec.network_id, "evaluation": str(evaluation),
             "true_class": int(t), "predicted_class": int(q), "count": int(counts[t, q])}
            for t, q in zip(true.tolist(), pred.tolist())]
