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

Identity follows what determines the weights, and the rule is written once: every field
of TrialSpec, Recipe and Imbalance has a :class:`FieldRole` in :data:`FIELD_ROLES`
(training-relevant, evaluation-only, bookkeeping). The network id, the parent network,
the training-set key and the :class:`PackKey` are all read off it or beside it here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property, lru_cache
from typing import Any

from sweep.core.catalog import DEFAULT_NORMALIZATION
from sweep.core.lr_search import LrSearch
from sweep.core.options import (  # re-exported: specs and grids name them from here
    METHOD_ORDER,
    METHOD_REVISIONS,
    Augmentation,
    Evaluation,
    Head,
    ImbalanceKind,
    Loss,
    LrPolicy,
    Method,
    MinorityChoice,
    Normalization,
    Selection,
)

__all__ = [
    # the options (sweep.core.options), named from here by most of the house
    "METHOD_ORDER", "METHOD_REVISIONS", "Augmentation", "Evaluation", "Head", "ImbalanceKind", "Loss", "LrPolicy",
    "Method", "MinorityChoice", "Normalization", "Selection",
    # the specs and their identity
    "FIELD_ROLES", "ID_KEPT", "ID_PINNED", "FieldRole", "Imbalance", "LrSearch", "PackKey", "Recipe", "TrialSpec",
    "canonical_json", "derive_seed",
]

ID_LENGTH = 16  # hex digits of sha256 kept in ids: 64 bits, no collisions at 10^6 specs


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
SPEC_FIELDS_ADDED: dict[str, Any] = {"model_revision": 1, "head": "linear", "data_seed": None,
                                     "method_revision": 1, "lr_search": None}


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
    """One network to train (and the ways it is evaluated).

    Which fields make the network (and so its id) is written once, in :data:`FIELD_ROLES`.
    """

    dataset: str
    model: str
    recipe: Recipe
    imbalance: Imbalance
    method: Method
    repeat: int
    # The network seed: its initial weights. One per training set, shared by every method on
    # it (paired comparisons); it also draws the training subset unless data_seed is set.
    seed: int
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
    # The seed of the imbalanced training subset (and its validation split) when it is not
    # the network seed: the runs of one lr in an lr search share their data and differ in
    # their initial weights ("on the same dataset", Buda et al.). None: ``seed`` draws both.
    data_seed: int | None = None
    # Which version of the method's procedure (Method.revision): a changed procedure is a
    # different network with a different id.
    method_revision: int = 1
    # Early stopping of its lr search (sweep.core.lr_search); None: the full search.
    lr_search: LrSearch | None = None
    # Not part of the identity: where the spec came from.
    grid: str = field(default="", compare=False)

    # -- identity -------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """Canonical content that defines this network: its TRAINING fields (FIELD_ROLES)."""
        d = {name: getattr(self, name) for name, role in FIELD_ROLES[TrialSpec].items()
             if role == FieldRole.TRAINING and name not in ("recipe", "imbalance")}
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
        """One evaluation of the network: the network and nothing else but the evaluation."""
        return _hash({"network": self.network_id, "evaluation": str(evaluation)})

    @cached_property  # specs are frozen; ids are asked for often
    def trial_ids(self) -> tuple[str, ...]:
        return tuple(self.trial_id(e) for e in self.evaluations)

    @cached_property  # specs are frozen; ids are asked for often
    def parent(self) -> "TrialSpec | None":
        """The phase-1 network this one starts from (two-phase, re-training), measured the
        plainest way: every EVALUATION field of the spec at its default."""
        p1 = self.method.phase1
        if p1 is None:
            return None
        return dataclasses.replace(self, method=p1, method_revision=p1.revision, **_EVALUATION_DEFAULTS)

    @cached_property  # specs are frozen; ids are asked for often
    def parent_id(self) -> str | None:
        p = self.parent
        return None if p is None else p.network_id

    @property
    def training_set_seed(self) -> int:
        """The seed that draws the imbalanced training subset and its validation split."""
        return self.seed if self.data_seed is None else self.data_seed

    @cached_property  # specs are frozen; ids are asked for often
    def training_set_key(self) -> str:
        """Networks with equal keys train on the same imbalanced subset: what draws the
        subset and nothing else (the dataset, the imbalance, the data seed, the split)."""
        return _hash({"dataset": self.dataset, "imbalance": _identity_of(self.imbalance),
                      "seed": self.training_set_seed, "validation": self.recipe.validation_fraction})

    @cached_property  # specs are frozen; ids are asked for often
    def stream_id(self) -> str:
        """What seeds the random streams (batches, re-sampling, dropout, crop/flip): the id in the
        full search, so an early-stopped search's candidate has the full search's numbers."""
        return self.network_id if self.lr_search is None else dataclasses.replace(self, lr_search=None).network_id

    @cached_property  # specs are frozen; ids are asked for often
    def search_group(self) -> str:
        """Equal for the candidates of one lr search: all but the base lr, the run and its seed."""
        d = {k: v for k, v in self.identity().items() if k not in ("lr_run", "seed")}
        d["recipe"] = {k: v for k, v in d["recipe"].items() if k != "base_lr"}
        return _hash({**d, "training_set": self.training_set_key})

    @property
    def normalization(self) -> Normalization:
        """How this network's inputs are normalised: the recipe's choice, else the dataset's."""
        return Normalization(self.recipe.normalization or DEFAULT_NORMALIZATION[self.dataset])

    @cached_property  # specs are frozen; ids are asked for often
    def pack_key(self) -> "PackKey":
        """Specs with equal keys can be trained together in one process (PackKey)."""
        return PackKey.of(self)

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
            lr_search=LrSearch.from_dict(d.pop("lr_search", None)),
            **d,
        )

    @classmethod
    def from_json(cls, s: str) -> "TrialSpec":
        return cls.from_dict(json.loads(s))


