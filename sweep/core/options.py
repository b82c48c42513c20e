"""The options a grid can name: enums of imbalance kinds, methods, losses, schedules, ...

Floor: sweep.core (what a study is; pure: imports nothing of the project, no torch, no store).

Each option is a ``StrEnum``, so an unknown value raises a ValueError naming it, and a
value is stored as its plain string. ``sweep.core.spec`` re-exports them all.
"""

from __future__ import annotations

from enum import StrEnum


class ImbalanceKind(StrEnum):
    NONE = "none"  # the dataset as given, each class capped at max_per_class
    STEP = "step"  # Buda et al.: mu = fraction of minority classes, rho = majority/minority
    LINEAR = "linear"  # Buda et al.: counts linear between n_max and n_max/rho
    EXPONENTIAL = "exponential"  # Cao et al. / Dablain et al.: n_c = n_max * rho^(-c/(C-1))


class Method(StrEnum):
    BASELINE = "baseline"
    OVERSAMPLING = "oversampling"
    UNDERSAMPLING = "undersampling"
    TWO_PHASE_OVER = "two_phase_over"  # phase 1 = the oversampling network
    TWO_PHASE_UNDER = "two_phase_under"  # phase 1 = the undersampling network
    CLASSIFIER_RETRAINING = "classifier_retraining"  # Dablain RQ1: retrain W_C on balanced FE

    @property
    def phase1(self) -> "Method | None":
        """The method whose trained network this one starts from, if any."""
        return _PHASE1.get(self)

    @property
    def sampling(self) -> "Method":
        """Which re-sampling of the training set this method trains on."""
        return _SAMPLING.get(self, self)

    @property
    def resamples(self) -> bool:
        """Whether this method trains on a re-sampled stream of the imbalanced set (the one
        list of re-sampling methods: grids, the workers and the analysis ask here)."""
        return self in _RESAMPLING

    @property
    def takes_resample_ratio(self) -> bool:
        """Whether a grid's ``resample_ratios`` apply: the method re-samples, or starts from a
        network that did (two-phase training); every other method keeps ratio 1."""
        return self.resamples or (self.phase1 is not None and self.phase1.resamples)


    @property
    def revision(self) -> int:
        """Which version of this method's procedure the workers run (1 when never revised).

        A changed procedure trains different weights, so it is a different network with a
        different id (TrialSpec.method_revision). classifier_retraining 2: W_C re-trained on
        a balanced set disjoint from the validation split, with plain cross-entropy
        (revision 1 drew the balanced set from every image and kept the network's loss).
        """
        return METHOD_REVISIONS.get(self, 1)


METHOD_ORDER = {m: i for i, m in enumerate(Method)}  # phase-1 methods before their dependents

METHOD_REVISIONS: dict[Method, int] = {Method.CLASSIFIER_RETRAINING: 2}
_RESAMPLING = frozenset({Method.OVERSAMPLING, Method.UNDERSAMPLING})
_PHASE1 = {
    Method.TWO_PHASE_OVER: Method.OVERSAMPLING,
    Method.TWO_PHASE_UNDER: Method.UNDERSAMPLING,
    Method.CLASSIFIER_RETRAINING: Method.BASELINE,
}
# Two-phase phase 2 and classifier re-training train on the original imbalanced set
# (retraining on balanced FE is a different sampler; see workers.samplers).
_SAMPLING = {
    Method.TWO_PHASE_OVER: Method.BASELINE,
    Method.TWO_PHASE_UNDER: Method.BASELINE,
    Method.CLASSIFIER_RETRAINING: Method.CLASSIFIER_RETRAINING,
}


class Evaluation(StrEnum):
    RAW = "raw"
    THRESHOLD = "threshold"  # outputs divided by the imbalanced training set's class priors


class Loss(StrEnum):
    CE = "ce"
    FOCAL = "focal"
    LDAM = "ldam"


class LrPolicy(StrEnum):
    INV = "inv"  # Caffe: base * (1 + gamma*t)^-power
    MULTISTEP = "multistep"  # base * gamma^(number of milestones passed)
    LINEAR = "linear"  # base * (1 - t/iters): Buda's ImageNet recipe
    CONSTANT = "constant"


