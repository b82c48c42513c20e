"""What successive halving saves on a learning-rate search, and what it costs in the choice.

    python bench/lr_search.py [--iters 10000] [--lrs 0.1,0.01,0.001,0.0001] [--runs 2] \
        [--cells step:10:0.5,step:100:0.5,linear:100] [--repeats 1] [--max-per-class 5000] \
        [--test-images 10000] [--methods baseline] [--reduction 2] [--threads 2]

A LeNet-5 / MNIST search (issue 25): every (cell, repeat, method) trains ``len(lrs) x runs``
candidates on Buda's recipe, selected on a 10 % validation split, twice: the full search
(every candidate to ``--iters``) and with ``lr_search: {scheduler: halving}`` at the ladder
the grid key derives for that many candidates (8 candidates, reduction 2, 10,000 iterations:
rungs 1,250 / 2,500 / 5,000, the CIFAR-10 ladder 8,750 / 17,500 / 35,000 of 70,000 scaled).
Both run in this process through ``workers.run_pack``, one pack per (cell, repeat), on the
CPU unless ``--device`` says otherwise. Printed: network-iterations spent, wall time, how often
the lr (and run) ``analysis.aggregate.select_lr_runs`` selects is the full search's, and the
paired difference in test ROC AUC of the selected networks (halving minus full; a candidate
draws the full search's batches, so the same selected lr and run give the same network and a
difference of exactly 0). Then the projection for grids/buda_cifar10.yaml in
network-iterations, and in device-hours where ``--cifar-rate`` (All-CNN network-iterations
per second on the device in question) is given.

A benchmark, not a test: the full scale is hours on two CPU cores. ``--iters``,
``--max-per-class``, ``--test-images``, ``--cells``, ``--lrs`` and ``--runs`` scale it down.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.aggregate import select_lr_runs  # noqa: E402
from sweep.core.grid import expand, load_grid  # noqa: E402
from sweep.core.lr_search import default_rungs  # noqa: E402
from sweep.core.plan import plan_packs  # noqa: E402
from workers.datasets import ArrayDataset, load_dataset  # noqa: E402
from workers.run_pack import run_pack  # noqa: E402

GROUP = ["imbalance", "rho", "mu", "method", "repeat"]


def _cells(text: str) -> dict:
    """``step:10:0.5,linear:100`` -> the grid's imbalance mapping."""
    out: dict = {}
    for cell in text.split(","):
        kind, *params = cell.split(":")
        entry = out.setdefault(kind, {"rho": []} | ({"mu": []} if kind == "step" else {}))
        if float(params[0]) not in entry["rho"]:
            entry["rho"].append(float(params[0]))
        if kind == "step" and float(params[1]) not in entry["mu"]:
            entry["mu"].append(float(params[1]))
    return out


def _grid(args: argparse.Namespace, halving: bool) -> dict:
    doc = {"name": "lr_search_bench", "dataset": "mnist", "model": "lenet5",
           "recipe": {"preset": "buda_mnist", "iters": args.iters}, "max_per_class": args.max_per_class,
           "imbalance": _cells(args.cells), "methods": args.methods.split(","), "thresholding": [],
           "lr": [float(x) for x in args.lrs.split(",")], "lr_runs": args.runs, "selection": "validation",
           "repeats": args.repeats, "seed": args.seed}
    if halving:
        doc["lr_search"] = {"scheduler": "halving", "reduction": args.reduction}
    return doc


def _run(doc: dict, ds: ArrayDataset, device: str | None) -> tuple[pd.DataFrame, float]:
    grid = expand(doc)
    t0 = time.perf_counter()
    rows = []
    for pack in plan_packs(grid.specs, 64):
        rows.extend(run_pack(pack, None, dataset=ds, device=device).tables["trials"])
    return pd.DataFrame(rows), time.perf_counter() - t0


def _left_at_a_rung(trials: pd.DataFrame) -> pd.Series:
    """Networks a rung took out: stopped ones, and diverged ones it dropped (they keep their status)."""
    if "stopped_at_iter" not in trials.columns:
        return pd.Series(False, index=trials.index)
    return pd.to_numeric(trials["stopped_at_iter"], errors="coerce").notna()


def _network_iterations(trials: pd.DataFrame) -> int:
    raw = trials[trials["evaluation"] == "raw"]
    left = _left_at_a_rung(raw)
    return int(raw.loc[left, "stopped_at_iter"].sum() + raw.loc[~left, "iters"].sum())


