"""Run a big grid on a lent GPU box in budgeted calls, carrying the store between them.

A lent machine starts bare every call, hands back at most 8 files, none deeper than two
folders and none with '=' in its path, so a hive-partitioned store cannot travel as it
is. This script moves a store as a *flat* folder instead: one Parquet file per table
(with its ``grid`` column) plus each saved grid file, and rebuilds it on either side.
Resume does the rest: the rebuilt store's completed ids are what the next call skips.

One call on the device (pyarrow, pandas, pyyaml and torch are there; Ray, DuckDB and
plotly are not, and none is needed)::

    python bench/gpu_reproduction.py run --grid grids/buda_mnist.yaml --flat-in results/gpu_flat \\
        --out $OUT --data-dir .mnist --device cuda --precision bf16 --seconds 420

Back here (``files_at`` is where the device tool put the returned files)::

    python bench/gpu_reproduction.py unpack FILES_AT results/buda_mnist   # a normal store
    python bench/gpu_reproduction.py pack results/buda_mnist results/gpu_flat  # carry it next time

``run`` rebuilds the store from ``--flat-in`` when it exists, trains packs in
repeat-major order until ``--seconds`` have passed (a started pack finishes), and
writes the flat store to ``--out`` with the tables ``trials``, ``class_metrics`` and
``curves`` (without ``spec_json``, which ``_grids`` can regenerate).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sweep.core.grid import load_grid  # noqa: E402
from sweep.store.results import ResultStore  # noqa: E402

TABLES = ("trials", "class_metrics", "curves")
DROP = ("spec_json",)
PACK_ID = "flat"


def pack(store_root: str, flat_dir: str, tables: tuple[str, ...] = TABLES) -> dict[str, int]:
    """Store -> one Parquet file per table (with ``grid``) and ``<grid>.yaml`` per saved grid."""
    store, out = ResultStore(store_root), Path(flat_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for t in (t for t in tables if t in store.table_names()):
        frame = store.read_table(t)
        frame.drop(columns=[c for c in DROP if c in frame.columns]).to_parquet(out / f"{t}.parquet", index=False)
        rows[t] = len(frame)
    for grid in store.saved_grids():
        (out / f"{grid.name}.yaml").write_bytes(Path(grid.path).read_bytes())
    return rows


def unpack(flat_dir: str, store_root: str) -> int:
    """A flat folder -> a store (one committed pack per grid); returns the trials rows."""
    src, store = Path(flat_dir), ResultStore(store_root)
    frames = {p.stem: pd.read_parquet(p) for p in sorted(src.glob("*.parquet"))}
    if "trials" not in frames:
        raise SystemExit(f"{flat_dir}: no trials.parquet, nothing to unpack")
    for grid, part in frames["trials"].groupby("grid"):
        tables = {name: f[f["grid"] == grid] for name, f in frames.items()}
        store.write_pack(PACK_ID, str(grid), tables)
    for path in sorted(src.glob("*.yaml")):
        store.save_grid(load_grid(path))
    return len(frames["trials"])


def run(a: argparse.Namespace) -> None:
    from sweep.local import run_local

    t0 = time.perf_counter()
    store = "/tmp/gpu_reproduction_store"
    if a.flat_in and Path(a.flat_in, "trials.parquet").exists():
        logging.info("rebuilt the store from %s: %d trial rows", a.flat_in, unpack(a.flat_in, store))
    grid = load_grid(a.grid)
    budget = max(0.0, a.seconds - (time.perf_counter() - t0))
    trained, failed, seconds = run_local(grid, store, device=a.device, data_dir=a.data_dir,
                                         precision=a.precision, max_networks=a.max_networks, max_seconds=budget)
    done = len(ResultStore(store).completed_network_ids(grid=grid.name))
    print(f"{grid.name}: {trained} networks trained this call ({failed} failed) in {seconds:.0f} s; "
          f"{done} of {grid.trained_networks} stored")
    print("rows written:", pack(store, a.out))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="store -> flat folder")
    p.add_argument("store")
    p.add_argument("flat")
    u = sub.add_parser("unpack", help="flat folder -> store")
    u.add_argument("flat")
    u.add_argument("store")
    r = sub.add_parser("run", help="rebuild, train for --seconds, write the flat store to --out")
    r.add_argument("--grid", required=True)
    r.add_argument("--flat-in", default=None)
    r.add_argument("--out", required=True)
    r.add_argument("--data-dir", default=None)
    r.add_argument("--device", default="cuda")
    r.add_argument("--precision", default="bf16", choices=["fp32", "tf32", "bf16"])
    r.add_argument("--max-networks", type=int, default=0)
    r.add_argument("--seconds", type=float, required=True)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if a.command == "pack":
        print(pack(a.store, a.flat))
    elif a.command == "unpack":
        print(f"{unpack(a.flat, a.store)} trial rows")
    else:
        run(a)


if __name__ == "__main__":
    main()
