"""The one way anything is written into a store: temporary name, fsync, rename.

Floor: sweep.store (pyarrow filesystems; no torch). Pack writes, manifests, saved grids,
the format marker and pack checkpoints all go through :func:`atomic_write`, so a reader
sees a file whole or not at all, and a crash leaves only a temporary whose name says who
wrote it (``sweep.store.paths.temp_path``).

On a local disk the temporary is fsynced before the rename and its folder after it: a
machine that loses power must not come back with a renamed but empty file, nor with a
commit (a manifest's rename) that never reached the disk. Object stores have no fsync and
no atomic rename; there a write is only as atomic as the filesystem's ``move``.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable
from typing import BinaryIO

import pyarrow as pa
import pyarrow.fs as pafs

from sweep.store.paths import temp_path

Writer = Callable[[BinaryIO], None]


def is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def atomic_write(fs: pafs.FileSystem, final: str, content: bytes | Writer, temp: str | None = None) -> None:
    """Write ``content`` (bytes, or a function writing to a binary file) to ``final``.

    ``temp``: the temporary to write through (default: a fresh :func:`temp_path`); a
    caller that must have its temporary on disk before it writes (a manifest's intent)
    creates it first with :func:`create_temp`. On any error the temporary is removed and
    ``final`` is untouched.
    """
    temp = temp or temp_path(final)
    write = content if callable(content) else (lambda fh: fh.write(content))  # type: ignore[misc]
    try:
        if is_local(fs):
            with open(temp, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(temp, final)
            fsync_dir(posixpath.dirname(final))
        else:
            with fs.open_output_stream(temp) as out:
                write(out)  # type: ignore[arg-type]
            fs.move(temp, final)
    except BaseException:
        remove_quietly(fs, temp)
        raise


def create_temp(fs: pafs.FileSystem, final: str) -> str:
    """An empty temporary for ``final``, on disk now (see :func:`atomic_write`'s ``temp``)."""
    temp = temp_path(final)
    if is_local(fs):
        with open(temp, "wb"):
            pass  # no fsync: an intent lost to a power cut only makes its leftovers wait an hour
    else:
        with fs.open_output_stream(temp):
            pass
    return temp


def fsync_dir(path: str) -> None:
    """Make a rename in ``path`` durable (local disks; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and platforms) refuse fsync on a folder: nothing more to do
    finally:
        os.close(fd)


def remove_quietly(fs: pafs.FileSystem, path: str) -> bool:
    """Remove a file; False when it was not there or could not be removed."""
    try:
        fs.delete_file(path)
        return True
    except (OSError, pa.ArrowException):
        return False
