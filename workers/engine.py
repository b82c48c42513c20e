"""The training loop of one stage of a pack: all members step together.

Floor: workers (trial execution; imports sweep.core and sweep.store only).

A stage trains a packed model for a fixed number of iterations. Each member has its
own sampler, learning-rate column, loss settings and input transform; the loop
issues one forward/backward per step for all of them. Divergence (a non-finite
loss) is tracked per member on the device without a host sync every step; a
diverged member stops learning (its learning rate is masked to zero) and the
others go on.

The step itself needs nothing from the host (batches in ``workers.batch_feed`` tables,
the step number, the alive mask and the first non-finite iteration in device tensors),
so on CUDA it is captured once per stage and replayed as one graph
(``workers.step_graph``); the host refills the tables between chunks of
``CHUNK_ITERS`` and stops only at evaluation points and checkpoints.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from workers.augment import CropFlipDraws
from workers.batch_feed import BatchFeed
from workers.compute import new_optimizer
from workers.divergence import DivergenceWatch, note_divergence
from workers.losses import PackedLoss
from workers.metrics import classification_metrics, member_balanced_accuracy
from workers.models import PackedNet
from workers.preemption import checkpoint_due
from workers.samplers import EpochSampler
from workers.step_graph import StepRunner

log = logging.getLogger(__name__)

CHUNK_ITERS = 50  # iterations of indices sent to the device at once
DIVERGENCE_CHECK_ITERS = 50  # host checks for diverged members this often
EVAL_CHUNK_IMAGES = 2048  # images per member per evaluation forward pass (of 32x32 or smaller images)


@dataclass
class EvalSet:
    """Images (uint8, on the device) and labels a stage measures itself on.

    Shared by all members (``y`` [N]), or per member (``idx`` [P, N] into ``x``, ``y``
    [P, N] with -1 for padding): each member's validation split is carved from its own
    training set, so members of different training sets are judged on different images.
    ``weight`` [P, N] counts each of those images that many times (the multiset a member's
    sampler walks: an over-sampled image as often as the stream holds it); None: once each.
    """

    x: Tensor
    y: Tensor
    split: str  # "test" | "validation" | "train"
    idx: Tensor | None = None
    weight: Tensor | None = None
    curve_set: str | None = None  # the curves' ``curve_set`` column (sweep.store.schema.CURVE_SETS); None: split


def pad_members(index_sets: list[np.ndarray], y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-member index sets as ``[P, N_max]`` indices (padding: index 0) and labels (-1 = padding)."""
    longest = max(len(s) for s in index_sets)
    idx = torch.zeros(len(index_sets), longest, dtype=torch.long)
    labels = torch.full((len(index_sets), longest), -1, dtype=torch.long)
    y_cpu = y.cpu()
    for p, s in enumerate(index_sets):
        t = torch.from_numpy(np.asarray(s, dtype=np.int64))
        idx[p, :len(s)] = t
        labels[p, :len(s)] = y_cpu[t]
    return idx.to(y.device), labels.to(y.device)


@dataclass
class StageConfig:
    iters: int
    batch_size: int
    lr: Tensor  # [iters, P] on the device
    momentum: Tensor  # [P]
    weight_decay: Tensor  # [P]
    bias_lr_factor: Tensor | None = None  # [P]: biases' lr as a multiple of the weights'
    head_only: bool = False  # phase 2 / classifier re-training: body parameters frozen, only the head trains
    body_train: bool = False  # head_only: frozen body in training mode (Caffe's TRAIN phase; workers.stages)
    eval_every: int = 0  # curve points (0: none)
    select_every: int = 0  # selection points (0: none), apart from curves: curves change nothing learnt
    select_on: EvalSet | None = None  # keep each member's best state by balanced accuracy
    curve_sets: tuple[EvalSet, ...] = ()
    checkpoint_every: int = 0
    autocast_dtype: torch.dtype | None = None  # bf16 on GPUs where accuracy allows
    cuda_graph: bool = True  # on CUDA, replay the step as one captured graph (workers.step_graph)


@dataclass
class StageState:
    """Everything needed to continue a stage after a restart."""

    iteration: int = 0
    diverged_at: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    curves: list[dict[str, Any]] = field(default_factory=list)
    best_score: np.ndarray | None = None
    best_iter: np.ndarray | None = None
    best_state: dict[str, Tensor] | None = None
    train_seconds: float = 0.0
    step_mode: str = "eager"  # how the last run of the stage stepped: "eager" | "graph"
    # Set when train_stage returns before the stage's end (``until``, a halving rung): the
    # optimizer's buffers on the CPU, for the next call (on the members left) to load.
    optimizer: list[Tensor | None] | None = None


