"""The store's commit log: which pack writes are committed, and what is left over.

Floor: sweep.store (pyarrow; imports sweep.core only through the store's modules).

A pack write is committed when its version-2 manifest is in ``_manifests/`` (see
sweep.store.integrity): readers take every committed file from the manifests, and a data
file that no manifest names does not exist for them. This module is the one place that
decides it, including the **legacy branch** for stores written by older versions:

* a version-1 manifest (written before the renames, ``trials`` renamed last) commits its
  write when the write's ``trials`` file exists;
* a store without ``_format.json`` (written before this version) also holds writes with
  no manifest at all: those whose ``trials`` file exists are committed, unchecked but for
  parsing, until :meth:`CommitLog.adopt` records their checksums and writes
  ``_format.json``. From then on a file without a manifest is never read.

Everything else in the store's folders is a **leftover**: temporaries, the files of a
write that never committed, files dropped there by hand. :meth:`CommitLog.leftovers`
lists them with whether they can still become part of a commit (a writer on this host
that is alive), provably never can (its writer is gone, or no writer ever announced it),
or it cannot tell (another host's writer, an older version's temporary).
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from sweep.store import paths
from sweep.store.atomic import atomic_write
from sweep.store.integrity import Manifest, check_file, digest, open_grid, seal_grid
from sweep.store.rows import reason
from sweep.store.schema import TRIALS, StoreError

FORMAT = 2  # _format.json: {"format": 2}

Fate = Literal["live", "dead", "unknown"]


@dataclass(frozen=True)
class Commit:
    """One committed pack write: its manifest (None: a legacy write) and its data files."""

    grid: str
    stem: str
    manifest: Manifest | None
    files: dict[str, str]  # table -> path
    manifest_path: str | None = None
    problem: str | None = None  # the manifest cannot be trusted: the whole write is damaged

    @property
    def key(self) -> tuple[str, str]:
        return (self.grid, self.stem)

    @property
    def network_ids(self) -> tuple[str, ...]:
        return self.manifest.network_ids if self.manifest is not None else ()


@dataclass(frozen=True)
class Leftover:
    """A file in the store's folders that no commit names."""

    path: str
    what: str
    fate: Fate  # live: may still be committed; dead: never will be; unknown: cannot tell
    mtime: float | None