class FieldRole(StrEnum):
    """What a spec field is to the network it describes (FIELD_ROLES classifies each)."""

    TRAINING = "training"  # determines the trained (or the reported) weights: in the network id
    EVALUATION = "evaluation"  # what is measured of the weights, and when: not in the id
    BOOKKEEPING = "bookkeeping"  # how a run is carried out, or where a spec came from: not in the id


_T, _E, _B = FieldRole.TRAINING, FieldRole.EVALUATION, FieldRole.BOOKKEEPING
# Every field of the three spec dataclasses, once: identity, the parent network and the
# tests read this table (tests/test_identity.py fails on a field it does not classify).
FIELD_ROLES: dict[type, dict[str, FieldRole]] = {
    TrialSpec: {
        "dataset": _T, "model": _T, "recipe": _T, "imbalance": _T, "method": _T, "repeat": _T, "seed": _T,
        "resample_ratio": _T, "loss": _T, "lr_run": _T,
        "selection": _T,  # which state is reported: the final one or the best of the selection points
        "evaluations": _E, "latent": _E, "embeddings": _E,
        "model_revision": _T, "head": _T, "data_seed": _T, "method_revision": _T,
        "lr_search": _T,  # a stopped network reports its state at its rung: it depends on the search
        "grid": _B,
    },
    Recipe: {
        "iters": _T, "batch_size": _T, "base_lr": _T, "momentum": _T, "weight_decay": _T, "lr_policy": _T,
        "lr_gamma": _T, "lr_power": _T, "lr_milestones": _T, "warmup_iters": _T, "init": _T,
        "phase2_lr_factor": _T, "drw_start_iter": _T, "drw_beta": _T, "focal_gamma": _T,
        "ldam_max_margin": _T, "ldam_scale": _T,
        "eval_every": _E,  # curve points: evaluated between steps, the steps do not change
        "select_every": _T,  # the points a selection picks the reported state from
        "checkpoint_every": _B,
        "validation_fraction": _T, "bias_lr_factor": _T, "normalization": _T, "augmentation": _T,
    },
    Imbalance: {"kind": _T, "rho": _T, "mu": _T, "classes": _T, "max_per_class": _T, "rounding": _T},
}
# Non-TRAINING fields that were part of ids before identity followed FIELD_ROLES. Identity
# still writes them so that stored networks keep their ids: ``eval_every`` at the value
# every curve-less network had (so a grid asking for curves trains the same networks), and
# ``checkpoint_every`` at its value (the presets' 5,000 and 10,000 are in stored ids;
# changing it only costs a retraining).
ID_PINNED: dict[str, Any] = {"eval_every": 0}
ID_KEPT: frozenset[str] = frozenset({"checkpoint_every"})
# A phase-1 parent is measured the plainest way, whatever its dependent asks for.
_EVALUATION_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in dataclasses.fields(TrialSpec) if FIELD_ROLES[TrialSpec][f.name] == _E}


@dataclass(frozen=True)
class PackKey:
    """What a pack applies to all its members at once; specs with equal keys can be trained
    together in one process.

    The data and architecture, the step count and batch, the initialisation scheme, and
    when the pack evaluates, selects and checkpoints. Per-member settings (lr and its
    schedule, momentum, weight decay, loss, sampling, seeds) are not in it.
    """

    dataset: str
    model: str
    model_revision: int
    head: str
    batch_size: int
    iters: int
    init: str
    selection: str
    eval_every: int
    select_every: int
    checkpoint_every: int
    lr_search: str | None = None  # the search's canonical JSON: a pack halves its candidates one way

    @classmethod
    def of(cls, spec: TrialSpec) -> "PackKey":
        r = spec.recipe
        return cls(spec.dataset, spec.model, spec.model_revision, str(spec.head), r.batch_size, r.iters, r.init,
                   str(spec.selection), r.eval_every, r.select_every, r.checkpoint_every,
                   None if spec.lr_search is None else canonical_json(spec.lr_search.to_dict()))

    @property
    def sort_key(self) -> str:
        """Packs are planned in this order (the order of the positional key it replaced)."""
        return repr(dataclasses.astuple(self))


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
    """A recipe or imbalance as identity sees it: its TRAINING fields (FIELD_ROLES), those
    added later left out at their old value, and the ID_PINNED / ID_KEPT fields of ids before."""
    roles = FIELD_ROLES[type(obj)]
    added = RECIPE_FIELDS_ADDED if isinstance(obj, Recipe) else IMBALANCE_FIELDS_ADDED
    d = {}
    for name, value in _plain(obj).items():
        if name in ID_PINNED:
            d[name] = _plain(ID_PINNED[name])
        elif roles[name] == FieldRole.TRAINING or name in ID_KEPT:
            if not (name in added and getattr(obj, name) == added[name]):
                d[name] = value
    return d


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _hash(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:ID_LENGTH]


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any JSON-able parts: stable across machines and processes."""
    digest = hashlib.sha256(canonical_json(_plain(list(parts))).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
