"""Pack checkpoints: one dataclass, one writer, one reader.

Floor: workers (torch; imports sweep.core and sweep.store's paths, atomic writer and
checksums). A pack saves its state every ``checkpoint_every`` iterations to
``<store>/_checkpoints/<pack_id>.pt`` (sweep.store.paths), replaced atomically at every
save, with the file's size and SHA-256 in ``<pack_id>.json`` beside it, and removes both
once its rows are stored. A checkpoint records its members: one whose members differ
(another plan that happens to hash alike), that cannot be read, whose checksum differs
(a flipped weight byte would train on to different numbers), that has no record, or that
an older version wrote is refused with its file name logged, and the pack starts over, so
a checkpoint can cost time but never results. Stores that are not local filesystems get
no checkpoints (``StoreSink.is_local``, the rule leases follow too), nor does a pack run
without a store.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs
import torch

from sweep.core.plan import Pack
from sweep.store import paths
from sweep.store.atomic import atomic_write
from sweep.store.integrity import FileRecord, check_record, digest
from workers.engine import StageSnapshot
from workers.preemption import Preempted, stop_requested
from workers.store_sink import StoreSink

log = logging.getLogger(__name__)

FORMAT = 2  # 1: the dict written before 2026-12 (ignored on read)


@dataclass
class PackCheckpoint:
    """Where a pack stands: the running stage's snapshot, and past stage 1, what the stages
    before it left (their members' results, the parents' weights, their latent tables)."""

    members: list[str]  # network ids of the pack, in order
    stage: int
    snapshot: StageSnapshot
    stage1_results: dict[str, Any] = field(default_factory=dict)  # network id -> MemberResult
    parent_states: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    stage1_latent: list[dict[str, Any]] = field(default_factory=list)
    # The running stage's learning-rate search (workers.halving.HalvingState): its survivors,
    # the rungs done and the stopped members' results. None: no search (and older checkpoints).
    halving: Any = None

    @property
    def iteration(self) -> int:
        return self.snapshot.stage_state.iteration


class CheckpointFile:
    """The checkpoint file of one pack in one store."""

    def __init__(self, store: StoreSink | None, pack: Pack) -> None:
        self.pack_id = pack.pack_id
        self.members = [s.network_id for s in pack.specs]
        self.path = (paths.checkpoint_path(store.base_path, self.pack_id)
                     if store is not None and store.is_local else None)
        self.record = paths.checkpoint_record_path(self.path) if self.path else None

    def write(self, ckpt: PackCheckpoint) -> None:
        """Save ``ckpt``; then, if SIGTERM asked the pack to stop, stop it (workers.preemption)."""
        self._write(ckpt)
        if stop_requested():
            raise Preempted(f"SIGTERM: pack {self.pack_id} stopped at stage {ckpt.stage}, iteration "
                            f"{ckpt.iteration}" + (", after its checkpoint" if self.path else ""))

    def _write(self, ckpt: PackCheckpoint) -> None:
        if self.path is None or self.record is None:
            return
        fs = pafs.LocalFileSystem()
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            # The record is replaced after the file: a crash in between leaves a record that
            # does not match, and the checkpoint is refused (time lost, never results).
            atomic_write(fs, self.path, lambda fh: torch.save({"format": FORMAT, "checkpoint": ckpt}, fh))
            record = digest(fs, self.path)
            atomic_write(fs, self.record, json.dumps(record.to_dict()).encode())
        except (OSError, RuntimeError) as e:  # costs time, never results (a full disk among them)
            log.warning("pack %s: checkpoint not saved to %s: %s", self.pack_id, self.path, e)
        else:
            log.info("pack %s: checkpoint at stage %d, iteration %d", self.pack_id, ckpt.stage, ckpt.iteration)

    def read(self) -> PackCheckpoint | None:
        if self.path is None or self.record is None or not os.path.exists(self.path):
            return None
        try:
            with open(self.record, "rb") as fh:
                record = FileRecord.from_dict(json.loads(fh.read()))
            with open(self.path, "rb") as fh:
                raw = fh.read()
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("refusing checkpoint %s: no readable checksum record %s (%s); the pack starts over",
                        self.path, self.record, e)
            return None
        problem = check_record(FileRecord.of_bytes(raw), record)
        if problem is not None:
            log.warning("refusing damaged checkpoint %s: %s; the pack starts over", self.path, problem)
            return None
        try:
            saved = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=False)
            ckpt = saved["checkpoint"] if saved.get("format") == FORMAT else None
        except Exception as e:  # a damaged checkpoint costs time, never results
            log.warning("ignoring unreadable checkpoint %s: %s", self.path, e)
            return None
        if not isinstance(ckpt, PackCheckpoint):
            log.warning("ignoring checkpoint %s: written by an older version", self.path)
            return None
        if ckpt.members != self.members:
            log.warning("ignoring checkpoint %s: it belongs to a pack with other members", self.path)
            return None
        log.info("pack %s resumes from its checkpoint at stage %d, iteration %d", self.pack_id, ckpt.stage,
                 ckpt.iteration)
        return ckpt

    def remove(self) -> None:
        for path in (self.path, self.record):
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
