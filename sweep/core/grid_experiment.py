"""One experiment block of a grid file: read, checked, and expanded into TrialSpecs.

Floor: sweep.core (what a study is; pure: imports sweep.core only, no torch, no store).

:func:`expand_experiment` reads the block in small named steps (data, methods, the lr
search, what the model allows), counts its networks before building any, then builds
them one training set at a time.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from sweep.core.catalog import (
    DATASETS,
    DEFAULT_NORMALIZATION,
    MODELS,
    NO_LINEAR_HEAD,
    NOT_MIRRORED,
    STREAMED,
    DatasetInfo,
    model_revision,
)
from sweep.core.counts import catalog_majority_count
from sweep.core.grid_checks import (
    BOUNDS,
    MAX_ITERS,
    MAX_NETWORKS_ENV,
    _choice,
    _choices,
    _Errors,
    _int,
    _list,
    _num,
    bounded,
    show,
)
from sweep.core.grid_recipe import recipe_of
from sweep.core.lr_search import LrSearchRequest, read_lr_search
from sweep.core.recipes import epochs_to_iters, iters_per_epoch
from sweep.core.spec import (
    Augmentation,
    Evaluation,
    Head,
    Imbalance,
    ImbalanceKind,
    Loss,
    LrSearch,
    Method,
    MinorityChoice,
    Normalization,
    Recipe,
    Selection,
    TrialSpec,
    derive_seed,
)

IMBALANCE_PARAMS = {
    ImbalanceKind.STEP: {"rho", "mu"},
    ImbalanceKind.LINEAR: {"rho"},
    ImbalanceKind.EXPONENTIAL: {"rho"},
    ImbalanceKind.NONE: set(),
}
DEFAULT_THRESHOLDED = (Method.BASELINE, Method.OVERSAMPLING, Method.UNDERSAMPLING)


@dataclass(frozen=True)
class _Experiment:
    """One experiment block, read and checked: everything its specs are built from."""

    dataset: str
    model: str
    revision: int  # the model's architecture revision
    recipe: Recipe  # before any epochs conversion, the lr not yet searched
    max_per_class: int
    minority: MinorityChoice
    imbalances: tuple[tuple[ImbalanceKind, float, float | None], ...]
    methods: tuple[Method, ...]
    thresholded: frozenset[Method]
    ratios: tuple[float, ...]
    losses: tuple[Loss, ...]
    ldam_head: Head
    lrs: tuple[float, ...]
    lr_runs: int
    selection: Selection
    lr_search: LrSearchRequest | None  # None: the full search (every candidate to the end)
    repeats: int
    latent: bool
    embeddings: int  # networks whose raw FE are stored
    epochs: float | None  # the budget in epochs, when the block gives one

    @property
    def info(self) -> DatasetInfo:
        return DATASETS[self.dataset]

    def ratios_of(self, method: Method) -> tuple[float, ...]:
        return self.ratios if method.takes_resample_ratio else (1.0,)

    @property
    def network_count(self) -> int:
        per_set = len(self.losses) * len(self.lrs) * self.lr_runs * sum(len(self.ratios_of(m)) for m in self.methods)
        return len(self.imbalances) * self.repeats * per_set


def expand_experiment(
    err: "_Errors", p: str, cfg: dict[str, Any], grid_seed: int, grid_name: str, index: int,
    already: int = 0, max_networks: int = 10**6,
) -> list[TrialSpec]:
    """One experiment block's specs: read it, count it, then one training set at a time."""
    exp = _read_experiment(err, p, cfg)
    # Counted before any spec is built: a grid of millions is refused in milliseconds.
    if exp.network_count + already > max_networks:
        raise err(p + "repeats", f"the grid trains at least {exp.network_count + already:,} networks, more than "
                  f"the limit of {max_networks:,}", f"fewer values, or raise the limit with {MAX_NETWORKS_ENV}")
    specs: list[TrialSpec] = []
    for kind, rho, mu in exp.imbalances:
        for repeat in range(exp.repeats):
            imb, set_seed = _training_set(exp, grid_seed, kind, rho, mu, repeat)
            recipe = _recipe_for_set(err, p, exp, imb)
            search = (None if exp.lr_search is None
                      else exp.lr_search.for_iters(err, p, recipe.iters, len(exp.lrs) * exp.lr_runs))
            specs.extend(_networks_on_set(exp, imb, recipe, repeat, set_seed, grid_name, search))
    return _with_embeddings(specs, exp.embeddings)


