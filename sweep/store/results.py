"""The results store: Parquet tables, hive-partitioned by grid, written one pack at a time.

Floor: sweep.store (where results live; imports sweep.core only, no torch).
It is longer than 400 lines because the write protocol (the manifest as the commit,
clean-up) and the read rules (committed files only, checksums, latest row per trial) are
one contract and are checked together.

Paths are sweep.store.paths' (docs/store.md); every file is written by
sweep.store.atomic. A pack write, :meth:`ResultStore.write_pack`, is:

1. the *intent*: an empty temporary of the write's manifest, whose name says which
   process writes it (so a later run knows whether the write can still finish);
2. each table's file, written to a temporary, fsynced and renamed to
   ``<table>/grid=<grid>/<pack_id>-<attempt>.parquet``; no manifest names it yet, so
   no reader sees it;
3. the manifest (each file's size, SHA-256 and rows; the write's network ids) written into
   the intent, fsynced and renamed to ``_manifests/grid=<grid>/<stem>.json``: this
   rename is the write's one commit point; then the folder is fsynced.

Readers (``read_table``, completed ids, ``sweep query``, status, resume, compact) take
committed files from manifests only (sweep.store.commits, which also holds the legacy
branch for older stores), check each against its record, and resolve the duplicates that
writing a pack again creates: per ``(grid, trial_id)`` the row with the latest
``created_at`` wins, ties going to the later attempt.
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import logging
import os
import posixpath
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Literal

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from sweep.core.grid import Grid, GridError, expand
from sweep.core.grid_checks import PATH_SEGMENT_RE
from sweep.core.plan import Pack
from sweep.store import paths
from sweep.store.atomic import atomic_write, create_temp, remove_quietly
from sweep.store.commits import Commit, CommitLog, Leftover
from sweep.store.integrity import (
    Damage,
    FileRecord,
    Manifest,
    check_file,
    digest,
    network_ids_of,
    open_grid,
    seal_grid,
)
from sweep.store.leases import LEASES
from sweep.store.paths import CHECKPOINTS, GRIDS, new_attempt  # noqa: F401  (re-exported)
from sweep.store.rows import (
    FILE_COL,
    Filters,
    TableData,
    check_columns,
    drop_partition_column,
    filters as parse_filters,
    latest_rows,
    prepare_trials,
    reason,
    rows_of_latest_packs,
    to_arrow,
    union,
)
from sweep.store.schema import COMPLETED, PARTITION, TRIALS, Measurement, StoreError, trial_row

log = logging.getLogger(__name__)

_NAME_RE = PATH_SEGMENT_RE  # grid names and pack ids become path segments
_TABLE_RE = paths.TABLE_RE
_PARTITIONING = ds.partitioning(pa.schema([(PARTITION, pa.string())]), flavor="hive")
_MAX_IO_THREADS = 16


@dataclass(frozen=True)
class _DataFile:
    """A committed data file and the record its manifest holds (None: a legacy write)."""

    table: str
    grid: str
    stem: str  # <pack_id>-<attempt>: shared by all tables of one write_pack call
    path: str
    record: FileRecord | None

    @property
    def key(self) -> tuple[str, str]:
        return (self.grid, self.stem)


class ResultStore:
    """A folder (local path or pyarrow filesystem URI) of hive-partitioned Parquet tables.

    What a pack run writes to (``workers.store_sink.StoreSink``: ``write_pack``,
    ``is_local``, ``base_path``, ``lease_dir``, ``completed_network_ids``)."""

    def __init__(self, root: str, on_damage: Literal["raise", "skip"] = "raise") -> None:
        """``on_damage``: a committed file that fails its checksum raises StoreError when
        read ("raise"), or its whole pack write is left out as if never stored ("skip":
        what ``sweep status`` shows and ``resume --repair`` retrains). In "skip" mode a
        write damaged in any table is left out of every table."""
        if on_damage not in ("raise", "skip"):
            raise ValueError(f"on_damage must be 'raise' or 'skip', got {on_damage!r}")
        self.root = str(root)
        self.on_damage = on_damage
        self._fs, self._base = _resolve(self.root)
        self._log = CommitLog(self._fs, self._base, self.root)
        self._checked: dict[tuple[str, int | None, int | None], str | None] = {}  # (path, size, mtime) -> problem

    def __repr__(self) -> str:
        return f"ResultStore({self.root!r})"

    @property
    def is_local(self) -> bool:
        return isinstance(self._fs, pafs.LocalFileSystem)

    @property
    def base_path(self) -> str:
        """The root as a path of the store's filesystem (absolute for local stores)."""
        return self._base

    # -- writing ---------------------------------------------------------------
    def check_writable(self) -> None:
        """Create the root if needed and write/remove a probe file; never touches data."""
        probe = paths.probe_path(self._base)
        try:
            self._fs.create_dir(self._base, recursive=True)
            with self._fs.open_output_stream(probe) as out:
                out.write(b"probe")
        except (OSError, pa.ArrowException) as exc:
            raise StoreError(f"results store {self.root} is not writable: {reason(exc)}") from exc
        finally:
            remove_quietly(self._fs, probe)

    def write_pack(self, pack_id: str, grid: str, tables: Mapping[str, TableData]) -> None:
        """Store one pack's tables atomically: its manifest's rename commits it (module doc).

        Empty tables are skipped. When some other table has rows but ``trials`` has none,
        an empty ``trials`` file is still written, so that every write has one.
        """
        _check_name("pack_id", pack_id, _NAME_RE)
        _check_name("grid", grid, _NAME_RE)
        prepared = self._prepare(tables)
        if not prepared:
            return
        stem = paths.stem(pack_id, new_attempt())
        manifest_path = paths.manifest_path(self._base, grid, stem)
        created: list[str] = []  # undone in this order when the write fails: the manifest first
        intent = None
        where = self._base  # for the error message: the file being written
        need = 0  # bytes this write puts on disk, for a full disk's message
        try:
            self._adopt_before_first_write()
            self._fs.create_dir(posixpath.dirname(manifest_path), recursive=True)
            where = manifest_path
            intent = create_temp(self._fs, manifest_path)
            records = {}
            for name in sorted(prepared):  # any order: nothing is visible before the manifest
                where = paths.data_path(self._base, name, grid, stem)
                self._fs.create_dir(posixpath.dirname(where), recursive=True)
                need += prepared[name].nbytes
                created.append(where)
                self._write_file(prepared[name], where)
                records[name] = replace(digest(self._fs, where), rows=prepared[name].num_rows)
            ids = tuple(sorted({i for t in prepared.values() for i in network_ids_of(t)}))
            where = manifest_path
            created.insert(0, manifest_path)
            atomic_write(self._fs, manifest_path, Manifest(pack_id, grid, stem, records, ids).to_json(), intent)
        except BaseException as exc:
            # Everything this call created is new (unique attempt): removing it loses nothing.
            for path in created + ([intent] if intent else []):
                remove_quietly(self._fs, path)
            if not isinstance(exc, Exception):
                raise  # KeyboardInterrupt and friends: clean up, then let them through
            full = isinstance(exc, OSError) and exc.errno == errno.ENOSPC
            raise StoreError(
                f"results store {self.root}: writing pack {pack_id} (grid {grid}) failed "
                f"at {where}: {reason(exc)}"
                + (f"; the pack needs about {need:,} bytes there (nothing was stored, "
                   f"everything stored before is intact)" if full else "")
            ) from exc
        log.debug("stored pack %s of grid %s as %s (%s)", pack_id, grid, stem, ", ".join(sorted(prepared)))

    def _adopt_before_first_write(self) -> None:
        """A store of an older version gets its legacy writes' manifests (and its format
        marker) before its first version-2 write: from then on only manifests commit."""
        if self._log.sealed():
            return
        adopted, refused = self._log.adopt()
        if adopted or refused:
            log.warning("results store %s: recorded checksums of %d pack writes stored before manifests%s",
                        self.root, adopted, f"; {len(refused)} unreadable file(s) left out: {refused[:3]}"
                        if refused else "")

    def adopt(self) -> tuple[int, list[str]]:
        """``sweep verify --adopt``: see :meth:`sweep.store.commits.CommitLog.adopt`."""
        try:
            return self._log.adopt()
        finally:
            self._checked.clear()

    def _prepare(self, tables: Mapping[str, TableData]) -> dict[str, pa.Table]:
        prepared: dict[str, pa.Table] = {}
        for name, data in tables.items():
            _check_name("table name", name, _TABLE_RE)
            table = drop_partition_column(to_arrow(name, data))
            if table.num_rows or name == TRIALS:
                prepared[name] = table
        if not any(t.num_rows for t in prepared.values()):
            return {}
        prepared[TRIALS] = prepare_trials(prepared.get(TRIALS))
        return prepared

    def _write_file(self, table: pa.Table, path: str) -> None:
        atomic_write(self._fs, path, lambda fh: pq.write_table(table, fh, compression="zstd"))

    def cleanup_uncommitted(self, min_age_s: float = 0.0) -> int:
        """Remove leftovers: temporaries and files that no commit names.

        A leftover that provably never becomes part of a commit (its writer on this host
        is gone, or no writer announced it) is removed whatever its age. Others only when
        at least ``min_age_s`` seconds old; with ``min_age_s`` 0 everything is removed but
        what a live process on this host is writing. Pass a positive age when another host
        may be writing to the same store right now. Returns the number of files removed.
        """
        cutoff = time.time() - min_age_s
        removed = 0
        for left in self.leftovers():
            old = left.mtime is None or left.mtime <= cutoff
            if left.fate == "dead" or (old and (min_age_s > 0 or left.fate != "live")):
                removed += self._remove_logged(left.path, left.what)
        return removed

    def leftovers(self) -> list[Leftover]:
        """Files in the store's folders that no commit names (``sweep verify`` lists them)."""
        return self._log.leftovers()

    def _remove_logged(self, path: str, what: str) -> int:
        if remove_quietly(self._fs, path):
            log.info("removed %s %s", what, path)
            return 1
        log.warning("could not remove %s %s", what, path)
        return 0

    def record_failure(self, pack: Pack, error: str, grid: str) -> None:
        """Store a pack that finally failed: ``failed`` trial rows and one ``failures`` row
        per network. Trials already completed in this grid are left alone (a pack that
        stored its rows and failed afterwards must not be masked by a later failed row).
        """
        done = self.completed_trial_ids(grid=grid)
        now = _dt.datetime.now(_dt.timezone.utc)
        trials, failures = [], []
        for spec in pack.stored_specs:
            todo = [e for e in spec.evaluations if spec.trial_id(e) not in done]
            if not todo:
                continue
            failures.append({"network_id": spec.network_id, "pack_id": pack.pack_id,
                             "error": error, "created_at": now, "spec_json": spec.to_json()})
            for e in todo:
                trials.append(trial_row(spec, e, pack.pack_id, Measurement.failed(error), now))
        self.write_pack(pack.pack_id, grid, {"trials": trials, "failures": failures})

    def save_grid(self, grid: Grid) -> None:
        """Keep a copy of the grid file as ``_grids/<name>.yaml``, for ``sweep resume``.

        The copy starts with a comment line holding the checksum of the rest (the grid
        file as given), so a changed byte is refused when the copy is used. The copy of a
        grid run earlier under the same name is replaced. A grid that was not read from a
        file (expanded in memory) cannot be copied and is skipped.
        """
        _check_name("grid", grid.name, _NAME_RE)
        try:
            with open(grid.path, "rb") as fh:
                raw = fh.read()
        except OSError as exc:
            log.warning("grid %s not saved in %s: cannot read %s (%s)", grid.name, self.root, grid.path, exc)
            return
        # A saved copy (`sweep compact` saves a store's grids again) is hashed without its header.
        if grid.file_hash and hashlib.sha256(open_grid(raw)[0]).hexdigest() != grid.file_hash:
            log.warning("grid file %s changed since it was loaded; saving its current content", grid.path)
        final = paths.grid_path(self._base, grid.name)
        try:
            self._fs.create_dir(paths.grids_dir(self._base), recursive=True)
            atomic_write(self._fs, final, seal_grid(raw))
        except (OSError, pa.ArrowException) as exc:
            raise StoreError(f"results store {self.root}: cannot save grid to {final}: {reason(exc)}") from exc

    def _grid_files(self) -> list[tuple[str, bytes | None, str | None]]:
        """(path, the grid as given or None, what is wrong with it) of every saved grid."""
        out = []
        for info in self._log.ls(paths.grids_dir(self._base), recursive=False):
            if info.type != pafs.FileType.File or paths.grid_name_of(info.path) is None:
                continue
            try:
                with self._fs.open_input_stream(info.path) as fh:
                    raw = fh.read()
            except (OSError, pa.ArrowException) as exc:
                out.append((info.path, None, f"unreadable: {reason(exc)}"))
                continue
            body, problem, recorded = open_grid(raw)
            if problem is None and not recorded and self._log.sealed():
                problem = ("no checksum: not saved by `sweep run` (`sweep verify --adopt` records one "
                           "for a copy you trust)")
            out.append((info.path, body, problem))
        return out

    def saved_grids(self) -> list[Grid]:
        """The grids saved by :meth:`save_grid`, expanded again, sorted by name.

        A copy that is not what was saved is refused (StoreError naming it): resuming it
        would train networks nobody asked for."""
        import yaml

        from sweep.core.grid_checks import parse_grid_yaml

        grids = []
        for path, body, problem in self._grid_files():
            if problem is not None:
                raise StoreError(f"results store {self.root}: saved grid {path} is damaged ({problem}); "
                                 "`sweep run GRID_FILE --store ...` with the original grid file saves it again")
            try:
                doc = parse_grid_yaml(body, path)  # a saved grid gets the grid file's own limits
                grids.append(expand(doc, source=path, file_hash=hashlib.sha256(body).hexdigest()))
            except (yaml.YAMLError, GridError) as exc:
                raise StoreError(f"results store {self.root}: saved grid {path} "
                                 f"cannot be loaded: {reason(exc)}") from exc
        return sorted(grids, key=lambda g: g.name)

    # -- reading ---------------------------------------------------------------
    def exists(self) -> bool:
        """Whether the root folder exists (readers treat a missing one as empty; the CLI does not)."""
        try:
            info = self._fs.get_file_info(self._base)
        except (OSError, pa.ArrowException) as exc:
            raise StoreError(f"results store {self.root}: cannot open: {reason(exc)}") from exc
        if info.type == pafs.FileType.NotFound:
            return False
        if info.type != pafs.FileType.Directory:
            raise StoreError(f"results store {self.root} is not a folder")
        return True

    def table_names(self) -> list[str]:
        """Tables with at least one committed file, sorted."""
        named = sorted({t for c in self._log.commits().values() for t in c.files})
        return [t for t in named if self.files(t)]

    def columns(self, table: str) -> list[str]:
        """The columns of ``table`` over all its committed files (with ``grid``)."""
        files = self._committed_files(table)
        return list(self._schema(table, files).names) if files else []

    def files(self, table: str) -> list[str]:
        """Paths of ``table``'s files that belong to committed packs, sorted."""
        return [f.path for f in self._committed_files(table)]

    def checkpoint_dir(self) -> str:
        """``<root>/_checkpoints``; created when the store is local."""
        if not self.is_local:
            return self.root.rstrip("/") + "/" + CHECKPOINTS
        path = paths.checkpoints_dir(self._base)
        os.makedirs(path, exist_ok=True)
        return path

    def lease_dir(self) -> str:
        """``<root>/_leases`` (local stores: see sweep.store.leases)."""
        return os.path.join(self._base, LEASES)

    def read_table(
        self,
        name: str,
        columns: Sequence[str] | None = None,
        filters: Filters = None,
    ) -> pd.DataFrame:
        """Read a table of committed packs as a DataFrame with a ``grid`` column.

        ``filters`` is a pyarrow Expression or pandas/pyarrow DNF tuples such as
        ``[("status", "==", "ok")]``. For ``trials``, duplicates are dropped first
        (the latest row per grid and trial_id) and filters apply to what is left.
        A table that does not exist gives an empty DataFrame.
        """
        _check_name("table name", name, _TABLE_RE)
        expr, filter_cols = parse_filters(filters)
        files = self._committed_files(name)
        if not files:
            return pd.DataFrame(columns=list(columns) if columns else None)
        schema = self._schema(name, files)
        want = list(schema.names) if columns is None else list(columns)
        check_columns(self.root, name, schema, want)
        if name != TRIALS:
            # Two runs of the same networks (concurrent, or a rerun) leave two packs' rows:
            # keep those of the pack whose trials rows are the latest, as for trials.
            extra = ["grid", "network_id"] if "network_id" in schema.names else []
            table = self._scan(files, schema, union(want, extra), expr)
            return rows_of_latest_packs(table, *self._trials_writes()).select(want).to_pandas()
        needed = want if filter_cols is not None else list(schema.names)
        keys = ["grid", "trial_id", "created_at"]
        table = latest_rows(self._scan(files, schema, union(needed, filter_cols or (), keys)))
        if expr is not None:
            table = table.filter(expr)
        return table.select(want).to_pandas()

    def _trials_writes(self) -> tuple[pa.Table, pa.Table]:
        """grid, network_id and source file of the latest row of every trial; and of every
        trials row (which writes hold trials rows of a network at all)."""
        files = self._committed_files(TRIALS)
        schema = self._schema(TRIALS, files) if files else None
        if schema is None or "network_id" not in schema.names:
            empty = pa.table({"grid": pa.array([], pa.string()), "network_id": pa.array([], pa.string()),
                              FILE_COL: pa.array([], pa.string())})
            return empty, empty
        cols = [c for c in ("grid", "trial_id", "network_id", "created_at") if c in schema.names]
        every = self._scan(files, schema, cols)
        return latest_rows(every, keep_file=True), every.select(["grid", "network_id", FILE_COL])

    def completed_trial_ids(
        self, statuses: Iterable[str] = COMPLETED, grid: str | None = None
    ) -> set[str]:
        """Trial ids whose latest row has a status in ``statuses`` (in ``grid``, if given)."""
        return self._completed("trial_id", statuses, grid)

    def completed_network_ids(
        self, statuses: Iterable[str] = COMPLETED, grid: str | None = None
    ) -> set[str]:
        """Network ids with at least one latest trial row whose status is in ``statuses``."""
        return self._completed("network_id", statuses, grid)

    def _completed(self, column: str, statuses: Iterable[str], grid: str | None) -> set[str]:
        if isinstance(statuses, str):  # completed_trial_ids("ok") means ("ok",), not {"o", "k"}
            statuses = (statuses,)
        files = self._committed_files(TRIALS)
        if grid is not None:
            files = [f for f in files if f.grid == grid]
        if not files:
            return set()
        schema = self._schema(TRIALS, files)
        if column not in schema.names or "status" not in schema.names:
            return set()
        cols = [c for c in ("grid", "trial_id", "created_at", "status", column) if c in schema.names]
        table = latest_rows(self._scan(files, schema, list(dict.fromkeys(cols))))
        wanted = pa.array(sorted(set(statuses)), pa.string())
        mask = pc.is_in(table["status"].cast(pa.string()), value_set=wanted)
        ids = table.filter(mask)[column].drop_null().cast(pa.string())
        return set(ids.to_pylist())

    # -- internals -------------------------------------------------------------
    def _committed_files(self, table: str) -> list[_DataFile]:
        """The table's files of committed pack writes, checked against their records.

        "raise": a damaged file among them (or a damaged manifest anywhere) raises;
        "skip": every write with a damaged file in any table is left out whole, so a
        network damaged in one table counts as not stored in all of them.
        """
        commits = self._log.commits()
        files = self._files_of(commits.values(), table)
        if self.on_damage == "skip":
            bad = {d.key for d in self._verify(commits)}
            return [f for f in files if f.key not in bad]
        damage = [self._manifest_damage(c) for c in commits.values() if c.problem is not None]
        damage += self._damage_among(files, commits)
        if damage:
            raise self._damage_error(damage)
        return files

    @staticmethod
    def _files_of(commits: Iterable[Commit], table: str) -> list[_DataFile]:
        files = []
        for c in commits:
            if table in c.files:
                record = c.manifest.files.get(table) if c.manifest is not None else None
                files.append(_DataFile(table, c.grid, c.stem, c.files[table], record))
        return sorted(files, key=lambda f: f.path)

    @staticmethod
    def _manifest_damage(c: Commit) -> Damage:
        return Damage(paths.MANIFESTS, c.grid, c.stem, c.manifest_path or "", c.problem or "", c.network_ids)

    def _damage_among(self, files: list[_DataFile], commits: Mapping[tuple[str, str], Commit]) -> list[Damage]:
        """The damaged ones of ``files``; each file is checked once per store object and
        state on disk (size, mtime)."""
        if not files:
            return []
        try:
            infos = self._fs.get_file_info([f.path for f in files])
        except (OSError, pa.ArrowException) as exc:
            raise StoreError(f"results store {self.root}: cannot read {files[0].table}: {reason(exc)}") from exc
        damage = []
        for f, info in zip(files, infos):
            if info.type != pafs.FileType.File:
                problem: str | None = "missing: its commit names it, but it is not there"
            else:
                key = (f.path, info.size, info.mtime_ns)
                if key not in self._checked:
                    self._checked[key] = check_file(self._fs, f.path, f.record)
                problem = self._checked[key]
            if problem is not None:
                damage.append(Damage(f.table, f.grid, f.stem, f.path, problem, commits[f.key].network_ids))
        return damage

    def _damage_error(self, damage: list[Damage]) -> StoreError:
        lines = "\n  ".join(d.describe() for d in damage[:5])
        more = f"\n  ... and {len(damage) - 5} more" if len(damage) > 5 else ""
        return StoreError(f"results store {self.root}: {len(damage)} damaged file(s), not read:\n  {lines}{more}"
                          f"\n`sweep verify {self.root}` lists them all; `sweep resume {self.root} --repair` "
                          "moves them aside and trains their networks again")

    def check_intact(self, grids: bool = True) -> None:
        """Raise StoreError naming every damaged file (when ``on_damage`` is "raise").

        ``grids=False``: saved grids are left out (``sweep run`` saves its grid again)."""
        damage = [d for d in self.verify() if grids or d.table != GRIDS]
        if damage and self.on_damage == "raise":
            raise self._damage_error(damage)

    def verify(self) -> list[Damage]:
        """Every committed file that is not what its write recorded (checksum, size,
        missing or unreadable), every damaged manifest, and every saved grid whose checksum
        differs. Files that no commit names are :meth:`leftovers`, not damage."""
        return self._verify(self._log.commits()) + [
            Damage(GRIDS, paths.grid_name_of(p) or "", "", p, problem)
            for p, _, problem in self._grid_files() if problem is not None]

    def _verify(self, commits: Mapping[tuple[str, str], Commit]) -> list[Damage]:
        damage = [self._manifest_damage(c) for c in commits.values() if c.problem is not None]
        tables = sorted({t for c in commits.values() for t in c.files})
        for table in tables:
            damage.extend(self._damage_among(self._files_of(commits.values(), table), commits))
        return damage

    def quarantine(self, damage: list[Damage]) -> int:
        """Move every file of the damaged pack writes (all tables and the manifest) to
        ``_damaged/<grid>/<stem>/``: their networks read as never stored, nothing is deleted.
        Saved grids are not moved (``sweep run`` saves a grid again). Returns the number of
        files moved."""
        moved = 0
        for grid, stem in sorted({(d.grid, d.stem) for d in damage if d.table != GRIDS}):
            target = paths.damaged_dir(self._base, grid, stem)
            self._fs.create_dir(target, recursive=True)
            sources = [d.path for d in self._log.data_files() if d.key == (grid, stem)]
            sources.append(paths.manifest_path(self._base, grid, stem))  # last: the commit goes with its files
            for src in sources:
                if self._fs.get_file_info(src).type != pafs.FileType.File:
                    continue
                table = posixpath.basename(posixpath.dirname(posixpath.dirname(src)))
                self._fs.move(src, paths.join(target, f"{table}-{posixpath.basename(src)}"))
                moved += 1
                log.warning("moved damaged %s to %s", src, target)
        self._checked.clear()
        return moved

    def _schema(self, table: str, files: list[_DataFile]) -> pa.Schema:
        """The union (by name, types promoted) of all files' schemas, plus ``grid``."""
        factory = self._factory(table, files)
        try:
            return factory.inspect(promote_options="permissive", fragments=None)
        except (OSError, pa.ArrowException) as exc:
            raise StoreError(
                f"results store {self.root}: table {table} has files that cannot be combined "
                f"(incompatible column types or unreadable file): {reason(exc)}"
            ) from exc

    def _factory(self, table: str, files: list[_DataFile]) -> ds.FileSystemDatasetFactory:
        options = ds.FileSystemFactoryOptions(
            partition_base_dir=paths.table_dir(self._base, table), partitioning=_PARTITIONING
        )
        return ds.FileSystemDatasetFactory(
            self._fs, [f.path for f in files], ds.ParquetFileFormat(), options
        )

    def _scan(
        self,
        files: list[_DataFile],
        schema: pa.Schema,
        columns: list[str],
        expr: ds.Expression | None = None,
    ) -> pa.Table:
        """Read ``columns`` of ``files`` (cast to ``schema``) plus the source file of each row."""
        dataset = self._factory(files[0].table, files).finish(schema)
        fragments = list(dataset.get_fragments())
        cols = [c for c in columns if c in schema.names]

        def one(fragment: ds.Fragment) -> pa.Table:
            part = fragment.to_table(schema=schema, columns=cols, filter=expr, use_threads=False)
            return part.append_column(FILE_COL, pa.array([fragment.path] * part.num_rows, pa.string()))

        try:
            with ThreadPoolExecutor(min(_MAX_IO_THREADS, len(fragments))) as pool:
                parts = list(pool.map(one, fragments))
        except (OSError, pa.ArrowException) as exc:
            table_name = files[0].table
            raise StoreError(f"results store {self.root}: cannot read {table_name}: {reason(exc)}") from exc
        table = pa.concat_tables(parts)
        # A key column that no file has (files written by hand) reads as nulls.
        for c in columns:
            if c not in table.column_names:
                table = table.append_column(c, pa.nulls(table.num_rows))
        return table.select(list(dict.fromkeys(columns)) + [FILE_COL])



# -- helpers -------------------------------------------------------------------
def _resolve(root: str) -> tuple[pafs.FileSystem, str]:
    if "://" not in root:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(root))
    try:
        fs, path = pafs.FileSystem.from_uri(root)
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise StoreError(f"results store {root}: cannot open: {reason(exc)}") from exc
    return fs, path.rstrip("/") or "/"


def _check_name(what: str, value: str, pattern: re.Pattern[str]) -> None:
    if not isinstance(value, str) or not pattern.match(value):
        raise ValueError(f"invalid {what} {value!r}: must match {pattern.pattern}")
