"""Run a big grid on a lent GPU box in budgeted calls, carrying the store between them.

A lent machine starts bare every call, hands back at most 8 files, none deeper than two
folders and none with '=' in its path, so a hive-partitioned store cannot travel as it
is. This script moves a store as a *flat* folder instead: one Parquet file per table
(with its ``grid`` column) plus each saved grid file, and rebuilds it on either side.
With ``--out-tar`` the flat folder travels as one tar file (one of the 8). Resume does
the rest: the rebuilt store's completed ids are what the next call skips.

One call on the device (pyarrow, pandas, pyyaml and torch are there; Ray, DuckDB and
plotly are not, and none is needed)::

    python3 bench/gpu_reproduction.py run --grid grids/buda_mnist.yaml --flat-in results/gpu_flat \
        --out-tar $OUT/reproduction.tar --data-dir .mnist --device cuda --precision bf16 --seconds 420 \
        --whole-repeats --rate-from $OUT/bench.md

Back here (``files_at`` is where the device tool put the returned files)::

    python bench/gpu_reproduction.py unpack FILES_AT/reproduction.tar results/buda_mnist   # a normal store
    python bench/gpu_reproduction.py pack results/buda_mnist results/gpu_flat  # carry it next time

``run`` rebuilds the store from ``--flat-in`` (a folder or a tar) when it holds a
``trials.parquet``, trains one pack at a time in repeat-major order (``--whole-repeats``:
one repeat of the grid per pack) and writes the flat store after every pack, so a call
cut short keeps every pack it finished. It starts no pack after ``--seconds``, nor one
that would not end by then at the expected rate: the pack before it, else the slowest
(e) row of ``--rate-from`` (a ``bench/bench_packed.py`` table) in ``--precision``, with
a quarter added and ``PACK_OVERHEAD_S`` for data and evaluation; without either, it
starts the pack. Tables: ``trials``, ``class_metrics`` and ``curves`` (without
``spec_json``, which ``_grids`` can regenerate). ``--iters`` and ``--repeats`` shrink the
grid (a copy under another name, for the GPU script's CPU dry run).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sys
import tarfile
import tempfile
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
PACK_OVERHEAD_S = 20.0  # per pack: data set-up, test-set evaluation, thresholding, writes
RATE_MARGIN = 1.25  # the expected training time of a pack, times this


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


def pack_tar(store_root: str, tar_path: str) -> dict[str, int]:
    """Store -> one tar of the flat folder, replaced atomically (a killed call keeps the last one)."""
    with tempfile.TemporaryDirectory() as tmp:
        rows = pack(store_root, tmp)
        part = f"{tar_path}.part"
        with tarfile.open(part, "w") as tar:
            for f in sorted(Path(tmp).iterdir()):
                tar.add(f, arcname=f.name)
        os.replace(part, tar_path)
    return rows


def unpack(flat_dir: str, store_root: str) -> int:
    """A flat folder (or a tar of one) -> a store (one committed pack per grid); returns the trials rows."""
    if Path(flat_dir).is_file():
        with tempfile.TemporaryDirectory() as tmp:
            with tarfile.open(flat_dir) as tar:
                tar.extractall(tmp, filter="data")
            return unpack(tmp, store_root)
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


def bench_rate(path: str, precision: str) -> float | None:
    """The slowest (e) rate in ``precision`` of a bench_packed table (net-it/s), or None."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError:
        return None
    rates = [float(m.group(1).replace(",", "")) for m in re.finditer(
        rf"^\| \(e\) fast path \| {re.escape(precision)} \| P=\d+ \| ([\d,.]+) \|", text, re.M)]
    return min(rates) if rates else None


def shrunk_grid(path: str, iters: int, repeats: int, folder: str):
    """A copy of the grid file with fewer iterations / repeats, under a name of its own."""
    import yaml

    doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if iters:
        recipe = doc.get("recipe")
        doc["recipe"] = {**recipe, "iters": iters} if isinstance(recipe, dict) else {"preset": recipe, "iters": iters}
    if repeats:
        doc["repeats"] = repeats
    doc["name"] = f"{doc['name']}_small"
    out = Path(folder, f"{doc['name']}.yaml")
    out.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return load_grid(out)