def _read_experiment(err: "_Errors", p: str, cfg: dict[str, Any]) -> _Experiment:
    """Every key of the block, checked in the order a reader meets them."""
    dataset, model, recipe, max_per_class, minority = _read_data(err, p, cfg)
    methods, thresholded, ratios, losses, ldam_head = _read_methods(err, p, cfg)
    lrs, lr_runs, selection, repeats = _read_search(err, p, cfg, recipe)
    lr_search = read_lr_search(err, p, cfg, len(lrs) * lr_runs, selection)
    if selection == Selection.VALIDATION and recipe.validation_fraction == 0:
        recipe = dataclasses.replace(recipe, validation_fraction=0.1)
    latent = cfg.get("latent", False)
    if not isinstance(latent, bool):  # bool("no") is True
        raise err(p + "latent", f"bad value {show(latent)}", "true, false")
    n_embed = _int(err, cfg, "embeddings", 0, p)
    bounded(err, p + "embeddings", n_embed, BOUNDS["embeddings"])
    revision = model_revision(model, dataset)
    recipe = _check_model_and_recipe(err, p, cfg, dataset, model, revision, recipe, losses, ldam_head,
                                     latent or bool(n_embed))
    imbalances = _imbalances(err, cfg.get("imbalance"), p, DATASETS[dataset].num_classes)
    epochs = None
    if "epochs" in cfg:
        epochs = _num(err, cfg, "epochs", 0, p)
        if epochs <= 0:
            raise err(p + "epochs", f"{epochs}: must be > 0", "")
        bounded(err, p + "epochs", epochs, BOUNDS["epochs"])
        epochs = float(epochs)
    return _Experiment(
        dataset=dataset, model=model, revision=revision, recipe=recipe, max_per_class=max_per_class,
        minority=minority, imbalances=tuple(imbalances), methods=tuple(methods), thresholded=frozenset(thresholded),
        ratios=tuple(ratios), losses=tuple(losses), ldam_head=ldam_head, lrs=tuple(lrs), lr_runs=lr_runs,
        selection=selection, lr_search=lr_search, repeats=repeats, latent=latent, embeddings=n_embed, epochs=epochs,
    )


def _read_data(err: "_Errors", p: str, cfg: dict[str, Any]) -> tuple[str, str, Recipe, int, MinorityChoice]:
    """The dataset, the model that takes its images, the recipe, the cap, the minority choice."""
    dataset = _choice(err, cfg, "dataset", DATASETS, p, required=True)
    model = _choice(err, cfg, "model", MODELS, p, required=True)
    if dataset not in MODELS[model]:
        raise err(p + "model", f"{model} does not take {dataset} images",
                  f"{model} takes: {', '.join(MODELS[model])}")
    info = DATASETS[dataset]
    recipe = recipe_of(err, cfg.get("recipe"), p)
    max_per_class = _int(err, cfg, "max_per_class", info.train_per_class, p)
    if not 1 <= max_per_class <= info.max_cap:
        raise err(p + "max_per_class", f"{max_per_class} is outside the dataset's range",
                  f"1..{info.max_cap} for {dataset}")
    minority = MinorityChoice(_choice(err, cfg, "minority", [m.value for m in MinorityChoice], p,
                                      default="random"))
    return dataset, model, recipe, max_per_class, minority


