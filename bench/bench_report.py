"""Time ``write_report`` on a store the size of Buda et al.'s MNIST study.

The store is built from the real grid (``grids/buda_mnist.yaml``: 22,500 networks,
36,000 evaluations), planned into packs as a GPU sweep would be (~90 packs of 256
networks) and written with ``ResultStore.write_pack``, with synthetic metrics,
curves and class metrics. Only ``write_report`` is timed.

    python bench/bench_report.py            # builds in a temporary folder
    python bench/bench_report.py --root /tmp/buda-store --keep
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from analysis.report import write_report  # noqa: E402
from sweep.core.grid import load_grid  # noqa: E402
from sweep.core.plan import plan_packs  # noqa: E402
from sweep.store.results import ResultStore  # noqa: E402

# Synthetic effects (fractions of ROC AUC) roughly in the shape of the paper's MNIST results.
METHOD_EFFECT = {"baseline": 1.0, "oversampling": 0.3, "undersampling": 1.3,
                 "two_phase_over": 0.6, "two_phase_under": 1.1}
CURVE_POINTS = 10  # test/train points per network (eval_every = iters / 10)


def _auc(spec, rng: np.random.Generator) -> float:
    severity = np.log10(spec.imbalance.rho) / np.log10(5000)
    share = spec.imbalance.mu if spec.imbalance.mu is not None else 0.5
    drop = 0.08 * severity * share * METHOD_EFFECT[str(spec.method)]
    return float(np.clip(0.995 - drop + rng.normal(0, 0.004), 0.5, 1.0))


def _pack_tables(pack, rng: np.random.Generator, now: dt.datetime) -> dict[str, list[dict]]:
    trials, classes, curves = [], [], []
    for s in pack.stored_specs:
        status = rng.choice(["ok", "diverged", "failed"], p=[0.993, 0.005, 0.002])
        auc = _auc(s, rng)
        acc_raw = auc - 0.05 - rng.uniform(0, 0.05)
        for e in s.evaluations:
            acc = acc_raw + (0.03 if str(e) == "threshold" else 0.0)
            ok = status == "ok"
            trials.append({
                "trial_id": s.trial_id(e), "network_id": s.network_id, "parent_id": s.parent_id,
                "pack_id": pack.pack_id, "evaluation": str(e), "dataset": s.dataset, "model": s.model,
                "method": str(s.method), "loss": str(s.loss), "imbalance": str(s.imbalance.kind),
                "rho": float(s.imbalance.rho), "mu": s.imbalance.mu,
                "n_minority": len(s.imbalance.classes) if str(s.imbalance.kind) == "step" else None,
                "classes": list(s.imbalance.classes), "resample_ratio": float(s.resample_ratio),
                "repeat": s.repeat, "seed": s.seed, "lr_run": s.lr_run, "base_lr": s.recipe.base_lr,
                "iters": s.recipe.iters, "batch_size": s.recipe.batch_size, "selection": str(s.selection),
                "class_counts": [5000] * 10, "sampled_counts": [5000] * 10, "status": str(status),
                "error": None if ok else f"synthetic {status}",
                "diverged_at_iter": 1234 if status == "diverged" else None,
                "roc_auc": auc if ok else float("nan"), "accuracy": acc if ok else float("nan"),
                "balanced_accuracy": acc if ok else float("nan"), "val_balanced_accuracy": None,
                "best_iter": s.recipe.iters, "resumed_from_iter": 0, "train_seconds": 60.0,
                "eval_seconds": 1.0, "device": "cuda:synthetic", "package_version": "0.1.0",
                "git_commit": "bench", "grid_hash": "bench", "host": "bench", "created_at": now,
                "spec_json": s.to_json(),
            })
            for c in range(10):
                classes.append({"trial_id": s.trial_id(e), "network_id": s.network_id, "evaluation": str(e),
                                "class": c, "train_count": 5000, "sampled_count": 5000, "test_count": 1000,
                                "accuracy": acc, "roc_auc": auc})
        step = s.recipe.iters // CURVE_POINTS
        for i in range(1, CURVE_POINTS + 1):
            level = acc_raw * (1 - np.exp(-3 * i / CURVE_POINTS))
            for split, gap in (("test", 0.0), ("train", 0.02)):
                curves.append({"network_id": s.network_id, "iter": i * step, "split": split,
                               "loss": 1.0 - level, "accuracy": level + gap, "balanced_accuracy": level + gap})
    return {"trials": trials, "class_metrics": classes, "curves": curves}


def build_store(root: str, grid_file: Path, networks_per_pack: int = 256) -> tuple[int, int]:
    """Write the synthetic store; returns (packs, trial rows)."""
    grid = load_grid(grid_file)
    store = ResultStore(root)
    store.save_grid(grid)
    packs = plan_packs(grid.specs, networks_per_pack)
    rng = np.random.default_rng(2017)
    now = dt.datetime.now(dt.timezone.utc)
    rows = 0
    for pack in packs:
        tables = _pack_tables(pack, rng, now)
        rows += len(tables["trials"])
        store.write_pack(pack.pack_id, grid.name, tables)
    return len(packs), rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", help="store folder (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the store and report")
    ap.add_argument("--grid", default=str(REPO / "grids" / "buda_mnist.yaml"))
    ap.add_argument("--reuse", action="store_true", help="time only: the store at --root exists")
    args = ap.parse_args()
    root = args.root or tempfile.mkdtemp(prefix="bench-report-")
    if not args.reuse:
        t0 = time.perf_counter()
        packs, rows = build_store(root, Path(args.grid))
        print(f"built store: {packs} packs, {rows:,} trial rows in {time.perf_counter() - t0:.1f} s at {root}",
              flush=True)
    out = os.path.join(root, "report.html")
    t0 = time.perf_counter()
    summary = write_report(root, out)
    seconds = time.perf_counter() - t0
    size_mb = os.path.getsize(out) / 1e6
    print(f"write_report: {seconds:.2f} s for {summary.evaluations:,} trial rows "
          f"({summary.networks:,} networks), {len(summary.figures)} figures, "
          f"{summary.summary_rows} summary rows, {size_mb:.1f} MB html, cpus={os.cpu_count()}")
    if not args.keep and not args.root:
        import shutil
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
