"""Training losses for a pack of P networks trained side by side.

Floor: workers (trial execution; imports sweep.core and sweep.store only).

Every tensor here has a leading member dimension P. One :class:`PackedLoss` is
built per pack and called every training step; members of one pack may use
different losses (cross-entropy, focal, LDAM) and different deferred
re-weighting schedules, and are all handled by the same vectorised code path:
each loss kind is expressed through per-member parameters that are neutral for
the other kinds (margin 0 and scale 1 unless LDAM, focal exponent 0 unless
focal, class weights 1 until a member's DRW start), so there is no Python loop
over members or kinds in ``__call__``.

References
----------
* Lin et al. 2017, "Focal loss for dense object detection" (focal loss).
* Cao et al. 2019, "Learning imbalanced datasets with label-distribution-aware
  margin loss" (LDAM, deferred re-weighting = DRW). Dablain et al. follow this
  training regime for their CE / focal / LDAM comparison.
* Cui et al. 2019, "Class-balanced loss based on effective number of samples"
  (the class-balanced weights DRW switches to).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from sweep.core.spec import Head, Loss, Method

if TYPE_CHECKING:  # pragma: no cover
    from sweep.core.spec import TrialSpec

__all__ = ["class_balanced_weights", "ldam_margins", "PackedLoss"]


def _per_member(value: Tensor | float | Sequence[float], p: int, name: str) -> Tensor:
    """A float or a length-P sequence/tensor as a float64 CPU tensor [P]."""
    t = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
    if t.ndim == 0:
        t = t.expand(p).clone()
    if t.shape != (p,):
        raise ValueError(f"{name} must be a scalar or have shape [{p}], got {tuple(t.shape)}")
    return t


def _check_counts(class_counts: Tensor) -> Tensor:
    counts = torch.as_tensor(class_counts)
    if counts.ndim != 2:
        raise ValueError(f"class_counts must be [P, K], got shape {tuple(counts.shape)}")
    counts = counts.to(torch.float64)
    if not torch.isfinite(counts).all() or (counts < 0).any():
        raise ValueError("class_counts must be finite and non-negative")
    if (counts.sum(dim=1) <= 0).any():
        raise ValueError("every member needs at least one training example")
    return counts


def class_balanced_weights(class_counts: Tensor, beta: Tensor | float) -> Tensor:
    """Cui et al.'s effective-number class weights, [P, K] float64.

    ``w_c = (1 - beta) / (1 - beta**n_c)``, normalised so that each member's
    weights sum to K (the number of classes), as Cao et al.'s DRW does.

    * ``beta`` is a float or a per-member tensor [P], in [0, 1]. ``beta = 0``
      gives equal weights; ``beta -> 1`` tends to inverse class frequency
      ``1/n_c``, which is what ``beta == 1`` returns (the formula itself is 0/0).
    * A class with zero training examples gets weight 0 (its effective number
      is 0; it never appears as a target, so the weight is never used). The
      remaining classes still sum to K.
    """
    counts = _check_counts(class_counts)
    p, _k = counts.shape
    b = _per_member(beta, p, "beta").to(counts.device)[:, None]
    if ((b < 0) | (b > 1)).any():
        raise ValueError("beta must be in [0, 1]")
    present = counts > 0
    # (1-beta)/(1-beta^n); evaluated as 1/n where beta == 1 (the limit).
    effective = torch.where(b < 1, (1.0 - b.pow(counts)) / (1.0 - b).clamp_min(1e-300), counts)
    weights = torch.where(present, 1.0 / torch.where(present, effective, 1.0), 0.0)
    return weights * (counts.shape[1] / weights.sum(dim=1, keepdim=True))


def ldam_margins(class_counts: Tensor, max_margin: Tensor | float) -> Tensor:
    """Cao et al.'s label-distribution-aware margins, [P, K] float64.

    ``m_c = C / n_c**(1/4)`` with C chosen per member so that its largest margin
    (the rarest class) equals ``max_margin`` (a float or a tensor [P]). A class
    with zero training examples gets margin 0: it never appears as a target, and
    an infinite margin would only poison the max.
    """
    counts = _check_counts(class_counts)
    p, _k = counts.shape
    mm = _per_member(max_margin, p, "max_margin").to(counts.device)[:, None]
    present = counts > 0
    raw = torch.where(present, torch.where(present, counts, 1.0).pow(-0.25), 0.0)
    return raw * (mm / raw.amax(dim=1, keepdim=True))


class PackedLoss:
    """Per-member loss of a pack: ``loss(logits [P,B,K], targets [P,B], it) -> [P]``.

    Each member's value is the mean of its per-sample losses over its own
    batch, so ``loss(...).sum().backward()`` trains every member exactly as if
    it had its own optimiser step on its own mean loss.

    Per-sample loss for member p with true class y and logits z:

    * CE: ``-log softmax(z)_y``.
    * focal (Lin et al. eq. 4 without the alpha-balancing factor, which is the
      variant Cao et al. use and Dablain et al. adopt with their training
      regime): ``(1 - p_y)**gamma * (-log p_y)``, ``p_y = softmax(z)_y``;
      gamma = 0 is exactly CE.
    * LDAM (Cao et al. eq. 13): subtract the member's class margin ``m_y`` from
      the true-class logit only, multiply all logits by ``ldam_scale``, then CE.

    Deferred re-weighting (Cao et al. Alg. 1): from ``drw_start_iter[p]`` on
    (``None`` = never), sample i is weighted by its class's class-balanced weight
    ``w_{y_i}`` (:func:`class_balanced_weights` with ``drw_beta``), and the
    member's loss is ``sum(w_i l_i) / sum(w_i)`` -- the reduction of PyTorch's
    ``cross_entropy(weight=...)``, which is what Cao et al. train CE and LDAM
    with. For focal + DRW we apply the same weighted mean to the focal terms,
    with ``p_y`` from the unweighted softmax; Cao et al.'s public code instead
    folds the weight into the CE term before the focal factor and divides by B.
    We keep one definition for all kinds (documented deviation, focal+DRW only).

    ``class_counts`` [P, K] are each member's training-set class counts (the
    imbalanced set, before any re-sampling), as in Cao et al.
    """

    def __init__(
        self,
        kinds: Sequence[Loss | str],
        class_counts: Tensor,
        focal_gamma: Tensor | float | Sequence[float] = 1.0,
        ldam_max_margin: Tensor | float | Sequence[float] = 0.5,
        ldam_scale: Tensor | float | Sequence[float] = 30.0,
        drw_beta: Tensor | float | Sequence[float] = 0.9999,
        drw_start_iter: Sequence[int | None] | None = None,
    ) -> None:
        kinds = [Loss(k) for k in kinds]
        counts = _check_counts(class_counts)
        p, k = counts.shape
        if len(kinds) != p:
            raise ValueError(f"{len(kinds)} loss kinds for {p} members")
        starts = list(drw_start_iter) if drw_start_iter is not None else [None] * p
        if len(starts) != p:
            raise ValueError(f"{len(starts)} drw_start_iter values for {p} members")
        device = torch.as_tensor(class_counts).device
        self.num_members, self.num_classes = p, k
        self.kinds = kinds

        is_focal = torch.tensor([kd == Loss.FOCAL for kd in kinds])
        is_ldam = torch.tensor([kd == Loss.LDAM for kd in kinds])
        gamma = _per_member(focal_gamma, p, "focal_gamma")
        if (gamma[is_focal] < 0).any():
            raise ValueError("focal_gamma must be >= 0")
        scale = _per_member(ldam_scale, p, "ldam_scale")
        max_margin = _per_member(ldam_max_margin, p, "ldam_max_margin")
        margins = ldam_margins(counts.cpu(), max_margin)

        # Neutral values for members of other kinds: gamma 0, margin 0, scale 1.
        # Tables are kept in float64 and cast once per logits dtype (see _table).
        self._gamma = torch.where(is_focal, gamma, 0.0)
        self._margins = torch.where(is_ldam[:, None], margins, 0.0)
        self._scale = torch.where(is_ldam, scale, 1.0)
        self._any_focal = bool(is_focal.any())
        self._any_ldam = bool(is_ldam.any())

        never = torch.iinfo(torch.int64).max
        self._start = torch.tensor([never if s is None else int(s) for s in starts], dtype=torch.int64)
        self._first_start = min((int(s) for s in starts if s is not None), default=None)
        self._weights = class_balanced_weights(counts.cpu(), _per_member(drw_beta, p, "drw_beta"))
        self._cast: dict[tuple[str, torch.dtype], Tensor] = {}
        self.to(device)

    @classmethod
    def from_specs(cls, specs: Sequence["TrialSpec"], class_counts: Tensor) -> "PackedLoss":
        """A pack's loss from its members' specs (``loss``, ``head`` and recipe fields).

        * A normalised (cosine) head already multiplies its logits by ``s``, so LDAM's
          margins are subtracted at that scale and not scaled again: ``s*cos_y - s*m_y``
          is Cao et al.'s ``s * (cos_y - m_y)``.
        * Classifier re-training trains W_C with plain cross-entropy on the balanced set
          (Kang et al.'s classifier re-training): LDAM's margins and DRW's class weights
          exist to counter the imbalanced counts, which the balanced set does not have.
          Its row's ``loss`` names the loss the extractor was trained with.
        """
        r = [s.recipe for s in specs]
        retrain = [s.method == Method.CLASSIFIER_RETRAINING for s in specs]
        cosine = [s.head == Head.COSINE for s in specs]
        return cls(
            kinds=[Loss.CE if rt else s.loss for s, rt in zip(specs, retrain)],
            class_counts=class_counts,
            focal_gamma=[x.focal_gamma for x in r],
            ldam_max_margin=[x.ldam_max_margin * (x.ldam_scale if c else 1.0) for x, c in zip(r, cosine)],
            ldam_scale=[1.0 if c else x.ldam_scale for x, c in zip(r, cosine)],
            drw_beta=[x.drw_beta for x in r],
            drw_start_iter=[None if rt else x.drw_start_iter for x, rt in zip(r, retrain)],
        )

    def to(self, device: torch.device | str) -> "PackedLoss":
        """Move the per-member parameter tables to ``device``; returns self."""
        self.device = torch.device(device)
        for name in ("_gamma", "_margins", "_scale", "_start", "_weights"):
            setattr(self, name, getattr(self, name).to(self.device))
        self._cast = {}
        return self

    def _table(self, name: str, dtype: torch.dtype) -> Tensor:
        """A per-member table in the logits' dtype, cast once and cached."""
        key = (name, dtype)
        if key not in self._cast:
            self._cast[key] = getattr(self, name).to(dtype)
        return self._cast[key]

    @property
    def margins(self) -> Tensor:
        """LDAM margins [P, K] in use, float64 (0 for non-LDAM members)."""
        return self._margins

    @property
    def drw_weights(self) -> Tensor:
        """Class-balanced weights [P, K], float64, applied once a member's DRW has started."""
        return self._weights

    def __call__(self, logits: Tensor, targets: Tensor, iteration: int | Tensor) -> Tensor:
        p, k = self.num_members, self.num_classes
        if logits.ndim != 3 or logits.shape[0] != p or logits.shape[2] != k:
            raise ValueError(f"logits must be [{p}, B, {k}], got {tuple(logits.shape)}")
        if targets.shape != logits.shape[:2]:
            raise ValueError(f"targets must be {tuple(logits.shape[:2])}, got {tuple(targets.shape)}")
        if logits.device != self.device:
            self.to(logits.device)
        z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        y = targets.long().unsqueeze(-1)  # [P, B, 1]

        if self._any_ldam:
            # LDAM: z_y - m_y on the true class only, then scale all logits.
            # Non-LDAM members have m = 0 and s = 1, which leaves z exactly as is.
            m_y = self._table("_margins", z.dtype).gather(1, targets.long()).unsqueeze(-1)  # [P, B, 1]
            z = z.scatter_add(2, y, -m_y) * self._table("_scale", z.dtype)[:, None, None]

        logp_y = torch.log_softmax(z, dim=2).gather(2, y).squeeze(2)  # [P, B]
        per_sample = -logp_y
        if self._any_focal:
            # (1 - p_y)^gamma via expm1 for accuracy near p_y = 1; the clamp keeps
            # the pow's gradient finite when p_y rounds to exactly 1 (where CE = 0).
            one_minus_p = (-torch.expm1(logp_y)).clamp_min(torch.finfo(z.dtype).tiny)
            per_sample = one_minus_p.pow(self._table("_gamma", z.dtype)[:, None]) * per_sample

        plain = per_sample.mean(dim=1)
        if self._first_start is None or (isinstance(iteration, int) and iteration < self._first_start):
            return plain
        # DRW: per-sample class weights for members whose schedule has started, reduction
        # sum(w l) / sum(w); the others keep the plain mean, so a member's loss does not depend
        # on whether a packmate's DRW has started. ``iteration`` may be a device counter (a
        # CUDA graph's step), compared on the device: no host sync.
        active = self._start <= iteration  # [P]
        w = self._table("_weights", z.dtype).gather(1, targets.long())
        return torch.where(active, (w * per_sample).sum(dim=1) / w.sum(dim=1), plain)
