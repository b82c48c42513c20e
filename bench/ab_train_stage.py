"""``workers.engine.train_stage`` of another checkout against this one, timed alternately.

    git worktree add /tmp/prev 8014e2f
    python bench/ab_train_stage.py /tmp/prev --members 1 --iters 150 [--runs 4]

Each run trains a fresh LeNet-5 pack (CE, constant lr 0.01, random MNIST-shaped data) for
``--iters`` iterations on the CPU; the two engines alternate after one untimed run each, so
load drifts hit both. Prints every run's seconds and the minimum per step. Everything but
the engine module (models, losses, samplers, transforms) is this checkout's.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from workers.losses import PackedLoss  # noqa: E402
from workers.models import LeNet5  # noqa: E402
from workers.samplers import EpochSampler  # noqa: E402
from workers.transforms import InputTransform, stack_transforms  # noqa: E402


def _engine(path: Path, name: str):  # noqa: ANN202 - a module
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _seconds(engine, members: int, iters: int, x: torch.Tensor, y: torch.Tensor) -> float:  # noqa: ANN001
    model = LeNet5(members, 10, (1, 28, 28))
    model.reset_parameters("xavier", list(range(members)))
    cfg = engine.StageConfig(iters=iters, batch_size=64, lr=torch.full((iters, members), 0.01),
                             momentum=torch.full((members,), 0.9), weight_decay=torch.full((members,), 5e-4),
                             bias_lr_factor=torch.full((members,), 2.0))
    samplers = [EpochSampler(np.arange(len(x)), 64, p) for p in range(members)]
    transform = stack_transforms([InputTransform("scale", None)] * members)
    t0 = time.perf_counter()
    engine.train_stage(model, samplers, x, y, transform, PackedLoss(["ce"] * members, torch.ones(members, 10)), cfg)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("other", type=Path, help="the other checkout's root")
    ap.add_argument("--members", type=int, default=1)
    ap.add_argument("--iters", type=int, default=150)
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    engines = {"other": _engine(a.other / "workers" / "engine.py", "other_engine"),
               "this": _engine(REPO / "workers" / "engine.py", "this_engine")}
    x = torch.randint(0, 256, (10_000, 1, 28, 28), dtype=torch.uint8)
    y = torch.randint(0, 10, (10_000,))
    for e in engines.values():
        _seconds(e, a.members, a.iters, x, y)
    times: dict[str, list[float]] = {k: [] for k in engines}
    for _ in range(a.runs):
        for k, e in engines.items():
            times[k].append(_seconds(e, a.members, a.iters, x, y))
    for k, v in times.items():
        print(f"{k} ({a.other if k == 'other' else REPO}): " + " ".join(f"{t:.2f}" for t in v)
              + f" s; min {1000 * min(v) / a.iters:.2f} ms per step (P={a.members}, {a.iters} iterations)")


if __name__ == "__main__":
    main()
