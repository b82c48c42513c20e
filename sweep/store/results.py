"""The results store: Parquet tables, hive-partitioned by grid, written one pack at a time.

Floor: sweep.store (where results live; imports sweep.core only, no torch).
It is longer than 400 lines because the write protocol (temporary files, commit order,
clean-up) and the read rules (committed files only, latest row per trial) are one
contract and are checked together.

Layout (see docs/store.md)::

    ROOT/<table>/grid=<grid>/<pack_id>-<attempt>.parquet
    ROOT/_checkpoints/...

A pack's tables are first written to temporary dot-files (``.<name>.tmp``) next to
their final place and then renamed; ``trials`` is renamed last, so its file is the
pack's commit marker. Readers only ever look at committed packs: a file of another
table whose ``<pack_id>-<attempt>`` has no ``trials`` file (a crash between renames)
is invisible until :meth:`ResultStore.cleanup_uncommitted` removes it.

``attempt`` is a fresh, time-ordered token per call, so running a pack again adds
files and never replaces any. The duplicate rows this can create are resolved on
read: per ``(grid, trial_id)`` the row with the latest ``created_at`` wins, ties going
to the later attempt.
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import logging
import os
import posixpath
import re
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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
from sweep.store.integrity import (
    DAMAGED,
    MANIFESTS,
    Damage,
    Manifest,
    check_file,
    digest,
    manifest_record,
    network_ids_of,
)
from sweep.store.leases import LEASES
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

CHECKPOINTS = "_checkpoints"
GRIDS = "_grids"

_TMP_SUFFIX = ".tmp"
_PROBE_PREFIX = ".write-probe-"
_NAME_RE = PATH_SEGMENT_RE  # grid names and pack ids become path segments
# Table names are also SQL view names in sweep.store.query.
_TABLE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_PARTITIONING = ds.partitioning(pa.schema([(PARTITION, pa.string())]), flavor="hive")
_MAX_IO_THREADS = 16


@dataclass(frozen=True)
class _DataFile:
    table: str
    grid: str
    stem: str  # <pack_id>-<attempt>: shared by all tables of one write_pack call
    path: str
    mtime: float | None

    @property
    def key(self) -> tuple[str, str]:
        return (self.grid, self.stem)


class ResultStore:
    """A folder (local path or pyarrow filesystem URI) of hive-partitioned Parquet tables."""

    def __init__(self, root: str, on_damage: Literal["raise", "skip"] = "raise") -> None:
        """``on_damage``: a committed file that fails its checksum raises StoreError when
        read ("raise"), or its whole pack write is left out as if never stored ("skip":
        what ``sweep status`` shows and ``resume --repair`` retrains)."""
        if on_damage not in ("raise", "skip"):
            raise ValueError(f"on_damage must be 'raise' or 'skip', got {on_damage!r}")
        self.root = str(root)
        self.on_damage = on_damage
        self._fs, self._base = _resolve(self.root)
        self._checked: dict[tuple[str, float | None], Damage | None] = {}  # (path, mtime) -> damage

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
        probe = _join(self._base, f"{_PROBE_PREFIX}{secrets.token_hex(6)}")
        try:
            self._fs.create_dir(self._base, recursive=True)
            with self._fs.open_output_stream(probe) as out:
                out.write(b"probe")
        except (OSError, pa.ArrowException) as exc:
            raise StoreError(f"results store {self.root} is not writable: {reason(exc)}") from exc
        finally:
            self._remove_quietly(probe)

    def write_pack(self, pack_id: str, grid: str, tables: Mapping[str, TableData]) -> None:
        """Store one pack's tables atomically (trials committed last); see module doc.

        Empty tables are skipped. When some other table has rows but ``trials`` has none,
        an empty ``trials`` file is still written: it is the commit marker.
        """
        _check_name("pack_id", pack_id, _NAME_RE)
        _check_name("grid", grid, _NAME_RE)
        prepared = self._prepare(tables)
        if not prepared:
            return
        stem = f"{pack_id}-{new_attempt()}"
        order = sorted(n for n in prepared if n != TRIALS) + [TRIALS]  # trials last
        temps: list[str] = []
        placed: list[str] = []
        where = self._base  # for the error message: the file being written or renamed
        need = 0  # bytes this write puts on disk, for a full disk's message
        try:
            for name in order:
                folder = self._partition_dir(name, grid)
                self._fs.create_dir(folder, recursive=True)
                where = _join(folder, f".{stem}.parquet{_TMP_SUFFIX}")
                temps.append(where)
                need += prepared[name].nbytes
                self._write_file(prepared[name], where)
            # The manifest is in place before any data file: a committed file always has one.
            manifest = Manifest(pack_id, grid, stem, {n: digest(self._fs, t) for n, t in zip(order, temps)},
                                tuple(sorted({i for t in prepared.values() for i in network_ids_of(t)})))
            folder = self._partition_dir(MANIFESTS, grid)
            self._fs.create_dir(folder, recursive=True)
            where = _join(folder, f".{stem}.json{_TMP_SUFFIX}")
            temps.append(where)
            with self._fs.open_output_stream(where) as out:
                out.write(manifest.to_json())
            placed.append(_join(folder, f"{stem}.json"))
            self._commit_file(where, placed[-1])
            for name, tmp in zip(order, temps):
                where = _join(self._partition_dir(name, grid), f"{stem}.parquet")
                placed.append(where)  # before the move: a move that fails halfway is undone too
                self._commit_file(tmp, where)
        except BaseException as exc:
            # Everything this call created is new (unique attempt): removing it loses nothing.
            for path in temps + placed:
                self._remove_quietly(path)
            if not isinstance(exc, Exception):
                raise  # KeyboardInterrupt and friends: clean up, then let them through
            full = isinstance(exc, OSError) and exc.errno == errno.ENOSPC
            raise StoreError(
                f"results store {self.root}: writing pack {pack_id} (grid {grid}) failed "
                f"at {where}: {reason(exc)}"
                + (f"; the pack needs about {need:,} bytes there (nothing was stored, "
                   f"everything stored before is intact)" if full else "")
            ) from exc
        log.debug("stored pack %s of grid %s as %s (%s)", pack_id, grid, stem, ", ".join(order))

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
        if self.is_local:
            # fsync before the rename so that a machine crash cannot leave a renamed
            # but empty file behind (a killed process alone could not).
            with open(path, "wb") as fh:
                pq.write_table(table, fh, compression="zstd")
                fh.flush()
                os.fsync(fh.fileno())
        else:
            pq.write_table(table, path, filesystem=self._fs, compression="zstd")

    def _commit_file(self, tmp: str, final: str) -> None:
        """Rename a finished temp file into place (atomic on local filesystems)."""
        self._fs.move(tmp, final)

    def _remove_quietly(self, path: str) -> bool:
        try:
            self._fs.delete_file(path)
            return True
        except (OSError, pa.ArrowException):
            return False

    def cleanup_uncommitted(self, min_age_s: float = 0.0) -> int:
        """Remove temp dot-files and files of packs whose ``trials`` file is missing.

        Only files at least ``min_age_s`` seconds old are removed: pass a positive age
        when another process may be writing to the same store right now. Returns the
        number of files removed.
        """
        cutoff = time.time() - min_age_s

        def old(mtime: float | None) -> bool:
            return min_age_s <= 0 or mtime is None or mtime <= cutoff

        removed = 0
        # List the other tables before trials: a pack committed in between is then
        # seen as committed rather than deleted as an orphan.
        others = [t for t in self._table_dirs() if t != TRIALS]
        candidates: list[_DataFile] = []
        for table in others + [TRIALS]:
            for info in self._list_partition_files(table):
                name = posixpath.basename(info.path)
                if name.startswith(".") and name.endswith(_TMP_SUFFIX) and old(_mtime(info)):
                    removed += self._remove_logged(info.path, "temporary file")
            if table != TRIALS:
                candidates.extend(self._data_files(table))
        committed = self._committed_keys()
        for f in candidates:
            if f.key not in committed and old(f.mtime):
                removed += self._remove_logged(f.path, "uncommitted file")
        for info in self._list(self._base, recursive=False):
            name = posixpath.basename(info.path)
            if name.startswith(_PROBE_PREFIX) and old(_mtime(info)):
                removed += self._remove_logged(info.path, "write probe")
        for info in self._list(_join(self._base, GRIDS), recursive=False):
            name = posixpath.basename(info.path)
            if name.startswith(".") and name.endswith(_TMP_SUFFIX) and old(_mtime(info)):
                removed += self._remove_logged(info.path, "temporary grid copy")
        for info in self._list_partition_files(MANIFESTS):  # manifests of writes never committed
            name = posixpath.basename(info.path)
            grid = posixpath.basename(posixpath.dirname(info.path)).split("=", 1)[1]
            orphan = name.endswith(".json") and (grid, name[: -len(".json")]) not in committed
            if (orphan or name.endswith(_TMP_SUFFIX)) and old(_mtime(info)):
                removed += self._remove_logged(info.path, "uncommitted manifest")
        return removed

    def _remove_logged(self, path: str, what: str) -> int:
        if self._remove_quietly(path):
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

        The copy of a grid run earlier under the same name is replaced. A grid that was
        not read from a file (expanded in memory) cannot be copied and is skipped.
        """
        _check_name("grid", grid.name, _NAME_RE)
        try:
            with open(grid.path, "rb") as fh:
                raw = fh.read()
        except OSError as exc:
            log.warning("grid %s not saved in %s: cannot read %s (%s)", grid.name, self.root, grid.path, exc)
            return
        if grid.file_hash and hashlib.sha256(raw).hexdigest() != grid.file_hash:
            log.warning("grid file %s changed since it was loaded; saving its current content", grid.path)
        folder = _join(self._base, GRIDS)
        final = _join(folder, f"{grid.name}.yaml")
        tmp = _join(folder, f".{grid.name}.yaml.{secrets.token_hex(3)}{_TMP_SUFFIX}")
        try:
            self._fs.create_dir(folder, recursive=True)
            with self._fs.open_output_stream(tmp) as out:
                out.write(raw)
            self._fs.move(tmp, final)
        except (OSError, pa.ArrowException) as exc:
            self._remove_quietly(tmp)
            raise StoreError(f"results store {self.root}: cannot save grid to {final}: {reason(exc)}") from exc

    def saved_grids(self) -> list[Grid]:
        """The grids saved by :meth:`save_grid`, expanded again, sorted by name."""
        import yaml

        grids = []
        for info in self._list(_join(self._base, GRIDS), recursive=False):
            name = posixpath.basename(info.path)
            if info.type != pafs.FileType.File or name.startswith(".") or not name.endswith(".yaml"):
                continue
            try:
                with self._fs.open_input_stream(info.path) as fh:
                    raw = fh.read()
                doc = yaml.safe_load(raw)
                grids.append(expand(doc, source=info.path, file_hash=hashlib.sha256(raw).hexdigest()))
            except (OSError, pa.ArrowException, yaml.YAMLError, GridError) as exc:
                raise StoreError(f"results store {self.root}: saved grid {info.path} "
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
        return [t for t in self._table_dirs() if self.files(t)]

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
        path = os.path.join(self._base, CHECKPOINTS)
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
            return rows_of_latest_packs(table, self._latest_trials()).select(want).to_pandas()
        needed = want if filter_cols is not None else list(schema.names)
        keys = ["grid", "trial_id", "created_at"]
        table = latest_rows(self._scan(files, schema, union(needed, filter_cols or (), keys)))
        if expr is not None:
            table = table.filter(expr)
        return table.select(want).to_pandas()

    def _latest_trials(self) -> pa.Table:
        """grid, network_id and source file of the latest row of every trial."""
        files = self._committed_files(TRIALS)
        schema = self._schema(TRIALS, files) if files else None
        if schema is None or "network_id" not in schema.names:
            return pa.table({"grid": pa.array([], pa.string()), "network_id": pa.array([], pa.string()),
                             FILE_COL: pa.array([], pa.string())})
        cols = [c for c in ("grid", "trial_id", "network_id", "created_at") if c in schema.names]
        return latest_rows(self._scan(files, schema, cols), keep_file=True)

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
    def _partition_dir(self, table: str, grid: str) -> str:
        return _join(self._base, table, f"{PARTITION}={grid}")

    def _list(self, path: str, recursive: bool) -> list[pafs.FileInfo]:
        selector = pafs.FileSelector(path, recursive=recursive, allow_not_found=True)
        try:
            return self._fs.get_file_info(selector)
        except (OSError, pa.ArrowException) as exc:
            raise StoreError(f"results store {self.root}: cannot list {path}: {reason(exc)}") from exc

    def _table_dirs(self) -> list[str]:
        names = [
            posixpath.basename(i.path)
            for i in self._list(self._base, recursive=False)
            if i.type == pafs.FileType.Directory
        ]
        return sorted(n for n in names if _TABLE_RE.match(n))

    def _list_partition_files(self, table: str) -> list[pafs.FileInfo]:
        """Regular files exactly one partition folder below the table folder."""
        table_dir = _join(self._base, table)
        out = []
        for info in self._list(table_dir, recursive=True):
            rel = info.path[len(table_dir):].strip("/").split("/")
            if info.type == pafs.FileType.File and len(rel) == 2 and rel[0].startswith(f"{PARTITION}="):
                out.append(info)
        return out

    def _data_files(self, table: str) -> list[_DataFile]:
        files = []
        for info in self._list_partition_files(table):
            name = posixpath.basename(info.path)
            if name.startswith((".", "_")) or not name.endswith(".parquet"):
                continue
            grid = posixpath.basename(posixpath.dirname(info.path)).split("=", 1)[1]
            files.append(_DataFile(table, grid, name[: -len(".parquet")], info.path, _mtime(info)))
        return sorted(files, key=lambda f: f.path)

    def _committed_keys(self) -> set[tuple[str, str]]:
        return {f.key for f in self._data_files(TRIALS)}

    def _committed_files(self, table: str) -> list[_DataFile]:
        """The table's files of committed pack writes, checked against their manifests."""
        files = self._data_files(table)
        if table != TRIALS and files:
            committed = self._committed_keys()
            files = [f for f in files if f.key in committed]
        damage = self._damage_among(files)
        if not damage:
            return files
        if self.on_damage == "raise":
            raise self._damage_error(damage)
        bad = {self._stem_key(d) for d in self.verify()}  # a damaged write is left out whole
        return [f for f in files if f.key not in bad]

    @staticmethod
    def _stem_key(d: Damage) -> tuple[str, str]:
        return (d.grid, d.stem)

    def _manifest(self, grid: str, stem: str) -> Manifest | None:
        path = _join(self._partition_dir(MANIFESTS, grid), f"{stem}.json")
        try:
            with self._fs.open_input_stream(path) as fh:
                return Manifest.from_json(fh.read())
        except FileNotFoundError:
            return None  # written before manifests existed
        except (OSError, pa.ArrowException, ValueError, KeyError) as exc:
            raise StoreError(f"results store {self.root}: manifest {path} is unreadable: {reason(exc)}") from exc

    def _damage_among(self, files: list[_DataFile]) -> list[Damage]:
        """The damaged ones of ``files``; each file is checked once per store object."""
        damage = []
        for f in files:
            key = (f.path, f.mtime)
            if key not in self._checked:
                try:
                    manifest = self._manifest(f.grid, f.stem)
                    problem = check_file(self._fs, f.path, manifest_record(manifest, f.table))
                except StoreError as exc:
                    manifest, problem = None, str(exc)
                ids = manifest.network_ids if manifest is not None else ()
                self._checked[key] = None if problem is None else Damage(f.table, f.grid, f.stem, f.path, problem, ids)
            if self._checked[key] is not None:
                damage.append(self._checked[key])
        return damage

    def _damage_error(self, damage: list[Damage]) -> StoreError:
        lines = "\n  ".join(d.describe() for d in damage[:5])
        more = f"\n  ... and {len(damage) - 5} more" if len(damage) > 5 else ""
        return StoreError(f"results store {self.root}: {len(damage)} damaged file(s), not read:\n  {lines}{more}"
                          f"\n`sweep verify {self.root}` lists them all; `sweep resume {self.root} --repair` "
                          "moves them aside and trains their networks again")

    def check_intact(self) -> None:
        """Raise StoreError naming every damaged committed file (when ``on_damage`` is "raise")."""
        damage = self.verify()
        if damage and self.on_damage == "raise":
            raise self._damage_error(damage)

    def verify(self) -> list[Damage]:
        """Every committed file that is not what its pack wrote (checksum, size, or unreadable)."""
        committed = self._committed_keys()
        damage = []
        for table in self._table_dirs():
            files = [f for f in self._data_files(table) if table == TRIALS or f.key in committed]
            damage.extend(self._damage_among(files))
        return damage

    def quarantine(self, damage: list[Damage]) -> int:
        """Move every file of the damaged pack writes (all tables and the manifest) to
        ``_damaged/<grid>/<stem>/``: their networks read as never stored, nothing is deleted.
        Returns the number of files moved."""
        moved = 0
        for grid, stem in sorted({self._stem_key(d) for d in damage}):
            target = _join(self._base, DAMAGED, grid, stem)
            self._fs.create_dir(target, recursive=True)
            sources = [f.path for t in self._table_dirs() for f in self._data_files(t) if f.key == (grid, stem)]
            sources.append(_join(self._partition_dir(MANIFESTS, grid), f"{stem}.json"))
            for src in sources:
                if self._fs.get_file_info(src).type != pafs.FileType.File:
                    continue
                table = posixpath.basename(posixpath.dirname(posixpath.dirname(src)))
                self._fs.move(src, _join(target, f"{table}-{posixpath.basename(src)}"))
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
            partition_base_dir=_join(self._base, table), partitioning=_PARTITIONING
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
def new_attempt() -> str:
    """A short token, unique per write and ordered by time: ``YYYYmmddTHHMMSSmmmZ`` + 6 hex."""
    now = _dt.datetime.now(_dt.timezone.utc)
    return f"{now:%Y%m%dT%H%M%S}{now.microsecond // 1000:03d}Z{secrets.token_hex(3)}"


def _resolve(root: str) -> tuple[pafs.FileSystem, str]:
    if "://" not in root:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(root))
    try:
        fs, path = pafs.FileSystem.from_uri(root)
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise StoreError(f"results store {root}: cannot open: {reason(exc)}") from exc
    return fs, path.rstrip("/") or "/"


def _join(*parts: str) -> str:
    return posixpath.join(*parts)


def _mtime(info: pafs.FileInfo) -> float | None:
    mtime = info.mtime
    return None if mtime is None else mtime.timestamp()


def _check_name(what: str, value: str, pattern: re.Pattern[str]) -> None:
    if not isinstance(value, str) or not pattern.match(value):
        raise ValueError(f"invalid {what} {value!r}: must match {pattern.pattern}")


