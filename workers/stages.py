"""The stages of a pack, planned from its specs alone: which networks train together,
how, and when they are evaluated. Pure: no torch, no data.

Floor: workers (imports sweep.core only here). A pack has up to two stages:

1. every network that starts from scratch (baseline, over-/under-sampling, ...);
2. networks that start from a stage-1 network (two-phase phase 2, classifier
   re-training): the body is copied from the parent and frozen, only the head trains,
   at the parent's base lr times ``phase2_lr_factor``.

How the frozen body runs (:attr:`StagePlan.body_train`):

* two-phase phase 2 (Buda et al., Caffe): the frozen layers are Caffe layers with
  ``lr_mult: 0`` in a TRAIN-phase net, so they run as in training: dropout keeps drawing
  masks, and BatchNorm (``use_global_stats`` defaults to false in TRAIN) normalises with
  the batch's statistics and keeps updating its running mean and variance, which are not
  learned by the solver at all (Caffe's BatchNorm blobs are moving averages written in the
  forward pass whatever their lr_mult). Only the parameters stay fixed.
* classifier re-training (Dablain et al. RQ1): W_C is re-trained on the features "extracted
  using imbalanced extraction layers": the extractor is a fixed function, so the body runs
  in eval mode (no dropout, BatchNorm on its stored running statistics, unchanged).

A pack holding both kinds runs them as two head-only stages, two-phase phase 2 first
(stage 2) and re-training after it (stage 3): a stage has one module-wide mode, and both
start from stage 1's networks only. A stage plan given both kinds by hand is refused.

Which stage-2 networks really run is decided after stage 1 (a diverged parent fails its
dependents); the settings are decided here.
"""

from __future__ import annotations

from dataclasses import dataclass

from sweep.core.plan import Pack
from sweep.core.spec import Method, Selection, TrialSpec

DEFAULT_SELECT_POINTS = 20  # evaluation points when a selection needs them and none are set


@dataclass(frozen=True)
class StagePlan:
    number: int  # 1: from scratch; 2: from a stage-1 parent
    specs: tuple[TrialSpec, ...]
    head_only: bool  # body frozen (parameters fixed), only the head trains
    lr_factors: tuple[float, ...]  # per member: multiplies the recipe's base lr
    iters: int
    batch_size: int
    selection: Selection  # which state a member reports: final, best on validation, best on test
    eval_every: int  # iterations between curve points (the recipe's; 0: no curves)
    curves: bool  # record learning curves (the recipe's eval_every > 0)
    # Iterations between the points a selection picks its state from (0: none). Never the
    # curve points: asking for curves must not change which state a network reports, so
    # curves stay out of its identity (sweep.core.spec.FIELD_ROLES).
    select_every: int
    checkpoint_every: int  # iterations between pack checkpoints (0: none)
    # head_only stages: run the frozen body in training mode (two-phase phase 2, Caffe's
    # TRAIN phase) rather than eval mode (classifier re-training); see the module doc.
    body_train: bool = False

    @property
    def base_lrs(self) -> list[float]:
        return [s.recipe.base_lr * f for s, f in zip(self.specs, self.lr_factors)]


def plan_stages(pack: Pack) -> list[StagePlan]:
    """The pack's stages in the order they run: stage 1 trains the networks that start from
    nothing; then one head-only stage per frozen-body mode (two-phase phase 2, then classifier
    re-training), numbered on from 2. Any of them may be absent."""
    trained = tuple(s for s in pack.specs if s.parent is None)
    two_phase = tuple(s for s in pack.specs if s.parent is not None and s.method != Method.CLASSIFIER_RETRAINING)
    retraining = tuple(s for s in pack.specs if s.method == Method.CLASSIFIER_RETRAINING)
    plans = [stage_plan(1, trained)] if trained else []
    head_only = [specs for specs in (two_phase, retraining) if specs]
    return plans + [stage_plan(number, specs) for number, specs in enumerate(head_only, start=2)]


def stage_plan(number: int, specs: tuple[TrialSpec, ...]) -> StagePlan:
    """One stage's settings; every pack-wide setting is part of the specs' pack key."""
    r = specs[0].recipe
    selection = specs[0].selection
    select_every = 0
    if selection != Selection.FINAL:
        select_every = r.select_every or max(1, r.iters // DEFAULT_SELECT_POINTS)
    head_only = number >= 2
    body_train = False
    if head_only:
        retrain = {s.method == Method.CLASSIFIER_RETRAINING for s in specs}
        if len(retrain) > 1:
            raise ValueError(f"stage {number} mixes classifier re-training (frozen body in eval mode) with "
                             "two-phase phase 2 (frozen body in training mode, as Caffe): plan_stages gives "
                             "each its own stage")
        body_train = not retrain.pop()
    return StagePlan(
        number=number, specs=specs, head_only=head_only,
        lr_factors=tuple(s.recipe.phase2_lr_factor if head_only else 1.0 for s in specs),
        iters=r.iters, batch_size=r.batch_size, selection=selection, eval_every=r.eval_every,
        curves=r.eval_every > 0, select_every=select_every, checkpoint_every=r.checkpoint_every,
        body_train=body_train,
    )