def _read_methods(err: "_Errors", p: str, cfg: dict[str, Any],
                  ) -> tuple[list[Method], list[Method], list[float], list[Loss], Head]:
    """The methods (each with its phase-1 method), which are thresholded, the re-sampling
    levels, the losses and the LDAM head."""
    methods = [Method(m) for m in _choices(err, cfg, "methods", [m.value for m in Method], p,
                                           default=["baseline"])]
    for m in methods:
        if m.phase1 is not None and m.phase1 not in methods:
            raise err(p + "methods", f"{m} starts from the {m.phase1} network, which is not in methods",
                      f"add {m.phase1} to methods")
    thresholded = [Method(m) for m in _choices(
        err, cfg, "thresholding", [m.value for m in Method], p,
        default=[m.value for m in DEFAULT_THRESHOLDED if m in methods], allow_empty=True)]
    for m in thresholded:
        if m not in methods:
            raise err(p + "thresholding", f"{m} is not one of the grid's methods",  # names, not enum reprs
                      "methods: " + ", ".join(str(x) for x in methods))
    ratios = [float(r) for r in _list(err, cfg, "resample_ratios", [1], p)]
    if any(not math.isfinite(r) or r < 1 for r in ratios):
        raise err(p + "resample_ratios", f"{ratios}: every ratio must be >= 1", "1 = fully balanced")
    for r in ratios:
        bounded(err, p + "resample_ratios", r, BOUNDS["resample_ratios"])
    losses = [Loss(x) for x in _choices(err, cfg, "losses", [l.value for l in Loss], p, default=["ce"])]
    # Cao et al. build the model with a normalised classifier whenever the loss is LDAM.
    ldam_head = Head(_choice(err, cfg, "ldam_head", [h.value for h in Head], p, default="cosine"))
    return methods, thresholded, ratios, losses, ldam_head


def _read_search(err: "_Errors", p: str, cfg: dict[str, Any], recipe: Recipe,
                 ) -> tuple[list[float], int, Selection, int]:
    """The learning rates searched, the runs of each, how the winner is selected, the repeats."""
    lrs = [float(x) for x in _list(err, cfg, "lr", [recipe.base_lr], p)]
    if any(not (x > 0) for x in lrs):
        raise err(p + "lr", f"{lrs}: learning rates must be > 0", "")
    for x in lrs:
        bounded(err, p + "lr", x, BOUNDS["lr"])
    lr_runs = _int(err, cfg, "lr_runs", 1, p)
    selection = Selection(_choice(err, cfg, "selection", [s.value for s in Selection], p,
                                  default="final"))
    repeats = _int(err, cfg, "repeats", 1, p)
    if repeats < 1 or lr_runs < 1:
        raise err(p + "repeats", "repeats and lr_runs must be >= 1", "")
    bounded(err, p + "repeats", repeats, BOUNDS["repeats"])
    bounded(err, p + "lr_runs", lr_runs, BOUNDS["lr_runs"])
    return lrs, lr_runs, selection, repeats


def _check_model_and_recipe(err: "_Errors", p: str, cfg: dict[str, Any], dataset: str, model: str, revision: int,
                            recipe: Recipe, losses: list[Loss], ldam_head: Head, measures_latent: bool) -> Recipe:
    """What the model and the images allow of the losses, the head, the augmentation and the
    latent statistics; the recipe with its normalisation named."""
    info = DATASETS[dataset]
    if "ldam_head" in cfg and Loss.LDAM not in losses:
        raise err(p + "ldam_head", "set, but no network of this experiment uses the LDAM loss", "losses: [ldam]")
    if Loss.LDAM in losses and ldam_head == Head.COSINE and (model, revision) in NO_LINEAR_HEAD:
        raise err(p + "ldam_head", f"{model} ends in a ReLU after its classifier: it has no linear layer "
                  "to normalise", "ldam_head: linear, or another model")
    if recipe.normalization is None:  # every spec names how its inputs are normalised
        recipe = dataclasses.replace(recipe, normalization=Normalization(DEFAULT_NORMALIZATION[dataset]))
    if recipe.augmentation == Augmentation.CROP_FLIP and dataset in NOT_MIRRORED and not _asks(cfg, "augmentation"):
        # The preset's flip is CIFAR's (Cao et al.); digits get its crop alone (Augmentation.CROP).
        recipe = dataclasses.replace(recipe, augmentation=Augmentation.CROP)
    if dataset in STREAMED or recipe.augmentation == Augmentation.RESIZE_CROP_FLIP:
        _check_streamed(err, p, dataset, recipe)
    if recipe.augmentation != Augmentation.NONE and info.image_shape[1] != info.image_shape[2]:
        raise err(p + "recipe.augmentation", f"{recipe.augmentation} needs square images, {dataset} has "
                  f"{info.image_shape[1]}x{info.image_shape[2]}", "augmentation: none")
    if measures_latent and (model, revision) in NO_LINEAR_HEAD:
        raise err(p + "latent", f"{model} ends in a ReLU after its classifier (Buda et al.'s model): its "
                  "logits are not FE x W_C, so Dablain's latent statistics do not apply", "latent: false")
    return recipe