class Selection(StrEnum):
    """How the reported evaluation point / lr-search winner is chosen."""

    FINAL = "final"  # the network after the last iteration
    VALIDATION = "validation"  # best by balanced accuracy on a validation split
    # Best on the test set, on request only: close to Buda et al.'s CIFAR-10 procedure (they
    # took the best of all runs and snapshots on the test set; grids/buda_cifar10.yaml).
    TEST = "test"


class LrScheduler(StrEnum):
    """How a grid's learning-rate search spends its iterations (the grid key ``lr_search``)."""

    # Every candidate trains to the end: Buda et al.'s procedure, and the default.
    FULL = "full"
    # Successive halving: at each rung the best 1/reduction of each (training set, method)
    # group's candidates go on, the rest stop (inside a pack; Ray Tune's ASHA across trials).
    HALVING = "halving"


class RungMetric(StrEnum):
    """What a rung ranks the candidates by, measured on the grid's selection split."""

    BALANCED_ACCURACY = "balanced_accuracy"
    ACCURACY = "accuracy"
    LOSS = "loss"  # mean cross-entropy

    @property
    def mode(self) -> "RungMode":
        """Which way is better: accuracies are maximised, the loss minimised."""
        return RungMode.MIN if self == RungMetric.LOSS else RungMode.MAX


class RungMode(StrEnum):
    """Ray Tune's ``mode``: whether a higher or a lower metric is better."""

    MAX = "max"
    MIN = "min"


class Normalization(StrEnum):
    """How input images are normalised (workers.transforms implements each)."""

    SCALE = "scale"  # x / 256: Caffe's LeNet example (Buda MNIST)
    STANDARDIZE = "standardize"  # per-channel mean and std of the training subset (Cao et al.)
    GCN_ZCA = "gcn_zca"  # global contrast normalisation + ZCA whitening (Buda CIFAR-10)
    # Pixel values 0..255 as floats, nothing subtracted or scaled: Buda's ImageNet regime ("the
    # only data preprocessing applied is resizing"; Caffe's ImageData layer with no mean or scale
    # in its transform_param, as in the ResNet-10 reference, cvjena/cnn-models ResNet10_cvgj).
    RAW = "raw"


class Augmentation(StrEnum):
    """Random changes of each training image, drawn per network (workers.augment)."""

    NONE = "none"  # Buda et al.: no augmentation
    # Cao et al.'s CIFAR regime (Dablain et al.): zero-pad 4 pixels on each side, take a
    # random crop of the original size, flip horizontally with probability 1/2.
    CROP_FLIP = "crop_flip"
    # The same crop without the mirror, for digits (SVHN): a mirrored 2, 3, 4, 5, 7 or 9 is
    # another symbol or none. Neither Dablain et al. nor Cao et al.'s code (CIFAR only) gives
    # an SVHN transform; the crop is kept from Cao's regime, the flip dropped
    # (sweep.core.catalog.NOT_MIRRORED).
    CROP = "crop"
    # Buda et al.'s ImageNet regime (Sec. 3.3.3) on images streamed from JPEG folders
    # (workers.jpeg_folder): each image resized so that its shorter side is 256 px (aspect
    # kept), a random 224x224 square cut from it and mirrored with probability 1/2 (Caffe's
    # transform_param crop_size: 224, mirror: true); the test images get one centred crop.
    # Only for datasets streamed from JPEGs (sweep.core.catalog.STREAMED).
    RESIZE_CROP_FLIP = "resize_crop_flip"


class Head(StrEnum):
    """The layer that turns the features FE into logits."""

    LINEAR = "linear"  # logits = FE @ W_C + b
    # Cao et al.'s NormedLinear, built whenever the loss is LDAM: logits = s * cos(FE, W_C[:, c])
    # with the recipe's ldam_scale s, so they lie in [-s, s]; no bias.
    COSINE = "cosine"


class MinorityChoice(StrEnum):
    RANDOM = "random"  # redrawn for every repeat (Buda MNIST)
    LOWEST = "lowest"  # the lowest labels (Buda CIFAR-10)
    HIGHEST = "highest"  # the highest labels (Cao et al.'s CIFAR-10-LT order, used by Dablain)
