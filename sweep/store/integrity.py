"""Checksums and commits: what a pack wrote is what every reader reads.

Floor: sweep.store (pyarrow; imports sweep.core only through the store's modules).

A pack write is committed by exactly one file, its manifest
``_manifests/grid=<grid>/<pack_id>-<attempt>.json`` (version 2), renamed into place after
every data file it names is: for each table the file's size, SHA-256 and rows, and the
network ids the write holds. A data file that no manifest names is not part of the store.
Readers check each file against its record before using it (a flipped byte or a truncated
file is an error naming the file, never a silently different number); ``sweep verify``
lists every damaged file with the networks it holds, and every file no commit names;
``sweep resume --repair`` moves the damaged pack writes to ``_damaged/`` (nothing is
deleted) and trains their networks again.

Saved grids carry their checksum in their first line (a YAML comment, so the file stays
the grid it was); pack checkpoints get a record beside them. Both are refused when they
do not match.

Older stores (the legacy branch of ``ResultStore``): manifests of version 1 were written
*before* the data files were renamed, with ``trials`` renamed last as the commit marker,
so such a write counts as committed when its trials file exists; writes from before
manifests existed have no record and are checked to parse, until ``sweep verify --adopt``
(or the first write with this version) records their checksums.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

MANIFEST_VERSION = 2  # 2: the manifest is the commit; 1 (no "version" key): trials renamed last was
_CHUNK_BYTES = 1 << 20
_GRID_HEADER = "# sweep-checksum sha256={sha256} bytes={bytes} (of the lines below; written by sweep)\n"
_GRID_HEADER_RE = re.compile(rb"^# sweep-checksum sha256=([0-9a-f]{64}) bytes=(\d+) [^\n]*\n")


@dataclass(frozen=True)
class FileRecord:
    bytes: int
    sha256: str
    rows: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"bytes": self.bytes, "sha256": self.sha256}
        if self.rows is not None:
            d["rows"] = self.rows
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FileRecord":
        sha = str(d["sha256"])
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise ValueError(f"not a SHA-256: {sha!r}")
        rows = d.get("rows")
        return cls(int(d["bytes"]), sha, None if rows is None else int(rows))

    @classmethod
    def of_bytes(cls, raw: bytes) -> "FileRecord":
        return cls(len(raw), hashlib.sha256(raw).hexdigest())


@dataclass(frozen=True)
class Manifest:
    """What one pack write committed."""

    pack_id: str
    grid: str
    stem: str  # <pack_id>-<attempt>, shared by the write's files
    files: dict[str, FileRecord]  # table -> its file's record
    network_ids: tuple[str, ...] = ()
    version: int = MANIFEST_VERSION

    def to_json(self) -> bytes:
        d = {"pack_id": self.pack_id, "grid": self.grid, "stem": self.stem,
             "files": {t: r.to_dict() for t, r in self.files.items()}, "network_ids": list(self.network_ids)}
        if self.version >= 2:  # version 1 manifests had no such key: they stay byte-identical
            d["version"] = self.version
        return json.dumps(d, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "Manifest":
        """Parse a manifest; ValueError for anything that is not one (damage, not a crash)."""
        try:
            d = json.loads(raw)
            version = int(d.get("version", 1))
            files = {str(t): FileRecord.from_dict(r) for t, r in d["files"].items()}
            ids = tuple(str(n) for n in d.get("network_ids", ()))
            return cls(str(d["pack_id"]), str(d["grid"]), str(d["stem"]), files, ids, version)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"not a manifest: {exc}") from None


@dataclass(frozen=True)
class Damage:
    """One committed file that is not what was written."""

    table: str
    grid: str
    stem: str
    path: str
    problem: str
    network_ids: tuple[str, ...] = field(default=())

    @property
    def key(self) -> tuple[str, str]:
        """The pack write it belongs to: (grid, stem)."""
        return (self.grid, self.stem)

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
            return check_record(digest(fs, path), record)
        with fs.open_input_file(path) as f:  # no manifest (an older store): must at least parse
            pq.ParquetFile(f).metadata
    except FileNotFoundError:
        return "missing: its commit names it, but it is not there"
    except (OSError, pa.ArrowException) as exc:
        return f"unreadable: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
    return None


def check_record(now: FileRecord, record: FileRecord) -> str | None:
    """What differs between a file as it is now and as it was written (None: nothing)."""
    if now.bytes != record.bytes:
        return f"{now.bytes:,} bytes, {record.bytes:,} were written (truncated or extended)"
    if now.sha256 != record.sha256:
        return "its checksum differs from the one recorded when it was written (changed on disk)"
    return None


def seal_grid(raw: bytes) -> bytes:
    """A grid file's saved form: a first line (a YAML comment) with the checksum of the rest."""
    body = open_grid(raw)[0]  # a grid saved before is saved again under one header, not two
    record = FileRecord.of_bytes(body)
    return _GRID_HEADER.format(sha256=record.sha256, bytes=record.bytes).encode() + body


def open_grid(raw: bytes) -> tuple[bytes, str | None, bool]:
    """(the grid file as it was given, what is wrong with it or None, whether it had a checksum)."""
    m = _GRID_HEADER_RE.match(raw)
    if m is None:
        return raw, None, False
    body = raw[m.end():]
    return body, check_record(FileRecord.of_bytes(body), FileRecord(int(m[2]), m[1].decode())), True


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
