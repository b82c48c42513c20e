"""``run_pack``: train, evaluate and store every network of a pack. No Ray here.

Floor: workers (imports sweep.core and sweep.store). A pack runs the stages that
:func:`workers.stages.plan_stages` plans (from scratch, then networks that start from a
stage-1 parent) on one device, then writes all rows to the store in one atomic commit.
The function runs the same under Ray Tune, in a test, in a benchmark or by hand on a GPU
box. What it is given is built once as a :class:`workers.pack_run.PackRun`; what it does
(phases, iterations, stages) goes to one :class:`workers.monitor.PackMonitor`, which
fans it out to the caller's listeners.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sweep.core.numerics import Kernels, Precision
from sweep.core.plan import Pack
from sweep.core.spec import Selection, TrialSpec, derive_seed
from sweep.store.leases import acquire
from sweep.store.schema import CURVE_SET_TEST, CURVE_SET_TRAINED, Measurement, Status
from workers.augment import augment_stream
from workers.checkpoint import CheckpointFile, PackCheckpoint
from workers.compute import Numerics, new_model, resolve_numerics
from workers.datasets import ArrayDataset
from workers.devices import device_name, resolve_device
from workers.engine import EvalSet, StageConfig, StageSnapshot, pad_members, predict, train_stage
from workers.latent_tables import latent_tables
from workers.losses import PackedLoss
from workers.members import MemberData, member_data, trained_multiset
from workers.metrics import evaluate
from workers.models import PackedNet
from workers.monitor import PackListener, PackMonitor, StageObserver, StageObserverListener
from workers.optim import lr_table
from workers.pack_rows import pack_tables, stored_latent
from workers.pack_run import PackRun
from workers.pack_work import Phase, estimate_work
from workers.samplers import EpochSampler
from workers.stages import StagePlan, plan_stages, stage_plan
from workers.store_sink import StoreSink, as_sink
from workers.transforms import FITS_NOTHING, InputTransform, fit_transform, stack_transforms

log = logging.getLogger(__name__)

TRAIN_CURVE_IMAGES = 10_000  # multiset elements per member and curve point: a training-set accuracy to 1 % or better


@dataclass(frozen=True)
class MemberResult:
    """What one network of a pack came to: its measurement and its learning curves."""

    measurement: Measurement
    curves: tuple[dict[str, Any], ...] = ()

    @property
    def status(self) -> Status:
        return self.measurement.status


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


@dataclass
class _Pack:
    """What every stage of one pack shares: its run (device, numerics, monitor), the data
    on the device and the fitted transforms."""

    run: PackRun
    ds: ArrayDataset
    data: dict[str, MemberData]  # network id -> its index sets
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    checkpoints: CheckpointFile
    # Input transforms by training set, shared by both stages: a stage-2 network trains on
    # its parent's subset, and refitting ZCA there cost seconds per training set for nothing.
    fitted: dict[tuple[str, str], InputTransform] = field(default_factory=dict)  # (set, normalization)

    @property
    def pack(self) -> Pack:
        return self.run.pack

    @property
    def device(self) -> torch.device:
        return self.x_train.device

    @property
    def autocast(self) -> torch.dtype | None:
        return self.run.numerics.autocast

    @property
    def monitor(self) -> PackMonitor:
        return self.run.monitor


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
    ctx = _Pack(run, ds, {s.network_id: member_data(s, labels, ds.num_classes, cache) for s in pack.specs},
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
            model = _new_model(plan.specs, ds, dev, numerics)
            out, tables = _run_stage(ctx, plan, model, resumed)
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
            if why is None:
                runnable.append(s)
            else:
                results[s.network_id] = MemberResult(Measurement.failed(why))
        if not runnable:
            continue
        plan = stage_plan(plan.number, tuple(runnable)) if len(runnable) < len(plan.specs) else plan
        model = _new_model(plan.specs, ds, dev, numerics)
        for i, s in enumerate(plan.specs):
            model.load_member_state(i, parent_states[s.parent_id])
        stage1 = (dict(results), parent_states, list(latent))
        out, tables = _run_stage(ctx, plan, model,
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
        return f"{p1} {parent.status}" + (f" at iteration {at}" if at is not None else "")
    return None


def _new_model(specs: tuple[TrialSpec, ...], ds: ArrayDataset, dev: torch.device, numerics: Numerics) -> PackedNet:
    return new_model(specs, numerics, ds.num_classes, tuple(ds.train_x.shape[1:]), dev)


def _stage_config(ctx: _Pack, plan: StagePlan, md: list[MemberData]) -> StageConfig:
    dev, specs = ctx.device, plan.specs
    select_on = None
    if plan.selection == Selection.VALIDATION and all(len(m.validation) for m in md):
        idx, labels = pad_members([m.validation for m in md], ctx.y_train)
        select_on = EvalSet(ctx.x_train, labels, "validation", idx=idx)
    elif plan.selection == Selection.TEST:
        select_on = EvalSet(ctx.x_test, ctx.y_test, "test")

    def per_member(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, device=dev)

    return StageConfig(
        iters=plan.iters,
        batch_size=plan.batch_size,
        lr=torch.from_numpy(lr_table([s.recipe for s in specs], plan.base_lrs, plan.iters)).to(dev),
        momentum=per_member([s.recipe.momentum for s in specs]),
        weight_decay=per_member([s.recipe.weight_decay for s in specs]),
        bias_lr_factor=per_member([s.recipe.bias_lr_factor for s in specs]),
        head_only=plan.head_only,
        body_train=plan.body_train,
        eval_every=plan.eval_every if plan.curves else 0,
        select_every=plan.select_every if select_on is not None else 0,
        select_on=select_on,
        curve_sets=_curve_sets(ctx, plan, md) if plan.curves else (),
        checkpoint_every=plan.checkpoint_every,
        autocast_dtype=ctx.autocast,
    )


def _curve_sets(ctx: _Pack, plan: StagePlan, md: list[MemberData]) -> tuple[EvalSet, ...]:
    """Learning curves (Buda et al.'s Fig. 8: does over-sampling overfit?) on the test set and
    on the multiset each member trains on, its images weighted by their multiplicity
    (:func:`workers.members.trained_multiset`; the curves' ``curve_set`` "trained")."""
    drawn = [trained_multiset(m, TRAIN_CURVE_IMAGES, derive_seed(s.network_id, "train-curve"))
             for s, m in zip(plan.specs, md)]
    idx, labels = pad_members([images for images, _ in drawn], ctx.y_train)
    weight = torch.zeros(labels.shape, dtype=torch.float32)
    for p, (_, counts) in enumerate(drawn):
        weight[p, :len(counts)] = torch.from_numpy(counts.astype(np.float32))
    return (EvalSet(ctx.x_test, ctx.y_test, "test", curve_set=CURVE_SET_TEST),
            EvalSet(ctx.x_train, labels, "train", idx=idx, weight=weight.to(labels.device),
                    curve_set=CURVE_SET_TRAINED))


def _fitted_transform(ctx: "_Pack", spec: TrialSpec, m: MemberData) -> InputTransform:
    """The member's input transform, fitted on its own imbalanced subset (ZCA, mean/std)
    once per subset and normalisation: ZCA costs seconds."""
    kind = spec.normalization
    key = (spec.training_set_key, kind)
    if key not in ctx.fitted:
        # A kind that fits nothing is given no images: a streamed dataset's would be decoded.
        images = ctx.ds.train_x[:0] if kind in FITS_NOTHING else ctx.ds.train_x[m.subset]
        ctx.fitted[key] = fit_transform(kind, images)
    return ctx.fitted[key]


def _run_stage(ctx: _Pack, plan: StagePlan, model: PackedNet, resume: PackCheckpoint | None,
               stage1: tuple[dict[str, MemberResult], dict[str, Any], list[dict[str, Any]]] | None = None,
               ) -> tuple[dict[str, MemberResult], dict[str, Any]]:
    """Train one stage's members together, then evaluate and measure them."""
    dev, specs, ds, monitor = ctx.device, plan.specs, ctx.ds, ctx.monitor
    monitor.phase(Phase.training(plan.number), plan.number)  # fitting the transforms (ZCA) counts as training
    md = [ctx.data[s.network_id] for s in specs]
    transforms = [_fitted_transform(ctx, s, m) for s, m in zip(specs, md)]
    transform = stack_transforms(transforms).to(dev)
    counts = torch.tensor(np.stack([m.counts for m in md]), dtype=torch.float32, device=dev)
    loss_fn = PackedLoss.from_specs(specs, counts)
    cfg = _stage_config(ctx, plan, md)
    samplers = [EpochSampler(m.train_indices, plan.batch_size, derive_seed(s.network_id, "batches"))
                for s, m in zip(specs, md)]
    # Each member's own crop/flip stream, seeded from its id (a stage-2 network draws anew).
    augment = [augment_stream(s.recipe.augmentation, derive_seed(s.network_id, "augment")) for s in specs]
    state, opt_state = None, None
    if resume is not None:
        snap = resume.snapshot
        model.load_state_dict({k: v.to(dev) for k, v in snap.model.items()})
        for smp, st in zip(samplers, snap.samplers):
            smp.load_state(st)
        state, opt_state = snap.stage_state, snap.optimizer
        if state.best_state is not None:  # saved from the device, loaded on the CPU
            state.best_state = {k: v.to(dev) for k, v in state.best_state.items()}
        if snap.noise is not None:  # dropout masks continue as if never stopped
            model.load_noise_state(snap.noise, dev)
        for a, st in zip(augment, snap.augment or [None] * len(augment)):
            if a is not None and st is not None:
                a.load_state(st)
        log.info("pack %s: stage %d resumes from iteration %d", ctx.pack.pack_id, plan.number, state.iteration)
    members = [s.network_id for s in ctx.pack.specs]

    def save(snapshot: StageSnapshot) -> None:
        results, parents, latent = stage1 or ({}, {}, [])
        ctx.checkpoints.write(PackCheckpoint(members, plan.number, snapshot, results, parents, latent))

    monitor.stage_start(plan, model)
    state = train_stage(model, samplers, ctx.x_train, ctx.y_train, transform, loss_fn, cfg, state, opt_state,
                        checkpoint=save, progress=lambda it: monitor.iteration(plan.number, it), augment=augment)
    monitor.stage_end(plan, model)
    monitor.phase(Phase.EVALUATING, plan.number)
    t_eval = time.perf_counter()
    logits, _ = predict(model, ctx.x_test, transform, ctx.autocast)
    priors = torch.tensor(np.stack([m.priors for m in md]), dtype=torch.float32, device=dev)
    metrics = evaluate(logits, ctx.y_test, priors, ds.num_classes)
    eval_seconds = time.perf_counter() - t_eval
    if any(s.latent or s.embeddings for s in specs):
        monitor.phase(Phase.LATENT, plan.number)
    t_latent = time.perf_counter()
    latent = latent_tables(model, list(specs), [m.subset for m in md], transforms,
                           ctx.x_train, ctx.y_train, ctx.x_test, ctx.y_test, ds.num_classes)
    n_latent = sum(1 for s in specs if s.latent or s.embeddings)
    latent_seconds = (time.perf_counter() - t_latent) / n_latent if n_latent else 0.0
    on_validation = cfg.select_on is not None and cfg.select_on.split == "validation"
    out: dict[str, MemberResult] = {}
    for i, s in enumerate(specs):
        diverged_at = int(state.diverged_at[i])
        measurement = Measurement(
            status=Status.DIVERGED if diverged_at >= 0 else Status.OK,
            error=f"non-finite loss at iteration {diverged_at}" if diverged_at >= 0 else None,
            diverged_at_iter=diverged_at if diverged_at >= 0 else None,
            metrics={str(e): {k: v[i].detach().cpu().numpy() for k, v in metrics[str(e)].items()}
                     for e in s.evaluations},
            best_iter=int(state.best_iter[i]) if state.best_iter is not None else plan.iters,
            val_balanced_accuracy=float(state.best_score[i]) if state.best_score is not None and on_validation
            else None,
            train_seconds=state.train_seconds / len(specs),
            eval_seconds=eval_seconds / len(specs),
            latent_seconds=latent_seconds if s.latent or s.embeddings else 0.0,
        )
        curves = tuple({k: v for k, v in c.items() if k != "member"} for c in state.curves if c["member"] == i)
        out[s.network_id] = MemberResult(measurement, curves)
    return out, latent
