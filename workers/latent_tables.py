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
(:data:`CLASS_TOPK_K`). FE and W_C are what the head multiplies: for a linear head the
features after ReLU and its weights; for the normalised (cosine) head of LDAM networks
the unit-length features and ``s`` times the unit-length class columns, with zero bias,
so that CE = FE ⊙ W_C still sums to the network's logits. Embeddings and
``classifier_weights`` store the same FE and W_C. Members with ``embeddings`` also store the raw FE vectors of both
splits and their ``W_C``, so any statistic can be recomputed from the store.

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
from workers.engine import pad_members, predict
from workers.latent import latent_statistics, statistics_table, tp_fp_statistics
from workers.models import PackedNet, model_for
from workers.transforms import InputTransform, stack_transforms

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
        # FE and W_C as the head multiplies them (a normalised head: unit FE, s * unit columns).
        head = sub.classifier()
        fe_train, w, b = _linear(head, member_features(sub, transform, x_train, idx))
        fe_test, _, _ = _linear(head, member_features(sub, transform, x_test))  # one test set for all
        pred_train, pred_test = _predictions(fe_train, w, b), _predictions(fe_test, w, b)
        ids = [specs[i].network_id for i in chunk]
        k = min(CLASS_TOPK_K, width)  # only a toy model is narrower than 7 features
        rows = (latent_statistics(fe_train, w, b, labels, "train", TOP, fixed_k=k)
                + latent_statistics(fe_test, w, b, y_test, "test", TOP, fixed_k=k)
                + tp_fp_statistics(fe_train, labels, torch.where(labels >= 0, pred_train, -1),
                                   fe_test, y_test, pred_test, w, TOP, bias=b, fixed_k=k))
        stats.append(pa.Table.from_pandas(compact_coverage(statistics_table(rows, ids)), preserve_index=False))
        for j, i in enumerate(chunk):
            if not specs[i].embeddings or not _finite(fe_train[j], fe_test[j], w[j], b[j]):
                continue
            trial = specs[i].trial_id(Evaluation.RAW)
            n = len(subsets[i])
            embeddings.append(embedding_table(specs[i].network_id, trial, "train", subsets[i],
                                              y_train[subsets[i]], pred_train[j, :n], fe_train[j, :n]))
            embeddings.append(embedding_table(specs[i].network_id, trial, "test", np.arange(x_test.shape[0]),
                                              y_test, pred_test[j], fe_test[j]))
            weights.append(weight_table(specs[i].network_id, trial, w[j], b[j]))
    return {name: pa.concat_tables(parts) if parts else pa.table({})
            for name, parts in (("latent_stats", stats), ("embeddings", embeddings),
                                ("classifier_weights", weights))}


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
                    predictions: Tensor, fe: Tensor) -> pa.Table:
    """One row per image: which image, its label, the network's prediction and its FE vector."""
    n, width = fe.shape
    flat = pa.array(fe.detach().cpu().numpy().astype(np.float32, copy=False).reshape(-1))
    return pa.table({
        "network_id": pa.array([network_id] * n, pa.string()),
        "trial_id": pa.array([trial_id] * n, pa.string()),
        "split": pa.array([split] * n, pa.string()),
        "sample": pa.array(np.asarray(samples, dtype=np.int64)),
        "label": pa.array(labels.cpu().numpy().astype(np.int64)),
        "prediction": pa.array(predictions.cpu().numpy().astype(np.int64)),
        "fe": pa.FixedSizeListArray.from_arrays(flat, width),
    })


def weight_table(network_id: str, trial_id: str, w: Tensor, b: Tensor) -> pa.Table:
    """One row per class: the class's column of ``W_C`` (FE -> logit) and its bias."""
    width, classes = w.shape
    cols = w.detach().cpu().numpy().astype(np.float32).T.reshape(-1)  # class-major
    return pa.table({
        "network_id": pa.array([network_id] * classes, pa.string()),
        "trial_id": pa.array([trial_id] * classes, pa.string()),
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
