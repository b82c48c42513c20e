"""``run_pack``: train, evaluate and store every network of a pack. No Ray here.

A pack runs in up to two stages on one device:

1. every network that starts from scratch (baseline, over-/under-sampling, ...),
   stacked into one packed model;
2. networks that start from a stage-1 network (two-phase phase 2, classifier
   re-training): their body is copied from the parent and frozen, and only the
   head trains, at the parent's base lr times ``phase2_lr_factor``.

Then all rows are written to the store in one atomic commit. The function runs the
same under Ray Tune, in a test, in a benchmark or by hand on a GPU box.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from sweep.plan import Pack
from sweep.spec import ImbalanceKind, Selection, TrialSpec, derive_seed
from workers.datasets import ArrayDataset, load_dataset
from workers.engine import EvalSet, StageConfig, pad_members, predict, train_stage
from workers.latent_tables import latent_tables
from workers.losses import PackedLoss
from workers.members import MemberData, member_data
from workers.metrics import evaluate
from workers.models import PackedNet, build_model
from workers.optim import lr_table
from workers.samplers import EpochSampler
from workers.transforms import fit_transform, stack_transforms

log = logging.getLogger(__name__)

Precision = Literal["fp32", "tf32", "bf16"]
PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16")
DEFAULT_SELECT_POINTS = 20  # evaluation points when a selection needs them and none are set


@dataclass
class PackResult:
    pack_id: str
    tables: dict[str, list[dict[str, Any]]]
    networks: int
    diverged: int
    failed: int
    seconds: float
    device: str
    resumed_from_iter: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available on this machine")
    return d


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def run_pack(
    pack: Pack,
    store: Any = None,
    *,
    device: str | None = None,
    data_dir: str | None = None,
    grid_hash: str = "",
    precision: Precision = "fp32",
    progress: Callable[[float], None] | None = None,
    dataset: ArrayDataset | None = None,
) -> PackResult:
    """Train and evaluate the pack's networks; write their rows to ``store`` if given.

    ``store`` is a :class:`sweep.store.ResultStore`, a path, or None (rows are only
    returned). ``progress`` receives the fraction of the pack's iterations done.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} (allowed: {', '.join(PRECISIONS)})")
    if not pack.specs:
        raise ValueError("empty pack")
    keys = {s.pack_key for s in pack.specs}
    if len(keys) != 1:
        raise ValueError(f"pack mixes incompatible specs: {sorted(map(str, keys))}")
    dev = resolve_device(device)
    store = _open_store(store)
    t0 = time.perf_counter()
    autocast = _set_precision(precision, dev)
    first = pack.specs[0]
    ds = dataset if dataset is not None else load_dataset(first.dataset, data_dir)
    labels = ds.train_y.numpy()
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    data = {s.network_id: member_data(s, labels, ds.num_classes, cache) for s in pack.specs}
    x_train, y_train = ds.train_x.to(dev), ds.train_y.to(dev)
    x_test, y_test = ds.test_x.to(dev), ds.test_y.to(dev)
    ckpt = _Checkpoints(store, pack)
    resumed = ckpt.load()
    resumed_from = 0 if resumed is None else int(resumed["resumed_from_iter"])

    stage1 = [s for s in pack.specs if s.parent is None]
    stage2 = [s for s in pack.specs if s.parent is not None]
    iters = first.recipe.iters
    total_iters = iters * ((1 if stage1 else 0) + (1 if stage2 else 0))

    def stage_progress(offset: int) -> Callable[[int], None]:
        return lambda it: progress((offset + it) / total_iters) if progress else None

    results: dict[str, dict[str, Any]] = {}
    states: dict[str, dict[str, torch.Tensor]] = {}
    latent: list[dict[str, Any]] = []  # per stage: latent_stats / embeddings / classifier_weights
    # Input transforms by training set, shared by both stages: a stage-2 network trains on
    # its parent's subset, and refitting ZCA there cost seconds per training set for nothing.
    fitted: dict[str, Any] = {}
    if resumed is not None and resumed["stage"] == 2:
        results, states, latent = resumed["results"], resumed["states"], resumed.get("latent", [])
    elif stage1:
        model = _new_model(stage1, ds, dev)
        out, tables = _run_stage(model, stage1, data, ds, x_train, y_train, x_test, y_test, head_only=False,
                                 fitted=fitted, autocast=autocast, ckpt=ckpt, resume=resumed, stage=1,
                                 progress=stage_progress(0))
        results.update(out)
        latent.append(tables)
        # Stage 2 needs the parents' weights; keep only those.
        needed = {s.parent_id for s in stage2}
        for i, s in enumerate(stage1):
            if s.network_id in needed:
                states[s.network_id] = model.member_state(i)
        del model
    if stage2:
        runnable = []
        for s in stage2:
            parent = results.get(s.parent_id)
            if parent is None:
                results[s.network_id] = _failed(s, f"phase-1 network {s.parent_id} ({s.method.phase1}) "
                                                   "is not in this pack; re-plan the sweep")
            elif parent["status"] != "ok":
                results[s.network_id] = _failed(
                    s, f"phase-1 network {s.parent_id} ({s.method.phase1}) {parent['status']}"
                       f"{' at iteration ' + str(parent['diverged_at_iter']) if parent['diverged_at_iter'] is not None else ''}")
            else:
                runnable.append(s)
        if runnable:
            model = _new_model(runnable, ds, dev)
            for i, s in enumerate(runnable):
                model.load_member_state(i, states[s.parent_id])
            ckpt.stage1 = {"results": results, "states": states, "latent": latent}
            out, tables = _run_stage(model, runnable, data, ds, x_train, y_train, x_test, y_test,
                                     head_only=True, fitted=fitted, autocast=autocast, ckpt=ckpt,
                                     resume=resumed if resumed is not None and resumed["stage"] == 2 else None,
                                     stage=2, progress=stage_progress(iters if stage1 else 0))
            results.update(out)
            latent.append(tables)

    seconds = time.perf_counter() - t0
    tables = _rows(pack, results, data, ds, dev, grid_hash, seconds, resumed_from)
    tables.update(_stored_latent(pack, latent))
    if store is not None:
        store.write_pack(pack.pack_id, first.grid or "default", tables)
        ckpt.remove()
    statuses = [results[s.network_id]["status"] for s in pack.stored_specs]
    return PackResult(pack.pack_id, tables, len(pack.stored_specs), statuses.count("diverged"),
                      statuses.count("failed"), seconds, device_name(dev), resumed_from)


