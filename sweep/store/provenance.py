"""Provenance stamped on every stored row: which code, which grid file, which machine.

Floor: sweep.store (where results live; imports sweep.core only, no torch).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
from functools import lru_cache
from importlib import metadata

log = logging.getLogger(__name__)

DIST_NAME = "imbalance-sweep"
UNKNOWN_VERSION = "0+unknown"
_GIT_TIMEOUT_S = 2.0


def provenance(grid_hash: str, device: str) -> dict[str, str | None]:
    """The provenance columns of a ``trials`` row (see docs/store.md)."""
    return {
        "package_version": package_version(),
        "git_commit": git_commit(),
        "grid_hash": grid_hash,
        "device": device,
        "host": host(),
    }


@lru_cache(maxsize=1)
def package_version() -> str:
    try:
        return metadata.version(DIST_NAME)
    except metadata.PackageNotFoundError:
        return UNKNOWN_VERSION


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """HEAD of the checkout this package runs from; None for an installed copy or no git."""
    source = _source_root()
    # Only ask git when the package sits directly in a checkout: an installed copy in a
    # virtualenv inside some other repository must not report that repository's commit.
    if not os.path.exists(os.path.join(source, ".git")):
        return None
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=source,
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("git rev-parse failed in %s: %s", source, exc)
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else None


@lru_cache(maxsize=1)
def host() -> str:
    return socket.gethostname()


def _source_root() -> str:
    """The folder holding the ``sweep`` package (the repository root in a checkout): this
    module is sweep/store/provenance.py, three levels below it."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
