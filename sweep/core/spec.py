"""Trial specifications: the frozen, hashable description of one network.

Floor: sweep.core (what a study is; pure: imports sweep.core only, no torch, no store).

A ``TrialSpec`` is everything needed to train one network and to understand a
row of the results store without the grid file it came from. Specs are built
only by :func:`sweep.core.grid.expand`; their ids are hashes of their canonical JSON,
so the same grid point has the same id on any machine and in any order.

One trained network is evaluated in one or more ways (``Evaluation``): the raw
outputs, and for example the outputs divided by the class priors
(thresholding). ``network_id`` names the trained network, ``trial_id(e)`` one
evaluation of it; a row of the ``trials`` table is one evaluation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from functools import cached_property, lru_cache
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from sweep.core.catalog import DEFAULT_NORMALIZATION

ID_LENGTH = 16  # hex digits of sha256 kept in ids: 64 bits, no collisions at 10^6 specs


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


METHOD_ORDER = {m: i for i, m in enumerate(Method)}  # phase-1 methods before their dependents

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
    TEST = "test"  # best on the test set: Buda et al.'s CIFAR-10 procedure, on request only


class Normalization(StrEnum):
    """How input images are normalised (workers.transforms implements each)."""

    SCALE = "scale"  # x / 256: Caffe's LeNet example (Buda MNIST)
    STANDARDIZE = "standardize"  # per-channel mean and std of the training subset (Cao et al.)
    GCN_ZCA = "gcn_zca"  # global contrast normalisation + ZCA whitening (Buda CIFAR-10)


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


@dataclass(frozen=True)
class Recipe:
    """A training recipe; every field is applied by the worker."""

    iters: int  # optimiser steps, whatever the training-set size
    batch_size: int  # images per step, per network
    base_lr: float
    momentum: float
    weight_decay: float
    lr_policy: LrPolicy
    lr_gamma: float = 0.0  # inv: gamma; multistep: multiplier per milestone
    lr_power: float = 0.0  # inv: power
    lr_milestones: tuple[int, ...] = ()  # multistep: iterations
    warmup_iters: int = 0  # linear warm-up from 0 to the policy's value
    init: str = "xavier"  # xavier | kaiming: weights; biases always zero
    phase2_lr_factor: float = 0.1  # two-phase: phase 2 base lr = base_lr * this (Buda)
    drw_start_iter: int | None = None  # deferred re-weighting starts here (Cao et al.)
    drw_beta: float = 0.9999  # class-balanced weights (effective number of samples)
    focal_gamma: float = 1.0
    ldam_max_margin: float = 0.5
    ldam_scale: float = 30.0
    eval_every: int = 0  # iterations between curve points (0: final only)
    # Iterations between the points a best-state selection looks at when there are no curve
    # points (0: DEFAULT_SELECT_POINTS of them); grids in epochs set one epoch.
    select_every: int = 0
    checkpoint_every: int = 0  # iterations between pack checkpoints (0: none)
    validation_fraction: float = 0.0  # carved per class from the training subset
    # Learning rate of the conv/linear biases as a multiple of the weights' (Caffe's
    # ``lr_mult`` of the second parameter blob; its LeNet example uses 2). BatchNorm's
    # shift is not such a bias and keeps the base rate.
    bias_lr_factor: float = 1.0
    # None: the dataset's usual normalisation (sweep.core.catalog.DEFAULT_NORMALIZATION);
    # expansion writes the value into every spec, so a stored spec always names it.
    normalization: Normalization | None = None
    augmentation: Augmentation = Augmentation.NONE

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)


# Fields added after the first stored results, with the value they had implicitly before.
# Identity leaves a field out while it holds that value, so every network that existed
# before keeps its id (stores stay resumable) and a changed network gets a new one.
# ``normalization`` was chosen by the dataset's name before recipes named it: identity leaves
# it out while it equals the dataset's default (TrialSpec.identity).
RECIPE_FIELDS_ADDED: dict[str, Any] = {"bias_lr_factor": 1.0, "augmentation": "none", "normalization": None,
                                       "select_every": 0}
IMBALANCE_FIELDS_ADDED: dict[str, Any] = {"rounding": "nearest"}
SPEC_FIELDS_ADDED: dict[str, Any] = {"model_revision": 1, "head": "linear"}


@dataclass(frozen=True)
class Imbalance:
    kind: ImbalanceKind
    rho: float = 1.0  # majority/minority count ratio (max/min for linear, exponential)
    mu: float | None = None  # step only: fraction of classes that are minority
    # step: the minority labels; linear/exponential: labels from most to fewest examples
    classes: tuple[int, ...] = ()
    max_per_class: int | None = None  # each class first subsampled to at most this
    # linear / exponential counts from n_max * f(c): "nearest" integer, or "truncate" as
    # Cao et al.'s code does (int(); Dablain et al.'s published counts follow it).
    rounding: str = "nearest"

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)


@dataclass(frozen=True)
class TrialSpec:
    """One network to train (and the ways it is evaluated)."""

    dataset: str
    model: str
    recipe: Recipe
    imbalance: Imbalance
    method: Method
    repeat: int
    seed: int  # one per training set: shared by every method on it (paired comparisons)
    resample_ratio: float = 1.0  # imbalance left after re-sampling (1 = fully balanced)
    loss: Loss = Loss.CE
    lr_run: int = 0  # index of the repeat of one lr in an lr search
    selection: Selection = Selection.FINAL
    evaluations: tuple[Evaluation, ...] = (Evaluation.RAW,)
    latent: bool = False  # compute Dablain latent statistics (not part of the identity)
    embeddings: bool = False  # store raw FE vectors and W_C (not part of the identity)
    # Which version of the model's architecture (sweep.core.catalog.MODEL_REVISIONS): a
    # corrected architecture is a different network with a different id.
    model_revision: int = 1
    head: Head = Head.LINEAR
    # Not part of the identity: where the spec came from.
    grid: str = field(default="", compare=False)

    # -- identity -------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """Canonical content that defines this network (the grid name is provenance)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.pop("grid")
        # What is measured of a network does not change the network: evaluation variants,
        # latent statistics and raw embeddings are computed from the same trained weights.
        for measured in ("evaluations", "latent", "embeddings"):
            d.pop(measured)
        for name, old in SPEC_FIELDS_ADDED.items():
            if d[name] == old:
                d.pop(name)
        # Recipes and imbalances are shared by many specs: convert each once.
        d["recipe"], d["imbalance"] = _identity_of(self.recipe), _identity_of(self.imbalance)
        if self.recipe.normalization == DEFAULT_NORMALIZATION.get(self.dataset):
            d["recipe"] = {k: v for k, v in d["recipe"].items() if k != "normalization"}
        return _plain(d)

    @cached_property  # specs are frozen; ids are asked for often
    def network_id(self) -> str:
        return _hash(self.identity())

    def trial_id(self, evaluation: Evaluation) -> str:
        return _hash({"network": self.network_id, "evaluation": str(evaluation)})

    @cached_property  # specs are frozen; ids are asked for often
    def trial_ids(self) -> tuple[str, ...]:
        return tuple(self.trial_id(e) for e in self.evaluations)

    @cached_property  # specs are frozen; ids are asked for often
    def parent(self) -> "TrialSpec | None":
        """The phase-1 network this one starts from (two-phase, re-training)."""
        p1 = self.method.phase1
        if p1 is None:
            return None
        return dataclasses.replace(
            self, method=p1, evaluations=(Evaluation.RAW,), latent=False, embeddings=False
        )

    @cached_property  # specs are frozen; ids are asked for often
    def parent_id(self) -> str | None:
        p = self.parent
        return None if p is None else p.network_id

    @cached_property  # specs are frozen; ids are asked for often
    def training_set_key(self) -> str:
        """Networks with equal keys train on the same imbalanced subset."""
        return _hash({"dataset": self.dataset, "imbalance": _identity_of(self.imbalance),
                      "seed": self.seed, "validation": self.recipe.validation_fraction})

    @property
    def normalization(self) -> Normalization:
        """How this network's inputs are normalised: the recipe's choice, else the dataset's."""
        return Normalization(self.recipe.normalization or DEFAULT_NORMALIZATION[self.dataset])

    @property
    def pack_key(self) -> tuple[Any, ...]:
        """Specs with equal keys can be trained together in one process.

        Everything a pack applies to all its members at once is in the key: the data and
        architecture, the step count and batch, the initialisation scheme, and when it
        evaluates, selects and checkpoints. Per-member settings (lr and its schedule,
        momentum, weight decay, loss, sampling) are not.
        """
        r = self.recipe
        return (self.dataset, self.model, self.model_revision, str(self.head), r.batch_size, r.iters, r.init,
                str(self.selection), r.eval_every, r.select_every, r.checkpoint_every)

    def to_json(self) -> str:
        return canonical_json(_plain(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrialSpec":
        d = dict(d)
        r = dict(d.pop("recipe"))
        r["lr_policy"] = LrPolicy(r["lr_policy"])
        r["lr_milestones"] = tuple(r.get("lr_milestones", ()))
        if r.get("normalization") is not None:
            r["normalization"] = Normalization(r["normalization"])
        r["augmentation"] = Augmentation(r.get("augmentation", "none"))
        im = dict(d.pop("imbalance"))
        im["kind"] = ImbalanceKind(im["kind"])
        im["classes"] = tuple(im.get("classes", ()))
        return cls(
            recipe=Recipe(**r),
            imbalance=Imbalance(**im),
            method=Method(d.pop("method")),
            loss=Loss(d.pop("loss", "ce")),
            head=Head(d.pop("head", "linear")),
            selection=Selection(d.pop("selection", "final")),
            evaluations=tuple(Evaluation(e) for e in d.pop("evaluations", ("raw",))),
            **d,
        )

    @classmethod
    def from_json(cls, s: str) -> "TrialSpec":
        return cls.from_dict(json.loads(s))


def _plain(obj: Any) -> Any:
    """Dataclasses/enums/tuples to JSON-able builtins, recursively."""
    if isinstance(obj, StrEnum):
        return str(obj)
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, float):
        # 10 and 10.0 must hash the same: a grid may write either.
        return int(obj) if obj.is_integer() else obj
    if isinstance(obj, (list, tuple)):
        return [_plain(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    raise TypeError(f"cannot canonicalise {type(obj).__name__}")


@lru_cache(maxsize=4096)
def _identity_of(obj: Recipe | Imbalance) -> dict[str, Any]:
    """A recipe or imbalance as identity sees it: fields added later are left out at their
    old value."""
    added = RECIPE_FIELDS_ADDED if isinstance(obj, Recipe) else IMBALANCE_FIELDS_ADDED
    d = dict(_plain(obj))
    for name, old in added.items():
        if getattr(obj, name) == old:
            d.pop(name)
    return d


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _hash(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:ID_LENGTH]


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any JSON-able parts: stable across machines and processes."""
    digest = hashlib.sha256(canonical_json(_plain(list(parts))).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