def _new_model(specs: list[TrialSpec], ds: ArrayDataset, dev: torch.device) -> PackedNet:
    s0 = specs[0]
    model = build_model(s0.model, len(specs), ds.num_classes, tuple(ds.train_x.shape[1:]))
    # Same training set -> same initial weights for every method (paired comparisons).
    model.reset_parameters(s0.recipe.init, [derive_seed(s.seed, "init") for s in specs])
    model.seed_noise([derive_seed(s.network_id, "dropout") for s in specs])
    return model.to(dev)


def _run_stage(model: PackedNet, specs: list[TrialSpec], data: dict[str, MemberData], ds: ArrayDataset,
               x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
               *, head_only: bool, fitted: dict[str, Any], autocast: torch.dtype | None,
               ckpt: "_Checkpoints",
               resume: dict[str, Any] | None, stage: int,
               progress: Callable[[int], None]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    dev = x_train.device
    md = [data[s.network_id] for s in specs]
    recipe = specs[0].recipe
    # Each member's input transform is fitted on its own imbalanced subset (ZCA, mean/std);
    # ``fitted`` (training_set_key -> transform) holds one fit per subset: ZCA costs seconds.
    for s, m in zip(specs, md):
        if s.training_set_key not in fitted:
            fitted[s.training_set_key] = fit_transform(ds.preprocess, ds.train_x[m.subset])
    transform = stack_transforms([fitted[s.training_set_key] for s in specs]).to(dev)
    factor = [s.recipe.phase2_lr_factor if head_only else 1.0 for s in specs]
    lr = torch.from_numpy(lr_table([s.recipe for s in specs],
                                   [s.recipe.base_lr * f for s, f in zip(specs, factor)], recipe.iters)).to(dev)
    loss_fn = PackedLoss(
        kinds=[s.loss for s in specs],
        class_counts=torch.tensor(np.stack([m.counts for m in md]), dtype=torch.float32, device=dev),
        focal_gamma=torch.tensor([s.recipe.focal_gamma for s in specs], device=dev),
        ldam_max_margin=torch.tensor([s.recipe.ldam_max_margin for s in specs], device=dev),
        ldam_scale=torch.tensor([s.recipe.ldam_scale for s in specs], device=dev),
        drw_beta=torch.tensor([s.recipe.drw_beta for s in specs], device=dev),
        drw_start_iter=[s.recipe.drw_start_iter for s in specs],
    )
    selection = specs[0].selection
    select_on = None
    if selection == Selection.VALIDATION and all(len(m.validation) for m in md):
        idx, labels = pad_members([m.validation for m in md], y_train)
        select_on = EvalSet(x_train, labels, "validation", idx=idx)
    elif selection == Selection.TEST:
        select_on = EvalSet(x_test, y_test, "test")
    eval_every = recipe.eval_every
    if select_on is not None and eval_every == 0:
        eval_every = max(1, recipe.iters // DEFAULT_SELECT_POINTS)
    cfg = StageConfig(
        iters=recipe.iters,
        batch_size=recipe.batch_size,
        lr=lr,
        momentum=torch.tensor([s.recipe.momentum for s in specs], device=dev),
        weight_decay=torch.tensor([s.recipe.weight_decay for s in specs], device=dev),
        bias_lr_factor=torch.tensor([s.recipe.bias_lr_factor for s in specs], device=dev),
        head_only=head_only,
        eval_every=eval_every,
        select_on=select_on,
        curve_sets=(EvalSet(x_test, y_test, "test"),) if recipe.eval_every else (),
        checkpoint_every=recipe.checkpoint_every,
        autocast_dtype=autocast,
    )
    samplers = [EpochSampler(m.train_indices, recipe.batch_size, derive_seed(s.network_id, "batches"))
                for s, m in zip(specs, md)]
    state, opt_state = None, None
    if resume is not None:
        model.load_state_dict({k: v.to(dev) for k, v in resume["model"].items()})
        for smp, st in zip(samplers, resume["samplers"]):
            smp.load_state(st)
        state, opt_state = resume["stage_state"], resume["optimizer"]
        if state.best_state is not None:  # saved from the device, loaded on the CPU
            state.best_state = {k: v.to(dev) for k, v in state.best_state.items()}
        if resume.get("noise") is not None:  # dropout masks continue as if never stopped
            model.load_noise_state(resume["noise"], dev)
        log.info("pack %s: stage %d resumes from iteration %d", ckpt.pack_id, stage, state.iteration)
    ckpt.stage = stage
    state = train_stage(model, samplers, x_train, y_train, transform, loss_fn, cfg, state, opt_state,
                        checkpoint=ckpt.save, progress=progress)
    t_eval = time.perf_counter()
    logits, _ = predict(model, x_test, transform, autocast)
    priors = torch.tensor(np.stack([m.priors for m in md]), dtype=torch.float32, device=dev)
    metrics = evaluate(logits, y_test, priors, ds.num_classes)
    eval_seconds = time.perf_counter() - t_eval
    t_latent = time.perf_counter()
    latent = latent_tables(model, specs[0].model, specs, [m.subset for m in md],
                           [fitted[s.training_set_key] for s in specs], x_train, y_train, x_test, y_test,
                           ds.num_classes)
    n_latent = sum(1 for s in specs if s.latent or s.embeddings)
    latent_seconds = (time.perf_counter() - t_latent) / n_latent if n_latent else 0.0
    out: dict[str, dict[str, Any]] = {}
    for i, s in enumerate(specs):
        diverged_at = int(state.diverged_at[i])
        per_eval = {e: {k: v[i].detach().cpu().numpy() for k, v in metrics[str(e)].items()}
                    for e in s.evaluations}
        out[s.network_id] = {
            "status": "diverged" if diverged_at >= 0 else "ok",
            "error": f"non-finite loss at iteration {diverged_at}" if diverged_at >= 0 else None,
            "diverged_at_iter": diverged_at if diverged_at >= 0 else None,
            "metrics": per_eval,
            "best_iter": int(state.best_iter[i]) if state.best_iter is not None else recipe.iters,
            "val_balanced_accuracy": float(state.best_score[i]) if state.best_score is not None
            and select_on is not None and select_on.split == "validation" else None,
            "curves": [c for c in state.curves if c["member"] == i],
            "train_seconds": state.train_seconds / len(specs),
            "eval_seconds": eval_seconds / len(specs),
            "latent_seconds": latent_seconds if s.latent or s.embeddings else 0.0,
        }
    return out, latent


def _failed(spec: TrialSpec, why: str) -> dict[str, Any]:
    return {"status": "failed", "error": why, "diverged_at_iter": None, "metrics": {}, "best_iter": None,
            "val_balanced_accuracy": None, "curves": [], "train_seconds": 0.0, "eval_seconds": 0.0,
            "latent_seconds": 0.0}


def _rows(pack: Pack, results: dict[str, dict[str, Any]], data: dict[str, MemberData], ds: ArrayDataset,
          dev: torch.device, grid_hash: str, seconds: float, resumed_from: int) -> dict[str, list[dict[str, Any]]]:
    from sweep.provenance import provenance

    prov = provenance(grid_hash, device_name(dev))
    now = dt.datetime.now(dt.timezone.utc)
    test_counts = np.bincount(ds.test_y.numpy(), minlength=ds.num_classes)
    trials, classes, curves = [], [], []
    for s in pack.stored_specs:
        r, m = results[s.network_id], data[s.network_id]
        for curve in r["curves"]:
            curves.append({"network_id": s.network_id, **{k: v for k, v in curve.items() if k != "member"}})
        for e in s.evaluations:
            met = r["metrics"].get(e)
            nan = float("nan")
            trials.append({
                "trial_id": s.trial_id(e), "network_id": s.network_id, "parent_id": s.parent_id,
                "pack_id": pack.pack_id, "evaluation": str(e),
                "dataset": s.dataset, "model": s.model, "method": str(s.method), "loss": str(s.loss),
                "imbalance": str(s.imbalance.kind), "rho": float(s.imbalance.rho),
                "mu": s.imbalance.mu, "n_minority": len(s.imbalance.classes)
                if s.imbalance.kind == ImbalanceKind.STEP else None,
                "classes": list(s.imbalance.classes), "resample_ratio": float(s.resample_ratio),
                "repeat": s.repeat, "seed": s.seed, "lr_run": s.lr_run, "base_lr": s.recipe.base_lr,
                "iters": s.recipe.iters, "batch_size": s.recipe.batch_size, "selection": str(s.selection),
                "class_counts": m.counts.tolist(), "sampled_counts": m.sampled_counts.tolist(),
                "status": r["status"], "error": r["error"], "diverged_at_iter": r["diverged_at_iter"],
                "roc_auc": float(met["roc_auc"]) if met else nan,
                "accuracy": float(met["accuracy"]) if met else nan,
                "balanced_accuracy": float(met["balanced_accuracy"]) if met else nan,
                "val_balanced_accuracy": r["val_balanced_accuracy"], "best_iter": r["best_iter"],
                "resumed_from_iter": resumed_from,
                "train_seconds": r["train_seconds"], "eval_seconds": r["eval_seconds"],
                "latent_seconds": r["latent_seconds"],
                **prov, "created_at": now, "spec_json": s.to_json(),
            })
            for c in range(ds.num_classes):
                classes.append({
                    "trial_id": s.trial_id(e), "network_id": s.network_id, "evaluation": str(e), "class": c,
                    "train_count": int(m.counts[c]), "sampled_count": int(m.sampled_counts[c]),
                    "test_count": int(test_counts[c]),
                    "accuracy": float(met["class_accuracy"][c]) if met else nan,
                    "roc_auc": float(met["class_roc_auc"][c]) if met else nan,
                })
    return {"trials": trials, "class_metrics": classes, "curves": curves}


def _stored_latent(pack: Pack, stages: list[dict[str, Any]]) -> dict[str, Any]:
    """The stages' latent tables, without the rows of rebuild members (stored before)."""
    keep = pa.array(sorted(s.network_id for s in pack.stored_specs), pa.string())
    out: dict[str, pa.Table] = {}
    for name in ("latent_stats", "embeddings", "classifier_weights"):
        parts = [t[name] for t in stages if t[name].num_rows]
        if parts:
            table = pa.concat_tables(parts)
            out[name] = table.filter(pc.is_in(table["network_id"], value_set=keep))
    return out


def _open_store(store: Any) -> Any:
    if store is None or hasattr(store, "write_pack"):
        return store
    from sweep.store import ResultStore

    return ResultStore(str(store))


def _set_precision(precision: str, dev: torch.device) -> torch.dtype | None:
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
        torch.backends.cudnn.allow_tf32 = precision != "fp32"
    return torch.bfloat16 if precision == "bf16" else None


class _Checkpoints:
    """Pack state saved every ``checkpoint_every`` iterations; removed once stored.

    One file per pack, ``<store>/_checkpoints/<pack_id>.pt``, replaced atomically at
    every save. It records the pack's member ids: a checkpoint whose members differ
    (another plan that happens to hash alike) or that cannot be read is ignored, so
    a checkpoint can cost time but never results. Stores that are not local
    filesystems get no checkpoints (a restarted pack starts over).
    """

    def __init__(self, store: Any, pack: Pack) -> None:
        self.pack_id = pack.pack_id
        self.members = [s.network_id for s in pack.specs]
        local = store is not None and getattr(store, "is_local", True)
        self.path = os.path.join(store.checkpoint_dir(), f"{self.pack_id}.pt") if local else None
        self.stage = 1
        self.stage1: dict[str, Any] | None = None

    def save(self, state: dict[str, Any]) -> None:
        if self.path is None:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        payload = {"stage": self.stage, "resumed_from_iter": state["stage_state"].iteration,
                   "members": self.members, **state}
        if self.stage == 2:
            payload.update(self.stage1 or {})
        # Per-process temp name: a stray duplicate of this pack cannot clobber our temp file.
        tmp = os.path.join(os.path.dirname(self.path), f".{self.pack_id}.pt.{os.getpid()}.tmp")
        try:
            torch.save(payload, tmp)
            os.replace(tmp, self.path)  # atomic: a crash mid-save keeps the previous checkpoint
        except OSError as e:  # a checkpoint that cannot be written costs time, never results
            log.warning("pack %s: checkpoint not saved to %s: %s", self.pack_id, self.path, e)
            with contextlib.suppress(OSError):
                os.remove(tmp)
        else:
            log.info("pack %s: checkpoint at stage %d, iteration %d", self.pack_id, self.stage,
                     payload["resumed_from_iter"])

    def load(self) -> dict[str, Any] | None:
        if self.path is None or not os.path.exists(self.path):
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=False)
            stage, it = int(state["stage"]), int(state["resumed_from_iter"])
        except Exception as e:  # a damaged checkpoint costs time, never results
            log.warning("ignoring unreadable checkpoint %s: %s", self.path, e)
            return None
        if state.get("members") not in (None, self.members):
            log.warning("ignoring checkpoint %s: it belongs to a pack with other members", self.path)
            return None
        log.info("pack %s resumes from its checkpoint at stage %d, iteration %d", self.pack_id, stage, it)
        return state

    def remove(self) -> None:
        if self.path is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)
