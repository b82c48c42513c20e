"""Checks of grid-file values: each failure is a :class:`GridError` naming the file, the
key and what is allowed.

Floor: sweep.core (pure; no torch, no store).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from typing import Any

from sweep.core.errors import UserError


# Names that become path segments of the store (grid names; pack ids): no separators, no
# leading dot/underscore or space (dot/underscore files are hidden from readers), nothing a
# hive partition value would need to escape (% and =), no control characters, no trailing
# space.
PATH_SEGMENT_RE = re.compile(r"^[^./\\%=_\s][^/\\%=\x00-\x1f]*(?<!\s)$")


MAX_NETWORKS_ENV = "SWEEP_MAX_GRID_NETWORKS"
DEFAULT_MAX_NETWORKS = 1_000_000  # Buda et al.'s largest grid: 22,500


class GridError(UserError, ValueError):
    """A grid file is malformed or contradictory."""


def max_networks_per_grid() -> int:
    """The most networks one grid may expand to (``SWEEP_MAX_GRID_NETWORKS``, default 1,000,000):
    each spec costs about 2 kB and a millisecond to build; a typo should not cost gigabytes."""
    raw = os.environ.get(MAX_NETWORKS_ENV, "")
    try:
        return int(raw) if raw else DEFAULT_MAX_NETWORKS
    except ValueError:
        raise GridError(f"{MAX_NETWORKS_ENV}={raw!r}: expected a whole number") from None


class _Errors:
    def __init__(self, source: str) -> None:
        self.source = source

    def __call__(self, key: str, problem: str, allowed: str) -> GridError:
        where = f"{self.source}: {key}: " if key else f"{self.source}: "
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
        raise err(p + key, f"unknown value {v!r}", ", ".join(allowed))
    return v


def _choices(err: _Errors, d: dict, key: str, allowed: list[str], p: str, default: list[str],
             allow_empty: bool = False) -> list[str]:
    if allow_empty and d.get(key) == []:
        return []  # e.g. `thresholding: []`: no thresholded evaluations
    vals = _list(err, d, key, default, p)
    seen = []
    for v in vals:
        if v not in allowed:
            raise err(p + key, f"unknown value {v!r}", ", ".join(allowed))
        if v in seen:
            raise err(p + key, f"{v!r} is listed twice", "each value once")
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
            raise err(p + key, f"bad value {x!r}", "numbers or names")
    if key not in ("methods", "thresholding", "losses") and any(isinstance(x, str) for x in v):
        raise err(p + key, f"{v}: expected numbers", "numbers")
    return v


def _num(err: _Errors, d: dict, key: str, default: float, p: str = "") -> float:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise err(p + key, f"bad value {v!r}", "a number")
    return v


def _int(err: _Errors, d: dict, key: str, default: int, p: str = "") -> int:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise err(p + key, f"bad value {v!r}", "an integer")
    return v