# Normalisations that fit nothing on the training images: the ones a streamed dataset takes.
_FITS_NOTHING = frozenset({Normalization.RAW, Normalization.SCALE})
_STREAMED_AUGMENTATIONS = frozenset({Augmentation.NONE, Augmentation.RESIZE_CROP_FLIP})


def _check_streamed(err: "_Errors", p: str, dataset: str, recipe: Recipe) -> None:
    """A dataset streamed from JPEGs (catalog.STREAMED) takes its own crops and no fitted
    normalisation; its crops are for it alone."""
    if dataset not in STREAMED:
        raise err(p + "recipe.augmentation", f"{recipe.augmentation} crops images streamed from JPEG folders; "
                  f"{dataset} is held in memory at a fixed size",
                  f"dataset: {sorted(STREAMED)[0]}, or augmentation: none / crop_flip")
    if recipe.augmentation not in _STREAMED_AUGMENTATIONS:
        raise err(p + "recipe.augmentation", f"{dataset} is streamed from JPEGs and takes "
                  f"{' or '.join(sorted(map(str, _STREAMED_AUGMENTATIONS)))}, not {recipe.augmentation}",
                  "augmentation: resize_crop_flip")
    if recipe.normalization not in _FITS_NOTHING:
        raise err(p + "recipe.normalization", f"{dataset} is streamed from JPEGs: {recipe.normalization} would "
                  "decode every training image to fit its statistics", "normalization: raw (or scale)")


def _training_set(exp: _Experiment, grid_seed: int, kind: ImbalanceKind, rho: float, mu: float | None,
                  repeat: int) -> tuple[Imbalance, int]:
    """One imbalanced training set of a cell and repeat: its imbalance (minority classes drawn
    from the grid seed) and its seed, shared by every network trained on it."""
    cell = [exp.dataset, str(kind), rho, mu, repeat]
    classes = _draw_classes(kind, mu, exp.info.num_classes, exp.minority,
                            np.random.default_rng(derive_seed(grid_seed, "classes", *cell)))
    # Exponential (long-tailed) counts as Cao et al.'s code and Dablain et al.'s list give them.
    rounding = "truncate" if kind == ImbalanceKind.EXPONENTIAL else "nearest"
    imb = Imbalance(kind=kind, rho=rho, mu=mu, classes=classes, max_per_class=exp.max_per_class, rounding=rounding)
    return imb, derive_seed(grid_seed, "training-set", *cell)


def _recipe_for_set(err: "_Errors", p: str, exp: _Experiment, imb: Imbalance) -> Recipe:
    """The recipe on one training set: an epoch budget becomes iterations of this set."""
    if exp.epochs is None:
        return exp.recipe
    info = exp.info
    n_max = catalog_majority_count(exp.dataset, exp.max_per_class)
    r = epochs_to_iters(exp.recipe, exp.epochs, imb, info.num_classes, n_max)
    if r.iters > MAX_ITERS:
        raise err(p + "epochs", f"{exp.epochs:g} epochs are {r.iters:,} iterations at rho {imb.rho:g}",
                  f"at most {MAX_ITERS:,} iterations")
    if exp.selection != Selection.FINAL and r.select_every == 0:
        # "The epoch with the best performing BAC is then selected" (Dablain et al.)
        r = dataclasses.replace(r, select_every=iters_per_epoch(imb, info.num_classes, n_max, r.batch_size))
    return r


def _networks_on_set(exp: _Experiment, imb: Imbalance, recipe: Recipe, repeat: int, set_seed: int,
                     grid_name: str, lr_search: LrSearch | None = None) -> list[TrialSpec]:
    """Every network trained on one training set: loss x lr x lr run x method x ratio.

    The runs of one lr share the set's data (``data_seed``) and differ in their network
    seed, so in their initial weights ("on the same dataset", Buda et al.); with one run
    per lr the set's seed is both, as it always was (the ids of such grids never changed).
    """
    specs = []
    for loss, lr, lr_run, method in itertools.product(exp.losses, exp.lrs, range(exp.lr_runs), exp.methods):
        searched = exp.lr_runs > 1
        for ratio in exp.ratios_of(method):
            specs.append(TrialSpec(
                dataset=exp.dataset, model=exp.model,
                recipe=dataclasses.replace(recipe, base_lr=lr),
                imbalance=imb, method=method, repeat=repeat,
                seed=derive_seed(set_seed, "lr-run", lr_run) if searched else set_seed,
                data_seed=set_seed if searched else None,
                resample_ratio=ratio, loss=loss, lr_run=lr_run, selection=exp.selection,
                evaluations=(Evaluation.RAW, Evaluation.THRESHOLD) if method in exp.thresholded else (Evaluation.RAW,),
                latent=exp.latent, model_revision=exp.revision, method_revision=method.revision,
                head=exp.ldam_head if loss == Loss.LDAM else Head.LINEAR,
                embeddings=False, lr_search=lr_search, grid=grid_name,
            ))
    return specs


