"""Dablain et al. latent statistics of trained networks, batched over a pack's members.

Floor: workers (trial execution; imports sweep.core and sweep.store only).
It is longer than 400 lines because the statistics share one chunked, memory-bounded
pass over the members and its ranking helpers; apart they would have to be kept in step
by hand.

Dablain, Jacobson, Bellinger, Roberts, Chawla, "Understanding CNN fragility when
learning with imbalanced data" (referred to below as "the paper", sections as §).

Notation (§3.1)
---------------
For one member, one instance with feature embedding ``fe`` (FE, the penultimate
features after ReLU, width H = F), classifier weights ``W`` [H, C] (``x @ W``) and
bias ``b`` [C]:

* classification embeddings ``ce[c, h] = fe[h] * W[h, c]`` (FE ⊙ W_C, per class);
* logits ``LG[c] = sum_h ce[c, h] + b[c]``. The paper writes ``LG = Σ CE``; its
  networks' biases are not mentioned. We keep the bias so that the logits are the
  network's own: pass ``bias=None`` (or zeros) to get the paper's bias-free form.
* reference class ``r`` = the predicted class (§3.1: "a reference class is the
  predicted label"), adversary logit ``LG_A = max_{c != r} LG[c]`` (§3.3).

Definitions chosen where the paper is ambiguous
-----------------------------------------------
Instance top-K (§3.3). Sort the reference class's ce in decreasing order,
``ce_(1) >= ce_(2) >= ...`` (ties: lower feature id first), and let
``S_k = ce_(1) + ... + ce_(k)`` (``S_0 = 0``). The instance top-K is the smallest
``k`` in ``0..H`` with ``b[r] + S_k > LG_A`` (strictly): the number of the
reference's largest ce whose sum, with the reference's bias, exceeds the largest
other logit. So the bias counts in the comparison but is never counted as a
feature. Consequences:

* ``k = 0`` when the bias alone exceeds ``LG_A`` (rare; counted as covered at
  every K >= 1);
* at ``k = H`` the sum is the whole reference logit, so an instance whose
  predicted logit strictly exceeds every other one always has top-K <= H. Only an
  exact tie (``LG_R == LG_A``, up to float64 rounding) -- or, in
  :func:`tp_fp_statistics`, a prediction that is not the arg-max -- never
  exceeds; such an instance gets top-K = ``H + 1`` ("never"), stays in every
  denominator and is never covered. ``topk_never_fraction`` reports how many.

Top-K coverage ratio at K (§3.3, Fig. 3): the fraction of a class's instances
whose instance top-K is <= K, for K = 1..H, i.e. the cumulative distribution of
instance top-K. It is non-decreasing in K. (The paper's "sum of the top-K ce
exceeds LG_A" at exactly K agrees with this except after the sum has passed its
maximum, when negative ce bring it back below LG_A; "K features suffice" is the
reading Fig. 3 and §5.3 use.)

Which instances (§3.3, §3.4, §5.7). Every per-class statistic of
:func:`latent_statistics` is computed over the *correctly classified* instances
of the class (label == prediction == c, the class's true positives), except the
accuracies. The top-K is defined against the predicted class (§3.3), so only for
these instances is "class c" both the label and the reference whose ce are
counted. The paper computes these statistics on the training set, where
accuracy is ~96-100 % (Table 2), so this is its "all instances of the class";
the misclassified test instances are what §5.7 studies separately, and
:func:`tp_fp_statistics` covers them. Class -1 means all classes together.

Instance top-K sets, class top-K members (§3.3, §5.6, Figs. 8-9). The instance
top-K ce set is the feature ids of ``ce_(1..k)``, with ``k`` the instance's own
top-K (the features its decision needs; an instance that never exceeds adds
none). The instance top-K fe set is the ids of the instance's ``k`` largest fe
(same ``k``). After §5.3 the paper fixes one K for every instance (K = 7 for
CIFAR-10): pass ``fixed_k`` to do the same. Features with ``fe == 0`` (cut by
the ReLU) or ``ce <= 0`` (pushing against the class) are never members. The
*class top-K members* are the features by decreasing frequency = fraction of
the class's instances whose set contains them; ``class_topk_{ce,fe}_needed``
(Fig. 9, "the number of class top-K FE needed to describe all instances") is
the number of features with non-zero frequency, i.e. the smallest m such that
the m most frequent members contain every instance's top-K set.

Magnitudes (§3.2: "the magnitude of a ce or fe refers to its value"; §3.4,
§5.4-5.6, Figs. 4-7, 10a, Tables 3-4). ``fe_mean_magnitude`` is the class mean of
each fe; ``ce_mean_magnitude`` the class mean of ``ce[c, h]`` for the class's
own column (= mean fe times ``W[h, c]``); ``wc_magnitude`` is ``W[h, c]``. Each
keeps the ``top`` largest *values* (not absolute values: with fe >= 0 only a
positive weight can raise a class logit) with their feature ids; rank 1 of
``ce_mean_magnitude`` is Table 3's "mean magnitude largest class ce".
``top_ce_logit_share`` at rank j is the class mean of ``ce_(j) / sum_h ce[r, h]``
(Fig. 6; rank 1 is Table 4). The denominator is the paper's ``LG = Σ CE``
without the bias, so the shares of all H ce sum to 1; instances whose ce sum is
<= 0 have no meaningful share and are left out of this mean.

Test true and false positives (§5.7, Fig. 10). The paper's "false positives" of
a class are, judging by its findings (their fe look like the class's training fe
at half magnitude, and their *CE* identities match only 39 % because the ce
counted are those of the wrongly predicted class), the *misclassified test
instances of that class by label*. We follow that: per class c, TP = test
instances with label c predicted c, FP = test instances with label c predicted
otherwise. ``μ(Train_FE)`` is the class mean fe of the correctly classified
training instances (= all of them at ~100 % training accuracy). The Frobenius
norm ``FB[μ(Train_FE) - μ(Test_TP-FE)]`` is of the [classes, H] matrix of
differences: per class it is the row's L2 norm, for class -1 the Frobenius norm
over the classes where both means exist. ``fe_members_frobenius_*`` restricts
each row to the class's top-``top`` training FE members (the features Fig. 10
shows). The identity overlap is ``|A ∩ B| / |A|`` with A the class's
top-``top`` training members and B the top-``top`` members of the test TP (or
FP) instances, for fe and for ce; class -1 is the mean over classes.

Storage: tidy rows
------------------
Each function returns ``list[dict]`` with keys ``member`` (index in the pack),
``split``, ``class`` (-1 = all classes), ``statistic`` (a key of
:data:`STATISTICS`), ``k`` (rank, K or None), ``feature`` (feature id or None),
``value`` (float). :func:`statistics_table` turns them into a DataFrame keyed by
``network_id``. A member whose features or weights are not all finite (a
diverged network) gets no rows. Row count per member and split, with C classes,
H features and T = ``top``: at most ``(C + 1) * (H + 4) + 6 * C * T + 2 * C + 1``
(the coverage curves, ``(C + 1) * H`` rows, dominate: 5,500 of ~6,200 rows for
H = 500, C = 10, T = 10), plus ``C * T`` ``wc_magnitude`` rows once per network
(with the training split by default); :func:`tp_fp_statistics` adds at most
``15 * (C + 1) + 3 * C * T``.

Computation
-----------
Everything runs on the features' device in float64 with no autocast; float16 /
bfloat16 inputs are refused (the statistics must come from full-precision
features). Members are processed in chunks of bounded size; there is no Python
loop over instances. Only instances that belong to some class group are
analysed, each with a ``topk`` of the first L = max(32, top, fixed_k) ce and fe,
and only the rows whose answer needs more (top-K > L, or a tie at the cut that
could change which ids are counted) are fully sorted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

__all__ = ["COLUMNS", "STATISTICS", "latent_statistics", "tp_fp_statistics", "statistics_table"]

COLUMNS = ("member", "split", "class", "statistic", "k", "feature", "value")

STATISTICS: dict[str, str] = {
    # latent_statistics (per split)
    "instances": "number of correctly classified instances the class statistics use",
    "accuracy": "class: recall (Table 2, Fig. 2); -1: accuracy over all instances",
    "balanced_accuracy": "-1 only: mean recall over the classes present (BAC)",
    "topk_coverage": "k = K: fraction of instances whose instance top-K <= K (§3.3, Fig. 3)",
    "topk_mean": "mean instance top-K over instances that ever exceed LG_A",
    "topk_never_fraction": "fraction of instances whose ce never exceed LG_A (top-K = H+1)",
    "class_topk_k": "-1 only: the K of every instance's top-K sets (absent: each instance's own top-K)",
    "class_topk_ce_frequency": "k = rank, feature: fraction of instances with the feature in their top-K ce set (§3.3)",
    "class_topk_fe_frequency": "k = rank, feature: fraction of instances with the feature in their top-K fe set (Fig. 8)",
    "class_topk_ce_needed": "number of class top-K ce members needed to describe every instance",
    "class_topk_fe_needed": "number of class top-K fe members needed to describe every instance (Fig. 9)",
    "fe_mean_magnitude": "k = rank, feature: the largest class mean fe (Fig. 10a)",
    "ce_mean_magnitude": "k = rank, feature: the largest class mean ce (Figs. 4-5; rank 1 = Table 3)",
    "wc_magnitude": "k = rank, feature: the largest class weights W_C[:, c] (Fig. 7, §5.5)",
    "top_ce_logit_share": "k = rank: mean share ce_(k) / sum(ce) of the class logit (Fig. 6; rank 1 = Table 4)",
    # tp_fp_statistics (split "test", §5.7)
    "tp_instances": "test instances of the class predicted correctly",
    "fp_instances": "test instances of the class predicted wrongly (the paper's false positives)",
    "fe_frobenius_tp": "||μ(train fe) - μ(test TP fe)|| over all features (-1: Frobenius norm)",
    "fe_frobenius_fp": "||μ(train fe) - μ(test FP fe)|| over all features (-1: Frobenius norm)",
    "fe_members_frobenius_tp": "as fe_frobenius_tp over the class's top training fe members (Fig. 10)",
    "fe_members_frobenius_fp": "as fe_frobenius_fp over the class's top training fe members (Fig. 10)",
    "fe_member_mean_train": "k = rank, feature: train mean fe of the class's top training fe members (Fig. 10)",
    "fe_member_mean_tp": "k = rank, feature: test TP mean fe of the same features (Fig. 10)",
    "fe_member_mean_fp": "k = rank, feature: test FP mean fe of the same features (Fig. 10)",
    "fe_identity_overlap_tp": "|top train fe members ∩ top test TP fe members| / |top train fe members|",
    "fe_identity_overlap_fp": "|top train fe members ∩ top test FP fe members| / |top train fe members|",
    "ce_identity_overlap_tp": "|top train ce members ∩ top test TP ce members| / |top train ce members|",
    "ce_identity_overlap_fp": "|top train ce members ∩ top test FP ce members| / |top train ce members|",
}

# FE values of a [members, instances, H] block handled at once (16 MiB as float64).
_CHUNK_ELEMENTS = 1 << 21
# First pass keeps this many of the largest ce / fe per instance (see module doc).
_FIRST_PASS = 32
_UNRESOLVED = -1


# -- validation -------------------------------------------------------------------------
def _check_float(name: str, t: Tensor) -> Tensor:
    t = torch.as_tensor(t)
    if t.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{name} must be float32 or float64 (full precision), got {t.dtype}")
    return t


def _check_inputs(features: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    features = _check_float("features", features)
    if features.ndim != 3:
        raise ValueError(f"features must be [P, N, F], got shape {tuple(features.shape)}")
    p, _n, h = features.shape
    weight = _check_float("weight", weight).to(features.device)
    if weight.ndim != 3 or weight.shape[:2] != (p, h):
        raise ValueError(f"weight must be [{p}, {h}, K] (x @ W), got shape {tuple(weight.shape)}")
    c = weight.shape[2]
    if c < 2:
        raise ValueError("top-K needs at least two classes (a reference and an adversary)")
    if bias is None:
        bias = torch.zeros(p, c, dtype=torch.float64, device=features.device)
    bias = _check_float("bias", bias).to(features.device)
    if bias.shape != (p, c):
        raise ValueError(f"bias must be [{p}, {c}], got shape {tuple(bias.shape)}")
    return features, weight, bias


def _check_labels(name: str, labels: Tensor, p: int, n: int, c: int, device: torch.device) -> Tensor:
    """Labels [N] or [P, N] as int64 [P, N]; -1 marks an instance a member does not use."""
    labels = torch.as_tensor(labels, device=device)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be integers")
    labels = labels.long()
    if labels.shape not in ((n,), (p, n)):
        raise ValueError(f"{name} must be [{n}] or [{p}, {n}], got {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < -1 or labels.max() >= c):
        raise ValueError(f"{name} must be in [0, {c}) (or -1 for instances a member does not use)")
    return labels.expand(p, n)


def _check_k(fixed_k: int | None, top: int, h: int) -> None:
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    if fixed_k is not None and not 1 <= fixed_k <= h:
        raise ValueError(f"fixed_k must be in [1, {h}], got {fixed_k}")


def _finite_members(*tensors: Tensor) -> Tensor:
    """[P] bool: members whose tensors are all finite.

    One float64 sum per member: NaN or inf anywhere makes it non-finite, and a
    float64 sum of float32 values cannot overflow.
    """
    ok = torch.ones(tensors[0].shape[0], dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        ok &= t.flatten(1).sum(dim=1, dtype=torch.float64).isfinite()
    return ok


# -- per-instance analysis ------------------------------------------------------------------
def _ranked(x: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """The ``length`` largest entries of each row, by decreasing value then increasing id.

    With ``length`` < H, ``topk`` picks the set; which ids are picked among values
    tied at the cut is unspecified, callers redo such rows with the full sort.
    """
    if length >= x.shape[1]:
        return torch.sort(x, dim=1, descending=True, stable=True)
    vals, ids = torch.topk(x, length, dim=1, sorted=True)
    # topk orders tied values arbitrarily: put ids of tied positive values in
    # increasing order (zeros and negatives are never counted, their order is moot).
    tied = ((vals[:, 1:] == vals[:, :-1]) & (vals[:, 1:] > 0)).any(dim=1)
    if tied.any():
        rows = tied.nonzero(as_tuple=True)[0]
        r_ids, perm = torch.sort(ids[rows], dim=1)  # ascending ids: the stable sort keeps them so
        r_vals, order = torch.sort(vals[rows].gather(1, perm), dim=1, descending=True, stable=True)
        vals[rows], ids[rows] = r_vals, r_ids.gather(1, order)
    return vals, ids


@dataclass
class _Analysed:
    """Per-instance results of :func:`_analyse` for M instances."""

    kstar: Tensor  # [M] int64: instance top-K, 0..H, H+1 = never
    share: Tensor  # [M, T] float64: ce_(j) / sum(ce)
    share_ok: Tensor  # [M] bool: sum(ce) > 0
    ce_rows: Tensor  # [E] int64: instance of each (instance, feature) top-K ce membership
    ce_ids: Tensor  # [E] int64: its feature id
    fe_rows: Tensor
    fe_ids: Tensor


def _memberships(vals: Tensor, ids: Tensor, kset: Tensor) -> tuple[Tensor, Tensor]:
    """(row, id) of the first ``kset`` ranked entries of each row whose value is > 0."""
    pos = torch.arange(vals.shape[1], device=vals.device)
    take = (pos[None, :] < kset[:, None]) & (vals > 0)
    rows, cols = take.nonzero(as_tuple=True)
    return rows, ids[rows, cols]


def _tie_at_cut(vals: Tensor, kset: Tensor, length: int, h: int) -> Tensor:
    """Rows whose counted prefix reaches a positive value equal to the cut value."""
    if length >= h:
        return torch.zeros_like(kset, dtype=torch.bool)
    last = vals.gather(1, (kset - 1).clamp(0, length - 1)[:, None]).squeeze(1)
    return (kset >= 1) & (last > 0) & (last == vals[:, length - 1])


def _analyse_pass(ce: Tensor, fe: Tensor, need: Tensor, fixed_k: int | None, top: int,
                  length: int) -> tuple[_Analysed, Tensor]:
    """One pass over M instances keeping ``length`` ranks; returns results and rows to redo."""
    m, h = ce.shape
    vals, ids = _ranked(ce, length)
    # Smallest k with b_r + S_k > LG_A, i.e. S_k > need = LG_A - b_r (k = 0: S_0 = 0).
    hit = vals.cumsum(dim=1) > need[:, None]
    first = hit.int().argmax(dim=1) + 1  # argmax returns the first maximum
    kstar = torch.where(hit.any(dim=1), first, _UNRESOLVED if length < h else h + 1)
    kstar = torch.where(need < 0, 0, kstar)
    unresolved = kstar == _UNRESOLVED
    if fixed_k is not None:
        kset = torch.full_like(kstar, fixed_k)
    else:
        kset = torch.where(kstar > h, 0, kstar).clamp_min(0)  # "never" adds no members
    fe_vals, fe_ids = _ranked(fe, length)
    redo = unresolved | _tie_at_cut(vals, kset, length, h) | _tie_at_cut(fe_vals, kset, length, h)
    kset = torch.where(redo, 0, kset)
    ce_rows, ce_ids = _memberships(vals, ids, kset)
    fe_rows, fe_ids = _memberships(fe_vals, fe_ids, kset)
    total = ce.sum(dim=1)
    t = min(top, h)
    share = vals[:, :t] / total[:, None]
    return _Analysed(kstar, share, total > 0, ce_rows, ce_ids, fe_rows, fe_ids), redo


def _analyse(ce: Tensor, fe: Tensor, need: Tensor, fixed_k: int | None, top: int) -> _Analysed:
    """Instance top-K, top-K sets and ce shares of M instances (rows of ce [M, H], fe [M, H])."""
    h = ce.shape[1]
    length = min(h, max(_FIRST_PASS, top, fixed_k or 0))
    out, redo = _analyse_pass(ce, fe, need, fixed_k, top, length)
    if redo.any():
        rows = redo.nonzero(as_tuple=True)[0]
        full, _ = _analyse_pass(ce[rows], fe[rows], need[rows], fixed_k, top, h)
        out.kstar[rows] = full.kstar
        out.share[rows] = full.share
        out.ce_rows = torch.cat([out.ce_rows, rows[full.ce_rows]])
        out.ce_ids = torch.cat([out.ce_ids, full.ce_ids])
        out.fe_rows = torch.cat([out.fe_rows, rows[full.fe_rows]])
        out.fe_ids = torch.cat([out.fe_ids, full.fe_ids])
    return out


# -- per-group aggregation ----------------------------------------------------------------
@dataclass
class _Groups:
    """Sums per (member, group) for a set of members; groups are disjoint sets of instances."""

    count: Tensor  # [P, G] float64
    hist: Tensor  # [P, G, H + 2]: instances with top-K = 0..H+1
    topk_sum: Tensor  # [P, G]: sum of top-K over instances with top-K <= H
    share_sum: Tensor  # [P, G, T]
    share_count: Tensor  # [P, G]
    fe_sum: Tensor  # [P, G, H]
    ce_members: Tensor  # [P, G, H]: instances with the feature in their top-K ce set
    fe_members: Tensor  # [P, G, H]

    @staticmethod
    def cat(parts: list["_Groups"]) -> "_Groups":
        return _Groups(*(torch.cat([getattr(q, f) for q in parts]) for f in _Groups.__dataclass_fields__))


# Chooses each instance's reference class and group for a block of members and
# instances: (member slice, instance slice, float64 logits [Pm, Nb, C]) ->
# (reference [Pm, Nb], group [Pm, Nb], -1 = in no group).
Grouping = Callable[[slice, slice, Tensor], tuple[Tensor, Tensor]]


def _blocks(p: int, n: int, h: int) -> list[tuple[slice, slice]]:
    """(members, instances) blocks of at most ~_CHUNK_ELEMENTS FE values.

    Small blocks keep every temporary well under glibc's mmap threshold, so freed
    memory is reused instead of being page-faulted in again for every array.
    """
    pm = max(1, min(p, _CHUNK_ELEMENTS // max(1, n * h)))
    nb = max(1, min(n, _CHUNK_ELEMENTS // max(1, pm * h)))
    return [(slice(i, min(p, i + pm)), slice(j, min(n, j + nb)))
            for i in range(0, p, pm) for j in range(0, max(n, 1), nb)]


@torch.no_grad()
def _group_sums(features: Tensor, weight: Tensor, bias: Tensor, grouping: Grouping, groups: int,
                fixed_k: int | None, top: int) -> _Groups:
    """Aggregate instance statistics of every member into ``groups`` disjoint groups."""
    p, n, h = features.shape
    c = weight.shape[2]
    t = min(top, h)
    f64 = dict(dtype=torch.float64, device=features.device)
    pg = p * groups
    count = torch.zeros(pg, **f64)
    hist = torch.zeros(pg * (h + 2), **f64)
    topk_sum = torch.zeros(pg, **f64)
    share_sum = torch.zeros(pg, t, **f64)
    share_count = torch.zeros(pg, **f64)
    fe_sum = torch.zeros(pg, h, **f64)
    ce_members = torch.zeros(pg * h, **f64)
    fe_members = torch.zeros(pg * h, **f64)
    w_all = weight.double()
    b_all = bias.double()
    for ms, ns in _blocks(p, n, h):
        fe = features[ms, ns].double()
        w, b = w_all[ms], b_all[ms]
        pm, nb = fe.shape[:2]
        logits = torch.baddbmm(b[:, None, :], fe, w)  # [Pm, Nb, C], float64
        ref, grp = grouping(ms, ns, logits)
        lg_a = logits.scatter(2, ref[..., None], float("-inf")).amax(dim=2)
        need = lg_a - b.gather(1, ref)  # the reference's ce must sum past this
        flat = (grp >= 0).flatten().nonzero(as_tuple=True)[0]  # member-major instance index
        if flat.numel() == 0:
            continue
        member = flat // nb
        g = (member + ms.start) * groups + grp.flatten()[flat]  # (member, group) index
        fe_sel = fe.reshape(pm * nb, h)
        if flat.numel() < pm * nb:
            fe_sel = fe_sel.index_select(0, flat)  # [M, H]
        w_rows = w.transpose(1, 2).reshape(pm * c, h)  # row (member, class) = W[member][:, class]
        ce_sel = fe_sel * w_rows.index_select(0, member * c + ref.flatten()[flat])
        a = _analyse(ce_sel, fe_sel, need.flatten()[flat], fixed_k, top)
        del ce_sel, logits

        count += torch.bincount(g, minlength=pg)
        hist += torch.bincount(g * (h + 2) + a.kstar, minlength=pg * (h + 2))
        ever = a.kstar <= h
        topk_sum.index_add_(0, g[ever], a.kstar[ever].double())
        ok = a.share_ok
        share_sum.index_add_(0, g[ok], a.share[ok])
        share_count += torch.bincount(g[ok], minlength=pg)
        fe_sum.index_add_(0, g, fe_sel)
        ce_members += torch.bincount(g[a.ce_rows] * h + a.ce_ids, minlength=pg * h)
        fe_members += torch.bincount(g[a.fe_rows] * h + a.fe_ids, minlength=pg * h)
    return _Groups(
        count.view(p, groups), hist.view(p, groups, h + 2), topk_sum.view(p, groups),
        share_sum.view(p, groups, t), share_count.view(p, groups), fe_sum.view(p, groups, h),
        ce_members.view(p, groups, h), fe_members.view(p, groups, h),
    )


def _div(a: Tensor, b: Tensor) -> Tensor:
    return torch.where(b > 0, a / b.clamp_min(1e-300), float("nan"))


def _ranking(x: Tensor, top: int) -> tuple[Tensor, Tensor]:
    """Top ``top`` along the last dim by decreasing value, ties by lower id (NaN last)."""
    x = torch.nan_to_num(x, nan=float("-inf"))
    vals, ids = torch.sort(x, dim=-1, descending=True, stable=True)
    return vals[..., :top], ids[..., :top]


# -- tidy rows ----------------------------------------------------------------------------
class _Rows:
    """Columnar accumulator of tidy rows; ``add`` takes arrays of equal shape."""

    def __init__(self, split: str) -> None:
        self.split = split
        self.cols: dict[str, list[Any]] = {c: [] for c in COLUMNS}

    def add(self, statistic: str, member: Any, cls: Any, value: Any, k: Any = None, feature: Any = None,
            keep: Any = None) -> None:
        value = np.asarray(value, dtype=np.float64)
        member, cls = np.broadcast_to(member, value.shape), np.broadcast_to(cls, value.shape)
        arrays = [member, cls, value]
        if k is not None:
            arrays.append(np.broadcast_to(k, value.shape))
        if feature is not None:
            arrays.append(np.broadcast_to(feature, value.shape))
        mask = np.ones(value.shape, bool) if keep is None else np.broadcast_to(keep, value.shape)
        flat = [a[mask] for a in arrays]
        size = flat[0].size
        self.cols["member"] += flat[0].astype(np.int64).tolist()
        self.cols["class"] += flat[1].astype(np.int64).tolist()
        self.cols["value"] += flat[2].tolist()
        self.cols["k"] += flat[3].astype(np.int64).tolist() if k is not None else [None] * size
        if feature is not None:
            self.cols["feature"] += flat[-1].astype(np.int64).tolist()
        else:
            self.cols["feature"] += [None] * size
        self.cols["statistic"] += [statistic] * size
        self.cols["split"] += [self.split] * size

    def records(self) -> list[dict[str, Any]]:
        return [dict(zip(COLUMNS, r)) for r in zip(*(self.cols[c] for c in COLUMNS))]


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


# -- public API ----------------------------------------------------------------------------
@torch.no_grad()
def latent_statistics(
    features: Tensor,
    logits_weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    split: str,
    top: int = 10,
    *,
    fixed_k: int | None = None,
    include_weights: bool | None = None,
    predictions: Tensor | None = None,
) -> list[dict[str, Any]]:
    """Dablain et al.'s latent statistics of every member on one split, as tidy rows.

    Args:
        features: FE [P, N, F] (penultimate features after ReLU), float32/float64.
        logits_weight: W_C [P, F, K] with logits = FE @ W_C + bias
            (``PackedNet.classifier().weight``).
        bias: [P, K] or None (no bias).
        labels: [N], or [P, N] when members use different instances; -1 marks an
            instance a member does not use.
        split: the ``split`` column, e.g. "train" or "test".
        top: how many ranked entries the ranked statistics keep (the paper's 10).
        fixed_k: use this K for every instance's top-K sets instead of the
            instance's own top-K (the paper fixes K = 7 after §5.3).
        include_weights: emit ``wc_magnitude`` (the weights do not depend on the
            split); default: only when ``split == "train"``.
        predictions: [N] or [P, N], the reference class of every instance when it is
            not the arg-max of FE @ W_C + bias (features on another scale than the
            head multiplies: a cosine head's raw features, workers.latent_tables);
            None: that arg-max.

    Returns rows with keys :data:`COLUMNS`; the statistics, the instances they use
    and the row count are described in the module docstring and :data:`STATISTICS`.
    Predictions are the arg-max of the logits recomputed in float64, unless given.
    """
    features, weight, bias = _check_inputs(features, logits_weight, bias)
    p, n, h = features.shape
    c = weight.shape[2]
    _check_k(fixed_k, top, h)
    labels = _check_labels("labels", labels, p, n, c, features.device)
    given = None if predictions is None else _check_labels("predictions", predictions, p, n, c, features.device)
    if include_weights is None:
        include_weights = split == "train"
    finite = _finite_members(features, weight, bias)
    used = (labels >= 0) & finite[:, None]

    def correct_by_class(ms: slice, ns: slice, logits: Tensor) -> tuple[Tensor, Tensor]:
        # Reference = prediction; group = class, for correctly classified instances only.
        pred = logits.argmax(dim=2) if given is None else given[ms, ns].clamp_min(0)
        lab = labels[ms, ns]
        return pred, torch.where(used[ms, ns] & (pred == lab), lab, -1)

    s = _group_sums(features, weight, bias, correct_by_class, c, fixed_k, top)

    members = finite.nonzero(as_tuple=True)[0]
    keep = members.cpu().numpy()
    mem = keep[:, None]
    cls = np.arange(c)[None, :]
    rows = _Rows(split)
    t = min(top, h)

    # Accuracy (Table 2): recall per class, accuracy and BAC over all used instances.
    lab_count = torch.zeros(p, c, dtype=torch.float64, device=features.device)
    lab_count.scatter_add_(1, labels.clamp_min(0), used.double())
    hits = s.count
    recall = _div(hits, lab_count)[members]
    rows.add("accuracy", mem, cls, _np(recall))
    rows.add("accuracy", keep, -1, _np(_div(hits.sum(1), lab_count.sum(1))[members]))
    rows.add("balanced_accuracy", keep, -1, _np(recall.nanmean(dim=1)))

    # Groups plus "all classes" (-1) for the sums that add up across classes.
    def with_all(x: Tensor) -> Tensor:
        return torch.cat([x, x.sum(dim=1, keepdim=True)], dim=1)[members]

    cls_all = np.append(np.arange(c), -1)[None, :]
    count = with_all(s.count)
    rows.add("instances", mem, cls_all, _np(count))
    hist = with_all(s.hist)  # [P', C+1, H+2]
    coverage = _div(hist.cumsum(dim=2)[:, :, 1:h + 1], count[:, :, None])  # K = 1..H
    rows.add("topk_coverage", mem[:, :, None], cls_all[:, :, None], _np(coverage),
             k=np.arange(1, h + 1)[None, None, :])
    ever = count - hist[:, :, h + 1]
    rows.add("topk_mean", mem, cls_all, _np(_div(with_all(s.topk_sum), ever)))
    rows.add("topk_never_fraction", mem, cls_all, _np(_div(hist[:, :, h + 1], count)))
    share = _div(with_all(s.share_sum), with_all(s.share_count)[:, :, None])
    rows.add("top_ce_logit_share", mem[:, :, None], cls_all[:, :, None], _np(share),
             k=np.arange(1, t + 1)[None, None, :])

    # Class top-K members (§3.3, Figs. 8-9).
    if fixed_k is not None:
        rows.add("class_topk_k", keep, -1, np.full(len(keep), float(fixed_k)))
    cnt = s.count[members][:, :, None]
    for kind, members_count in (("ce", s.ce_members), ("fe", s.fe_members)):
        freq = _div(members_count[members], cnt)
        vals, ids = _ranking(freq, t)
        rows.add(f"class_topk_{kind}_frequency", mem[:, :, None], cls[:, :, None], _np(vals),
                 k=np.arange(1, t + 1)[None, None, :], feature=_np(ids), keep=_np(vals > 0))
        needed = torch.where(cnt[..., 0] > 0, (members_count[members] > 0).sum(dim=2).double(), float("nan"))
        rows.add(f"class_topk_{kind}_needed", mem, cls, _np(needed))

    # Magnitudes (§3.4, §5.4-5.6).
    fe_mean = _div(s.fe_sum[members], cnt)  # [P', C, H]
    w_t = weight[members].double().transpose(1, 2)  # [P', C, H]
    ranks = np.arange(1, t + 1)[None, None, :]
    for name, x in (("fe_mean_magnitude", fe_mean), ("ce_mean_magnitude", fe_mean * w_t)):
        vals, ids = _ranking(x, t)
        rows.add(name, mem[:, :, None], cls[:, :, None], _np(vals), k=ranks, feature=_np(ids),
                 keep=_np(torch.isfinite(vals)))
    if include_weights:
        vals, ids = _ranking(w_t, t)
        rows.add("wc_magnitude", mem[:, :, None], cls[:, :, None], _np(vals), k=ranks, feature=_np(ids))
    return rows.records()


def _top_sets(freq: Tensor, top: int) -> Tensor:
    """[P, C, H] bool: the ``top`` most frequent features with frequency > 0."""
    vals, ids = _ranking(freq, top)
    out = torch.zeros_like(freq, dtype=torch.bool)
    return out.scatter_(2, ids, vals > 0)


@torch.no_grad()
def tp_fp_statistics(
    train_features: Tensor,
    train_labels: Tensor,
    train_pred: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    test_pred: Tensor,
    W: Tensor,
    top: int = 10,
    *,
    bias: Tensor | None,
    fixed_k: int | None = None,
) -> list[dict[str, Any]]:
    """§5.7: test true / false positives against training, per member, as tidy rows (split "test").

    Per class c (definitions in the module docstring): TP = test instances of
    label c predicted c; FP = test instances of label c predicted otherwise (the
    paper's "false positives", see module doc); the training reference is the
    correctly classified training instances of c. Returns instance counts, the
    Frobenius norms of the class mean fe differences (all features and the class's
    top-``top`` training fe members), the Fig. 10 member means, and the overlap of
    the top-``top`` most frequent fe and ce identities.

    Args:
        train_features, test_features: FE [P, N, F] (float32/float64).
        train_labels, test_labels: [N] or [P, N] (-1: not used by the member).
        train_pred, test_pred: the members' predictions [N] or [P, N]; the
            instance top-K is taken against the predicted class (§3.3).
        W: W_C [P, F, K]; bias: [P, K] or None, as in :func:`latent_statistics`
            (required by keyword so that the top-K sets match it).
    """
    train_features, weight, bias_ = _check_inputs(train_features, W, bias)
    test_features = _check_float("test_features", test_features).to(train_features.device)
    p, n1, h = train_features.shape
    c = weight.shape[2]
    if test_features.ndim != 3 or test_features.shape[0] != p or test_features.shape[2] != h:
        raise ValueError(f"test_features must be [{p}, N, {h}], got {tuple(test_features.shape)}")
    n2 = test_features.shape[1]
    _check_k(fixed_k, top, h)
    dev = train_features.device
    y1 = _check_labels("train_labels", train_labels, p, n1, c, dev)
    y2 = _check_labels("test_labels", test_labels, p, n2, c, dev)
    # A prediction of -1 (a diverged member in workers.metrics) leaves the instance out.
    r1 = _check_labels("train_pred", train_pred, p, n1, c, dev)
    r2 = _check_labels("test_pred", test_pred, p, n2, c, dev)
    finite = _finite_members(train_features, test_features, weight, bias_)
    ok = finite[:, None]
    g1 = torch.where(ok & (y1 >= 0) & (r1 == y1), y1, -1)
    # Test groups: 0..C-1 the class's TPs, C..2C-1 its misclassified instances.
    g2 = torch.where(ok & (y2 >= 0) & (r2 >= 0), torch.where(r2 == y2, y2, y2 + c), -1)
    r1, r2 = r1.clamp_min(0), r2.clamp_min(0)
    tr = _group_sums(train_features, weight, bias_, lambda ms, ns, _: (r1[ms, ns], g1[ms, ns]), c, fixed_k, top)
    te = _group_sums(test_features, weight, bias_, lambda ms, ns, _: (r2[ms, ns], g2[ms, ns]), 2 * c, fixed_k,
                     top)

    members = finite.nonzero(as_tuple=True)[0]
    keep = members.cpu().numpy()
    mem = keep[:, None]
    cls = np.arange(c)[None, :]
    t = min(top, h)
    rows = _Rows("test")

    def sel(x: Tensor) -> Tensor:
        return x[members]

    n_train = sel(tr.count)[:, :, None]
    n_test = sel(te.count)
    mu_train = _div(sel(tr.fe_sum), n_train)
    fe_sets = _top_sets(_div(sel(tr.fe_members), n_train), t)
    ce_sets = _top_sets(_div(sel(tr.ce_members), n_train), t)
    member_vals, member_ids = _ranking(_div(sel(tr.fe_members), n_train), t)
    member_keep = member_vals > 0
    rows.add("fe_member_mean_train", mem[:, :, None], cls[:, :, None], _np(mu_train.gather(2, member_ids)),
             k=np.arange(1, t + 1)[None, None, :], feature=_np(member_ids), keep=_np(member_keep))

    for tag, lo in (("tp", 0), ("fp", c)):
        n_g = n_test[:, lo:lo + c]
        rows.add(f"{tag}_instances", mem, cls, _np(n_g))
        rows.add(f"{tag}_instances", keep, -1, _np(n_g.sum(dim=1)))
        mu = _div(sel(te.fe_sum)[:, lo:lo + c], n_g[:, :, None])
        rows.add(f"fe_member_mean_{tag}", mem[:, :, None], cls[:, :, None], _np(mu.gather(2, member_ids)),
                 k=np.arange(1, t + 1)[None, None, :], feature=_np(member_ids),
                 keep=_np(member_keep & (n_g[:, :, None] > 0)))
        sq = (mu_train - mu) ** 2
        both = (n_train[:, :, 0] > 0) & (n_g > 0)  # a norm needs both class means
        for name, mask in ((f"fe_frobenius_{tag}", None), (f"fe_members_frobenius_{tag}", fe_sets)):
            per_class_sq = (sq if mask is None else torch.where(mask, sq, 0.0)).sum(dim=2)
            per_class_sq = torch.where(both, per_class_sq, float("nan"))
            rows.add(name, mem, cls, _np(per_class_sq.sqrt()))
            defined = ~per_class_sq.isnan()
            total = torch.where(defined, per_class_sq, 0.0).sum(dim=1).sqrt()
            rows.add(name, keep, -1, _np(torch.where(defined.any(dim=1), total, float("nan"))))
        for kind, train_sets, counts in (("fe", fe_sets, te.fe_members), ("ce", ce_sets, te.ce_members)):
            test_sets = _top_sets(_div(sel(counts)[:, lo:lo + c], n_g[:, :, None]), t)
            overlap = _div((train_sets & test_sets).sum(dim=2).double(), train_sets.sum(dim=2).double())
            overlap = torch.where(n_g > 0, overlap, float("nan"))
            rows.add(f"{kind}_identity_overlap_{tag}", mem, cls, _np(overlap))
            rows.add(f"{kind}_identity_overlap_{tag}", keep, -1, _np(overlap.nanmean(dim=1)))
    return rows.records()


def statistics_table(rows: Sequence[Mapping[str, Any]],
                     member_to_trial: Mapping[int, str] | Sequence[str]) -> pd.DataFrame:
    """Tidy rows -> the ``latent_stats`` table: ``member`` replaced by ``network_id``.

    ``member_to_trial`` maps the pack member index to the member's network id
    (a dict, or a list indexed by member). Columns: network_id, split, class,
    statistic, k (nullable Int64), feature (nullable Int64), value (float64).
    """
    frame = pd.DataFrame(list(rows), columns=list(COLUMNS))
    if isinstance(member_to_trial, Mapping):
        lookup = dict(member_to_trial)
    else:
        lookup = dict(enumerate(member_to_trial))
    missing = sorted(set(frame["member"].tolist()) - set(lookup))
    if missing:
        raise ValueError(f"no network id for member(s) {missing}")
    out = pd.DataFrame({
        "network_id": frame["member"].map(lookup).astype(object),
        "split": frame["split"].astype(object),
        "class": frame["class"].astype(np.int64),
        "statistic": frame["statistic"].astype(object),
        "k": frame["k"].astype("Int64"),
        "feature": frame["feature"].astype("Int64"),
        "value": frame["value"].astype(np.float64),
    })
    return out.reset_index(drop=True)
