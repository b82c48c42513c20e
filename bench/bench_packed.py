"""Network-iterations per second: one network at a time, K processes, and packs of P.

Measures, in one run on one device, the training throughput of the sweep's packed
execution against the two ways of training many small networks without it:

(a) ``single``: one network at a time in one process (a P=1 packed model);
(b) ``procs``: K processes sharing the device (multiprocessing, spawn), each training
    one P=1 network; throughput = K * iters / wall time from a common start barrier
    to the last process's end;
(c) ``packed``: P networks stacked in one process, for each P in ``--packs``.

Every configuration runs the sweep's own training loop, ``workers.engine.train_stage``
(uint8 images on the device, per-member samplers and index gathering, the packed
input transform, ``PackedLoss`` CE, ``PackedSGD`` with a per-member lr column,
divergence bookkeeping), so the figures include everything a real pack pays per
iteration except evaluation, which is timed apart (``predict``) and reported as a
share of a network's total time.

Data are random (uint8 images, uniform labels) of the model's input shape: speed does
not depend on the pixels. Recipes are the sweep's own presets (sweep.core.recipes), with
their lr schedules (workers.optim): lenet5 on MNIST-shaped images under ``buda_mnist``,
allcnn under ``buda_cifar10`` (dropout on), resnet32 under ``ldam_drw``.

``--precision bf16`` trains under autocast(bfloat16) as ``run_pack`` does (and on CUDA,
like run_pack, allows TF32 unless fp32 is asked for). Timings start after
``--warmup`` iterations of the same configuration (CUDA: synchronised).

    python bench/bench_packed.py --device cpu --packs 8,32 --iters 100
    python bench/bench_packed.py --device cuda --packs 64,128,256,512 --procs 16 \\
        --iters 1000 --precision bf16 --out bench/RESULTS.md

Output: a markdown block (command, device, date, one table row per configuration,
the ratios to the one-at-a-time baseline measured in the same run, the projected wall
time of Buda et al.'s MNIST grid at the best rate); ``--out FILE`` appends it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import multiprocessing as mp
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sweep.core.catalog import DATASETS  # noqa: E402
from sweep.core.recipes import RECIPES as PAPER_RECIPES  # noqa: E402
from sweep.core.spec import Recipe  # noqa: E402
from workers.devices import set_precision  # noqa: E402
from workers.engine import StageConfig, predict, train_stage  # noqa: E402
from workers.optim import lr_table  # noqa: E402
from workers.latent_tables import latent_tables  # noqa: E402
from workers.losses import PackedLoss  # noqa: E402
from workers.models import build_model  # noqa: E402
from workers.samplers import EpochSampler  # noqa: E402
from workers.transforms import InputTransform, stack_transforms  # noqa: E402

BUDA_MNIST_NETWORKS = 22_500  # grids/buda_mnist.yaml
BUDA_MNIST_ITERS = 10_000  # Buda et al.: 10,000 iterations per network
TRAIN_IMAGES = 10_000  # random training pool per benchmark (sampled per member)
TEST_IMAGES = 10_000  # a network's final test-set evaluation (MNIST / CIFAR-10 test sets)


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


class Bench:
    """One packed model of P members with everything train_stage needs, on one device."""

    def __init__(self, model_name: str, members: int, device: torch.device, precision: str, seed: int = 0):
        self.r = r = RECIPES[model_name]
        self.model_name = model_name
        self.device, self.members = device, members
        self.autocast = set_precision(precision, device)
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, 256, (TRAIN_IMAGES, *r.in_shape), generator=g, dtype=torch.uint8).to(device)
        self.y = torch.randint(0, r.classes, (TRAIN_IMAGES,), generator=g).to(device)
        self.model = build_model(model_name, members, r.classes, r.in_shape)
        self.model.reset_parameters(r.init, [seed * 100_003 + p for p in range(members)])
        self.model.to(device)
        self.transform = stack_transforms([InputTransform("scale", None)] * members).to(device)
        self.loss = PackedLoss(["ce"] * members, torch.full((members, r.classes), 1.0, device=device))
        self.samplers = [EpochSampler(np.arange(TRAIN_IMAGES), r.batch_size, seed * 7919 + p)
                         for p in range(members)]

    def cfg(self, iters: int) -> StageConfig:
        lr = torch.from_numpy(np.repeat(lr_column(self.r, iters)[:, None], self.members, 1)).to(self.device)
        full = lambda v: torch.full((self.members,), v, device=self.device)  # noqa: E731
        return StageConfig(iters=iters, batch_size=self.r.batch_size, lr=lr, momentum=full(self.r.momentum),
                           weight_decay=full(self.r.weight_decay), bias_lr_factor=full(self.r.bias_lr_factor),
                           autocast_dtype=self.autocast)

    def train_seconds(self, iters: int) -> float:
        cfg = self.cfg(iters)
        sync(self.device)
        t0 = time.perf_counter()
        train_stage(self.model, self.samplers, self.x, self.y, self.transform, self.loss, cfg)
        sync(self.device)
        return time.perf_counter() - t0

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


def _latent_spec(model_name: str):
    """A spec that asks for latent statistics (its other fields do not matter to the pass)."""
    from sweep.core.grid import expand

    dataset = "mnist" if model_name == "lenet5" else "cifar10"
    return dataclasses.replace(expand({"dataset": dataset, "model": model_name, "recipe": "buda_mnist"})
                               .specs[0], latent=True)


def buda_mnist_mean_subset() -> float:
    """Mean training-subset size over the training sets of grids/buda_mnist.yaml."""
    from sweep.core.grid import load_grid
    from sweep.core.counts import class_counts

    sets = {s.training_set_key: s for s in load_grid(REPO / "grids" / "buda_mnist.yaml").specs}
    return float(np.mean([class_counts(s.imbalance, 10, 5_000).sum() for s in sets.values()]))


def _proc_worker(rank: int, args: dict, threads: int, barrier, queue) -> None:
    try:
        torch.set_num_threads(threads)
        dev = torch.device(args["device"])
        b = Bench(args["model"], 1, dev, args["precision"], seed=1 + rank)
        if args["warmup"]:
            b.train_seconds(args["warmup"])
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


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--model", default="lenet5", choices=sorted(RECIPES))
    ap.add_argument("--packs", default="8,32", help="comma-separated pack sizes P for (c)")
    ap.add_argument("--procs", type=int, default=os.cpu_count() or 1, help="K processes for (b); 0 skips")
    ap.add_argument("--iters", type=int, default=100, help="timed iterations per configuration")
    ap.add_argument("--warmup", type=int, default=10, help="untimed iterations first")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--eval-images", type=int, default=1024,
                    help="images per member for the evaluation timing (0 skips), scaled to a 10,000-image test set")
    ap.add_argument("--latent", action="store_true",
                    help="also time the latent-statistics pass (Dablain) of the best pack")
    ap.add_argument("--out", default=None, help="append the markdown block to this file")
    a = ap.parse_args(argv)
    packs = [int(p) for p in a.packs.split(",") if p.strip()]
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    command = "python bench/bench_packed.py " + " ".join(shlex.quote(s) for s in (argv if argv is not None else sys.argv[1:]))
    r = RECIPES[a.model]

    rows: list[tuple[str, str, float, float]] = []  # (mode, size, net-it/s, seconds per step)

    def packed(p: int) -> tuple[float, Bench]:
        b = Bench(a.model, p, dev, a.precision)
        if a.warmup:
            b.train_seconds(a.warmup)
        s = b.train_seconds(a.iters)
        return p * a.iters / s, b

    base, _ = packed(1)
    rows.append(("(a) one at a time", "P=1", base, 1 / base))
    if a.procs > 0:
        rate = run_procs(a.procs, {"device": a.device, "model": a.model, "precision": a.precision,
                                   "iters": a.iters, "warmup": a.warmup})
        rows.append(("(b) processes", f"K={a.procs}", rate, a.procs / rate))
    best_b, best_rate = None, base
    for p in packs:
        rate, b = packed(p)
        rows.append(("(c) packed", f"P={p}", rate, p / rate))
        if rate >= best_rate:
            best_rate, best_b = rate, b

    eval_line = ""
    if a.eval_images > 0:
        eb = best_b or Bench(a.model, 1, dev, a.precision)
        es = eb.eval_seconds(a.eval_images)
        eval_per_net = es * TEST_IMAGES / a.eval_images / eb.members  # one 10,000-image test pass
        train_per_net = BUDA_MNIST_ITERS / best_rate if a.model == "lenet5" else 0.0
        eval_line = (f"Evaluation (predict, P={eb.members}): {eb.members * a.eval_images / es:,.0f} "
                     f"member-images/s, {eval_per_net:.3g} s per network for a {TEST_IMAGES:,}-image test set")
        if train_per_net:
            eval_line += (f"; {100 * eval_per_net / (eval_per_net + train_per_net):.1f} % of a network's time "
                          f"with {BUDA_MNIST_ITERS:,} training iterations at the best rate")
        eval_line += "."
        if a.latent:
            images = min(a.eval_images, TRAIN_IMAGES)
            ls = eb.latent_seconds(images)
            subset = buda_mnist_mean_subset() if a.model == "lenet5" else 5_000 * r.classes
            latent_per_net = ls / eb.members / (2 * images) * (subset + TEST_IMAGES)
            eval_line += (f"\nLatent statistics (workers.latent_tables, P={eb.members}, {images:,} train + "
                          f"{images:,} test images per member): {ls / eb.members:.3g} s per member; scaled to a "
                          f"{subset:,.0f}-image training subset + {TEST_IMAGES:,} test images: "
                          f"{latent_per_net:.3g} s per network")
            if train_per_net:
                eval_line += (f", {100 * latent_per_net / train_per_net:.1f} % of its {BUDA_MNIST_ITERS:,}-iteration "
                              "training time at the best rate")
            eval_line += "."

    lines = [
        f"### {a.model}, {a.precision}, {dev.type}: {dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        "",
        f"- Command: `{command}`",
        f"- Device: {device_name(dev)}; torch {torch.__version__}",
        f"- Recipe: batch {r.batch_size}, input {'x'.join(map(str, r.in_shape))}, SGD momentum {r.momentum}, "
        f"wd {r.weight_decay}, lr {r.lr_policy} {r.base_lr}; random data; {a.warmup} warm-up + "
        f"{a.iters} timed iterations each; all through workers.engine.train_stage",
        "",
        "| configuration | size | net-it/s | ms per step | vs (a) |",
        "|---|---|---:|---:|---:|",
    ]
    for mode, size, rate, step in rows:
        lines.append(f"| {mode} | {size} | {rate:,.1f} | {1000 * step:,.1f} | {rate / base:.2f}x |")
    lines.append("")
    best_mode = max(rows, key=lambda t: t[2])
    if a.model == "lenet5":
        total = BUDA_MNIST_NETWORKS * BUDA_MNIST_ITERS
        lines.append(f"Best: {best_mode[0]} {best_mode[1]} at {best_mode[2]:,.1f} net-it/s = "
                     f"{best_mode[2] / base:.2f}x the one-at-a-time baseline (a). Projected training wall time of "
                     f"the {BUDA_MNIST_NETWORKS:,}-network x {BUDA_MNIST_ITERS:,}-iteration Buda MNIST grid: "
                     f"{_hours(total / best_mode[2])} (one at a time: {_hours(total / base)}).")
    else:
        lines.append(f"Best: {best_mode[0]} {best_mode[1]} at {best_mode[2]:,.1f} net-it/s = "
                     f"{best_mode[2] / base:.2f}x the one-at-a-time baseline (a).")
    if eval_line:
        lines.append(eval_line)
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "a", encoding="utf-8") as f:
            f.write("\n" + text)
    return text


if __name__ == "__main__":
    main()
