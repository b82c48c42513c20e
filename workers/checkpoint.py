"""Pack checkpoints: one dataclass, one writer, one reader.

Floor: workers (torch; imports sweep.core only). A pack saves its state every
``checkpoint_every`` iterations to ``<store>/_checkpoints/<pack_id>.pt``, replaced
atomically at every save, and removes it once its rows are stored. A checkpoint records
its members: one whose members differ (another plan that happens to hash alike), that
cannot be read, or that an older version wrote is ignored, so a checkpoint can cost time
but never results. Stores that are not local filesystems get no checkpoints.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from sweep.core.plan import Pack
from workers.engine import StageSnapshot

log = logging.getLogger(__name__)

FORMAT = 2  # 1: the dict written before 2026-12 (ignored on read)


@dataclass
class PackCheckpoint:
    """Where a pack stands: the running stage's snapshot, and when that is stage 2, what
    stage 1 left (its members' results, the parents' weights, its latent tables)."""

    members: list[str]  # network ids of the pack, in order
    stage: int
    snapshot: StageSnapshot
    stage1_results: dict[str, Any] = field(default_factory=dict)  # network id -> MemberResult
    parent_states: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    stage1_latent: list[dict[str, Any]] = field(default_factory=list)

    @property
    def iteration(self) -> int:
        return self.snapshot.stage_state.iteration


class CheckpointFile:
    """The checkpoint file of one pack in one store."""

    def __init__(self, store: Any, pack: Pack) -> None:
        self.pack_id = pack.pack_id
        self.members = [s.network_id for s in pack.specs]
        local = store is not None and getattr(store, "is_local", True)
        self.path = os.path.join(store.checkpoint_dir(), f"{self.pack_id}.pt") if local else None

    def write(self, ckpt: PackCheckpoint) -> None:
        if self.path is None:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        # Per-process temp name: a stray duplicate of this pack cannot clobber our temp file.
        tmp = os.path.join(os.path.dirname(self.path), f".{self.pack_id}.pt.{os.getpid()}.tmp")
        try:
            torch.save({"format": FORMAT, "checkpoint": ckpt}, tmp)
            os.replace(tmp, self.path)  # atomic: a crash mid-save keeps the previous checkpoint
        except (OSError, RuntimeError) as e:  # costs time, never results (a full disk among them)
            log.warning("pack %s: checkpoint not saved to %s: %s", self.pack_id, self.path, e)
            with contextlib.suppress(OSError):
                os.remove(tmp)
        else:
            log.info("pack %s: checkpoint at stage %d, iteration %d", self.pack_id, ckpt.stage, ckpt.iteration)

    def read(self) -> PackCheckpoint | None:
        if self.path is None or not os.path.exists(self.path):
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=False)
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
        if self.path is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)
