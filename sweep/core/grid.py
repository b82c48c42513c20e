"""Grid files: parsing, validation and expansion into TrialSpecs.

Floor: sweep.core (what a study is; pure: imports sweep.core only, no torch, no store).

A grid file is YAML. Top-level keys are defaults for every experiment; an optional
``experiments:`` list holds blocks that override them (a grid may mix datasets and
models). Every key is checked: an unknown key or value raises :class:`GridError`
naming the file, the key and what is allowed.

Expansion is a pure function: the same file gives the same specs, with the same ids,
in the same order, on any machine. This module reads the file's top level; each
experiment block is read and expanded by ``sweep.core.grid_experiment``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweep.core.catalog import DATASETS, MODELS
from sweep.core.grid_checks import (
    BOUNDS,
    MAX_GRID_BYTES,
    PATH_SEGMENT_RE,
    GridError,
    _Errors,
    _int,
    _num,
    bounded,
    max_networks_per_grid,
    parse_grid_yaml,
    show,
)
from sweep.core.grid_experiment import IMBALANCE_PARAMS, expand_experiment
from sweep.core.recipes import RECIPES
from sweep.core.spec import Loss, Method, MinorityChoice, Selection, TrialSpec

__all__ = ["EXPERIMENT_KEYS", "IMBALANCE_PARAMS", "TOP_KEYS", "Grid", "GridError", "expand", "load_grid"]


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
    "lr_runs": "runs per learning rate, on the same training subset from other initial weights "
               "(Buda CIFAR-10: 2)",
    "selection": "lr-search / evaluation-point selection: " + ", ".join(Selection),
    "lr_search": "early stopping of the lr search: {scheduler: halving, metric, mode, rungs, reduction} "
                 "(sweep.core.lr_search; without it every candidate trains to the end, Buda et al.'s way)",
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
MAX_NAME_CHARS = 128  # a folder name in the store (filesystems allow 255 bytes)


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
        specs.extend(expand_experiment(err, prefix, defaults | block, seed, name, i, len(specs),
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