def run(a: argparse.Namespace) -> int:
    import torch

    from sweep.local import run_local
    from sweep.prepare import plan_for
    from workers.devices import resolve_device

    t0 = time.perf_counter()
    store = tempfile.mkdtemp(prefix="gpu_reproduction_store")
    if a.flat_in and (Path(a.flat_in).is_file() or Path(a.flat_in, "trials.parquet").exists()):
        logging.info("rebuilt the store from %s: %d trial rows", a.flat_in, unpack(a.flat_in, store))
    grid = shrunk_grid(a.grid, a.iters, a.repeats, tempfile.mkdtemp(prefix="gpu_reproduction_grid")) if (a.iters or a.repeats) else load_grid(a.grid)
    per_repeat = sum(1 for s in grid.specs if s.repeat == grid.specs[0].repeat)
    max_networks = a.max_networks or (per_repeat if a.whole_repeats else 0)
    iters = max(s.recipe.iters for s in grid.specs)
    rate = bench_rate(a.rate_from, a.precision) if a.rate_from else None
    dev = resolve_device(a.device)
    memory = torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else None
    logging.info("%s: packs of %s networks; expected rate %s", grid.name, max_networks or "device-sized",
                 f"{rate:,.0f} net-it/s (from {a.rate_from})" if rate else "unknown")
    trained = failed = packs = 0
    seconds_per_net_iter = None if not rate else 1.0 / rate
    written = None
    while not a.max_packs or packs < a.max_packs:
        todo, _ = plan_for(grid, ResultStore(store), max_networks, dev.type, memory)
        if not todo:
            break
        left = a.seconds - (time.perf_counter() - t0)
        nets = len(todo[0].specs)
        expect = None if seconds_per_net_iter is None else (
            RATE_MARGIN * nets * iters * seconds_per_net_iter + PACK_OVERHEAD_S)
        if left <= 0 or (expect is not None and expect > left):
            print(f"not starting a pack of {nets} networks: {left:.0f} s left"
                  + (f", {expect:.0f} s expected" if expect is not None else ""), flush=True)
            break
        t_pack = time.perf_counter()
        n_ok, n_bad, _ = run_local(grid, store, device=str(dev), data_dir=a.data_dir, precision=a.precision,
                                   max_networks=max_networks, max_packs=1)
        took = time.perf_counter() - t_pack
        trained, failed, packs = trained + n_ok, failed + n_bad, packs + 1
        seconds_per_net_iter = max(took - PACK_OVERHEAD_S, 0.5 * took) / max(nets * iters, 1)
        written = pack_tar(store, a.out_tar) if a.out_tar else pack(store, a.out)
        print(f"pack {packs}: {n_ok + n_bad} networks ({n_bad} failed) in {took:.0f} s "
              f"= {(n_ok + n_bad) * iters / took:,.0f} net-it/s with set-up and evaluation; "
              f"flat store written: {written}", flush=True)
    done = len(ResultStore(store).completed_network_ids(grid=grid.name))
    print(f"{grid.name}: {trained} networks trained this call ({failed} failed) in "
          f"{time.perf_counter() - t0:.0f} s; {done} of {grid.trained_networks} stored", flush=True)
    if written is None:
        written = pack_tar(store, a.out_tar) if a.out_tar else pack(store, a.out)
        print("rows written:", written, flush=True)
    shutil.rmtree(store, ignore_errors=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
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
    out = r.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", help="write the flat store into this folder")
    out.add_argument("--out-tar", help="write the flat store as one tar file")
    r.add_argument("--data-dir", default=None)
    r.add_argument("--device", default="cuda")
    r.add_argument("--precision", default="bf16", choices=["fp32", "tf32", "bf16"])
    r.add_argument("--max-networks", type=int, default=0, help="networks per pack (0: see --whole-repeats)")
    r.add_argument("--whole-repeats", action="store_true", help="one repeat of the grid per pack")
    r.add_argument("--max-packs", type=int, default=0, help="stop after this many packs (0: no limit)")
    r.add_argument("--seconds", type=float, required=True, help="start no pack that would end after this")
    r.add_argument("--rate-from", default=None, help="a bench_packed table whose (e) rows give the expected rate")
    r.add_argument("--iters", type=int, default=0, help="train the grid with this many iterations (a smaller copy)")
    r.add_argument("--repeats", type=int, default=0, help="the grid with this many repeats (a smaller copy)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if a.command == "pack":
        print(pack(a.store, a.flat))
    elif a.command == "unpack":
        print(f"{unpack(a.flat, a.store)} trial rows")
    else:
        return run(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
