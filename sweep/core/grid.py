"""Grid files: parsing, validation and expansion into TrialSpecs.

Floor: sweep.core (what a study is; pure: imports sweep.core only, no torch, no store).

A grid file is YAML. Top-level keys are defaults for every experiment; an optional
``experiments:`` list holds blocks that override them (a grid may mix datasets and
models). Every key is checked: an unknown key or value raises :class:`GridError`
naming the file, the key and what is allowed.

Expansion is a pure function: the same file gives the same specs, with the same ids,
in the same order, on any machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sweep.core.catalog import DATASETS, DEFAULT_NORMALIZATION, MODEL_REVISIONS, MODELS, NO_LINEAR_HEAD, NOT_MIRRORED
from sweep.core.grid_checks import (
    BOUNDS,
    MAX_GRID_BYTES,
    MAX_ITERS,
    MAX_NETWORKS_ENV,
    PATH_SEGMENT_RE,
    GridError,
    bounded,
    _choice,
    _choices,
    _Errors,
    _int,
    _list,
    _num,
    max_networks_per_grid,
    parse_grid_yaml,
    show,
)
from sweep.core.grid_recipe import recipe_of
from sweep.core.recipes import RECIPES, epochs_to_iters, iters_per_epoch
from sweep.core.spec import (
    Augmentation,
    Evaluation,
    Head,
    Imbalance,
    ImbalanceKind,
    Loss,
    Method,
    MinorityChoice,
    Normalization,
    Selection,
    TrialSpec,
    derive_seed,
)


EXPERIMENT_KEYS = {
    "dataset": "dataset name: " + ", ".join(DATASETS),
    "model": "model name: " + ", ".join(MODELS),
    "recipe": "a recipe name (" + ", ".join(RECIPES) + ") or a mapping {preset: NAME, FIELD: VALUE, ...}",
    "epochs": "training budget in epochs of the imbalanced set (overrides recipe iters)",
    "imbalance": "mapping of kind -> parameters: step {rho, mu}, linear {rho}, exponential {rho}, none {}",
    "minority": "which labels are minority: " + ", ".join(MinorityChoice),
    "max_per_class": "cap on each class before imbalancing (Buda MNIST: 5000)",
    "methods": "list of: " + ", ".join(Method),
    "thresholding": "methods that also get the thresholded evaluation (default: baseline, over-, "
                    "under-sampling; [] for none)",
    "resample_ratios": "imbalance left after re-sampling, for over/under-sampling (1 = balanced)",
    "losses": "list of: " + ", ".join(Loss),
    "ldam_head": "the head of LDAM networks: cosine (Cao et al.'s normalised classifier, the default) "
                 "or linear",
    "lr": "list of base learning rates to search (default: the recipe's)",
    "lr_runs": "runs per learning rate (Buda CIFAR-10: 2)",
    "selection": "lr-search / evaluation-point selection: " + ", ".join(Selection),
    "repeats": "number of repeats (minority classes redrawn each repeat)",
    "latent": "compute Dablain latent statistics (true/false)",
    "embeddings": "store raw FE vectors for this many networks per experiment (0 = none)",
}
TOP_KEYS = {
    "name": "grid name",
    "description": "free text",
    "seed": "integer seed of the whole grid",
    "resources": "mapping {cpu, gpu} per pack",
    "pack": "mapping {max_networks}",
    "experiments": "list of experiment blocks overriding the top-level keys",
} | EXPERIMENT_KEYS
RESOURCE_KEYS = {"cpu", "gpu"}
PACK_KEYS = {"max_networks"}
IMBALANCE_PARAMS = {
    ImbalanceKind.STEP: {"rho", "mu"},
    ImbalanceKind.LINEAR: {"rho"},
    ImbalanceKind.EXPONENTIAL: {"rho"},
    ImbalanceKind.NONE: set(),
}
MAX_NAME_CHARS = 128  # a folder name in the store (filesystems allow 255 bytes)
DEFAULT_THRESHOLDED = (Method.BASELINE, Method.OVERSAMPLING, Method.UNDERSAMPLING)


@dataclass(frozen=True)
class Grid:
    name: str
    path: str
    file_hash: str  # sha256 of the file's bytes: provenance in every row
    seed: int
    specs: tuple[TrialSpec, ...]
    cpu_per_pack: float
    gpu_per_pack: float
    max_networks_per_pack: int  # 0: sized from the device

    @property
    def trained_networks(self) -> int:
        return len(self.specs)

    @property
    def evaluations(self) -> int:
        return sum(len(s.evaluations) for s in self.specs)


def load_grid(path: str | Path) -> Grid:
    """Read, validate and expand a grid file."""
    path = Path(path)
    if not path.is_file():
        raise GridError(f"{path}: grid file not found")
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_GRID_BYTES + 1)  # never more: parse_grid_yaml refuses a larger file
    except OSError as e:
        raise GridError(f"{path}: cannot read the grid file: {e.strerror or e}") from None
    doc = parse_grid_yaml(raw, str(path))
    return expand(doc, source=str(path), file_hash=hashlib.sha256(raw).hexdigest())


def expand(doc: Any, source: str = "<grid>", file_hash: str = "") -> Grid:
    """Expand a parsed grid document into specs (pure: no I/O, no randomness but the seed)."""
    err = _Errors(source)
    if not isinstance(doc, dict):
        raise err("", "the grid must be a YAML mapping", "top-level keys: " + ", ".join(TOP_KEYS))
    err.unknown_keys(doc, TOP_KEYS, "")
    name = doc.get("name") or Path(source).stem
    if not isinstance(name, str) or not PATH_SEGMENT_RE.match(name) or len(name) > MAX_NAME_CHARS:
        raise err("name", f"{show(name)} cannot name a grid: it becomes a folder name in the store",
                  f"at most {MAX_NAME_CHARS} characters; no / \\ % = or control characters; "
                  "not starting with . _ or a space")
    seed = _int(err, doc, "seed", 0)
    bounded(err, "seed", seed, BOUNDS["seed"])
    res = doc.get("resources", {}) or {}
    if not isinstance(res, dict):
        raise err("resources", f"expected a mapping, got {show(res)}", "keys: cpu, gpu")
    err.unknown_keys(res, RESOURCE_KEYS, "resources")
    pack = doc.get("pack", {}) or {}
    if not isinstance(pack, dict):
        raise err("pack", f"expected a mapping, got {show(pack)}", "keys: max_networks")
    err.unknown_keys(pack, PACK_KEYS, "pack")

    defaults = {k: v for k, v in doc.items() if k in EXPERIMENT_KEYS}
    blocks = doc.get("experiments")
    if blocks is None:
        blocks = [{}]
    if not isinstance(blocks, list) or not blocks:
        raise err("experiments", "expected a non-empty list of experiment blocks", "")
    specs: list[TrialSpec] = []
    for i, block in enumerate(blocks):
        prefix = f"experiments[{i}]." if "experiments" in doc else ""
        if not isinstance(block, dict):
            raise err(prefix.rstrip("."), "expected a mapping", "")
        err.unknown_keys(block, EXPERIMENT_KEYS, prefix.rstrip("."))
        specs.extend(_expand_experiment(err, prefix, defaults | block, seed, name, i, len(specs),
                                        max_networks_per_grid()))
    ids = [s.network_id for s in specs]
    if len(set(ids)) != len(ids):
        raise err("experiments", "two experiments produce the same networks", "make them differ")
    # Checked here, not by the driver: its message would blame --cpus-per-pack/--max-networks.
    cpu = float(_num(err, res, "cpu", 1, "resources."))
    gpu = float(_num(err, res, "gpu", 0, "resources."))
    if cpu < 0 or gpu < 0:
        raise err("resources", f"cpu {cpu:g}, gpu {gpu:g}: cannot be negative", "cpu >= 0, gpu >= 0")
    bounded(err, "resources.cpu", cpu, BOUNDS["resources.cpu"])
    bounded(err, "resources.gpu", gpu, BOUNDS["resources.gpu"])
    max_networks = _int(err, pack, "max_networks", 0, "pack.")
    if max_networks < 0:
        raise err("pack.max_networks", f"{max_networks}: cannot be negative", "0 (sized for the device) or more")
    bounded(err, "pack.max_networks", max_networks, BOUNDS["pack.max_networks"])
    return Grid(
        name=str(name),
        path=source,
        file_hash=file_hash,
        seed=seed,
        specs=tuple(specs),
        cpu_per_pack=cpu,
        gpu_per_pack=gpu,
        max_networks_per_pack=max_networks,
    )


def _expand_experiment(
    err: "_Errors", p: str, cfg: dict[str, Any], grid_seed: int, grid_name: str, index: int,
    already: int = 0, max_networks: int = 10**6,
) -> list[TrialSpec]:
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
    if selection == Selection.VALIDATION and recipe.validation_fraction == 0:
        recipe = dataclasses.replace(recipe, validation_fraction=0.1)
    latent = cfg.get("latent", False)
    if not isinstance(latent, bool):  # bool("no") is True
        raise err(p + "latent", f"bad value {show(latent)}", "true, false")
    n_embed = _int(err, cfg, "embeddings", 0, p)
    bounded(err, p + "embeddings", n_embed, BOUNDS["embeddings"])
    revision = MODEL_REVISIONS.get(model, 1)
    if "ldam_head" in cfg and Loss.LDAM not in losses:
        raise err(p + "ldam_head", "set, but no network of this experiment uses the LDAM loss", "losses: [ldam]")
    if Loss.LDAM in losses and ldam_head == Head.COSINE and (model, revision) in NO_LINEAR_HEAD:
        raise err(p + "ldam_head", f"{model} ends in a ReLU after its classifier: it has no linear layer "
                  "to normalise", "ldam_head: linear, or another model")
    if recipe.normalization is None:  # every spec names how its inputs are normalised
        recipe = dataclasses.replace(recipe, normalization=Normalization(DEFAULT_NORMALIZATION[dataset]))
    if recipe.augmentation == Augmentation.CROP_FLIP and dataset in NOT_MIRRORED and not _asks(cfg, "augmentation"):
        # The preset's flip is CIFAR's (Cao et al.); digits get its crop alone (spec.Augmentation.CROP).
        recipe = dataclasses.replace(recipe, augmentation=Augmentation.CROP)
    if recipe.augmentation != Augmentation.NONE and info.image_shape[1] != info.image_shape[2]:
        raise err(p + "recipe.augmentation", f"{recipe.augmentation} needs square images, {dataset} has "
                  f"{info.image_shape[1]}x{info.image_shape[2]}", "augmentation: none")
    if (latent or n_embed) and (model, revision) in NO_LINEAR_HEAD:
        raise err(p + "latent", f"{model} ends in a ReLU after its classifier (Buda et al.'s model): its "
                  "logits are not FE x W_C, so Dablain's latent statistics do not apply", "latent: false")
    imbalances = _imbalances(err, cfg.get("imbalance"), p, info.num_classes)
    if "epochs" in cfg:
        epochs = _num(err, cfg, "epochs", 0, p)
        if epochs <= 0:
            raise err(p + "epochs", f"{epochs}: must be > 0", "")
        bounded(err, p + "epochs", epochs, BOUNDS["epochs"])

    def ratios_of(method: Method) -> list[float]:
        resampled = (Method.OVERSAMPLING, Method.UNDERSAMPLING)
        return ratios if method.sampling in resampled or method.phase1 in resampled else [1.0]

    # Counted before any spec is built: a grid of millions is refused in milliseconds.
    count = len(imbalances) * repeats * len(losses) * len(lrs) * lr_runs * sum(len(ratios_of(m)) for m in methods)
    if count + already > max_networks:
        raise err(p + "repeats", f"the grid trains at least {count + already:,} networks, more than the limit of "
                  f"{max_networks:,}", f"fewer values, or raise the limit with {MAX_NETWORKS_ENV}")

    specs: list[TrialSpec] = []
    for kind, rho, mu in imbalances:
        for repeat in range(repeats):
            cell = [dataset, str(kind), rho, mu, repeat]
            classes = _draw_classes(kind, mu, info.num_classes, minority,
                                    np.random.default_rng(derive_seed(grid_seed, "classes", *cell)))
            # Exponential (long-tailed) counts as Cao et al.'s code and Dablain et al.'s list give them.
            rounding = "truncate" if kind == ImbalanceKind.EXPONENTIAL else "nearest"
            imb = Imbalance(kind=kind, rho=rho, mu=mu, classes=classes, max_per_class=max_per_class,
                            rounding=rounding)
            seed = derive_seed(grid_seed, "training-set", *cell)
            r = recipe
            if "epochs" in cfg:
                r = epochs_to_iters(recipe, float(cfg["epochs"]), imb, info.num_classes, max_per_class)
                if r.iters > MAX_ITERS:
                    raise err(p + "epochs", f"{show(cfg['epochs'])} epochs are {r.iters:,} iterations at "
                              f"rho {rho:g}", f"at most {MAX_ITERS:,} iterations")
                if selection != Selection.FINAL and r.select_every == 0:
                    # "The epoch with the best performing BAC is then selected" (Dablain et al.)
                    r = dataclasses.replace(r, select_every=iters_per_epoch(imb, info.num_classes, max_per_class,
                                                                            r.batch_size))
            for loss, lr, lr_run, method in itertools.product(losses, lrs, range(lr_runs), methods):
                for ratio in ratios_of(method):
                    evals = (Evaluation.RAW, Evaluation.THRESHOLD) if method in thresholded else (Evaluation.RAW,)
                    specs.append(TrialSpec(
                        dataset=dataset, model=model,
                        recipe=dataclasses.replace(r, base_lr=lr),
                        imbalance=imb, method=method, repeat=repeat,
                        seed=derive_seed(seed, "lr-run", lr_run) if lr_runs > 1 else seed,
                        resample_ratio=ratio, loss=loss, lr_run=lr_run, selection=selection,
                        evaluations=evals, latent=latent, model_revision=revision,
                        head=ldam_head if loss == Loss.LDAM else Head.LINEAR,
                        embeddings=False, grid=grid_name,
                    ))
    # Raw embeddings for the first n networks (they are large); deterministic choice.
    for i in range(min(n_embed, len(specs))):
        specs[i] = dataclasses.replace(specs[i], embeddings=True, latent=True)
    return specs


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
