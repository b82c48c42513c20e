"""One network, one set of numbers: ``sweep run`` (Ray Tune) and ``python -m sweep.local``
store bit-equal results for the same grid on the same device.

They did not (issue 22, item 10): the driver set torch's thread count to the pack's CPU
share while ``sweep.local`` kept torch's default (the machine's cores), and on the CPU
the numbers depend on the thread count. The grid asks for 1 CPU per pack, so on a
machine with 2 or more cores the old local runner trained with more threads than the
driver; 50 images per class and 5 iterations are enough to show it (the evaluation
over MNIST's 10,000 test images differs in ROC AUC's 8th digit between 1 and 2
threads). Both runners run as their commands, in subprocesses, with their own defaults.
"""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from sweep.store.results import ResultStore

from conftest import tiny_grid

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]

GRID = tiny_grid("same", methods=["baseline", "oversampling"], thresholding=["baseline"], seed=3)
# What may differ between two runs of the same network: when and how fast it ran.
RUN_COLUMNS = {"created_at", "train_seconds", "eval_seconds", "latent_seconds", "host"}
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "CUDA_VISIBLE_DEVICES": ""}


def run(*args: str) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=600, env=ENV)
    assert res.returncode == 0, f"rc={res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    return res


def rows(store: Path, table: str) -> pd.DataFrame:
    df = ResultStore(str(store)).read_table(table)
    df = df.drop(columns=[c for c in df.columns if c in RUN_COLUMNS])
    keys = [c for c in ("trial_id", "network_id", "class", "true_class", "predicted_class", "iter", "split")
            if c in df.columns]
    return df.sort_values(keys).reset_index(drop=True)


def test_sweep_run_and_sweep_local_store_the_same_numbers(tmp_path, mnist, ray_dir):
    grid = tmp_path / "same.yaml"
    grid.write_text(yaml.safe_dump(GRID))
    by_ray, by_local = tmp_path / "ray", tmp_path / "local"
    run("-m", "sweep.cli", "run", str(grid), "--store", str(by_ray), "--num-cpus", "2",
        "--ray-temp-dir", ray_dir, "-q")
    run("-m", "sweep.local", str(grid), "--store", str(by_local), "--device", "cpu")

    a, b = ResultStore(str(by_ray)), ResultStore(str(by_local))
    tables = sorted(set(a.table_names()) | set(b.table_names()))
    assert {"trials", "class_metrics"} <= set(tables)
    for table in tables:
        x, y = rows(by_ray, table), rows(by_local, table)
        assert len(x) > 0, table
        # Bit-equal, not close: check_exact compares floats with ==.
        pd.testing.assert_frame_equal(x, y, check_exact=True, obj=table)
    trials = rows(by_ray, "trials")
    assert len(trials) == 3 and set(trials["status"]) == {"ok"}
    assert set(trials["device"]) == {"cpu, 1 thread"}  # what the numbers depend on, recorded
