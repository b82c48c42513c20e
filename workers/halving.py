"""Successive halving inside a pack: rank a stage's candidates at a rung, keep the best of
each group, and cut every per-member table down to them.

Floor: workers (trial execution; imports sweep.core and sweep.store only).

The candidates of one learning-rate search (equal ``TrialSpec.search_group``: one training
set and method, several learning rates and runs) train in one pack
(``sweep.core.plan``). At each rung of the grid's ``lr_search`` the pack measures every
member on its selection split, keeps the best ``LrSearch.keep(n)`` of each group's ``n``
and stops the rest. The stopped leave the pack: the stacked parameters, the optimizer's
buffers, the best-state copies and the per-member arrays of the stage's state are cut down
to the survivors (:func:`compact_state`, :func:`select_members`), so the steps that remain
cost less; ``workers.run_pack`` builds the smaller model and its tables, and the engine
captures a new CUDA graph for it (every ``train_stage`` call makes its own step).

Ranking: ties go to the earlier member (the grid's order: lr, then run); a member whose loss
went non-finite ranks last. All of a rung's results are in when it ranks (a pack is
synchronous). Ray Tune's ASHA, for packs of one network (``sweep.driver``), is not: it keeps
a trial at or above the ``1 - 1/reduction`` quantile of those that reached the rung before
it. Where the survivors reach a rung first, worst to best, and the others after them, that is
the same ``ceil(n / reduction)`` networks (tests/test_lr_search_asha.py); otherwise ASHA
may keep more or others (its first trials at a rung always go on; a good trial after a
better one may stop).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sweep.core.lr_search import LrSearch
from sweep.core.options import LrScheduler, RungMode
from sweep.core.spec import TrialSpec
from workers.engine import StageState


@dataclass
class HalvingState:
    """Where a stage's search stands (a checkpoint's payload: a resumed pack continues with the
    same survivors at the same rung)."""

    survivors: list[str]  # network ids still training, in member order
    rungs_done: int = 0  # rungs already ranked
    stopped: dict[str, Any] = field(default_factory=dict)  # network id -> workers.run_pack.MemberResult
    last_score: dict[str, float] = field(default_factory=dict)  # survivor -> its metric at the last rung


def search_of(specs: Sequence[TrialSpec]) -> LrSearch | None:
    """The halving search a stage's members share (they share a pack key), or None."""
    search = specs[0].lr_search if specs else None
    return search if search is not None and search.scheduler == LrScheduler.HALVING else None


def rank(specs: Sequence[TrialSpec], scores: np.ndarray, diverged: np.ndarray, search: LrSearch) -> list[int]:
    """The members that go on, in member order: per search group, the best ``search.keep(n)``
    by ``scores`` (``search.mode``), diverged members (and NaN scores) last, ties to the earlier."""
    sign = 1.0 if search.mode == RungMode.MAX else -1.0
    key = np.where(diverged | ~np.isfinite(scores), -np.inf, sign * np.nan_to_num(scores, nan=0.0))
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(specs):
        groups.setdefault(s.search_group, []).append(i)
    keep: list[int] = []
    for members in groups.values():
        # Stable sort on the negated key: equal scores keep the member order.
        ordered = sorted(members, key=lambda i: -key[i])
        keep.extend(ordered[:search.keep(len(members))])
    return sorted(keep)


def select_members(t: Tensor, keep: Sequence[int], members: int) -> Tensor:
    """Members ``keep`` of a tensor laid out ``[P, ...]`` or ``[P*C, ...]`` (BatchNorm)."""
    idx = torch.as_tensor(list(keep), dtype=torch.long, device=t.device)
    per = t.reshape(members, t.shape[0] // members, *t.shape[1:])
    return per.index_select(0, idx).reshape(len(keep) * (t.shape[0] // members), *t.shape[1:]).contiguous()


def compact_state(state: StageState, keep: Sequence[int], members: int) -> StageState:
    """The stage's state of members ``keep`` only: per-member arrays, best states, curves
    (renumbered) and the optimizer's buffers."""
    rows = np.asarray(keep, dtype=np.int64)
    new_index = {old: new for new, old in enumerate(keep)}
    best_state = None
    if state.best_state is not None:
        best_state = {k: select_members(v, keep, members) for k, v in state.best_state.items()}
    optimizer = None
    if state.optimizer is not None:
        optimizer = [None if b is None else select_members(b, keep, members) for b in state.optimizer]
    return replace(
        state,
        diverged_at=state.diverged_at[rows],
        curves=[{**c, "member": new_index[c["member"]]} for c in state.curves if c["member"] in new_index],
        best_score=None if state.best_score is None else state.best_score[rows],
        best_iter=None if state.best_iter is None else state.best_iter[rows],
        best_state=best_state,
        optimizer=optimizer,
    )
