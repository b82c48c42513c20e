"""Network-iterations per second: one network per process, K processes, packs, vmap, the fast path.

Measures, in one run on one device, the training throughput of five ways of training many
small networks, in each precision asked for (``--precisions fp32,bf16``):

(a) ``one network per process``: a P=1 packed model on the grouped layers, stepped eagerly;
(b) ``K processes`` sharing the device (multiprocessing, spawn), each training one P=1
    network as in (a); throughput = K * iters / wall time from a common start barrier to
    the last process's end;
(c) ``grouped packed path``: P networks stacked in one process on the grouped layers,
    stepped eagerly (the reference path, and what main ran before the fast path);
(d) ``vmap ensemble``: ``torch.func.vmap`` over P stacked copies of a plain ``nn.Module``
    LeNet-5 (``functional_call``), cross-entropy, and SGD with momentum as ``torch._foreach``
    passes (one lr for all members; random batch indices drawn on the device): the usual
    way to train an ensemble in PyTorch, without this system's per-member bookkeeping;
(e) ``fast path``: P networks on the fused Triton LeNet-5 (``workers.fused_lenet``, 16-bit
    arithmetic in bf16 with fp32 master weights), batch tables, device step counter, the
    whole step replayed as one CUDA graph. CUDA only (on the CPU the kernels would run in
    Triton's interpreter, which measures nothing): reported as not run elsewhere.

Optional ``--channels-last`` adds (c) with channels-last activations (All-CNN, ResNet-32),
and ``--graph-grouped`` adds (c) replayed as a CUDA graph: the graph's share of (e)'s gain.

(a), (b), (c) and (e) run the sweep's own training loop, ``workers.engine.train_stage``
(uint8 images on the device, per-member samplers and index tables, the packed input
transform, ``PackedLoss`` CE, per-member lr columns, divergence bookkeeping), so their
figures include everything a real pack pays per iteration except evaluation, which is
timed apart (``predict``). A configuration's rate is ``P * iters / (T(warmup + iters) -
T(warmup))`` over two stages after a first untimed one: set-up, CUDA-graph capture and
one-off initialisation cancel out, as they do over a 10,000-iteration stage.

Data are random (uint8 images, uniform labels) of the model's input shape: speed does
not depend on the pixels. Recipes are the sweep's own presets (sweep.core.recipes), with
their lr schedules (workers.optim): lenet5 on MNIST-shaped images under ``buda_mnist``,
allcnn under ``buda_cifar10`` (dropout on), resnet32 under ``ldam_drw``. On CUDA, fp32
means IEEE fp32 (no TF32), bf16 autocast(bfloat16) on the grouped layers (as run_pack).

    python bench/bench_packed.py --device cpu --packs 8,32 --procs 2 --iters 60
    python bench/bench_packed.py --device cuda --packs 256,1024 --precisions fp32,bf16 \\
        --procs 16 --iters 100 --warmup 10 --graph-grouped --out bench/RESULTS.md   # < 8 min

Output: a markdown block (command, device, date, one table row per configuration with
its ratio to (a) in the same precision and to (c) at the same P and precision, the
projected training wall time of grids/buda_mnist.yaml at the best rate); ``--out FILE``
appends it. ``--rows FILE`` appends each configuration's row the moment it is measured
(flushed, so a run killed later keeps it). ``--budget-seconds`` stops starting
configurations once spent (the block says which were skipped).

Configurations run precision by precision in ``--precisions`` order, and within one, (a)
and (b) first, then pack by pack in ``--packs`` order with the modes in ``--modes`` order
(``--modes e,c --packs 1024,256``: (e) then (c) at 1024, then at 256). Any error of a
configuration (out of memory or any other) is recorded in its row and the run goes on;
(e) whose step could not be captured as a CUDA graph says so in its row
(``GRAPH CAPTURE FAILED``). The exit status is 1 when any row records an error or a
failed capture.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import logging
import multiprocessing as mp
import os
import platform
import shlex
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sweep.core.catalog import DATASETS  # noqa: E402
from sweep.core.recipes import RECIPES as PAPER_RECIPES  # noqa: E402
from sweep.core.spec import Recipe  # noqa: E402
from workers.compute import resolve_numerics  # noqa: E402
from workers.engine import StageConfig, predict, train_stage  # noqa: E402
from workers.latent_tables import latent_tables  # noqa: E402
from workers.losses import PackedLoss  # noqa: E402
from workers.models import build_model  # noqa: E402
from workers.optim import lr_table  # noqa: E402
from workers.samplers import EpochSampler  # noqa: E402
from workers.transforms import InputTransform, stack_transforms  # noqa: E402

BUDA_MNIST_NETWORKS = 22_500  # grids/buda_mnist.yaml
BUDA_MNIST_ITERS = 10_000  # Buda et al.: 10,000 iterations per network
TRAIN_IMAGES = 10_000  # random training pool per benchmark (sampled per member)
TEST_IMAGES = 10_000  # a network's final test-set evaluation (MNIST / CIFAR-10 test sets)


def set_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Torch's TF32 switches as a pack's run sets them (``workers.compute.Numerics.apply``);
    returns the grouped layers' autocast dtype (bf16 in bf16, else None)."""
    numerics = resolve_numerics(precision, "grouped", "", "linear", device)
    numerics.apply()
    return numerics.autocast


