"""Training-step throughput of the fused LeNet-5 path against the packed reference.

For each P in ``--packs``: the reference step (``LeNet5`` + ``PackedSGD``; autocast for
16 bits, as run_pack trains) and the fused step (``FusedLeNet5`` + ``FusedSGD``), each
eagerly and, with ``--graph`` on CUDA, replayed as one CUDA graph. A step is forward,
per-member cross-entropy, backward and SGD on random device data (no sampler, no input
transform: what the kernels cost, not what the engine adds). Reported as
network-iterations per second, P * iters / seconds, after ``--warmup`` steps.

    python bench/bench_fused_lenet.py --packs 256,1024 --batch 64 --precision fp16 --graph
    TRITON_INTERPRET=1 python bench/bench_fused_lenet.py --device cpu --packs 2 --batch 2 --iters 1 --warmup 1

Before timing, the fused step is checked against the reference once at the smallest P
(largest relative parameter difference after one step, printed).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from workers.fused_lenet import FusedLeNet5, FusedSGD  # noqa: E402
from workers.models import LeNet5  # noqa: E402
from workers.optim import PackedSGD  # noqa: E402
from workers.step_graph import WARMUP_STEPS, StepRunner  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _models(p: int, device: str, dtype: torch.dtype) -> tuple[LeNet5, FusedLeNet5]:
    ref = LeNet5(p).to(device)
    ref.reset_parameters("xavier", list(range(p)))
    return ref, FusedLeNet5.from_lenet(ref, compute_dtype=dtype)


def _optimizer(model: LeNet5, device: str) -> PackedSGD | FusedSGD:
    p = model.members
    m, wd, f = (torch.full((p,), v, device=device) for v in (0.9, 5e-4, 2.0))
    if isinstance(model, FusedLeNet5):
        return FusedSGD(model, m, wd, f)
    return PackedSGD(list(model.parameters()), p, m, wd, f, model.bias_parameters())


def _step(model: LeNet5, opt: PackedSGD | FusedSGD, x: torch.Tensor, y: torch.Tensor, lr: torch.Tensor,
          autocast: torch.dtype | None) -> Callable[[], None]:
    def step() -> None:
        opt.zero_grad()
        # No weight-cast cache: PyTorch advises against it under CUDA graph capture.
        ctx = (torch.autocast(x.device.type, dtype=autocast, cache_enabled=False) if autocast is not None
               else nullcontext())
        with ctx:
            _, logits = model(x)
        F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none").mean(1).sum().backward()
        opt.step(lr)
    return step


def _graphed(step: Callable[[], None]) -> Callable[[], None]:
    """The step as the engine replays it (workers.step_graph: warm-up on a side stream, capture)."""
    runner = StepRunner(step, torch.device("cuda"), True, "bench_fused_lenet")
    for _ in range(WARMUP_STEPS + 1):
        runner()
    if runner.graph is None:
        raise RuntimeError(f"no CUDA graph: {runner.reason}")
    return runner.graph.replay


def _rate(step: Callable[[], None], p: int, iters: int, warmup: int, device: str) -> float:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    sync()
    return p * iters / (time.perf_counter() - start)


def _data(p: int, batch: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn(p, batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (p, batch), device=device)
    return x, y, torch.full((p,), 0.01, device=device)


def check(p: int, batch: int, device: str, dtype: torch.dtype) -> float:
    """Largest relative parameter difference between the two paths after one step."""
    ref, fused = _models(p, device, dtype)
    x, y, lr = _data(p, batch, device)
    autocast = None if dtype == torch.float32 else dtype
    _step(ref, _optimizer(ref, device), x, y, lr, autocast)()
    _step(fused, _optimizer(fused, device), x, y, lr, None)()
    return max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(ref.parameters(), fused.parameters()))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--packs", default="256,1024")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--precision", choices=sorted(DTYPES), default="fp16")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--graph", action="store_true", help="also time both steps as CUDA graphs")
    args = ap.parse_args(argv)
    dtype = DTYPES[args.precision]
    packs = [int(v) for v in args.packs.split(",")]
    if args.device == "cuda":  # as run_pack: TF32 for the reference unless fp32 is asked for
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = dtype != torch.float32
    print(f"check at P={packs[0]}: max relative parameter difference after one step "
          f"{check(packs[0], args.batch, args.device, dtype):.2e}")
    print("| P | batch | precision | path | net-iter/s |\n|---|---|---|---|---|")
    for p in packs:
        x, y, lr = _data(p, args.batch, args.device)
        ref, fused = _models(p, args.device, dtype)
        autocast = None if dtype == torch.float32 else dtype
        steps = {"reference": _step(ref, _optimizer(ref, args.device), x, y, lr, autocast),
                 "fused": _step(fused, _optimizer(fused, args.device), x, y, lr, None)}
        if args.graph and args.device == "cuda":
            steps.update({f"{k} + CUDA graph": _graphed(v) for k, v in list(steps.items())})
        for name, step in steps.items():
            rate = _rate(step, p, args.iters, args.warmup, args.device)
            print(f"| {p} | {args.batch} | {args.precision} | {name} | {rate:,.0f} |", flush=True)
        del ref, fused, steps
        if args.device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
