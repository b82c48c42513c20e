"""One stage of a pack: its per-member tables, its training (halved at the rungs of a
learning-rate search), and its members' measurements.

Floor: workers (imports sweep.core and sweep.store). ``workers.run_pack`` plans a pack's
stages and calls :func:`run_stage` for each, with the :class:`PackContext` every stage
shares; a stage with a halving search (``workers.halving``) trains to each rung, ranks its
members there, stores the stopped ones' results and goes on with a smaller model and
smaller tables (:func:`_halve`), its checkpoints recording the survivors.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sweep.core.lr_search import LrSearch
from sweep.core.plan import Pack
from sweep.core.spec import Selection, TrialSpec, derive_seed
from sweep.store.schema import CURVE_SET_TEST, CURVE_SET_TRAINED, Measurement, Status
from workers.augment import augment_stream
from workers.checkpoint import CheckpointFile, PackCheckpoint
from workers.compute import Numerics, new_model
from workers.datasets import ArrayDataset
from workers.engine import (
    EvalSet,
    StageConfig,
    StageSnapshot,
    StageState,
    measure,
    pad_members,
    predict,
    train_stage,
)
from workers.halving import HalvingState, compact_state, rank, search_of
from workers.latent_tables import latent_tables
from workers.losses import PackedLoss
from workers.members import MemberData, trained_multiset
from workers.metrics import evaluate
from workers.models import PackedNet
from workers.monitor import PackMonitor, RungEvent
from workers.optim import lr_table
from workers.pack_run import PackRun
from workers.pack_work import Phase
from workers.samplers import EpochSampler
from workers.stages import StagePlan, stage_plan
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
class PackContext:
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


def new_pack_model(specs: tuple[TrialSpec, ...], ds: ArrayDataset, dev: torch.device, numerics: Numerics) -> PackedNet:
    return new_model(specs, numerics, ds.num_classes, tuple(ds.train_x.shape[1:]), dev)


def _stage_config(ctx: PackContext, plan: StagePlan, md: list[MemberData]) -> StageConfig:
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


def _curve_sets(ctx: PackContext, plan: StagePlan, md: list[MemberData]) -> tuple[EvalSet, ...]:
    """Learning curves (Buda et al.'s Fig. 8: does over-sampling overfit?) on the test set and
    on the multiset each member trains on, its images weighted by their multiplicity
    (:func:`workers.members.trained_multiset`; the curves' ``curve_set`` "trained")."""
    drawn = [trained_multiset(m, TRAIN_CURVE_IMAGES, derive_seed(s.stream_id, "train-curve"))
             for s, m in zip(plan.specs, md)]
    idx, labels = pad_members([images for images, _ in drawn], ctx.y_train)
    weight = torch.zeros(labels.shape, dtype=torch.float32)
    for p, (_, counts) in enumerate(drawn):
        weight[p, :len(counts)] = torch.from_numpy(counts.astype(np.float32))
    return (EvalSet(ctx.x_test, ctx.y_test, "test", curve_set=CURVE_SET_TEST),
            EvalSet(ctx.x_train, labels, "train", idx=idx, weight=weight.to(labels.device),
                    curve_set=CURVE_SET_TRAINED))


def _fitted_transform(ctx: PackContext, spec: TrialSpec, m: MemberData) -> InputTransform:
    """The member's input transform, fitted on its own imbalanced subset (ZCA, mean/std)
    once per subset and normalisation: ZCA costs seconds."""
    kind = spec.normalization
    key = (spec.training_set_key, kind)
    if key not in ctx.fitted:
        # A kind that fits nothing is given no images: a streamed dataset's would be decoded.
        images = ctx.ds.train_x[:0] if kind in FITS_NOTHING else ctx.ds.train_x[m.subset]
        ctx.fitted[key] = fit_transform(kind, images)
    return ctx.fitted[key]


@dataclass
class _StageParts:
    """What a stage's step needs per member, built for its members (and rebuilt for the
    survivors at a halving rung, with the samplers and crop/flip streams carried on)."""

    md: list[MemberData]
    transforms: list[InputTransform]
    transform: Any  # the stacked transform, on the device
    loss_fn: PackedLoss
    cfg: StageConfig
    samplers: list[EpochSampler]
    augment: list[Any]


def _stage_parts(ctx: PackContext, plan: StagePlan, streams: tuple[list[EpochSampler], list[Any]] | None = None,
                 ) -> _StageParts:
    """The stage's tables for ``plan.specs``; ``streams``: samplers and crop/flip streams that
    are already under way (the survivors' at a rung), else new ones seeded from the specs."""
    dev, specs = ctx.device, plan.specs
    md = [ctx.data[s.network_id] for s in specs]
    transforms = [_fitted_transform(ctx, s, m) for s, m in zip(specs, md)]
    counts = torch.tensor(np.stack([m.counts for m in md]), dtype=torch.float32, device=dev)
    if streams is None:
        samplers = [EpochSampler(m.train_indices, plan.batch_size, derive_seed(s.stream_id, "batches"))
                    for s, m in zip(specs, md)]
        # Each member's own crop/flip stream, seeded from its id (a stage-2 network draws anew).
        augment = [augment_stream(s.recipe.augmentation, derive_seed(s.stream_id, "augment")) for s in specs]
    else:
        samplers, augment = streams
    return _StageParts(md, transforms, stack_transforms(transforms).to(dev), PackedLoss.from_specs(specs, counts),
                       _stage_config(ctx, plan, md), samplers, augment)


def run_stage(ctx: PackContext, plan: StagePlan, model: PackedNet, resume: PackCheckpoint | None,
               stage1: tuple[dict[str, MemberResult], dict[str, Any], list[dict[str, Any]]] | None = None,
               ) -> tuple[dict[str, MemberResult], dict[str, Any]]:
    """Train one stage's members together (halving them at the rungs of a learning-rate
    search), then evaluate and measure them."""
    dev, ds, monitor = ctx.device, ctx.ds, ctx.monitor
    monitor.phase(Phase.training(plan.number), plan.number)  # fitting the transforms (ZCA) counts as training
    search = search_of(plan.specs)
    halving = HalvingState([s.network_id for s in plan.specs])
    if resume is not None and resume.halving is not None:
        halving = resume.halving
        if len(halving.survivors) < len(plan.specs):  # the checkpoint's model holds the survivors only
            alive = set(halving.survivors)
            plan = stage_plan(plan.number, tuple(s for s in plan.specs if s.network_id in alive))
            model = new_pack_model(plan.specs, ds, dev, ctx.run.numerics)
    parts = _stage_parts(ctx, plan)
    if search is not None and parts.cfg.select_on is None:
        log.warning("pack %s: stage %d has no selection split to rank its candidates on (a member without "
                    "validation images): every candidate trains to the end", ctx.pack.pack_id, plan.number)
        search = None
    state, opt_state = None, None
    if resume is not None:
        snap = resume.snapshot
        model.load_state_dict({k: v.to(dev) for k, v in snap.model.items()})
        for smp, st in zip(parts.samplers, snap.samplers):
            smp.load_state(st)
        state, opt_state = snap.stage_state, snap.optimizer
        if state.best_state is not None:  # saved from the device, loaded on the CPU
            state.best_state = {k: v.to(dev) for k, v in state.best_state.items()}
        if snap.noise is not None:  # dropout masks continue as if never stopped
            model.load_noise_state(snap.noise, dev)
        for a, st in zip(parts.augment, snap.augment or [None] * len(parts.augment)):
            if a is not None and st is not None:
                a.load_state(st)
        log.info("pack %s: stage %d resumes from iteration %d", ctx.pack.pack_id, plan.number, state.iteration)
    members = [s.network_id for s in ctx.pack.specs]

    def save(snapshot: StageSnapshot) -> None:
        results, parents, latent = stage1 or ({}, {}, [])
        ctx.checkpoints.write(PackCheckpoint(members, plan.number, snapshot, results, parents, latent,
                                             halving if search is not None else None))

    monitor.stage_start(plan, model)
    rungs = search.rungs if search is not None else ()
    while True:
        until = rungs[halving.rungs_done] if halving.rungs_done < len(rungs) else None
        state = train_stage(model, parts.samplers, ctx.x_train, ctx.y_train, parts.transform, parts.loss_fn,
                            parts.cfg, state, opt_state, checkpoint=save,
                            progress=lambda it: monitor.iteration(plan.number, it), augment=parts.augment,
                            until=until)
        if until is None:
            break
        plan, model, parts, state = _halve(ctx, plan, model, parts, state, search, halving)
        opt_state, state.optimizer = state.optimizer, None
    monitor.stage_end(plan, model)
    monitor.phase(Phase.EVALUATING, plan.number)
    specs, md, transform = plan.specs, parts.md, parts.transform
    t_eval = time.perf_counter()
    metrics = _test_metrics(ctx, model, transform, md)
    eval_seconds = time.perf_counter() - t_eval
    if any(s.latent or s.embeddings for s in specs):
        monitor.phase(Phase.LATENT, plan.number)
    t_latent = time.perf_counter()
    latent = latent_tables(model, list(specs), [m.subset for m in md], parts.transforms,
                           ctx.x_train, ctx.y_train, ctx.x_test, ctx.y_test, ds.num_classes)
    n_latent = sum(1 for s in specs if s.latent or s.embeddings)
    latent_seconds = (time.perf_counter() - t_latent) / n_latent if n_latent else 0.0
    on_validation = parts.cfg.select_on is not None and parts.cfg.select_on.split == "validation"
    out: dict[str, MemberResult] = dict(halving.stopped)
    for i, s in enumerate(specs):
        measurement = _measurement(i, s, metrics, state, plan.iters, on_validation,
                                   eval_seconds=eval_seconds / len(specs),
                                   latent_seconds=latent_seconds if s.latent or s.embeddings else 0.0)
        if search is not None:
            measurement = dataclasses.replace(measurement, rung=len(rungs) - 1,
                                              rung_metric=halving.last_score.get(s.network_id))
        out[s.network_id] = MemberResult(measurement, _curves_of(state, i))
    return out, latent


def _test_metrics(ctx: PackContext, model: PackedNet, transform: Any, md: list[MemberData]) -> dict[str, Any]:
    """Every member's metrics on the test set, raw and thresholded by its training priors."""
    logits, _ = predict(model, ctx.x_test, transform, ctx.autocast)
    priors = torch.tensor(np.stack([m.priors for m in md]), dtype=torch.float32, device=ctx.device)
    return evaluate(logits, ctx.y_test, priors, ctx.ds.num_classes)


def _measurement(i: int, s: TrialSpec, metrics: dict[str, Any], state: StageState, iters: int,
                 on_validation: bool, **seconds: float) -> Measurement:
    """Member ``i``'s measurement from the stage's test metrics and state."""
    diverged_at = int(state.diverged_at[i])
    return Measurement(
        status=Status.DIVERGED if diverged_at >= 0 else Status.OK,
        error=f"non-finite loss at iteration {diverged_at}" if diverged_at >= 0 else None,
        diverged_at_iter=diverged_at if diverged_at >= 0 else None,
        metrics={str(e): {k: v[i].detach().cpu().numpy() for k, v in metrics[str(e)].items()}
                 for e in s.evaluations},
        best_iter=int(state.best_iter[i]) if state.best_iter is not None else iters,
        val_balanced_accuracy=float(state.best_score[i]) if state.best_score is not None and on_validation
        else None,
        train_seconds=state.train_seconds / len(state.diverged_at),
        **seconds,
    )


def _curves_of(state: StageState, i: int) -> tuple[dict[str, Any], ...]:
    return tuple({k: v for k, v in c.items() if k != "member"} for c in state.curves if c["member"] == i)


def _halve(ctx: PackContext, plan: StagePlan, model: PackedNet, parts: _StageParts, state: StageState,
           search: LrSearch, halving: HalvingState) -> tuple[StagePlan, PackedNet, _StageParts, StageState]:
    """One rung: rank the members on the selection split, record the stopped (their test
    metrics at this iteration, status stopped) and cut the stage down to the survivors."""
    rung, it = halving.rungs_done, state.iteration
    scores = measure(model, parts.transform, parts.cfg.select_on, ctx.autocast)[str(search.metric)]
    keep = rank(plan.specs, scores, state.diverged_at >= 0, search)
    stopped = [i for i in range(len(plan.specs)) if i not in set(keep)]
    log.info("pack %s: rung %d at iteration %d keeps %d of %d networks", ctx.pack.pack_id, rung, it,
             len(keep), len(plan.specs))
    # Test metrics at the rung: the stopped networks' rows, and what a one-network trial tells Ray Tune.
    metrics = _test_metrics(ctx, model, parts.transform, parts.md)
    raw = metrics["raw"]
    ids = tuple(s.network_id for s in plan.specs)
    ctx.monitor.rung(RungEvent(
        ctx.pack.pack_id, plan.number, rung, it, str(search.metric), ids, tuple(float(x) for x in scores),
        tuple(ids[i] for i in keep),
        tuple({k: float(raw[k][i]) for k in ("roc_auc", "accuracy", "balanced_accuracy")} for i in range(len(ids)))))
    if stopped:
        for i in stopped:
            s = plan.specs[i]
            m = _measurement(i, s, metrics, state, it, False)
            if m.status == Status.OK:  # a diverged member keeps its status; its rung is recorded too
                m = dataclasses.replace(m, status=Status.STOPPED,
                                        error=f"stopped at rung {rung} (iteration {it}) of the lr search")
            m = dataclasses.replace(m, best_iter=it, rung=rung, stopped_at_iter=it, rung_metric=float(scores[i]),
                                    val_balanced_accuracy=None)
            halving.stopped[s.network_id] = MemberResult(m, _curves_of(state, i))
    halving.last_score = {plan.specs[i].network_id: float(scores[i]) for i in keep}
    halving.rungs_done += 1
    if not stopped:
        return plan, model, parts, state
    survivors = stage_plan(plan.number, tuple(plan.specs[i] for i in keep))
    halving.survivors = [s.network_id for s in survivors.specs]
    smaller = new_pack_model(survivors.specs, ctx.ds, ctx.device, ctx.run.numerics)
    for new, old in enumerate(keep):
        smaller.load_member_state(new, model.member_state(old))
    noise = model.noise_state()
    if noise is not None:  # one draw counter for all members: the survivors' masks go on
        smaller.load_noise_state(noise, ctx.device)
    streams = ([parts.samplers[i] for i in keep], [parts.augment[i] for i in keep])
    return (survivors, smaller, _stage_parts(ctx, survivors, streams),
            compact_state(state, keep, len(plan.specs)))
