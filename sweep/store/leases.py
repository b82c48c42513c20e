"""Pack leases: two runners writing into one store do not train the same pack twice.

Floor: sweep.store (imports sweep.core only; no torch).

A runner takes ``<store>/_leases/<pack_id>.json`` before it trains a pack, keeps it fresh
with a heartbeat thread while the pack loads, trains, evaluates, computes latent
statistics and writes (a timer independent of the pack's progress: a latent pass or an
evaluation that reports nothing for an hour still holds its lease), and removes it when
the pack is stored. Another runner that finds a fresh lease skips that pack; a lease not
refreshed for ``ttl_s``, held by a process of this host that is gone (a killed worker, a
killed driver), or that cannot be read (empty, not JSON: what an old full disk left) is a
dead runner's and is taken over, with a warning.

A lease is written whole before it becomes visible: its content goes to a temporary
file that is then hard-linked to the lease's name (``link`` fails when the name exists,
so of two runners only one gets it). A reader therefore never sees a half-written lease,
and a write that fails (a full disk) leaves nothing behind and raises
:class:`LeaseError` naming the path and the bytes. On a filesystem without hard links
the lease is created exclusively (``O_EXCL``) and written, and removed if the write
fails. Leases need exclusive create (local disks, NFS v3+); on others (object stores)
every runner trains what it planned and reads deduplicate the rows.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field

from sweep.core.errors import UserError

log = logging.getLogger(__name__)

LEASES = "_leases"
DEFAULT_TTL_SECONDS = 900.0  # a lease not refreshed for 15 minutes is a dead runner's
REFRESH_SECONDS = 60.0  # how often the heartbeat touches a held lease (15 beats per TTL)
# errno values of a filesystem that has no hard links (FAT, some FUSE and SMB mounts).
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS, errno.EMLINK}


class LeaseError(UserError, OSError):
    """A lease could not be written (a full disk, a read-only store); the message names the
    path and the bytes."""


@dataclass
class Lease:
    path: str
    owner: str
    _last: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _beat: threading.Thread | None = field(default=None, repr=False)

    def refresh(self, force: bool = False) -> None:
        """Touch the lease (at most every REFRESH_SECONDS unless ``force``)."""
        now = time.time()
        if force or now - self._last >= REFRESH_SECONDS:
            try:
                os.utime(self.path, (now, now))
            except OSError as exc:  # a lost lease costs a duplicate, never results
                log.warning("lease %s could not be refreshed: %s", self.path, exc)
            self._last = now

    def start_heartbeat(self, interval_s: float | None = None) -> None:
        """Refresh the lease every ``interval_s`` (default REFRESH_SECONDS, read at the call)
        from a daemon thread until :meth:`release`.

        Independent of the pack's progress reports: loading, evaluation, latent statistics
        and the write report rarely or never, and a lease must outlive each of them."""
        if self._beat is not None:
            return
        self._stop.clear()
        interval = REFRESH_SECONDS if interval_s is None else interval_s

        def beat() -> None:
            while not self._stop.wait(interval):
                holder = _owner(self.path)
                if holder is not None and holder != self.owner:
                    # Taken over (this runner stalled past the TTL): touching it would keep
                    # the new holder's lease alive for it, and say nothing about ours.
                    log.warning("lease %s was taken over by %s; this runner's pack may be stored twice "
                                "(reads keep one copy)", self.path, holder)
                    return
                self.refresh(force=True)

        self._beat = threading.Thread(target=beat, name=f"lease-heartbeat:{os.path.basename(self.path)}",
                                      daemon=True)  # daemon: a killed runner's lease must go stale
        self._beat.start()

    @property
    def beating(self) -> bool:
        """Whether the heartbeat thread is running."""
        return self._beat is not None and self._beat.is_alive()

    def stop_heartbeat(self) -> None:
        """Stop the heartbeat and wait for it (it is between two touches within one interval)."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if this runner still holds it."""
        self.stop_heartbeat()
        with contextlib.suppress(FileNotFoundError):
            if _owner(self.path) == self.owner:
                os.remove(self.path)