@dataclass
class StageSnapshot:
    """What a stage needs to continue exactly where it was (a checkpoint's payload)."""

    stage_state: StageState
    optimizer: list[Tensor | None]
    samplers: list[dict[str, Any]]
    model: dict[str, Tensor]  # state_dict on the CPU
    noise: dict[str, int] | None  # where the members' dropout streams are (models.PackedNet.noise_state)
    augment: list[dict[str, Any] | None] | None = None  # the members' crop/flip streams (None: none)


Checkpointer = Callable[[StageSnapshot], None]


def predict(model: PackedNet, x: Tensor, transform: Any, autocast_dtype: torch.dtype | None = None,
            want_features: bool = False, idx: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Logits ``[P, N, K]`` (and FE ``[P, N, F]``) of every member on the same images ``x``,
    or, with ``idx`` ``[P, N]``, of member p on its own images ``x[idx[p]]``."""
    model.eval()
    outs, feats = [], []
    n = x.shape[0] if idx is None else idx.shape[1]
    step = max(1, min(EVAL_CHUNK_IMAGES, EVAL_CHUNK_IMAGES * 1024 // (x.shape[-1] * x.shape[-2])))  # 40 at 224 px
    with torch.no_grad(), _autocast(x.device, autocast_dtype):
        for i in range(0, n, step):
            if idx is None:
                chunk = x[i:i + step]
                xb = chunk.unsqueeze(0).expand(model.members, *chunk.shape)
            else:
                xb = x[idx[:, i:i + step]]
            f, logits = model(transform.apply(xb))
            outs.append(logits.float())
            if want_features:
                feats.append(f.float())
    return torch.cat(outs, 1), (torch.cat(feats, 1) if want_features else None)


def train_stage(
    model: PackedNet,
    samplers: list[EpochSampler],
    x_train: Tensor,
    y_train: Tensor,
    transform: Any,
    loss_fn: PackedLoss,
    cfg: StageConfig,
    state: StageState | None = None,
    optimizer_state: list[Tensor | None] | None = None,
    checkpoint: Checkpointer | None = None,
    progress: Callable[[int], None] | None = None,
    augment: Sequence[CropFlipDraws | None] | None = None,
    until: int | None = None,
) -> StageState:
    """Train all members for ``cfg.iters`` iterations (continuing from ``state``).

    ``until``: return at that iteration instead (a rung of a learning-rate search), with the
    optimizer's buffers in ``state.optimizer`` and no best state restored; a later call,
    perhaps on fewer members, goes on from there with the same numbers.

    ``augment`` holds each member's crop/flip stream (None: that member's images are used
    as they are); None or all None: no augmentation work at all.

    The step (:func:`_device_step`) takes everything from the device: batches from a
    :class:`BatchFeed` table, the learning rate from ``cfg.lr`` at a device step counter,
    divergence state in device tensors. The host only refills the tables between chunks,
    reads divergence asynchronously, and stops at evaluation points and checkpoints. On
    CUDA the step is replayed as one CUDA graph (:class:`StepRunner`).
    """
    if augment is not None and all(a is None for a in augment):
        augment = None
    device = x_train.device
    p = model.members
    state = state or StageState(diverged_at=np.full(p, -1, dtype=np.int64))
    params = model.head_parameters() if cfg.head_only else list(model.parameters())
    for prm in model.parameters():
        prm.requires_grad_(not cfg.head_only or any(prm is h for h in params))
    opt = _optimizer(model, params, cfg)
    if optimizer_state is not None:
        opt.load_state(optimizer_state, device)
    feed = BatchFeed(samplers, augment, cfg.batch_size, device, CHUNK_ITERS, images=x_train)
    # Diverged members keep a zero learning rate; the mask lives on the device.
    counters = _Counters(
        it=torch.full((), state.iteration, dtype=torch.int64, device=device),
        alive=torch.tensor(state.diverged_at < 0, device=device, dtype=torch.float32),
        first_bad=torch.as_tensor(state.diverged_at, device=device).clone(),
    )
    step = _device_step(model, feed, x_train, y_train, transform, loss_fn, cfg, opt, counters)
    forget_copy = getattr(model, "forget_compute_copy", None)
    runner = StepRunner(step, device, cfg.cuda_graph and not feed.streamed, f"stage of {p} members", forget_copy)

    def after_replays() -> None:
        # Replays run no Python: a 16-bit compute copy's version bookkeeping stopped there.
        if runner.mode == "graph" and forget_copy is not None:
            forget_copy()

    watch = DivergenceWatch(counters.first_bad)
    start = time.perf_counter() - state.train_seconds
    it = state.iteration
    stop = cfg.iters if until is None else min(until, cfg.iters)
    state.optimizer = None
    while it < stop:
        n = min(CHUNK_ITERS, stop - it)
        if checkpoint is not None and cfg.checkpoint_every:
            # End chunks on checkpoint boundaries: checkpoints land exactly every
            # ``checkpoint_every`` iterations (the sampler streams do not depend on chunking).
            n = min(n, cfg.checkpoint_every - it % cfg.checkpoint_every)
        feed.load(n)
        for _ in range(n):
            runner()
            it += 1
            if it % DIVERGENCE_CHECK_ITERS == 0:
                watch.poll(state)
            curve_point = _is_point(it, cfg.eval_every, cfg.iters)
            select_point = cfg.select_on is not None and _is_point(it, cfg.select_every, cfg.iters)
            if curve_point or select_point:
                after_replays()
                _eval_point(model, transform, cfg, state, it, curve_point, select_point)
        state.iteration = it
        state.train_seconds = time.perf_counter() - start
        if checkpoint is not None and it < cfg.iters and checkpoint_due(it, cfg.checkpoint_every):  # or on SIGTERM
            # Divergence is noted first so a restarted stage keeps masking diverged members.
            note_divergence(state, counters.first_bad)
            # Saved before progress is reported: whoever sees ``it`` reported can rely on a checkpoint at ``it``.
            checkpoint(StageSnapshot(state, opt.state(), [s.state() for s in samplers],
                                     {k: v.detach().cpu() for k, v in model.state_dict().items()},
                                     model.noise_state(),
                                     None if augment is None else [None if a is None else a.state() for a in augment]))
        if progress is not None:
            progress(it)
    note_divergence(state, counters.first_bad)
    state.train_seconds = time.perf_counter() - start
    state.step_mode = runner.mode
    after_replays()
    if it < cfg.iters:  # stopped at ``until``: the stage goes on in a later call
        state.optimizer = opt.state()
    elif state.best_state is not None:
        _restore_best(model, state)
    for prm in model.parameters():
        prm.requires_grad_(True)
        prm.grad = None  # a replayed graph's gradients live in its memory pool: let it go
    return state


@dataclass
class _Counters:
    """Device state the step updates in place: the step number, and per member whether it is
    still alive (1.0 / 0.0) and the iteration its loss first went non-finite (-1: never)."""

    it: Tensor
    alive: Tensor
    first_bad: Tensor


def _optimizer(model: PackedNet, params: list[Tensor], cfg: StageConfig) -> Any:
    """The stage's optimizer of ``params`` (``workers.compute.new_optimizer`` chooses)."""
    return new_optimizer(model, params, cfg.momentum, cfg.weight_decay, cfg.bias_lr_factor)


