"""Pack leases: two runners writing into one store do not train the same pack twice.

Floor: sweep.store (imports sweep.core only; no torch).

A runner takes ``<store>/_leases/<pack_id>.json`` before it trains a pack (created
exclusively: of two runners only one gets it), refreshes it while the pack trains and
removes it when the pack is stored. Another runner that finds a fresh lease skips that
pack; a lease not refreshed for ``ttl_s``, or held by a process of this host that is gone
(a killed worker, a killed driver), belongs to a runner that died and is taken over.
Leases need a filesystem with exclusive create (local disks, NFS v3+); on others
(object stores) every runner trains what it planned and reads deduplicate the rows.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

LEASES = "_leases"
DEFAULT_TTL_SECONDS = 900.0  # a lease not refreshed for 15 minutes is a dead runner's
REFRESH_SECONDS = 60.0  # how often a running pack touches its lease


@dataclass
class Lease:
    path: str
    owner: str
    _last: float = 0.0

    def refresh(self, force: bool = False) -> None:
        """Touch the lease (at most every REFRESH_SECONDS unless ``force``)."""
        now = time.time()
        if force or now - self._last >= REFRESH_SECONDS:
            with contextlib.suppress(OSError):  # a lost lease costs a duplicate, never results
                os.utime(self.path, (now, now))
            self._last = now

    def release(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if _owner(self.path) == self.owner:
                os.remove(self.path)


def owner_id() -> str:
    """This runner's name in a lease: host, process and a token of this acquisition."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def acquire(folder: str, pack_id: str, ttl_s: float = DEFAULT_TTL_SECONDS) -> Lease | None:
    """The pack's lease, or None while another runner holds a fresh one."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{pack_id}.json")
    owner = owner_id()
    for _ in range(2):  # the second try follows the removal of a stale lease
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                age = time.time() - os.stat(path).st_mtime
            except FileNotFoundError:
                continue  # released between our two calls
            if age < ttl_s and not _holder_is_dead(path):
                log.info("pack %s is being trained by %s (lease %.0f s old): skipped", pack_id, _owner(path), age)
                return None
            log.warning("taking over pack %s: its lease (%s) was not refreshed for %.0f s", pack_id,
                        _owner(path), age)
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            continue
        with os.fdopen(fd, "w") as fh:
            json.dump({"owner": owner, "pack_id": pack_id, "since": time.time()}, fh)
        lease = Lease(path, owner)
        lease.refresh(force=True)
        return lease
    return None


def _holder_is_dead(path: str) -> bool:
    """The lease's process ran on this host and is gone (a killed worker or driver)."""
    owner = _owner(path) or ""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another machine's runner: only its lease's age can tell
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _owner(path: str) -> str | None:
    try:
        with open(path) as fh:
            return json.load(fh).get("owner")
    except (OSError, ValueError):
        return None
