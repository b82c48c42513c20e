"""A pack run's phases and how much of its work each one is: an honest progress fraction.

Floor: workers (imports workers.stages' plans and sweep.core only; no torch).

A pack loads its data, then for each stage trains, evaluates and (when a member asks)
computes latent statistics, then writes its rows. Counting training iterations alone
said 83 % with "35 s left" for the demo's packs, which then spent 6.5 minutes on latent
statistics: each of their members runs its whole training subset (about 33,000 images)
and the test set (10,000) through the network once more, against 300 x 64 = 19,200
training images. So every phase is weighed in one unit, **image-equivalents per
member**: one image through one training step (forward, backward, update) is 1.

The costs of the other phases are an estimate, measured once with LeNet-5 on real MNIST
on a 2-core CPU (2026-12, ``train_seconds``, ``eval_seconds`` and ``latent_seconds`` of
the rows, per image): a test image through prediction and the metrics costs about 0.7 of
a training image, an image through the latent statistics (a full-precision forward pass
plus the per-instance rankings) about 1.0, and a training image of a stage that trains
the head only about 0.4 (the body runs forward only). Other models and GPUs shift these
ratios; the fraction stays monotone and reaches 1 only once the rows are written, and a
wrong ratio only makes the estimate of time left less exact. Loading the data and
writing the rows are not counted in images: they get fixed shares of the pack
(:data:`LOAD_SHARE`, :data:`WRITE_SHARE`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from sweep.core.spec import Selection
from workers.stages import StagePlan

TRAIN_IMAGE_COST = 1.0  # one image through a training step: the unit
HEAD_ONLY_IMAGE_COST = 0.4  # a stage-2 step: full forward, backward through the head only
EVAL_IMAGE_COST = 0.7  # one image through prediction and the metrics (measured, module doc)
LATENT_IMAGE_COST = 1.0  # one image through the full-precision pass and Dablain's statistics
LOAD_SHARE = 0.01  # of the pack, before its first stage
WRITE_SHARE = 0.02  # of the pack, for its rows and the atomic write


class Phase(StrEnum):
    """What a pack is doing; the value is what progress bars and logs print."""

    LOADING = "loading data"
    TRAINING = "training"
    TRAINING_FROM_PHASE1 = "training (from phase-1 networks)"
    EVALUATING = "evaluating"
    LATENT = "latent statistics"
    WRITING = "writing"

    @classmethod
    def training(cls, stage: int) -> "Phase":
        return cls.TRAINING if stage == 1 else cls.TRAINING_FROM_PHASE1


@dataclass(frozen=True)
class Segment:
    """One phase of one stage and its weight (image-equivalents per member, summed)."""

    phase: Phase
    stage: int
    units: float
    iters: int = 0  # training segments: the stage's iterations


@dataclass(frozen=True)
class PackWork:
    """The stages' phases in the order they run, each with its expected share of the work."""

    segments: tuple[Segment, ...]

    @property
    def iters_total(self) -> int:
        return sum(s.iters for s in self.segments)

    def iters_before(self, stage: int) -> int:
        """Training iterations of the stages before ``stage``."""
        return sum(s.iters for s in self.segments if s.stage < stage)

    def fraction(self, phase: Phase, stage: int = 0, within: float = 0.0) -> float:
        """The fraction of the pack done when ``phase`` of ``stage`` is ``within`` (0..1) done.

        Loading starts at 0, the stages share what the fixed loading and writing shares
        leave, writing starts at ``1 - WRITE_SHARE``: 1 is the pack written, nothing less.
        """
        if phase == Phase.LOADING:
            return LOAD_SHARE * within
        if phase == Phase.WRITING:
            return 1.0 - WRITE_SHARE
        total = sum(s.units for s in self.segments)
        before = 0.0
        for s in self.segments:
            if (s.phase, s.stage) == (phase, stage):
                share = (before + s.units * min(max(within, 0.0), 1.0)) / total if total > 0 else 0.0
                return LOAD_SHARE + (1.0 - LOAD_SHARE - WRITE_SHARE) * share
            before += s.units
        raise ValueError(f"pack work has no phase {phase.value!r} in stage {stage}")


def estimate_work(stages: Sequence[StagePlan], subset_images: Mapping[str, int], test_images: int,
                  curve_train_images: int) -> PackWork:
    """The segments of a pack's stages, weighed as the module doc says.

    ``subset_images``: network id -> size of its imbalanced training subset (what latent
    statistics run over, with the test set); ``curve_train_images``: the most training
    images a learning-curve point evaluates per member. Evaluation points during training
    (curves, best-state selection) count towards training; a selection on a validation
    split is counted as if on the test set (the estimate needs no validation sizes).
    """
    segments: list[Segment] = []
    for plan in stages:
        members = len(plan.specs)
        step = HEAD_ONLY_IMAGE_COST if plan.head_only else TRAIN_IMAGE_COST
        train = plan.iters * plan.batch_size * members * step
        if plan.eval_every and (plan.curves or plan.selection != Selection.FINAL):
            per_point = test_images + (min(curve_train_images, max(subset_images.values(), default=0))
                                       if plan.curves else 0)
            train += plan.iters // plan.eval_every * members * per_point * EVAL_IMAGE_COST
        segments.append(Segment(Phase.training(plan.number), plan.number, train, plan.iters))
        segments.append(Segment(Phase.EVALUATING, plan.number, members * test_images * EVAL_IMAGE_COST))
        latent = [s for s in plan.specs if s.latent or s.embeddings]
        if latent:
            images = sum(subset_images.get(s.network_id, 0) + test_images for s in latent)
            segments.append(Segment(Phase.LATENT, plan.number, images * LATENT_IMAGE_COST))
    return PackWork(tuple(segments))
