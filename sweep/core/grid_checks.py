"""Checks of grid-file values: each failure is a :class:`GridError` naming the file, the
key and what is allowed.

Floor: sweep.core (pure; no torch, no store).

A grid file is read by :func:`parse_grid_yaml`: YAML with limits. At most
``MAX_GRID_BYTES``; at most ``MAX_GRID_NODES`` values once every alias is expanded where
it is used (nine levels of aliases fit in 1.5 KB and expand to billions of values, which
any message quoting the value would try to print); no recursive alias; at most
``MAX_GRID_DEPTH`` levels of nesting. Every number is finite and within the bound
:data:`BOUNDS` gives its key (recipe fields: ``sweep.core.grid_recipe.RECIPE_BOUNDS``).
"""

from __future__ import annotations

import math
import os
import re
import reprlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import yaml

from sweep.core.errors import UserError

# Names that become path segments of the store (grid names; pack ids): no separators, no
# leading dot/underscore or space (dot/underscore files are hidden from readers), nothing a
# hive partition value would need to escape (% and =), no control characters, no trailing
# space.
PATH_SEGMENT_RE = re.compile(r"^[^./\\%=_\s][^/\\%=\x00-\x1f]*(?<!\s)$")


MAX_NETWORKS_ENV = "SWEEP_MAX_GRID_NETWORKS"
DEFAULT_MAX_NETWORKS = 1_000_000  # Buda et al.'s largest grid: 22,500


MAX_GRID_BYTES = 1_000_000  # the paper grids are 1-4 KB
MAX_GRID_NODES = 10_000  # YAML values after alias expansion; the paper grids have < 200
MAX_GRID_DEPTH = 32  # nesting levels; a grid needs 5
MAX_ITERS = 100_000_000  # optimiser steps of one network (Buda ImageNet: 320,000)
MAX_MESSAGE_VALUE = 300  # characters of a user's value quoted in an error message


class GridError(UserError, ValueError):
    """A grid file is malformed or contradictory."""


@dataclass(frozen=True)
class Bound:
    """The range a number of a grid file must lie in (inclusive unless ``*_open``)."""

    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False

    def holds(self, v: float) -> bool:
        return (math.isfinite(v) and (v > self.lo if self.lo_open else v >= self.lo)
                and (v < self.hi if self.hi_open else v <= self.hi))

    def text(self) -> str:
        if not self.lo_open and not self.hi_open:
            return f"{_fmt(self.lo)}..{_fmt(self.hi)}"
        return (f"{'>' if self.lo_open else '>='} {_fmt(self.lo)} and "
                f"{'<' if self.hi_open else '<='} {_fmt(self.hi)}")