@dataclass(frozen=True)
class ModelRecipe:
    """A model with the dataset shape and the paper recipe it is benchmarked under."""

    dataset: str
    recipe: Recipe

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return DATASETS[self.dataset].image_shape

    @property
    def classes(self) -> int:
        return DATASETS[self.dataset].num_classes

    def __getattr__(self, name: str):  # batch_size, momentum, weight_decay, base_lr, lr_policy, init
        return getattr(self.recipe, name)


RECIPES = {
    "lenet5": ModelRecipe("mnist", PAPER_RECIPES["buda_mnist"]),
    "allcnn": ModelRecipe("cifar10", PAPER_RECIPES["buda_cifar10"]),
    "resnet32": ModelRecipe("cifar10", PAPER_RECIPES["ldam_drw"]),
}


def lr_column(r: ModelRecipe, iters: int) -> np.ndarray:
    """The recipe's own schedule (workers.optim), as the sweep trains it."""
    return lr_table([r.recipe], [r.recipe.base_lr], iters)[:, 0]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_data(r: ModelRecipe, g: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A training pool of uint8 images of the model's input shape and uniform labels."""
    x = torch.randint(0, 256, (TRAIN_IMAGES, *r.in_shape), generator=g, dtype=torch.uint8)
    return x.to(device), torch.randint(0, r.classes, (TRAIN_IMAGES,), generator=g).to(device)


class Bench:
    """One packed model of P members with everything train_stage needs, on one device.

    ``kernels="fused"`` builds the fused LeNet-5 (compute dtype from the precision, no
    autocast); ``graph`` lets train_stage replay its step as a CUDA graph.
    """

    def __init__(self, model_name: str, members: int, device: torch.device, precision: str, seed: int = 0,
                 kernels: str = "grouped", graph: bool = False, channels_last: bool = False):
        self.r = r = RECIPES[model_name]
        self.model_name = model_name
        self.device, self.members, self.graph = device, members, graph
        self.autocast = set_precision(precision, device)
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = random_data(r, g, device)
        if kernels == "fused":
            from workers.fused_lenet import FusedLeNet5

            self.model = FusedLeNet5(members, r.classes, r.in_shape, compute_dtype=self.autocast or torch.float32)
            self.autocast = None  # 16-bit arithmetic inside the kernels
        else:
            self.model = build_model(model_name, members, r.classes, r.in_shape)
            self.model.channels_last = channels_last
        self.model.reset_parameters(r.init, [seed * 100_003 + p for p in range(members)])
        self.model.to(device)
        self.transform = stack_transforms([InputTransform("scale", None)] * members).to(device)
        self.loss = PackedLoss(["ce"] * members, torch.full((members, r.classes), 1.0, device=device))
        self.samplers = [EpochSampler(np.arange(TRAIN_IMAGES), r.batch_size, seed * 7919 + p)
                         for p in range(members)]
        self.step_mode = "eager"

    def cfg(self, iters: int) -> StageConfig:
        lr = torch.from_numpy(np.repeat(lr_column(self.r, iters)[:, None], self.members, 1)).to(self.device)
        full = lambda v: torch.full((self.members,), v, device=self.device)  # noqa: E731
        return StageConfig(iters=iters, batch_size=self.r.batch_size, lr=lr, momentum=full(self.r.momentum),
                           weight_decay=full(self.r.weight_decay), bias_lr_factor=full(self.r.bias_lr_factor),
                           autocast_dtype=self.autocast, cuda_graph=self.graph)

    def train_seconds(self, iters: int) -> float:
        cfg = self.cfg(iters)
        sync(self.device)
        t0 = time.perf_counter()
        state = train_stage(self.model, self.samplers, self.x, self.y, self.transform, self.loss, cfg)
        sync(self.device)
        self.step_mode = state.step_mode
        return time.perf_counter() - t0

    def rate(self, iters: int, warmup: int) -> float:
        """Network-iterations/s in the steady state (see the module docstring)."""
        self.train_seconds(max(warmup, 1))  # one-off initialisation (cuDNN, Triton, allocator)
        short = self.train_seconds(max(warmup, 1))
        long = self.train_seconds(max(warmup, 1) + iters)
        return self.members * iters / max(long - short, 1e-9)

    def latent_seconds(self, images: int) -> float:
        """Seconds for Dablain's latent tables of every member (``workers.latent_tables``), each
        member's training split being ``images`` images and the test split as many."""
        spec = _latent_spec(self.model_name)
        subsets = [np.arange(images)] * self.members
        transforms = [InputTransform("scale", None)] * self.members
        x, y = self.x[:images], self.y[:images]
        sync(self.device)
        t0 = time.perf_counter()
        latent_tables(self.model, [spec] * self.members, subsets, transforms, self.x, self.y,
                      x, y, self.r.classes)
        sync(self.device)
        return time.perf_counter() - t0

    def eval_seconds(self, images: int) -> float:
        """Seconds for ``predict`` of every member on ``images`` test images (after one warm-up)."""
        xt = self.x[:images]
        predict(self.model, xt[: min(images, 64)], self.transform, self.autocast)
        sync(self.device)
        t0 = time.perf_counter()
        predict(self.model, xt, self.transform, self.autocast)
        sync(self.device)
        return time.perf_counter() - t0


class _PlainLeNet5(nn.Module):
    """LeNet-5 as one would write it for one network (the vmap baseline's module)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 20, 5), nn.Conv2d(20, 50, 5)
        self.fc1, self.fc2 = nn.Linear(800, 500), nn.Linear(500, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.conv1(x), 2)
        x = F.max_pool2d(self.conv2(x), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class VmapLeNet5:
    """(d): ``torch.func.vmap`` over P stacked LeNet-5 parameter sets, foreach SGD."""

    def __init__(self, members: int, device: torch.device, precision: str, seed: int = 0) -> None:
        r = RECIPES["lenet5"]
        self.r, self.members, self.device = r, members, device
        self.autocast = set_precision(precision, device)
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = random_data(r, g, device)
        base = _PlainLeNet5(r.classes)
        self.params = {n: (torch.randn((members, *p.shape), generator=g) * 0.05).to(device).requires_grad_()
                       for n, p in base.named_parameters()}
        self.bufs = [torch.zeros_like(p) for p in self.params.values()]
        meta = base.to("meta")
        self.forward = torch.func.vmap(lambda prm, x: torch.func.functional_call(meta, prm, (x,)))
        self.step_mode = "eager"

    def step(self) -> None:
        r = self.r
        idx = torch.randint(0, TRAIN_IMAGES, (self.members, r.batch_size), device=self.device)
        xb = self.x[idx].float().mul_(1 / 255)  # [P, B, 1, 28, 28]
        with torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            logits = self.forward(self.params, xb)
        loss = F.cross_entropy(logits.float().flatten(0, 1), self.y[idx].flatten(), reduction="sum") / r.batch_size
        params = list(self.params.values())
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            torch._foreach_add_(grads, params, alpha=r.weight_decay)
            torch._foreach_mul_(self.bufs, r.momentum)
            torch._foreach_add_(self.bufs, grads)
            torch._foreach_add_(params, self.bufs, alpha=-r.base_lr)

    def train_seconds(self, iters: int) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(iters):
            self.step()
        sync(self.device)
        return time.perf_counter() - t0

    def rate(self, iters: int, warmup: int) -> float:
        self.train_seconds(max(warmup, 1))
        return self.members * iters / self.train_seconds(iters)


def _latent_spec(model_name: str):
    """A spec that asks for latent statistics (its other fields do not matter to the pass)."""
    from sweep.core.grid import expand

    dataset = "mnist" if model_name == "lenet5" else "cifar10"
    return dataclasses.replace(expand({"dataset": dataset, "model": model_name, "recipe": "buda_mnist"})
                               .specs[0], latent=True)


def buda_mnist_mean_subset() -> float:
    """Mean training-subset size over the training sets of grids/buda_mnist.yaml."""
    from sweep.core.counts import class_counts
    from sweep.core.grid import load_grid

    sets = {s.training_set_key: s for s in load_grid(REPO / "grids" / "buda_mnist.yaml").specs}
    return float(np.mean([class_counts(s.imbalance, 10, 5_000).sum() for s in sets.values()]))


def _proc_worker(rank: int, args: dict, threads: int, barrier, queue) -> None:
    try:
        torch.set_num_threads(threads)
        dev = torch.device(args["device"])
        b = Bench(args["model"], 1, dev, args["precision"], seed=1 + rank)
        b.train_seconds(max(args["warmup"], 1))  # initialisation before the common start
        barrier.wait()
        t0 = time.time()
        b.train_seconds(args["iters"])
        queue.put((rank, t0, time.time(), None))
    except BaseException as e:  # report, never hang the parent on the barrier
        barrier.abort()
        queue.put((rank, 0.0, 0.0, repr(e)))


def run_procs(k: int, args: dict) -> float:
    """Aggregate network-iterations/s of k spawned processes training one network each."""
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(k), ctx.Queue()
    # CPU: split the cores between the processes (oversubscribed threads only slow them down).
    threads = max(1, torch.get_num_threads() // k) if args["device"] == "cpu" else 1
    procs = [ctx.Process(target=_proc_worker, args=(i, args, threads, barrier, queue)) for i in range(k)]
    for p in procs:
        p.start()
    results = [queue.get() for _ in range(k)]
    for p in procs:
        p.join()
    errors = [e for *_, e in results if e]
    if errors:
        raise RuntimeError(f"process benchmark failed: {errors[0]}")
    start = min(r[1] for r in results)
    end = max(r[2] for r in results)
    return k * args["iters"] / (end - start)


class Procs:
    """(b) as a runner: ``rate`` spawns the K processes."""

    step_mode = "eager"

    def __init__(self, k: int, args: dict) -> None:
        self.k, self.args = k, args

    def rate(self, iters: int, warmup: int) -> float:
        return run_procs(self.k, {**self.args, "iters": iters, "warmup": warmup})


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    model = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads)"


def _rate(rate: float) -> str:
    return f"{rate:,.1f}" if rate >= 10 else f"{rate:.3g}"  # slow models on a CPU: 0.149, not 0.1


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


@dataclass
class Row:
    mode: str  # a | b | c | d | e
    label: str
    precision: str
    members: int  # P (or K processes)
    rate: float | None  # network-iterations/s; None: not run (``note`` says why)
    note: str = ""


def _size(row: Row) -> str:
    return f"K={row.members}" if row.mode == "b" else f"P={row.members}"


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


class _CaptureFailures(logging.Handler):
    """Collects the reasons step_graph logs when a capture fails (it then steps eagerly)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "capture failed" in text:
            self.reasons.append(text)


def _row_line(row: Row, ra: float | None = None, rc: float | None = None) -> str:
    if row.rate is None:
        return f"| {row.label} | {row.precision} | {_size(row)} | - | - | - | - | {row.note} |"
    return (f"| {row.label} | {row.precision} | {_size(row)} | {_rate(row.rate)} | "
            f"{1000 * row.members / row.rate:,.2f} | {f'{row.rate / ra:.2f}x' if ra else '-'} | "
            f"{f'{row.rate / rc:.2f}x' if rc and row.mode != 'b' and row.label != '(c) grouped packed path' else '-'} | "
            f"{row.note} |")


TABLE_HEAD = ["| configuration | precision | size | net-it/s | ms per step | vs (a) | vs (c) same P | note |",
              "|---|---|---|---:|---:|---:|---:|---|"]


def main(argv: list[str] | None = None) -> str:
    """Runs the benchmark; returns the markdown block (``run`` also returns whether any row failed)."""
    return run(argv)[0]


def run(argv: list[str] | None = None) -> tuple[str, bool]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--model", default="lenet5", choices=sorted(RECIPES))
    ap.add_argument("--packs", default="8,32", help="comma-separated pack sizes P for (c), (d), (e)")
    ap.add_argument("--procs", type=int, default=os.cpu_count() or 1, help="K processes for (b); 0 skips")
    ap.add_argument("--iters", type=int, default=100, help="timed iterations per configuration")
    ap.add_argument("--warmup", type=int, default=10, help="iterations of the untimed and the subtracted stage")
    ap.add_argument("--precisions", default="fp32", help="comma-separated: fp32, bf16")
    ap.add_argument("--modes", default="a,b,c,d,e", help="comma-separated subset of a,b,c,d,e")
    ap.add_argument("--channels-last", action="store_true", help="also (c) with channels-last activations")
    ap.add_argument("--graph-grouped", action="store_true", help="also (c) replayed as a CUDA graph")
    ap.add_argument("--budget-seconds", type=float, default=0.0,
                    help="start no configuration after this long (0: no limit)")
    ap.add_argument("--eval-images", type=int, default=0,
                    help="images per member for the evaluation timing (0 skips), scaled to a 10,000-image test set")
    ap.add_argument("--latent", action="store_true",
                    help="also time the latent-statistics pass (Dablain) of the largest grouped pack")
    ap.add_argument("--out", default=None, help="append the markdown block to this file")
    ap.add_argument("--rows", default=None, help="append each row to this file as soon as it is measured")
    a = ap.parse_args(argv)
    packs = [int(p) for p in a.packs.split(",") if p.strip()]
    precisions = [p.strip() for p in a.precisions.split(",") if p.strip()]
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    for prec in precisions:
        if prec not in ("fp32", "bf16"):
            ap.error(f"--precisions: {prec!r} is not one of fp32, bf16")
    for m in modes:
        if m not in "abcde" or len(m) != 1:
            ap.error(f"--modes: {m!r} is not one of a, b, c, d, e")
    if a.channels_last and a.model == "lenet5":
        ap.error("--channels-last: LeNet-5's packed layers have no channels-last layout (All-CNN, ResNet-32 do)")
    if not packs or min(packs) < 1 or a.iters < 1 or a.warmup < 0:
        ap.error("--packs need sizes >= 1, --iters >= 1 and --warmup >= 0")
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    command = "python bench/bench_packed.py " + " ".join(shlex.quote(s) for s in (argv if argv is not None else sys.argv[1:]))
    r = RECIPES[a.model]
    t_start = time.perf_counter()
    rows: list[Row] = []
    failed = False
    captures = _CaptureFailures()
    logging.getLogger("workers.step_graph").addHandler(captures)
    if a.rows:
        _append(a.rows, f"\n### rows as measured: `{command}` on {device_name(dev)}, "
                f"{dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}\n\n" + "\n".join(TABLE_HEAD) + "\n")

    def add(row: Row) -> None:
        rows.append(row)
        if a.rows:
            _append(a.rows, _row_line(row) + "\n")

    def measure(mode: str, label: str, prec: str, members: int, make, graph: bool = False) -> None:  # noqa: ANN001
        nonlocal failed
        if a.budget_seconds and time.perf_counter() - t_start > a.budget_seconds:
            add(Row(mode, label, prec, members, None, "skipped: --budget-seconds spent"))
            return
        runner = None
        try:
            captures.reasons.clear()
            runner = make()
            rate = runner.rate(a.iters, a.warmup)
            note = "" if not graph else f"step: {runner.step_mode}"
            if graph and runner.step_mode != "graph":
                failed = True
                why = captures.reasons[-1] if captures.reasons else "no reason logged"
                note += f"; GRAPH CAPTURE FAILED: {why}"
            add(Row(mode, label, prec, members, rate, note))
            print(f"{label} {prec} P={members}: {rate:,.1f} net-it/s {note}", flush=True)  # partial output
        except torch.cuda.OutOfMemoryError:
            add(Row(mode, label, prec, members, None, "out of device memory"))
            print(f"{label} {prec} P={members}: out of device memory", flush=True)
        except Exception as e:  # noqa: BLE001 - record it in the row and go on with the others
            failed = True
            msg = " ".join(f"{type(e).__name__}: {e}".split())[:300].replace("|", "/")
            add(Row(mode, label, prec, members, None, f"error: {msg}"))
            print(f"{label} {prec} P={members}: error", flush=True)
            traceback.print_exc()
        del runner
        try:
            _free(dev)
        except Exception:  # noqa: BLE001 - a broken device context: the next rows will say so
            traceback.print_exc()

    def per_pack(mode: str, prec: str, p: int) -> None:
        if mode == "c":
            measure("c", "(c) grouped packed path", prec, p, lambda: Bench(a.model, p, dev, prec))
            if a.channels_last:
                measure("c", "(c) grouped, channels-last", prec, p,
                        lambda: Bench(a.model, p, dev, prec, channels_last=True))
            if a.graph_grouped and dev.type == "cuda":
                measure("c", "(c) grouped, CUDA graph", prec, p, lambda: Bench(a.model, p, dev, prec, graph=True),
                        graph=True)
        elif mode == "d":
            if a.model == "lenet5":
                measure("d", "(d) vmap ensemble", prec, p, lambda: VmapLeNet5(p, dev, prec))
            else:
                add(Row("d", "(d) vmap ensemble", prec, p, None, "LeNet-5 only"))
        elif mode == "e":
            if a.model != "lenet5":
                add(Row("e", "(e) fast path", prec, p, None, "fused kernels: LeNet-5 only"))
            elif dev.type != "cuda":
                add(Row("e", "(e) fast path", prec, p, None,
                        "not run: the fused kernels need CUDA (Triton's CPU interpreter measures nothing)"))
            else:
                measure("e", "(e) fast path", prec, p,
                        lambda: Bench(a.model, p, dev, prec, kernels="fused", graph=True), graph=True)

    for prec in precisions:
        if "a" in modes:
            measure("a", "(a) one network per process", prec, 1, lambda: Bench(a.model, 1, dev, prec))
        if "b" in modes and a.procs > 0:
            measure("b", "(b) K processes", prec, a.procs, lambda: Procs(a.procs, {
                "device": a.device, "model": a.model, "precision": prec}))
        for p in packs:
            for m in modes:
                per_pack(m, prec, p)
    logging.getLogger("workers.step_graph").removeHandler(captures)

    def ref(row: Row, mode: str, same_p: bool) -> float | None:
        for o in rows:
            if (o.mode == mode and o.precision == row.precision and o.rate and o.label.startswith(f"({mode})")
                    and "," not in o.label and (not same_p or o.members == row.members)):
                return o.rate
        return None

    lines = [
        f"### {a.model}, {'/'.join(precisions)}, {dev.type}: "
        f"{dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        "",
        f"- Command: `{command}`",
        f"- Device: {device_name(dev)}; torch {torch.__version__}",
        f"- Recipe: batch {r.batch_size}, input {'x'.join(map(str, r.in_shape))}, SGD momentum {r.momentum}, "
        f"wd {r.weight_decay}, lr {r.lr_policy} {r.base_lr}; random data; per configuration an untimed stage of "
        f"{max(a.warmup, 1)} iterations, then rate = P x {a.iters} / (T({max(a.warmup, 1) + a.iters}) - "
        f"T({max(a.warmup, 1)}))",
        "",
        *TABLE_HEAD,
    ]
    for row in rows:
        lines.append(_row_line(row, *((ref(row, "a", False), ref(row, "c", True)) if row.rate else ())))
    lines.append("")
    timed = [row for row in rows if row.rate]
    if timed:
        best = max(timed, key=lambda t: t.rate)
        line = f"Best: {best.label} {best.precision} {_size(best)} at {_rate(best.rate)} net-it/s"
        if a.model == "lenet5":
            total = BUDA_MNIST_NETWORKS * BUDA_MNIST_ITERS
            line += (f"; projected training wall time of grids/buda_mnist.yaml ({BUDA_MNIST_NETWORKS:,} networks x "
                     f"{BUDA_MNIST_ITERS:,} iterations) at that rate: {_hours(total / best.rate)}")
            base = [t for t in timed if t.mode == "a"]
            if base:
                line += f" (one network per process, {base[0].precision}: {_hours(total / base[0].rate)})"
        lines.append(line + ".")
    for extra in (lambda: _feed_line(max(packs), r.batch_size, dev, [t for t in timed if t.members == max(packs)]),
                  (lambda: _eval_line(a, dev, precisions[0], packs)) if a.eval_images > 0 else None):
        if extra is None:
            continue
        try:
            lines.append(extra())
        except Exception as e:  # noqa: BLE001 - the table above is what matters
            failed = True
            lines.append(f"(a summary line failed: {type(e).__name__}: {e})")
    lines.append(f"Wall time of this benchmark: {time.perf_counter() - t_start:,.0f} s.")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        _append(a.out, "\n" + text)
    return text, failed


def _append(path: str, text: str) -> None:
    """Append and flush to the disk: a run killed later keeps what was written."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _feed_line(p: int, batch: int, dev: torch.device, rows: list[Row]) -> str:
    """The host's work between chunks (refilling the batch tables from P samplers), which
    overlaps the queued steps as long as it is shorter than a chunk of them."""
    from workers.batch_feed import BatchFeed
    from workers.engine import CHUNK_ITERS

    feed = BatchFeed([EpochSampler(np.arange(TRAIN_IMAGES), batch, q) for q in range(p)], None, batch, dev,
                     CHUNK_ITERS)
    feed.load(CHUNK_ITERS)
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(3):
        feed.load(CHUNK_ITERS)
    sync(dev)
    ms = (time.perf_counter() - t0) / 3 * 1000
    line = f"Host refill of the batch tables ({CHUNK_ITERS} iterations, P={p}, batch {batch}): {ms:,.1f} ms"
    if rows:
        fastest = max(rows, key=lambda t: t.rate)
        gpu_ms = CHUNK_ITERS * 1000 * p / fastest.rate
        line += f", against {gpu_ms:,.1f} ms for those {CHUNK_ITERS} steps at the best P={p} rate ({fastest.label})"
    return line + "."


def _eval_line(a: argparse.Namespace, dev: torch.device, precision: str, packs: list[int]) -> str:
    """Evaluation (and with --latent, latent statistics) of the largest grouped pack, as a
    share of a network's time at that pack's training rate."""
    eb = Bench(a.model, max(packs), dev, precision)
    train_rate = eb.rate(a.iters, a.warmup)
    es = eb.eval_seconds(a.eval_images)
    eval_per_net = es * TEST_IMAGES / a.eval_images / eb.members  # one 10,000-image test pass
    train_per_net = BUDA_MNIST_ITERS / train_rate
    line = (f"Evaluation (predict, P={eb.members}): {eb.members * a.eval_images / es:,.0f} member-images/s, "
            f"{eval_per_net:.3g} s per network for a {TEST_IMAGES:,}-image test set; "
            f"{100 * eval_per_net / (eval_per_net + train_per_net):.1f} % of a network's time with "
            f"{BUDA_MNIST_ITERS:,} training iterations at this pack's rate ({train_rate:,.1f} net-it/s).")
    if a.latent:
        images = min(a.eval_images, TRAIN_IMAGES)
        ls = eb.latent_seconds(images)
        subset = buda_mnist_mean_subset() if a.model == "lenet5" else 5_000 * eb.r.classes
        latent_per_net = ls / eb.members / (2 * images) * (subset + TEST_IMAGES)
        line += (f"\nLatent statistics (workers.latent_tables, P={eb.members}, {images:,} train + {images:,} test "
                 f"images per member): {ls / eb.members:.3g} s per member; scaled to a {subset:,.0f}-image training "
                 f"subset + {TEST_IMAGES:,} test images: {latent_per_net:.3g} s per network, "
                 f"{100 * latent_per_net / train_per_net:.1f} % of its {BUDA_MNIST_ITERS:,}-iteration training time.")
    return line


if __name__ == "__main__":
    sys.exit(1 if run()[1] else 0)
