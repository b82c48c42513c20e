"""Buda et al.'s balanced sanity checks on a GPU: All-CNN on CIFAR-10, ResNet-10 on ImageNet.

    python bench/check_balanced.py allcnn_cifar10 --data-dir DIR [--device cuda] [--iters 70000] \
        [--lrs 0.05[,0.005,...]] [--runs 1] [--precision fp32|tf32|bf16] [--max-error 0.11]
    python bench/check_balanced.py resnet10_imagenet --data-dir DIR [--device cuda] [--iters 320000] \
        [--repeats 1] [--precision ...] [--max-error 0.65] [--min-auc 0.993] [--batch-size B]

``allcnn_cifar10`` trains ``grids/balanced_cifar10.yaml`` (All-CNN, the full balanced training
set, GCN + ZCA, 70,000 iterations; DIR/cifar-10-batches-py/); the paper: 9.75 % test error.
``--lrs``/``--runs`` give the base-lr search (the paper: 0.05, 0.005, 0.0005, 0.00005, twice
each, the best on the test set), all trained as one pack. ``resnet10_imagenet`` trains
``grids/balanced_imagenet224.yaml`` (ResNet-10 revision 2, 224-px random crops with mirroring
streamed from DIR/imagenet/{train,val}/<wnid>/*.JPEG, 320,000 iterations); the paper: 62.56 %
top-1 error and 99.50 multi-class ROC AUC on one centred crop.

Prints one line per network (its lr and run, top-1 test error, multi-class ROC AUC), the
best of them, and PASS or FAIL against the bounds (a little above the paper's error, a
little below its AUC: one run is not the paper's number), with the date, device, precision,
iterations and wall time. Exit status 0 on PASS, 1 on FAIL, 2 on a usage or data error.
Shorter ``--iters`` only checks that the command runs (the schedule shrinks with it: the
lr milestones and the linear decay are the recipe's fractions of the run); the bounds
hold for the full schedule. No Ray; nothing is stored. bench/BALANCED_CHECKS.md has the
commands, what they print and their time on an H100.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sweep.core.errors import UserError  # noqa: E402
from sweep.core.grid import expand  # noqa: E402
from sweep.core.numerics import PRECISIONS  # noqa: E402
from sweep.core.plan import Pack  # noqa: E402
from sweep.core.spec import TrialSpec  # noqa: E402
from workers.run_pack import run_pack  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Check:
    grid: str
    paper: str  # what the paper reports, as printed
    max_error: float  # default bound on the best network's top-1 test error
    min_auc: float  # default bound on the best network's multi-class ROC AUC (0: none)


CHECKS: dict[str, Check] = {
    "allcnn_cifar10": Check("balanced_cifar10.yaml", "9.75 % test error (Sec. 3.3.2)", 0.11, 0.0),
    "resnet10_imagenet": Check("balanced_imagenet224.yaml",
                               "62.56 % top-1 error, 99.50 multi-class ROC AUC, one centred crop (Sec. 3.3.3)",
                               0.65, 0.993),
}


def check_specs(name: str, iters: int | None, lrs: list[float] | None, runs: int, repeats: int,
                batch_size: int | None = None) -> list[TrialSpec]:
    """The check's networks: its grid, with the run length, lr search and batch asked for."""
    doc: dict[str, Any] = yaml.safe_load((ROOT / "grids" / CHECKS[name].grid).read_text())
    if lrs is not None:
        doc["lr"], doc["lr_runs"] = lrs, runs
    doc["repeats"] = repeats
    specs = expand(doc, source=CHECKS[name].grid).specs
    if iters is None and batch_size is None:
        return list(specs)
    out = []
    for s in specs:  # the schedule keeps its shape: milestones at the recipe's fractions
        r = s.recipe
        scale = (iters or r.iters) / r.iters
        out.append(dataclasses.replace(s, recipe=dataclasses.replace(
            r, iters=iters or r.iters, batch_size=batch_size or r.batch_size,
            lr_milestones=tuple(max(1, round(m * scale)) for m in r.lr_milestones), checkpoint_every=0)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("check", choices=sorted(CHECKS))
    ap.add_argument("--data-dir", default=None, help="where the dataset is (default: $SWEEP_DATA_DIR)")
    ap.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when present)")
    ap.add_argument("--iters", type=int, default=None, help="a shorter run (default: the recipe's)")
    ap.add_argument("--lrs", default=None, help="allcnn_cifar10: base lrs to search, comma-separated")
    ap.add_argument("--runs", type=int, default=1, help="allcnn_cifar10: runs of each lr")
    ap.add_argument("--repeats", type=int, default=1, help="networks from other seeds")
    ap.add_argument("--batch-size", type=int, default=None, help="smoke runs only (default: the recipe's 256)")
    ap.add_argument("--precision", default="fp32", choices=PRECISIONS)
    ap.add_argument("--max-error", type=float, default=None, help="largest top-1 test error of the best network")
    ap.add_argument("--min-auc", type=float, default=None, help="smallest ROC AUC of the best network")
    args = ap.parse_args(argv)
    check = CHECKS[args.check]
    max_error = check.max_error if args.max_error is None else args.max_error
    min_auc = check.min_auc if args.min_auc is None else args.min_auc
    lrs = None if args.lrs is None else [float(v) for v in args.lrs.split(",")]
    try:
        specs = check_specs(args.check, args.iters, lrs, args.runs, args.repeats, args.batch_size)
        t0 = time.perf_counter()
        result = run_pack(Pack(tuple(specs)), None, device=args.device, precision=args.precision,
                          data_dir=args.data_dir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    rows = [r for r in result.tables["trials"] if r["evaluation"] == "raw"]
    iters = specs[0].recipe.iters
    print(f"{dt.date.today()} check={args.check} device={result.device} precision={args.precision} "
          f"iters={iters} batch={specs[0].recipe.batch_size} networks={len(rows)} wall={seconds:.0f}s", flush=True)
    print(f"paper: {check.paper}", flush=True)
    lr_of = {s.network_id: (s.recipe.base_lr, s.lr_run, s.repeat) for s in specs}
    for r in rows:
        lr, run, repeat = lr_of[r["network_id"]]
        print(f"  lr={lr:g} run={run} repeat={repeat} status={r['status']} top1_error={1 - r['accuracy']:.4f} "
              f"roc_auc={r['roc_auc']:.4f}", flush=True)
    ok_rows = [r for r in rows if r["status"] == "ok"]
    if not ok_rows:
        print("FAIL: no network trained to the end", flush=True)
        return 1
    best = max(ok_rows, key=lambda r: r["accuracy"])
    error, auc = 1 - best["accuracy"], best["roc_auc"]
    print(f"best: top1_error={error:.4f} roc_auc={auc:.4f}", flush=True)
    ok = error <= max_error and auc >= min_auc
    bound = f"top-1 error at most {max_error:.2%}" + (f", ROC AUC at least {min_auc:.4f}" if min_auc else "")
    print(f"PASS: {bound}" if ok else f"FAIL: not {bound}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
