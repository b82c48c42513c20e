"""A grid block's ``recipe:``: a named preset, optionally with fields overridden, checked.

Floor: sweep.core (what a study is; pure: imports sweep.core only, no torch, no store).

Every numeric field of the resulting recipe, preset or overridden, is finite and within
:data:`RECIPE_BOUNDS`: a value a worker cannot use (``iters: 1e20``, ``momentum: .inf``)
is refused when the grid is read, with the key and the allowed range.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from sweep.core.grid_checks import MAX_ITERS, Bound, _Errors, bounded, show
from sweep.core.recipes import RECIPES
from sweep.core.spec import Augmentation, LrPolicy, Normalization, Recipe

_ITERATIONS = Bound(0, MAX_ITERS)
# The range of every numeric Recipe field (sweep.core.spec.Recipe says what each means).
RECIPE_BOUNDS: dict[str, Bound] = {
    "iters": Bound(1, MAX_ITERS),
    "batch_size": Bound(1, 65_536),
    "base_lr": Bound(0, 100, lo_open=True),
    "momentum": Bound(0, 1, hi_open=True),  # 1 or more: SGD's buffer grows without bound
    "weight_decay": Bound(0, 1),
    "lr_gamma": Bound(0, 1000),
    "lr_power": Bound(0, 100),
    "lr_milestones": _ITERATIONS,
    "warmup_iters": _ITERATIONS,
    "phase2_lr_factor": Bound(0, 1000),
    "drw_start_iter": _ITERATIONS,
    "drw_beta": Bound(0, 1, hi_open=True),  # the effective number (1 - beta^n) / (1 - beta)
    "focal_gamma": Bound(0, 100),
    "ldam_max_margin": Bound(0, 100),
    "ldam_scale": Bound(0, 10_000, lo_open=True),
    "eval_every": _ITERATIONS,
    "select_every": _ITERATIONS,
    "checkpoint_every": _ITERATIONS,
    "validation_fraction": Bound(0, 1, hi_open=True),
    "bias_lr_factor": Bound(0, 1000, lo_open=True),
}


def recipe_of(err: _Errors, cfg: Any, p: str) -> Recipe:
    """The recipe a grid block names (a preset, or a preset with field overrides), checked."""
    key = p + "recipe"
    if cfg is None:
        raise err(key, "missing", "a recipe name: " + ", ".join(RECIPES))
    overrides: dict[str, Any] = {}
    if isinstance(cfg, dict):
        overrides = dict(cfg)
        name = overrides.pop("preset", None)
        if name is None:
            raise err(key + ".preset", "missing", "a recipe name: " + ", ".join(RECIPES))
    else:
        name = cfg
    if name not in RECIPES:
        raise err(key, f"unknown recipe {show(name)}", "recipes: " + ", ".join(RECIPES))
    base = RECIPES[name]
    fields = {f.name: f for f in dataclasses.fields(Recipe)}
    err.unknown_keys(overrides, set(fields), key)
    typed: dict[str, Any] = {}
    for k, v in overrides.items():
        cur = getattr(base, k)
        try:
            if k == "lr_policy":
                typed[k] = LrPolicy(v)
            elif k == "lr_milestones":
                typed[k] = tuple(int(x) for x in v)
            elif k == "normalization":
                typed[k] = None if v is None else Normalization(v)
            elif k == "augmentation":
                typed[k] = Augmentation(v)
            elif k == "drw_start_iter":
                typed[k] = None if v is None else int(v)
            elif isinstance(cur, bool):
                typed[k] = bool(v)
            elif isinstance(cur, int):
                if isinstance(v, float) and not v.is_integer():
                    raise ValueError(v)
                typed[k] = int(v)
            elif isinstance(cur, float):
                typed[k] = float(v)
            else:
                typed[k] = str(v)
        except (TypeError, ValueError, OverflowError):  # int(.inf) overflows
            allowed = {"lr_policy": LrPolicy, "normalization": Normalization, "augmentation": Augmentation}.get(k)
            raise err(f"{key}.{k}", f"bad value {show(v)}", ", ".join(allowed) if allowed
                      else f"a value like {show(cur)}") from None
    r = dataclasses.replace(base, **typed)
    for name, bound in RECIPE_BOUNDS.items():
        value = getattr(r, name)
        for v in value if isinstance(value, tuple) else () if value is None else (value,):
            bounded(err, f"{key}.{name}", v, bound)
    if r.iters < 1 or r.batch_size < 1:
        raise err(key, "iters and batch_size must be >= 1", "")
    if r.init not in ("xavier", "kaiming"):
        raise err(key + ".init", f"unknown init {show(r.init)}", "xavier, kaiming")
    if not (r.bias_lr_factor > 0 and math.isfinite(r.bias_lr_factor)):
        raise err(key + ".bias_lr_factor", f"{r.bias_lr_factor}", "a finite number > 0")
    for name in ("eval_every", "select_every", "checkpoint_every", "warmup_iters"):
        if getattr(r, name) < 0:
            raise err(f"{key}.{name}", f"{getattr(r, name)}: cannot be negative", "0 or more iterations")
    if not 0 <= r.validation_fraction < 1:
        raise err(key + ".validation_fraction", f"{r.validation_fraction}", "0 <= fraction < 1")
    return r
