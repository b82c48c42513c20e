"""``run_pack``: train, evaluate and store every network of a pack. No Ray here.

Floor: workers (imports sweep.core and sweep.store). A pack runs the stages that
:func:`workers.stages.plan_stages` plans (from scratch, then networks that start from a
stage-1 parent) on one device, then writes all rows to the store in one atomic commit.
The function runs the same under Ray Tune, in a test, in a benchmark or by hand on a GPU
box. Each stage runs in :func:`workers.pack_stage.run_stage` (halving a learning-rate
search's candidates at its rungs). What it is given is built once as a
:class:`workers.pack_run.PackRun`; what it does
(phases, iterations, stages) goes to one :class:`workers.monitor.PackMonitor`, which
fans it out to the caller's listeners.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sweep.core.numerics import Kernels, Precision
from sweep.core.plan import Pack
from sweep.core.spec import TrialSpec
from sweep.store.leases import acquire
from sweep.store.schema import Measurement, Status
from workers import pack_stage  # new_pack_model through the module: one name to patch (tests)
from workers.checkpoint import CheckpointFile
from workers.compute import resolve_numerics
from workers.datasets import ArrayDataset
from workers.devices import device_name, resolve_device
from workers.members import member_data
from workers.monitor import PackListener, PackMonitor, StageObserver, StageObserverListener
from workers.pack_rows import pack_tables, stored_latent
from workers.pack_run import PackRun
from workers.pack_stage import TRAIN_CURVE_IMAGES, MemberResult, PackContext, run_stage
from workers.pack_work import Phase, estimate_work
from workers.stages import plan_stages, stage_plan
from workers.store_sink import StoreSink, as_sink

log = logging.getLogger(__name__)

@dataclass
class PackResult:
    pack_id: str
    tables: dict[str, Any]
    networks: int
    diverged: int
    failed: int
    seconds: float
    device: str
    resumed_from_iter: int = 0
    skipped: bool = False  # another runner holds the pack's lease, or has stored it already


def run_pack(
    pack: Pack,
    store: StoreSink | str | os.PathLike | None = None,
    *,
    device: str | None = None,
    data_dir: str | None = None,
    grid_hash: str = "",
    precision: Precision | str = Precision.FP32,
    kernels: Kernels | str = Kernels.AUTO,
    listeners: Sequence[PackListener] = (),
    dataset: ArrayDataset | None = None,
    observer: StageObserver | None = None,
) -> PackResult:
    """Train and evaluate the pack's networks; write their rows to ``store`` if given.

    ``store`` is a :class:`workers.store_sink.StoreSink` (a ResultStore), a path, or None
    (rows are only returned); anything else raises TypeError. ``listeners`` hear what the
    pack does (:mod:`workers.monitor`: phases, iterations, stages, with the fraction of the
    pack's expected work); ``observer`` is short for a listener that sees every stage's
    model as it starts and ends (:data:`workers.monitor.StageObserver`). A listener that
    raises stops the pack before its rows are written.
    ``kernels`` (:func:`workers.compute.resolve_numerics`): ``auto`` trains LeNet-5 on CUDA in
    ``bf16`` precision with the fused Triton fast path (16-bit arithmetic, fp32 master weights),
    everything else (fp32 and tf32 included) on the grouped layers.
    """
    if not pack.specs:
        raise ValueError("empty pack")
    keys = {s.pack_key for s in pack.specs}
    if len(keys) != 1:
        raise ValueError(f"pack mixes incompatible specs: {sorted(map(str, keys))}")
    sink = as_sink(store)  # first: a wrong store fails before a device or data is touched
    dev = resolve_device(device)
    # Raises on an unknown precision or kernels, and on fused kernels where they cannot run.
    numerics = resolve_numerics(precision, kernels, pack.specs[0].model, str(pack.specs[0].head), dev)
    numerics.apply()
    if observer is not None:
        listeners = (*listeners, StageObserverListener(observer))
    run = PackRun(pack, dev, numerics, sink, PackMonitor(pack.pack_id, listeners),
                  grid_hash, data_dir, dataset)
    lease = None
    if sink is not None and sink.is_local:  # leases need a local path, as checkpoints do
        lease = acquire(sink.lease_dir(), pack.pack_id)
        done = set() if lease is None else sink.completed_network_ids(grid=run.grid)
        if lease is None or all(s.network_id in done for s in pack.stored_specs):
            if lease is not None:  # stored by another runner since this one planned
                lease.release()
            return PackResult(pack.pack_id, {}, 0, 0, 0, 0.0, device_name(dev), skipped=True)
        # A timer, not a listener of the monitor: evaluation, latent statistics and the
        # write send no event for minutes; the heartbeat stops in release().
        lease.start_heartbeat()
    try:
        return _run_pack(run)
    finally:
        if lease is not None:
            lease.release()


def _run_pack(run: PackRun) -> PackResult:
    t0 = time.perf_counter()
    pack, dev, numerics, monitor = run.pack, run.device, run.numerics, run.monitor
    monitor.phase(Phase.LOADING)
    ds = run.load_data()
    labels = ds.train_y.numpy()
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    ctx = PackContext(run, ds, {s.network_id: member_data(s, labels, ds.num_classes, cache) for s in pack.specs},
                ds.train_x.to(dev), ds.train_y.to(dev), ds.test_x.to(dev), ds.test_y.to(dev),
                CheckpointFile(run.store, pack))
    resumed = ctx.checkpoints.read()
    resumed_from = 0 if resumed is None else resumed.iteration

    stages = plan_stages(pack)
    monitor.plan(estimate_work(stages, {k: len(m.subset) for k, m in ctx.data.items()}, len(ds.test_y),
                               TRAIN_CURVE_IMAGES))
    results: dict[str, MemberResult] = {}
    parent_states: dict[str, dict[str, torch.Tensor]] = {}
    latent: list[dict[str, Any]] = []  # per stage: latent_stats / embeddings / classifier_weights
    for plan in stages:
        if plan.number == 1:
            if resumed is not None and resumed.stage > 1:
                results, parent_states = resumed.stage1_results, resumed.parent_states
                latent = resumed.stage1_latent
                continue
            model = pack_stage.new_pack_model(plan.specs, ds, dev, numerics)
            out, tables = run_stage(ctx, plan, model, resumed)
            results.update(out)
            latent.append(tables)
            # Stage 2 needs the parents' weights; keep only those.
            needed = {s.parent_id for s in pack.specs}
            parent_states = {s.network_id: model.member_state(i) for i, s in enumerate(plan.specs)
                             if s.network_id in needed}
            del model
            continue
        if resumed is not None and resumed.stage > plan.number:
            continue  # finished before the checkpoint: its results and latent tables came with it
        runnable = []
        for s in plan.specs:
            why = _cannot_start(s, results.get(s.parent_id))
            parent = results.get(s.parent_id)
            if why is None:
                runnable.append(s)
            elif parent is not None and parent.status == Status.STOPPED:
                # Left behind by the lr search with its phase-1 network: stopped, never trained.
                results[s.network_id] = MemberResult(Measurement(Status.STOPPED, error=why, stopped_at_iter=0))
            else:
                results[s.network_id] = MemberResult(Measurement.failed(why))
        if not runnable:
            continue
        plan = stage_plan(plan.number, tuple(runnable)) if len(runnable) < len(plan.specs) else plan
        model = pack_stage.new_pack_model(plan.specs, ds, dev, numerics)
        for i, s in enumerate(plan.specs):
            model.load_member_state(i, parent_states[s.parent_id])
        stage1 = (dict(results), parent_states, list(latent))
        out, tables = run_stage(ctx, plan, model,
                                 resumed if resumed is not None and resumed.stage == plan.number else None,
                                 stage1=stage1)
        results.update(out)
        latent.append(tables)

    seconds = time.perf_counter() - t0
    monitor.phase(Phase.WRITING)  # the last moment a listener can stop the pack: nothing is stored yet
    device = device_name(dev)
    tables = pack_tables(ctx.pack, ctx.ds, ctx.data, results, run.grid_hash, resumed_from, device,
                         numerics.columns())
    tables.update(stored_latent(pack, latent))
    if run.store is not None:
        run.store.write_pack(pack.pack_id, run.grid, tables)
        ctx.checkpoints.remove()
    monitor.pack_end()
    statuses = [results[s.network_id].status for s in pack.stored_specs]
    return PackResult(pack.pack_id, tables, len(pack.stored_specs), statuses.count(Status.DIVERGED),
                      statuses.count(Status.FAILED), seconds, device, resumed_from)


def _cannot_start(spec: TrialSpec, parent: MemberResult | None) -> str | None:
    """Why a stage-2 network cannot start from its parent (None: it can)."""
    p1 = f"phase-1 network {spec.parent_id} ({spec.method.phase1})"
    if parent is None:
        return f"{p1} is not in this pack; re-plan the sweep"
    if parent.status != Status.OK:
        at = parent.measurement.diverged_at_iter
        if parent.status == Status.STOPPED:
            at = parent.measurement.stopped_at_iter
        return f"{p1} {parent.status}" + (f" at iteration {at}" if at is not None else "")
    return None


