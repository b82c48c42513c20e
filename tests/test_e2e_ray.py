"""A tiny sweep through the real CLI and Ray Tune: grid -> packs -> store -> query."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]

GRID = {
    "name": "tiny", "dataset": "mnist", "model": "lenet5",
    "recipe": {"preset": "buda_mnist", "iters": 20},
    "imbalance": {"step": {"rho": [10], "mu": [0.2]}, "linear": {"rho": [10]}},
    "methods": ["baseline", "oversampling", "undersampling"],
    "repeats": 1, "seed": 1,
    "resources": {"cpu": 1, "gpu": 0}, "pack": {"max_networks": 3},
}


def sweep(*args, check=True, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "sweep.cli", *args], capture_output=True, text=True,
                          cwd=cwd, check=check, timeout=600)


def test_grid_to_store_to_query_through_ray(tmp_path, mnist, ray_dir):
    grid = tmp_path / "tiny.yaml"
    grid.write_text(yaml.safe_dump(GRID))
    store = tmp_path / "store"
    expected = json.loads(sweep("expand", str(grid), "--json").stdout)
    # As the README does it: paths relative to where the command runs (Tune runs each
    # trial in a folder of its own, so the workers must not resolve them there).
    run = sweep("run", "tiny.yaml", "--store", "store", "--num-cpus", "2",
                "--ray-temp-dir", ray_dir, "-q", cwd=tmp_path)
    assert "6 networks trained in 2 packs" in run.stdout
    assert len(list((store / "trials").rglob("*.parquet"))) == 2  # one committed file per pack, here
    counted = json.loads(sweep("query", str(store), "select count(*) as n from trials", "--format", "json").stdout)
    assert counted[0]["n"] == expected["evaluations"] == 12
    # Running the same grid again trains nothing: the store is the source of truth.
    again = sweep("run", str(grid), "--store", str(store), "--num-cpus", "2",
                  "--ray-temp-dir", ray_dir, "-q")
    assert "0 networks trained" in again.stdout and "6 already stored" in again.stdout
    counted = json.loads(sweep("query", str(store), "select count(*) as n from trials", "--format", "json").stdout)
    assert counted[0]["n"] == 12
