"""Every path inside a results store, built and parsed in this one module.

Floor: sweep.store (where results live; standard library and sweep.store.schema only). The other store modules,
the checkpoint writer (workers.checkpoint) and the CLI ask here for a file's name and
never spell one themselves, so the layout of docs/store.md is written down once::

    ROOT/<table>/grid=<grid>/<pack_id>-<attempt>.parquet     data file of one pack write
    ROOT/_manifests/grid=<grid>/<pack_id>-<attempt>.json     that write's commit (sweep.store.integrity)
    ROOT/_manifests/grid=<grid>/.<stem>.json.<writer>.tmp    the commit being written (its intent)
    ROOT/_grids/<grid>.yaml                                  saved grid, first line its checksum
    ROOT/_checkpoints/<pack_id>.pt (+ .json, its checksum)   in-flight pack state
    ROOT/_slurm/<job>.sbatch, <job>.yaml, <job>-<id>.out     `sweep submit`: script, grid copy, job logs
    ROOT/_format.json                                        present: every commit has a manifest

A temporary file is ``.<final name>.<writer>.tmp`` beside its final name, where
``<writer>`` is ``<host hash>-<pid>-<random>``: a later run on the same host can tell
that the process that wrote it is gone, and remove it at once instead of after an hour.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import posixpath
import re
import secrets
import socket
from dataclasses import dataclass

from sweep.store.schema import PARTITION

MANIFESTS = "_manifests"
GRIDS = "_grids"
CHECKPOINTS = "_checkpoints"
DAMAGED = "_damaged"
SLURM = "_slurm"
FORMAT_FILE = "_format.json"
TMP_SUFFIX = ".tmp"
PROBE_PREFIX = ".write-probe-"
DATA_SUFFIX = ".parquet"
MANIFEST_SUFFIX = ".json"
GRID_SUFFIX = ".yaml"
CHECKPOINT_SUFFIX = ".pt"
CHECKPOINT_RECORD_SUFFIX = ".json"

# Grid names and pack ids become path segments; table names are also SQL view names.
TABLE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_WRITER_RE = re.compile(r"^(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-[0-9a-f]{6}$")


def join(*parts: str) -> str:
    return posixpath.join(*parts)


def new_attempt() -> str:
    """A short token, unique per write and ordered by time: ``YYYYmmddTHHMMSSmmmZ`` + 6 hex."""
    now = _dt.datetime.now(_dt.timezone.utc)
    return f"{now:%Y%m%dT%H%M%S}{now.microsecond // 1000:03d}Z{secrets.token_hex(3)}"


def stem(pack_id: str, attempt: str) -> str:
    """``<pack_id>-<attempt>``: the name every file of one pack write shares."""
    return f"{pack_id}-{attempt}"


def attempt_of(name: str) -> str:
    """The attempt token of a stem or of a data file's path (sorts by write time)."""
    base = posixpath.basename(name)
    if base.endswith(DATA_SUFFIX):
        base = base[: -len(DATA_SUFFIX)]
    return base.rsplit("-", 1)[-1]


def stem_of(path: str) -> str:
    """The stem of a data file's path."""
    return posixpath.basename(path)[: -len(DATA_SUFFIX)]


def table_dir(base: str, table: str) -> str:
    return join(base, table)


def partition_dir(base: str, table: str, grid: str) -> str:
    return join(base, table, f"{PARTITION}={grid}")


def data_path(base: str, table: str, grid: str, stem_: str) -> str:
    return join(partition_dir(base, table, grid), stem_ + DATA_SUFFIX)


def manifest_path(base: str, grid: str, stem_: str) -> str:
    return join(partition_dir(base, MANIFESTS, grid), stem_ + MANIFEST_SUFFIX)


def grids_dir(base: str) -> str:
    return join(base, GRIDS)


def grid_path(base: str, name: str) -> str:
    return join(grids_dir(base), name + GRID_SUFFIX)


def checkpoints_dir(base: str) -> str:
    return join(base, CHECKPOINTS)


def checkpoint_path(base: str, pack_id: str) -> str:
    return join(checkpoints_dir(base), pack_id + CHECKPOINT_SUFFIX)


def slurm_dir(base: str) -> str:
    """Where ``sweep submit`` writes a job's sbatch script, its copy of the grid and its logs."""
    return join(base, SLURM)