def owner_id() -> str:
    """This runner's name in a lease: host, process and a token of this acquisition."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def acquire(folder: str, pack_id: str, ttl_s: float = DEFAULT_TTL_SECONDS) -> Lease | None:
    """The pack's lease, or None while another runner holds a fresh one.

    Raises :class:`LeaseError` when the lease cannot be written (a full disk); nothing is
    left behind then. The caller starts the heartbeat (:meth:`Lease.start_heartbeat`)."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise LeaseError(f"cannot create the lease folder {folder}: {exc.strerror or exc}") from exc
    path = os.path.join(folder, f"{pack_id}.json")
    owner = owner_id()
    body = json.dumps({"owner": owner, "pack_id": pack_id, "since": time.time()}).encode()
    for _ in range(2):  # the second try follows the removal of a stale lease
        if _create(path, body):
            lease = Lease(path, owner)
            lease.refresh(force=True)
            return lease
        raw = _read(path)
        holder = _owner_in(raw)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue  # released between our two calls
        age = time.time() - st.st_mtime
        if holder is None:
            # Written whole before it is visible (_create), so unreadable means damaged or
            # left by a write that failed: nobody can hold it.
            log.warning("taking over pack %s: its lease %s cannot be read (empty or not a lease)", pack_id, path)
        elif age < ttl_s and not _holder_is_dead(holder):
            log.info("pack %s is being trained by %s (lease %.0f s old): skipped", pack_id, holder, age)
            return None
        else:
            log.warning("taking over pack %s: its lease (%s) was not refreshed for %.0f s", pack_id, holder, age)
        _remove_if_same(path, st.st_ino, raw)
    return None


def _remove_if_same(path: str, inode: int, content: bytes | None) -> None:
    """Remove the lease judged stale, but not one another runner put there since.

    Two runners that both judged a lease stale would otherwise each remove it, and the
    second would remove the first's new lease: both would train the pack. The lease is
    moved aside atomically and put back if it is not the file that was judged: another
    inode, or other bytes (inode numbers are reused as soon as a file is removed; a new
    lease's bytes name its own owner)."""
    aside = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{secrets.token_hex(4)}.stale")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # removed by its holder or another taker: the next try decides
    try:
        if os.stat(aside).st_ino != inode or _read(aside) != content:
            with contextlib.suppress(FileExistsError):
                os.link(aside, path)  # a fresh lease taken meanwhile: give it back
    finally:
        with contextlib.suppress(OSError):
            os.remove(aside)


def _create(path: str, body: bytes) -> bool:
    """Create ``path`` holding ``body``, or False if it exists. Never leaves an empty or
    partial file at ``path``; raises LeaseError when the bytes cannot be written."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    try:
        _write_new(tmp, body, path)
        try:
            os.link(tmp, path)  # atomic and exclusive: fails if the name exists
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_LINKS:
                raise LeaseError(f"cannot create lease {path}: {exc.strerror or exc}") from exc
        # No hard links here: create exclusively, then write (removed if the write fails).
        try:
            _write_new(path, body, path)
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def _write_new(target: str, body: bytes, lease_path: str) -> None:
    """Write ``body`` to a new file ``target`` (O_EXCL) and fsync it; on failure remove it."""
    try:
        fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        raise
    except OSError as exc:  # no inode left, a read-only store
        raise LeaseError(f"cannot write lease {lease_path} ({len(body)} bytes): {exc.strerror or exc}") from exc
    try:
        view = memoryview(body)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.remove(target)
        raise LeaseError(f"cannot write lease {lease_path} ({len(body)} bytes): {exc.strerror or exc}") from exc
    os.close(fd)


def _holder_is_dead(owner: str) -> bool:
    """The lease's process ran on this host and is gone (a killed worker or driver)."""
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


def _read(path: str) -> bytes | None:
    """A lease's bytes (None if it cannot be read); a lease is ~100 bytes, so never more
    than 64 KB of whatever file sits at its name."""
    try:
        with open(path, "rb") as fh:
            return fh.read(64 * 1024)
    except OSError:
        return None


def _owner_in(raw: bytes | None) -> str | None:
    """The owner a lease's bytes name; None when they are not a lease."""
    try:
        doc = json.loads(raw) if raw is not None else None
    except ValueError:
        return None
    owner = doc.get("owner") if isinstance(doc, dict) else None
    return owner if isinstance(owner, str) and owner else None


def _owner(path: str) -> str | None:
    """The owner a lease names; None when it cannot be read or is not a lease."""
    return _owner_in(_read(path))