def _with_embeddings(specs: list[TrialSpec], n: int) -> list[TrialSpec]:
    """Raw embeddings for the first n networks (they are large); a deterministic choice."""
    return [dataclasses.replace(s, embeddings=True, latent=True) if i < n else s for i, s in enumerate(specs)]


def _imbalances(err: "_Errors", cfg: Any, p: str, num_classes: int) -> list[tuple[ImbalanceKind, float, float | None]]:
    key = p + "imbalance"
    if cfg is None:
        return [(ImbalanceKind.NONE, 1.0, None)]
    if not isinstance(cfg, dict) or not cfg:
        raise err(key, f"expected a mapping of kinds, got {show(cfg)}", "kinds: " + ", ".join(IMBALANCE_PARAMS))
    out: list[tuple[ImbalanceKind, float, float | None]] = []
    for kind_name, params in cfg.items():
        try:
            kind = ImbalanceKind(kind_name)
        except ValueError:
            raise err(f"{key}.{kind_name}", "unknown imbalance kind",
                      "kinds: " + ", ".join(IMBALANCE_PARAMS)) from None
        params = params or {}
        if not isinstance(params, dict):
            raise err(f"{key}.{kind_name}", f"expected a mapping, got {show(params)}",
                      "parameters: " + ", ".join(sorted(IMBALANCE_PARAMS[kind])) or "none")
        err.unknown_keys(params, IMBALANCE_PARAMS[kind], f"{key}.{kind_name}")
        if kind == ImbalanceKind.NONE:
            out.append((kind, 1.0, None))
            continue
        rhos = [float(r) for r in _list(err, params, "rho", None, f"{key}.{kind_name}.", required=True)]
        if any(not math.isfinite(r) or r < 1 for r in rhos):
            raise err(f"{key}.{kind_name}.rho", f"{rhos}: every rho must be >= 1", "")
        for r in rhos:
            bounded(err, f"{key}.{kind_name}.rho", r, BOUNDS["rho"])
        if kind == ImbalanceKind.STEP:
            mus = [float(m) for m in _list(err, params, "mu", None, f"{key}.{kind_name}.", required=True)]
            for m in mus:
                k = m * num_classes
                if not (0 < m < 1) or abs(k - round(k)) > 1e-9:
                    raise err(f"{key}.step.mu", f"{m} does not give a whole number of minority classes",
                              f"multiples of 1/{num_classes} strictly between 0 and 1")
            out.extend((kind, r, m) for r in rhos for m in mus)
        else:
            out.extend((kind, r, None) for r in rhos)
    return out


def _draw_classes(kind: ImbalanceKind, mu: float | None, n: int, choice: MinorityChoice,
                  rng: np.random.Generator) -> tuple[int, ...]:
    """Step: the minority labels. Linear/exponential: labels from most to fewest examples."""
    if kind == ImbalanceKind.NONE:
        return ()
    if kind == ImbalanceKind.STEP:
        k = round(mu * n)
        if choice == MinorityChoice.LOWEST:
            return tuple(range(k))
        if choice == MinorityChoice.HIGHEST:
            return tuple(range(n - k, n))
        return tuple(sorted(int(c) for c in rng.choice(n, size=k, replace=False)))
    if choice == MinorityChoice.LOWEST:
        return tuple(range(n - 1, -1, -1))  # label 0 gets the fewest
    if choice == MinorityChoice.HIGHEST:
        return tuple(range(n))  # Cao et al.'s CIFAR-LT order: label 0 gets the most
    return tuple(int(c) for c in rng.permutation(n))


def _asks(cfg: Any, field: str) -> bool:
    """Whether the experiment's recipe mapping sets ``field`` itself (not through its preset)."""
    recipe = cfg.get("recipe")
    return isinstance(recipe, dict) and field in recipe