class CommitLog:
    """The commits and leftovers of one store (a pyarrow filesystem and a base path)."""

    def __init__(self, fs: pafs.FileSystem, base: str, root: str) -> None:
        self._fs, self._base, self.root = fs, base, root
        self._parsed: dict[tuple[str, float | None], Manifest | str] = {}  # manifests never change
        self._sealed = False

    # -- listing -----------------------------------------------------------------
    def ls(self, path: str, recursive: bool = True) -> list[pafs.FileInfo]:
        selector = pafs.FileSelector(path, recursive=recursive, allow_not_found=True)
        try:
            return [i for i in self._fs.get_file_info(selector)]
        except (OSError, pa.ArrowException) as exc:
            raise StoreError(f"results store {self.root}: cannot list {path}: {reason(exc)}") from exc

    def table_dirs(self) -> list[str]:
        names = [posixpath.basename(i.path) for i in self.ls(self._base, recursive=False)
                 if i.type == pafs.FileType.Directory]
        return sorted(n for n in names if paths.TABLE_RE.match(n))

    def _files(self, top: str) -> list[pafs.FileInfo]:
        return [i for i in self.ls(paths.table_dir(self._base, top)) if i.type == pafs.FileType.File]

    def data_files(self, tables: Iterable[str] | None = None) -> list[paths.DataPath]:
        out = []
        for table in self.table_dirs() if tables is None else tables:
            for info in self._files(table):
                parsed = paths.parse_data_path(self._base, info.path)
                if parsed is not None:
                    out.append(parsed)
        return sorted(out, key=lambda d: d.path)

    def sealed(self) -> bool:
        """Whether every commit has a manifest (``_format.json`` is there)."""
        if not self._sealed:
            info = self._fs.get_file_info(paths.format_path(self._base))
            self._sealed = info.type == pafs.FileType.File
        return self._sealed

    # -- commits -----------------------------------------------------------------
    def commits(self, trials: list[paths.DataPath] | None = None) -> dict[tuple[str, str], Commit]:
        """Every committed write by (grid, stem)."""
        if trials is None:
            trials = self.data_files([TRIALS])
        with_trials = {d.key for d in trials}
        out: dict[tuple[str, str], Commit] = {}
        for info in self._files(paths.MANIFESTS):
            key = paths.parse_manifest_path(self._base, info.path)
            if key is None:
                continue
            manifest = self._manifest(info)
            grid, stem = key
            if isinstance(manifest, str):
                out[key] = Commit(grid, stem, None, {}, info.path, manifest)
            elif manifest.version >= 2 or key in with_trials:  # version 1: trials was its commit
                problem = None
                if (manifest.grid, manifest.stem) != key:
                    problem = f"manifest names write {manifest.grid}/{manifest.stem}, not the one at its path"
                elif not all(paths.TABLE_RE.match(t) for t in manifest.files):
                    problem = f"manifest names tables that are not table names: {sorted(manifest.files)}"
                # Paths are built here from the table names, never taken from the manifest.
                files = {} if problem else {t: paths.data_path(self._base, t, grid, stem) for t in manifest.files}
                out[key] = Commit(grid, stem, manifest, files, info.path, problem)
        if not self.sealed():
            legacy = [d for d in trials if d.key not in out]
            if legacy:
                keys = {d.key for d in legacy}
                found: dict[tuple[str, str], dict[str, str]] = {k: {} for k in keys}
                for d in self.data_files():
                    if d.key in found:
                        found[d.key][d.table] = d.path
                for grid, stem in sorted(keys):
                    out[(grid, stem)] = Commit(grid, stem, None, found[(grid, stem)])
        return out

    def _manifest(self, info: pafs.FileInfo) -> Manifest | str:
        """The parsed manifest, or what is wrong with it."""
        cache_key = (info.path, _mtime(info))
        if cache_key not in self._parsed:
            try:
                with self._fs.open_input_stream(info.path) as fh:
                    self._parsed[cache_key] = Manifest.from_json(fh.read())
            except (OSError, pa.ArrowException, ValueError) as exc:
                self._parsed[cache_key] = f"manifest unreadable: {reason(exc)}"
        return self._parsed[cache_key]

    # -- leftovers ---------------------------------------------------------------
    def leftovers(self) -> list[Leftover]:
        """Every file of the store's folders that is neither committed nor kept state.

        Listed in the order that makes a concurrent writer safe: data files first, then
        the writes in progress (manifest temporaries), then the commits. A writer creates
        its intent before its first data file and renames it into the manifest, so a data
        file seen here whose write has neither is one that no manifest can ever name.
        """
        data = {t: self._files(t) for t in self.table_dirs()}
        manifest_files = self._files(paths.MANIFESTS)
        intents, manifests = {}, set()
        for info in manifest_files:
            key = paths.parse_intent_path(self._base, info.path)
            if key is not None:
                intents[key] = info.path
            manifests.add(paths.parse_manifest_path(self._base, info.path))
        sealed = self.sealed()
        trials = [d for info in data.get(TRIALS, []) if (d := paths.parse_data_path(self._base, info.path))]
        commits = self.commits(trials)
        named = {p for c in commits.values() for p in c.files.values()}
        committed_manifests = {c.manifest_path for c in commits.values()}
        out = []
        for infos in data.values():
            for info in infos:
                if info.path in named:
                    continue
                parsed = paths.parse_data_path(self._base, info.path)
                if parsed is None:
                    out.append(self._temp_or_stray(info, "temporary file"))
                elif parsed.key in intents:
                    dead = paths.writer_is_dead(intents[parsed.key])
                    out.append(Leftover(info.path, "file of a write in progress" if not dead else
                                        "file of a write whose writer died", "dead" if dead else "live",
                                        _mtime(info)))
                elif sealed and parsed.key not in manifests:
                    out.append(Leftover(info.path, "file no manifest names", "dead", _mtime(info)))
                else:  # an older version's write in progress, or a legacy store's leftover
                    out.append(Leftover(info.path, "uncommitted file", "unknown", _mtime(info)))
        for info in manifest_files:
            if info.path in committed_manifests:
                continue
            if paths.parse_intent_path(self._base, info.path) is not None:
                dead = paths.writer_is_dead(info.path)
                out.append(Leftover(info.path, "commit in progress" if not dead else "commit whose writer died",
                                    "dead" if dead else "live", _mtime(info)))
            elif paths.parse_manifest_path(self._base, info.path) is not None:
                out.append(Leftover(info.path, "manifest of a write never committed", "unknown", _mtime(info)))
            else:
                out.append(self._temp_or_stray(info, "temporary manifest"))
        for folder in (paths.grids_dir(self._base), paths.checkpoints_dir(self._base)):
            for info in self.ls(folder, recursive=False):
                if info.type == pafs.FileType.File and paths.is_temp(info.path):
                    out.append(self._temp_or_stray(info, "temporary file"))
        for info in self.ls(self._base, recursive=False):
            if info.type == pafs.FileType.File and paths.is_probe(info.path):
                out.append(Leftover(info.path, "write probe", "unknown", _mtime(info)))
        return out

    @staticmethod
    def _temp_or_stray(info: pafs.FileInfo, what: str) -> Leftover:
        if not paths.is_temp(info.path):  # put there by hand: removed when old, or by verify --clean
            return Leftover(info.path, "file that is not part of the store", "unknown", _mtime(info))
        if paths.writer_is_dead(info.path):
            return Leftover(info.path, f"{what} whose writer died", "dead", _mtime(info))
        return Leftover(info.path, what, "live" if paths.temp_final_name(info.path) else "unknown", _mtime(info))

    # -- adoption ----------------------------------------------------------------
    def adopt(self) -> tuple[int, list[str]]:
        """Record checksums for the legacy writes and saved grids, then mark the store as
        one where every commit has a manifest. Returns (writes adopted, files refused:
        unreadable ones stay uncommitted, so `sweep verify` lists them)."""
        if self.sealed():
            return 0, []
        adopted, refused = 0, []
        for c in self.commits().values():
            if c.manifest is not None or c.problem is not None:
                continue
            problems = {t: check_file(self._fs, p, None) for t, p in c.files.items()}
            bad = [f"{c.files[t]}: {why}" for t, why in problems.items() if why]
            if bad:
                refused.extend(bad)
                continue
            ids: set[str] = set()
            for path in c.files.values():
                with self._fs.open_input_file(path) as fh:
                    f = pq.ParquetFile(fh)
                    if "network_id" in f.schema_arrow.names:
                        ids.update(n for n in f.read(columns=["network_id"])["network_id"].to_pylist() if n)
            pack_id = c.stem.rsplit("-", 1)[0]
            manifest = Manifest(pack_id, c.grid, c.stem, {t: digest(self._fs, p) for t, p in c.files.items()},
                                tuple(sorted(ids)))
            target = paths.manifest_path(self._base, c.grid, c.stem)
            self._fs.create_dir(posixpath.dirname(target), recursive=True)
            atomic_write(self._fs, target, manifest.to_json())
            adopted += 1
        for info in self.ls(paths.grids_dir(self._base), recursive=False):
            if info.type != pafs.FileType.File or paths.grid_name_of(info.path) is None:
                continue
            with self._fs.open_input_stream(info.path) as fh:
                raw = fh.read()
            if not open_grid(raw)[2]:
                atomic_write(self._fs, info.path, seal_grid(raw))
        self.seal()
        return adopted, refused

    def seal(self) -> None:
        self._fs.create_dir(self._base, recursive=True)
        atomic_write(self._fs, paths.format_path(self._base), json.dumps({"format": FORMAT}).encode())
        self._sealed = True


def _mtime(info: pafs.FileInfo) -> float | None:
    mtime = info.mtime
    return None if mtime is None else mtime.timestamp()