def _fmt(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


# Every number a grid file's own keys may give (recipe fields: grid_recipe.RECIPE_BOUNDS).
# Wide enough for any study in the papers and well beyond; narrow enough that a typo
# (1e20 iterations, an infinite lr) is refused when the grid is read, not deep in a worker.
BOUNDS: dict[str, Bound] = {
    "seed": Bound(-(2**63), 2**63 - 1),  # derive_seed hashes it; 64-bit keeps it portable
    "resources.cpu": Bound(0, 1024),
    "resources.gpu": Bound(0, 64),  # fractions share a GPU
    "pack.max_networks": Bound(0, 65_536),  # 0: sized from the device (at most 256)
    "epochs": Bound(0, 100_000, lo_open=True),
    "resample_ratios": Bound(1, 1e6),
    "lr": Bound(0, 100, lo_open=True),  # the papers use 1e-3..0.1
    # Buda: 50 (MNIST) and 10 (CIFAR-10) repeats. The count of networks is what limits a
    # grid (SWEEP_MAX_GRID_NETWORKS, checked before any spec is built); these only keep
    # the arithmetic on plain integers.
    "lr_runs": Bound(1, 10**9),
    "repeats": Bound(1, 10**9),
    "embeddings": Bound(0, 10**9),
    "rho": Bound(1, 1e6),  # Buda: up to 5000
}


_SHOW = reprlib.Repr()
_SHOW.maxlevel, _SHOW.maxlist, _SHOW.maxtuple, _SHOW.maxdict = 3, 6, 6, 6
_SHOW.maxstring, _SHOW.maxother, _SHOW.maxlong = 80, 80, 40


def show(v: Any) -> str:
    """A user's value as an error message quotes it: its repr, cut short. A grid document
    built elsewhere than parse_grid_yaml may share sub-values billions of times over (a
    YAML alias bomb), whose full repr would take gigabytes."""
    return _SHOW.repr(v)


def bounded(err: "_Errors", key: str, v: float, bound: Bound) -> None:
    """Raise a GridError naming ``key`` and ``bound`` unless ``v`` is finite and within it."""
    if not bound.holds(v):
        raise err(key, f"{show(v)} is {'not a finite number' if not math.isfinite(v) else 'out of range'}",
                  bound.text())


def parse_grid_yaml(raw: bytes, source: str) -> Any:
    """The YAML document of a grid file, within the module's limits (see the docstring)."""
    if len(raw) > MAX_GRID_BYTES:
        raise GridError(f"{source}: {len(raw):,} bytes, more than the {MAX_GRID_BYTES:,} a grid file may have")
    loader = yaml.SafeLoader(raw)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, source)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise GridError(f"{source}: not valid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:  # PyYAML composes recursively: [[[[...]]]] thousands deep
        raise GridError(f"{source}: nested more than {MAX_GRID_DEPTH} levels deep") from None
    finally:
        loader.dispose()


def _expanded_size(root: yaml.Node, source: str) -> int:
    """Values in the document with every alias expanded, refused past MAX_GRID_NODES.

    Counted on the node graph, where an alias is a second reference to its anchor's node:
    each node's expanded size is computed once, so a billion-value bomb costs a few hundred
    steps to refuse."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()

    def size(node: yaml.Node, depth: int) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in on_path:
            raise GridError(f"{source}: a YAML alias refers to a value that contains it (line "
                            f"{node.start_mark.line + 1})")
        if depth > MAX_GRID_DEPTH:
            raise GridError(f"{source}: nested more than {MAX_GRID_DEPTH} levels deep "
                            f"(line {node.start_mark.line + 1})")
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [x for pair in node.value for x in pair]
        else:
            children = []
        on_path.add(key)
        total = 1
        for child in children:
            total += size(child, depth + 1)
            if total > MAX_GRID_NODES:
                raise GridError(f"{source}: YAML aliases expand to more than {MAX_GRID_NODES:,} values "
                                f"(line {node.start_mark.line + 1}); write the values out, or use fewer aliases")
        on_path.discard(key)
        sizes[key] = total
        return total

    return size(root, 0)


def max_networks_per_grid() -> int:
    """The most networks one grid may expand to (``SWEEP_MAX_GRID_NETWORKS``, default 1,000,000):
    each spec costs about 2 kB and a millisecond to build; a typo should not cost gigabytes."""
    raw = os.environ.get(MAX_NETWORKS_ENV, "")
    try:
        return int(raw) if raw else DEFAULT_MAX_NETWORKS
    except ValueError:
        raise GridError(f"{MAX_NETWORKS_ENV}={show(raw)}: expected a whole number") from None


class _Errors:
    def __init__(self, source: str) -> None:
        self.source = source

    def __call__(self, key: str, problem: str, allowed: str) -> GridError:
        if len(key) > MAX_MESSAGE_VALUE:  # an unknown key is the user's text too
            key = key[:MAX_MESSAGE_VALUE] + "..."
        where = f"{self.source}: {key}: " if key else f"{self.source}: "
        if len(problem) > MAX_MESSAGE_VALUE:  # it quotes the user's value, which may be huge
            problem = problem[:MAX_MESSAGE_VALUE] + f"... ({len(problem):,} characters)"
        return GridError(where + problem + (f" (allowed: {allowed})" if allowed else ""))

    def unknown_keys(self, d: dict[str, Any], allowed: Iterable[str], where: str) -> None:
        allowed = set(allowed)
        for k in d:
            if k not in allowed:
                raise self(f"{where}.{k}" if where else str(k), "unknown key",
                           ", ".join(sorted(allowed)) or "no keys")


def _choice(err: _Errors, d: dict, key: str, allowed: Iterable[str], p: str,
            default: Any = None, required: bool = False) -> Any:
    allowed = list(allowed)
    if key not in d or d[key] is None:
        if required:
            raise err(p + key, "missing", ", ".join(allowed))
        return default
    v = d[key]
    if v not in allowed:
        raise err(p + key, f"unknown value {show(v)}", ", ".join(allowed))
    return v


def _choices(err: _Errors, d: dict, key: str, allowed: list[str], p: str, default: list[str],
             allow_empty: bool = False) -> list[str]:
    if allow_empty and d.get(key) == []:
        return []  # e.g. `thresholding: []`: no thresholded evaluations
    vals = _list(err, d, key, default, p)
    seen = []
    for v in vals:
        if v not in allowed:
            raise err(p + key, f"unknown value {show(v)}", ", ".join(allowed))
        if v in seen:
            raise err(p + key, f"{show(v)} is listed twice", "each value once")
        seen.append(v)
    return seen


def _list(err: _Errors, d: dict, key: str, default: Any, p: str, required: bool = False) -> list:
    if key not in d or d[key] is None:
        if required:
            raise err(p + key, "missing", "a list of values")
        return list(default)
    v = d[key]
    if not isinstance(v, list):
        v = [v]
    if not v:
        raise err(p + key, "empty list", "at least one value")
    for x in v:
        if isinstance(x, bool) or not isinstance(x, (int, float, str)):
            raise err(p + key, f"bad value {show(x)}", "numbers or names")
        if not isinstance(x, str) and not _finite(x):
            raise err(p + key, f"bad value {show(x)}", "finite numbers")
    if key not in ("methods", "thresholding", "losses") and any(isinstance(x, str) for x in v):
        raise err(p + key, f"{v}: expected numbers", "numbers")
    return v


def _num(err: _Errors, d: dict, key: str, default: float, p: str = "") -> float:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not _finite(v):
        raise err(p + key, f"bad value {show(v)}", "a finite number")
    return v


def _finite(x: float) -> bool:
    """Finite, and a float can hold it (YAML ints have no limit: 10**400 overflows float())."""
    try:
        return math.isfinite(float(x))
    except OverflowError:
        return False


def _int(err: _Errors, d: dict, key: str, default: int, p: str = "") -> int:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise err(p + key, f"bad value {show(v)}", "an integer")
    return v
