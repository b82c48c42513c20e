"""From a trained pack to Dablain et al.'s tables: ``latent_stats``, ``embeddings``, ``classifier_weights``.

Floor: workers (trial execution; imports sweep.core and sweep.store only).

For every member whose spec asks for it (``latent``), the worker runs the trained
network once more in full precision (no autocast, whatever the training precision)
over two splits:

* ``train``: the member's own imbalanced training subset (the images it learned from,
  before re-sampling and without the validation split; each image once);
* ``test``: the balanced test set.

It keeps the penultimate features FE and the classifier ``W_C`` / bias and turns them
into the tidy statistics of :mod:`workers.latent` (both splits plus the test TP/FP
comparison of §5.7), with every instance's top-K sets at the paper's K = 7
(:data:`CLASS_TOPK_K`).

Feature scales (the ``feature_scale`` column of all three tables). For a linear head there
is one, ``raw``: the features after ReLU and the layer's weights and bias. The normalised
(cosine) head of LDAM networks gets two, every statistic computed on each:

* ``normalised``: what the head multiplies, the unit-length features and ``s`` times the
  unit-length class columns with zero bias, so that CE = FE ⊙ W_C sums to the logits;
* ``raw``: the penultimate features before the head normalises them and its weight
  parameter as stored, no bias: Dablain et al.'s scale (they read FE from Cao et al.'s
  ResNet-32, whose NormedLinear normalises inside the last layer; their LDAM magnitudes,
  e.g. a train-vs-FP norm of 21.16 and W_C entries of 2.36, exceed what unit vectors allow).
  Σ CE is then not the logit (the head divides by the norms and multiplies by ``s``), so
  the reference class, the correctly classified instances and the TP / FP split are the
  network's own predictions, as on the normalised scale; an instance whose raw Σ CE for its
  predicted class stays below another class's sum counts as "never" in the top-K.

Members with ``embeddings`` store the FE vectors of both splits and their W_C on every
scale, so any statistic can be recomputed from the store.

Members are processed in chunks whose FE fit in :data:`FE_CHUNK_BYTES`: a chunk's
trained weights are copied into a smaller packed model (no forward pass is spent on
members that are not in the chunk), and each member sees its own training images.

Storage compaction: ``topk_coverage`` is a cumulative distribution over K = 1..H and
stays constant once every instance that will ever be covered is covered. Rows stop at
the first K where the coverage reaches its value at K = H (for LeNet-5, H = 500, that
is usually a few dozen K instead of 500). ``analysis.latent_figures.complete_coverage``
fills the curve forward again; ``docs/store.md`` states the rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch import Tensor

from sweep.core.spec import Evaluation, TrialSpec
from sweep.store.schema import FEATURE_SCALE_NORMALISED, FEATURE_SCALE_RAW
from workers.engine import pad_members, predict
from workers.latent import latent_statistics, statistics_table, tp_fp_statistics
from workers.models import PackedNet, model_for
from workers.packed_layers import PackedCosineLinear
from workers.transforms import InputTransform, stack_transforms

# The ``feature_scale`` column of the three tables (every statistic, FE vector and W_C row
# says which it is on). Stores written before the column hold one scale per network: raw for
# a linear head, normalised for a cosine head (sweep.store.schema.feature_scale).
RAW, NORMALISED = FEATURE_SCALE_RAW, FEATURE_SCALE_NORMALISED
FEATURE_SCALES = (RAW, NORMALISED)
FE_CHUNK_BYTES = 256 * 2**20  # float32 FE of one chunk of members, train and test together
TOP = 10  # ranked entries kept per class (the paper's "ten largest")
# Dablain et al. §5.3: "we focus on 7 features in subsequent experiments": every instance's
# top-K sets (class top-K members, Figs. 8-9, and the TP/FP identity overlaps) use K = 7.
# Each instance's own top-K still gives the coverage curves and topk_mean.
CLASS_TOPK_K = 7


def latent_tables(model: PackedNet, specs: Sequence[TrialSpec], subsets: Sequence[np.ndarray],
                  transforms: Sequence[InputTransform], x_train: Tensor, y_train: Tensor, x_test: Tensor,
                  y_test: Tensor, num_classes: int) -> dict[str, Any]:
    """The latent tables of the members of ``model`` whose specs ask for them.

    ``specs``, ``subsets`` (training-set indices) and ``transforms`` are per member of
    ``model``. Members that diverged (non-finite weights) get no rows. Returns the Arrow
    tables ``latent_stats``, ``embeddings`` and ``classifier_weights`` (empty when no
    member asks).
    """
    wanted = [i for i, s in enumerate(specs) if s.latent or s.embeddings]
    if not wanted:  # also for models without W_C, which no grid asks latent statistics of
        return {name: pa.table({}) for name in ("latent_stats", "embeddings", "classifier_weights")}
    stats: list[pa.Table] = []
    embeddings: list[pa.Table] = []
    weights: list[pa.Table] = []
    width = _feature_width(model)
    for chunk in _chunks(wanted, [len(subsets[i]) for i in wanted], x_test.shape[0], width):
        sub = _sub_model(model, [specs[i] for i in chunk], chunk, num_classes, tuple(x_train.shape[1:]))
        transform = stack_transforms([transforms[i] for i in chunk]).to(x_train.device)
        idx, labels = pad_members([subsets[i] for i in chunk], y_train)
        head = sub.classifier()
        raw_train = member_features(sub, transform, x_train, idx)
        raw_test = member_features(sub, transform, x_test)  # one test set for all
        ids = [specs[i].network_id for i in chunk]
        k = min(CLASS_TOPK_K, width)  # only a toy model is narrower than 7 features
        pred_train = pred_test = None  # the network's own decisions, from the scale the head multiplies
        for scale, (fe_train, w, b), (fe_test, _, _) in _scales(head, raw_train, raw_test):
            if pred_train is None:
                pred_train, pred_test = _predictions(fe_train, w, b), _predictions(fe_test, w, b)
            given = scale == RAW and _normalises(head)  # Σ CE is not the logit here: keep the network's
            rows = (latent_statistics(fe_train, w, b, labels, "train", TOP, fixed_k=k,
                                      predictions=pred_train if given else None)
                    + latent_statistics(fe_test, w, b, y_test, "test", TOP, fixed_k=k,
                                        predictions=pred_test if given else None)
                    + tp_fp_statistics(fe_train, labels, torch.where(labels >= 0, pred_train, -1),
                                       fe_test, y_test, pred_test, w, TOP, bias=b, fixed_k=k))
            table = compact_coverage(statistics_table(rows, ids))
            table.insert(2, "feature_scale", scale)
            stats.append(pa.Table.from_pandas(table, preserve_index=False))
            for j, i in enumerate(chunk):
                if not specs[i].embeddings or not _finite(fe_train[j], fe_test[j], w[j], b[j]):
                    continue
                trial = specs[i].trial_id(Evaluation.RAW)
                n = len(subsets[i])
                embeddings.append(embedding_table(specs[i].network_id, trial, "train", subsets[i],
                                                  y_train[subsets[i]], pred_train[j, :n], fe_train[j, :n], scale))
                embeddings.append(embedding_table(specs[i].network_id, trial, "test", np.arange(x_test.shape[0]),
                                                  y_test, pred_test[j], fe_test[j], scale))
                weights.append(weight_table(specs[i].network_id, trial, w[j], b[j], scale))
    return {name: pa.concat_tables(parts) if parts else pa.table({})
            for name, parts in (("latent_stats", stats), ("embeddings", embeddings),
                                ("classifier_weights", weights))}


def _normalises(head: Any) -> bool:
    """Whether the head normalises FE and W_C before multiplying them (LDAM's cosine head)."""
    return isinstance(head, PackedCosineLinear)


def _scales(head: Any, raw_train: Tensor, raw_test: Tensor) -> list[tuple[str, tuple, tuple]]:
    """``(feature_scale, (FE, W_C, b) of the training images, the same of the test set)`` per
    scale the network is measured on, the scale the head multiplies first (its predictions
    are the network's).

    A linear head: one scale, ``raw`` (the features after ReLU and the layer's weights).
    A normalised (cosine) head: ``normalised``, the unit features and ``s`` times the unit
    columns it multiplies (Σ CE = the logits), then ``raw``: the features before the head's
    normalisation and its weight parameter as stored, no bias (Dablain et al.'s scale:
    Cao et al.'s NormedLinear normalises inside the last layer, so the penultimate
    features they read are these).
    """
    if not _normalises(head):
        return [(RAW, _linear(head, raw_train), _linear(head, raw_test))]
    w = head.weight.detach().float()
    b = torch.zeros(w.shape[0], w.shape[2], device=w.device)  # the cosine head has no bias
    return [(NORMALISED, _linear(head, raw_train), _linear(head, raw_test)),
            (RAW, (raw_train.float(), w, b), (raw_test.float(), w, b))]


def member_features(model: PackedNet, transform: Any, x: Tensor, idx: Tensor | None = None) -> Tensor:
    """FE ``[P, N, F]`` (float32, no autocast) of every member on ``x``, or of member p on ``x[idx[p]]``."""
    _, fe = predict(model, x, transform, None, want_features=True, idx=idx)
    return fe


def compact_coverage(table: pd.DataFrame) -> pd.DataFrame:
    """Drop ``topk_coverage`` rows after the first K that reaches the curve's final value."""
    cov = table["statistic"] == "topk_coverage"
    if not cov.any():
        return table
    c = table[cov]
    keys = [c["network_id"], c["split"], c["class"]]
    final = c.groupby(keys)["value"].transform("last")  # rows come in K order: K = H last
    reached = c["value"] >= final
    # the first K where the final value is reached, per curve
    first = c["k"].where(reached).groupby(keys).transform("min")
    keep = c["k"] <= first
    return table.drop(index=c.index[~keep]).reset_index(drop=True)


def embedding_table(network_id: str, trial_id: str, split: str, samples: np.ndarray, labels: Tensor,
                    predictions: Tensor, fe: Tensor, feature_scale: str = "raw") -> pa.Table:
    """One row per image: which image, its label, the network's prediction and its FE vector
    on ``feature_scale`` (:data:`FEATURE_SCALES`)."""
    n, width = fe.shape
    flat = pa.array(fe.detach().cpu().numpy().astype(np.float32, copy=False).reshape(-1))
    return pa.table({
        "network_id": pa.array([network_id] * n, pa.string()),
        "trial_id": pa.array([trial_id] * n, pa.string()),
        "split": pa.array([split] * n, pa.string()),
        "feature_scale": pa.array([feature_scale] * n, pa.string()),
        "sample": pa.array(np.asarray(samples, dtype=np.int64)),
        "label": pa.array(labels.cpu().numpy().astype(np.int64)),
        "prediction": pa.array(predictions.cpu().numpy().astype(np.int64)),
        "fe": pa.FixedSizeListArray.from_arrays(flat, width),
    })


def weight_table(network_id: str, trial_id: str, w: Tensor, b: Tensor, feature_scale: str = "raw") -> pa.Table:
    """One row per class: the class's column of ``W_C`` (FE -> logit) and its bias, on
    ``feature_scale`` (:data:`FEATURE_SCALES`)."""
    width, classes = w.shape
    cols = w.detach().cpu().numpy().astype(np.float32).T.reshape(-1)  # class-major
    return pa.table({
        "network_id": pa.array([network_id] * classes, pa.string()),
        "trial_id": pa.array([trial_id] * classes, pa.string()),
        "feature_scale": pa.array([feature_scale] * classes, pa.string()),
        "class": pa.array(np.arange(classes, dtype=np.int64)),
        "weight": pa.FixedSizeListArray.from_arrays(pa.array(cols), width),
        "bias": pa.array(b.detach().cpu().numpy().astype(np.float32)),
    })


def _feature_width(model: PackedNet) -> int:
    head = model.classifier()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no final linear layer W_C: no latent statistics")
    return head.f_in


def _chunks(members: list[int], sizes: list[int], test_size: int, width: int) -> list[list[int]]:
    """Consecutive members whose train + test FE (float32) fit in FE_CHUNK_BYTES together."""
    out: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i, n in zip(members, sizes):
        longest_with = max(longest, n)
        if current and (len(current) + 1) * (longest_with + test_size) * width * 4 > FE_CHUNK_BYTES:
            out.append(current)
            current, longest_with = [], n
        current.append(i)
        longest = longest_with
    if current:
        out.append(current)
    return out


def _linear(head: Any, fe: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(FE, W_C, b) in float32 as the head multiplies them: logits = FE @ W_C + b."""
    with torch.no_grad():
        x, w, b = head.linear_form(fe)
    return x.float(), w.detach().float(), b.detach().float()


def _sub_model(model: PackedNet, specs: Sequence[TrialSpec], members: list[int], num_classes: int,
               in_shape: tuple[int, int, int]) -> PackedNet:
    """A packed model of just ``members`` (their ``specs``), with their trained weights, on the same device."""
    if members == list(range(model.members)):
        return model
    device = next(model.parameters()).device
    sub = model_for(specs, num_classes, in_shape).to(device)
    for j, i in enumerate(members):
        sub.load_member_state(j, model.member_state(i))
    return sub


def _predictions(fe: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """Arg-max of the logits recomputed in float64, as :mod:`workers.latent` does."""
    return (torch.baddbmm(b.double()[:, None, :], fe.double(), w.double())).argmax(dim=2)


def _finite(*tensors: Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)
