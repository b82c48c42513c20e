"""Checksums of committed files: what a pack wrote is what every reader reads.

Floor: sweep.store (pyarrow; imports sweep.core only through the store's modules).

Every pack write leaves a manifest, ``_manifests/grid=<grid>/<pack_id>-<attempt>.json``,
written before its files are renamed into place: for each table the file's size and
SHA-256, and the network ids the write holds. Readers check each file against it before
using it (a flipped byte or a truncated file is an error naming the file, never a silently
different number); ``sweep verify`` lists every damaged file with the networks it holds;
``sweep resume --repair`` moves the damaged pack writes to ``_damaged/`` (nothing is
deleted) and trains their networks again. Files written before manifests existed have
none: they are checked to be readable Parquet, not against a checksum.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

MANIFESTS = "_manifests"
DAMAGED = "_damaged"
_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class FileRecord:
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """What one pack write committed."""

    pack_id: str
    grid: str
    stem: str  # <pack_id>-<attempt>, shared by the write's files
    files: dict[str, FileRecord]  # table -> its file's record
    network_ids: tuple[str, ...] = ()

    def to_json(self) -> bytes:
        return json.dumps({"pack_id": self.pack_id, "grid": self.grid, "stem": self.stem,
                           "files": {t: {"bytes": r.bytes, "sha256": r.sha256} for t, r in self.files.items()},
                           "network_ids": list(self.network_ids)}, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "Manifest":
        d = json.loads(raw)
        return cls(d["pack_id"], d["grid"], d["stem"],
                   {t: FileRecord(int(r["bytes"]), str(r["sha256"])) for t, r in d["files"].items()},
                   tuple(d.get("network_ids", ())))


@dataclass(frozen=True)
class Damage:
    """One committed file that is not what was written."""

    table: str
    grid: str
    stem: str
    path: str
    problem: str
    network_ids: tuple[str, ...] = field(default=())

    def describe(self) -> str:
        nets = f"; holds {len(self.network_ids)} networks" if self.network_ids else "; its networks are unknown"
        return f"{self.path}: {self.problem}{nets}"


def digest(fs: pafs.FileSystem, path: str) -> FileRecord:
    """Size and SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    with fs.open_input_stream(path) as f:
        while True:
            chunk = f.read(_CHUNK_BYTES)
            if not chunk:
                break
            h.update(chunk)
            size += len(chunk)
    return FileRecord(size, h.hexdigest())


def check_file(fs: pafs.FileSystem, path: str, record: FileRecord | None) -> str | None:
    """What is wrong with a committed file (None: nothing): checksum, else readability."""
    try:
        if record is not None:
            now = digest(fs, path)
            if now.bytes != record.bytes:
                return f"{now.bytes:,} bytes, {record.bytes:,} were written (truncated or extended)"
            if now.sha256 != record.sha256:
                return "its checksum differs from the one recorded when it was written (changed on disk)"
            return None
        with fs.open_input_file(path) as f:  # no manifest (an older store): must at least parse
            pq.ParquetFile(f).metadata
    except (OSError, pa.ArrowException) as exc:
        return f"unreadable: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
    return None


def network_ids_of(table: pa.Table) -> tuple[str, ...]:
    if "network_id" not in table.column_names:
        return ()
    return tuple(sorted({n for n in table["network_id"].to_pylist() if n is not None}))


def manifest_record(manifest: Manifest | None, table: str) -> FileRecord | None:
    return None if manifest is None else manifest.files.get(table)


def summarize_damage(damage: list[Damage]) -> dict[str, Any]:
    """For messages and ``sweep verify --json``."""
    return {"damaged_files": len(damage),
            "networks": len({n for d in damage for n in d.network_ids}),
            "files": [{"path": d.path, "table": d.table, "grid": d.grid, "problem": d.problem,
                       "network_ids": list(d.network_ids)} for d in damage]}