def checkpoint_record_path(checkpoint: str) -> str:
    """The checksum record written beside a checkpoint file."""
    return checkpoint[: -len(CHECKPOINT_SUFFIX)] + CHECKPOINT_RECORD_SUFFIX


def damaged_dir(base: str, grid: str, stem_: str) -> str:
    return join(base, DAMAGED, grid, stem_)


def format_path(base: str) -> str:
    return join(base, FORMAT_FILE)


def probe_path(base: str) -> str:
    return join(base, f"{PROBE_PREFIX}{secrets.token_hex(6)}")


def is_probe(path: str) -> bool:
    return posixpath.basename(path).startswith(PROBE_PREFIX)


# -- temporary files -------------------------------------------------------------
def _host_hash() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


def temp_path(final: str) -> str:
    """A fresh temporary name beside ``final`` that names this process as its writer."""
    writer = f"{_host_hash()}-{os.getpid()}-{secrets.token_hex(3)}"
    return join(posixpath.dirname(final), f".{posixpath.basename(final)}.{writer}{TMP_SUFFIX}")


def is_temp(path: str) -> bool:
    name = posixpath.basename(path)
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


def temp_final_name(path: str) -> str | None:
    """The final file name a temporary of :func:`temp_path` becomes (None: not one of them)."""
    name = posixpath.basename(path)
    if not is_temp(name):
        return None
    head, _, writer = name[1: -len(TMP_SUFFIX)].rpartition(".")
    return head if _WRITER_RE.match(writer) else None


def writer_is_dead(path: str) -> bool:
    """The temporary's writer ran on this host and its process is gone.

    False when it cannot be proven: another host's writer, a temporary named by an older
    version (no writer in its name), or a process that still exists.
    """
    name = posixpath.basename(path)
    if not is_temp(name):
        return False
    m = _WRITER_RE.match(name[1: -len(TMP_SUFFIX)].rpartition(".")[2])
    if m is None or m["host"] != _host_hash():
        return False
    pid = int(m["pid"])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OSError):
        return False
    return False


# -- parsing -----------------------------------------------------------------------
@dataclass(frozen=True)
class DataPath:
    """A data file of one pack write, parsed from its path."""

    table: str
    grid: str
    stem: str
    path: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.grid, self.stem)


def parse_partition_file(base: str, path: str, top: str) -> tuple[str, str] | None:
    """(grid, file name) of ``ROOT/<top>/grid=<grid>/<name>``; None for any other path."""
    rel = path[len(base):].strip("/").split("/") if path.startswith(base) else []
    if len(rel) != 3 or rel[0] != top or not rel[1].startswith(f"{PARTITION}="):
        return None
    return rel[1].split("=", 1)[1], rel[2]


def parse_data_path(base: str, path: str) -> DataPath | None:
    """A data file's table, grid and stem; None for temporaries, manifests and other names."""
    rel = path[len(base):].strip("/").split("/") if path.startswith(base) else []
    if len(rel) != 3 or not TABLE_RE.match(rel[0]):
        return None
    parsed = parse_partition_file(base, path, rel[0])
    if parsed is None:
        return None
    grid, name = parsed
    if name.startswith((".", "_")) or not name.endswith(DATA_SUFFIX):
        return None  # names starting with . or _ are never data
    return DataPath(rel[0], grid, name[: -len(DATA_SUFFIX)], path)


def parse_manifest_path(base: str, path: str) -> tuple[str, str] | None:
    """(grid, stem) of a committed manifest's path; None for temporaries and other names."""
    parsed = parse_partition_file(base, path, MANIFESTS)
    if parsed is None:
        return None
    grid, name = parsed
    if name.startswith((".", "_")) or not name.endswith(MANIFEST_SUFFIX):
        return None
    return grid, name[: -len(MANIFEST_SUFFIX)]


def parse_intent_path(base: str, path: str) -> tuple[str, str] | None:
    """(grid, stem) of a manifest being written (its temporary): a write in progress or dead."""
    parsed = parse_partition_file(base, path, MANIFESTS)
    final = temp_final_name(path) if parsed else None
    if parsed is None or final is None or not final.endswith(MANIFEST_SUFFIX):
        return None
    return parsed[0], final[: -len(MANIFEST_SUFFIX)]


def grid_name_of(path: str) -> str | None:
    """The grid name of a saved grid's path (None: a temporary or another file)."""
    name = posixpath.basename(path)
    if name.startswith(".") or not name.endswith(GRID_SUFFIX):
        return None
    return name[: -len(GRID_SUFFIX)]