def _device_step(model: PackedNet, feed: BatchFeed, x_train: Tensor, y_train: Tensor, transform: Any,
                 loss_fn: PackedLoss, cfg: StageConfig, opt: Any, c: _Counters) -> Callable[[], None]:
    """One training step of all members that reads nothing from the host (capturable).

    Every tensor it keeps between steps is updated in place at a fixed address: the feed's
    row, the step counter, the alive mask, the first non-finite iteration, and the model's
    and optimizer's own tensors.
    """

    def step() -> None:
        batch, draws = feed.batch()  # [P, B], [P, B, 3]
        model.train(not cfg.head_only or cfg.body_train)
        images = feed.images(x_train, batch, draws)
        with _autocast(x_train.device, cfg.autocast_dtype):
            xb = transform.apply(images)
            if cfg.head_only:
                with torch.no_grad():
                    z = model.body(xb)
                _, logits = model.head(z)
            else:
                _, logits = model(xb)
        losses = loss_fn(logits.float(), y_train[batch], c.it)
        # A member's loss only reaches its own parameters, so one backward serves all.
        opt.zero_grad()
        losses.sum().backward()
        bad = ~torch.isfinite(losses.detach())
        c.first_bad.copy_(torch.where(bad & (c.first_bad < 0), c.it, c.first_bad))
        c.alive.mul_((~bad).float())
        opt.step(cfg.lr.index_select(0, c.it.view(1)).squeeze(0) * c.alive)
        c.it.add_(1)
        feed.advance()

    return step