def _cifar_projection(reduction: int) -> tuple[int, int, tuple[int, ...]]:
    """Network-iterations of grids/buda_cifar10.yaml without and with halving at the default
    ladder (each (set, method) group of 8 candidates: 8 -> 4 -> 2 -> 1)."""
    grid = load_grid(ROOT / "grids" / "buda_cifar10.yaml")
    groups: dict[str, list] = {}
    for s in grid.specs:
        groups.setdefault(s.search_group, []).append(s)
    iters = grid.specs[0].recipe.iters
    full = sum(len(g) * iters for g in groups.values())
    halved = 0
    for g in groups.values():
        rungs, alive, spent = default_rungs(iters, len(g), reduction), len(g), 0
        for r in rungs:
            keep = max(1, math.ceil(alive / reduction))
            spent += (alive - keep) * r
            alive = keep
        # A two-phase group trains only the children of its parents' survivors (the others
        # are stopped with their parents, untrained): the parents' search decided for it.
        halved += alive * iters if g[0].parent is not None else spent + alive * iters
    return full, halved, default_rungs(iters, 8, reduction)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=10_000)
    ap.add_argument("--lrs", default="0.1,0.01,0.001,0.0001", help="base learning rates searched")
    ap.add_argument("--runs", type=int, default=2, help="runs per learning rate")
    ap.add_argument("--cells", default="step:10:0.5,step:100:0.5,step:100:0.2,linear:100",
                    help="imbalance cells: kind:rho[:mu],...")
    ap.add_argument("--methods", default="baseline")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--max-per-class", type=int, default=5000)
    ap.add_argument("--test-images", type=int, default=10_000, help="the first N MNIST test images")
    ap.add_argument("--reduction", type=int, default=2)
    ap.add_argument("--seed", type=int, default=25)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default=None)
    ap.add_argument("--out-dir", default=None, help="also write both searches' trials rows here (CSV)")
    ap.add_argument("--cifar-rate", type=float, default=None,
                    help="All-CNN network-iterations/s of the target device, for the GPU-hours projection")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    full_ds = load_dataset("mnist")
    ds = ArrayDataset(name="mnist", train_x=full_ds.train_x, train_y=full_ds.train_y,
                      test_x=full_ds.test_x[:args.test_images], test_y=full_ds.test_y[:args.test_images],
                      num_classes=10, source=f"{full_ds.source} [test {args.test_images}]")

    full, full_s = _run(_grid(args, False), ds, args.device)
    halved, halved_s = _run(_grid(args, True), ds, args.device)
    if args.out_dir:
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        full.to_csv(Path(args.out_dir) / "full.csv", index=False)
        halved.to_csv(Path(args.out_dir) / "halving.csv", index=False)
    n_full, n_halved = _network_iterations(full), _network_iterations(halved)
    chosen_full = select_lr_runs(full[full["evaluation"] == "raw"]).set_index(GROUP)
    chosen_halved = select_lr_runs(halved[halved["evaluation"] == "raw"]).set_index(GROUP)
    pairs = chosen_full.merge(chosen_halved, left_index=True, right_index=True, suffixes=("_full", "_halved"))
    same_lr = pairs["base_lr_full"].eq(pairs["base_lr_halved"])
    same_run = same_lr & pairs["lr_run_full"].eq(pairs["lr_run_halved"])
    diff = (pairs["roc_auc_halved"] - pairs["roc_auc_full"]).to_numpy(dtype=float)
    n = len(diff)
    sd = float(np.std(diff, ddof=1)) if n > 1 else float("nan")

    candidates = len(args.lrs.split(",")) * args.runs
    print(f"# lr search, LeNet-5 / MNIST: {n} searches of {candidates} candidates ({args.lrs} x {args.runs} runs), "
          f"{args.iters:,} iterations, rungs {default_rungs(args.iters, candidates, args.reduction)}, "
          f"reduction {args.reduction}; cells {args.cells}; methods {args.methods}; repeats {args.repeats}; "
          f"max_per_class {args.max_per_class}; test images {args.test_images:,}; "
          f"{args.threads} threads on {args.device or 'cpu'}")
    print(f"network-iterations: full {n_full:,}, halving {n_halved:,} ({n_halved / n_full:.1%} of full)")
    print(f"wall time: full {full_s:,.0f} s, halving {halved_s:,.0f} s ({halved_s / full_s:.1%} of full)")
    print(f"selected lr equals the full search's: {int(same_lr.sum())} of {n} ({int(same_run.sum())} the same run too)")
    print(f"paired test ROC AUC difference (halving - full) of the selected networks: mean {diff.mean():+.5f}, "
          f"sd {sd:.5f}, min {diff.min():+.5f}, n = {n}")
    raw = halved[halved["evaluation"] == "raw"]
    left = raw[_left_at_a_rung(raw)]
    ladder = left.groupby("stopped_at_iter")["network_id"].nunique()
    print("left at each rung: " + ", ".join(f"{n_:,} at {int(it):,}" for it, n_ in ladder.items())
          + f" ({int(left['status'].eq('diverged').sum())} of them diverged before); diverged in the full search: "
          f"{int(full.loc[full['evaluation'] == 'raw', 'status'].eq('diverged').sum())}")
    c_full, c_halved, c_rungs = _cifar_projection(args.reduction)
    line = (f"projection, grids/buda_cifar10.yaml (rungs {c_rungs} of 70,000; each (set, method) group "
            f"of 8 to 1): {c_full:,} -> {c_halved:,} network-iterations ({c_halved / c_full:.1%})")
    if args.cifar_rate:
        line += (f"; at {args.cifar_rate:,.0f} net-it/s: {c_full / args.cifar_rate / 3600:,.1f} -> "
                 f"{c_halved / args.cifar_rate / 3600:,.1f} device-hours")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