def _is_point(it: int, every: int, iters: int) -> bool:
    """Whether iteration ``it`` is one of every ``every`` (and the last) iterations (0: none)."""
    return every > 0 and (it % every == 0 or it == iters)


def _eval_point(model: PackedNet, transform: Any, cfg: StageConfig, state: StageState, it: int,
                curve_point: bool, select_point: bool) -> None:
    sets = list(cfg.curve_sets) if curve_point else []
    if select_point and cfg.select_on is not None and all(s is not cfg.select_on for s in sets):
        sets.append(cfg.select_on)
    for es in sets:
        # Each member on its own images where es.idx is set (labels [P, N], -1 = padding).
        m = measure(model, transform, es, cfg.autocast_dtype)
        acc, bac, lss = m["accuracy"], m["balanced_accuracy"], m["loss"]
        if curve_point and any(es is c for c in cfg.curve_sets):
            for p in range(model.members):
                state.curves.append({"member": p, "iter": it, "split": es.split,
                                     "curve_set": es.curve_set or es.split, "loss": float(lss[p]),
                                     "accuracy": float(acc[p]), "balanced_accuracy": float(bac[p])})
        if select_point and es is cfg.select_on:
            _track_best(model, state, np.nan_to_num(bac, nan=-1.0), it)


def measure(model: PackedNet, transform: Any, es: EvalSet,
            autocast_dtype: torch.dtype | None = None) -> dict[str, np.ndarray]:
    """Every member's accuracy, balanced accuracy and mean cross-entropy on ``es`` (a rung of a
    learning-rate search ranks the members by one of them), as ``[P]`` arrays."""
    logits, _ = predict(model, es.x, transform, autocast_dtype, idx=es.idx)
    if es.idx is not None:
        acc, bac, lss = _member_metrics(logits, es.y, es.weight)
    else:
        m = classification_metrics(logits, es.y, logits.shape[-1])
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), es.y.repeat(logits.shape[0]), reduction="none"
        ).view(logits.shape[0], -1).mean(1)
        acc, bac, lss = (m["accuracy"].cpu().numpy(), m["balanced_accuracy"].cpu().numpy(), loss.cpu().numpy())
    return {"accuracy": acc, "balanced_accuracy": bac, "loss": lss}


def _member_metrics(logits: Tensor, labels: Tensor,
                    weights: Tensor | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Accuracy, balanced accuracy and mean cross-entropy per member on padded per-member sets,
    each image counted ``weights`` times (None: once)."""
    valid = labels >= 0
    w = valid.to(logits.dtype) if weights is None else torch.where(valid, weights.to(logits.dtype), 0.0)
    n = w.sum(1).clamp_min(1)
    acc = (w * (logits.argmax(-1) == labels)).sum(1) / n
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp_min(0), reduction="none")
    loss = (ce * w).sum(1) / n
    return (acc.cpu().numpy(), member_balanced_accuracy(logits, labels, weights).cpu().numpy(),
            loss.cpu().numpy())


def _track_best(model: PackedNet, state: StageState, score: np.ndarray, it: int) -> None:
    tensors = model._member_tensors()
    if state.best_state is None:
        state.best_score = np.full(model.members, -np.inf)
        state.best_iter = np.zeros(model.members, dtype=np.int64)
        state.best_state = {k: t.detach().clone() for k, t in tensors.items()}
    better = score > state.best_score
    if not better.any():
        return
    mask = torch.from_numpy(better)
    with torch.no_grad():
        for k, t in tensors.items():
            state.best_state[k][mask.to(t.device)] = t.detach()[mask.to(t.device)]
    state.best_score = np.where(better, score, state.best_score)
    state.best_iter = np.where(better, it, state.best_iter)


def _restore_best(model: PackedNet, state: StageState) -> None:
    with torch.no_grad():
        for k, t in model._member_tensors().items():
            t.copy_(state.best_state[k])


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return nullcontext()
    # No weight-cast cache: a CUDA graph capture cannot hold one, and every weight is used
    # once per forward, so the cache saves nothing.
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=False)
