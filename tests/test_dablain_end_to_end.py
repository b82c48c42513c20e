"""grids/dablain.yaml end to end on CIFAR-10, SVHN and CelebA files the test writes, and a
report that draws Dablain's tables from the store; Buda's Fig. 8 from trained curves.

The grid file is the real one; only its budget is cut (1 epoch instead of 200 / 50) and
the datasets are small copies in the datasets' own formats.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import yaml

from analysis.figures import buda_figure
from analysis.report import write_report
from sweep.core.grid import expand
from sweep.local import run_local
from sweep.store.results import ResultStore
from workers import datasets

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PER_CLASS, TEST_PER_CLASS = 100, 10  # rho = 100 leaves the last class 1 image
CELEBA_TRAIN = 40  # rho = 20 leaves men 2 images


def _images(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """Learnable images: a class-dependent colour plus noise, [N, 3, 32, 32] uint8."""
    base = (labels[:, None] * 23 % 256).astype(np.float64)
    x = base[:, :, None, None] + rng.normal(0, 30, (len(labels), 3, 32, 32))
    return np.clip(x, 0, 255).astype(np.uint8)


def _labels(per_class: int, classes: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.repeat(np.arange(classes), per_class))


def write_cifar10(root: Path, rng: np.random.Generator) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    y = _labels(TRAIN_PER_CLASS, 10, rng)
    for i, part in enumerate(np.array_split(np.arange(len(y)), 5)):
        with open(folder / f"data_batch_{i + 1}", "wb") as f:
            pickle.dump({b"data": _images(rng, y[part]).reshape(len(part), -1), b"labels": y[part].tolist()}, f)
    yt = _labels(TEST_PER_CLASS, 10, rng)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": _images(rng, yt).reshape(len(yt), -1), b"labels": yt.tolist()}, f)


def write_svhn(root: Path, rng: np.random.Generator) -> None:
    from scipy.io import savemat

    (root / "svhn").mkdir()
    for split, n in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        y = _labels(n, 10, rng)
        x = np.transpose(_images(rng, y), (2, 3, 1, 0))  # SVHN's H, W, C, N
        savemat(root / "svhn" / f"{split}_32x32.mat", {"X": x, "y": np.where(y == 0, 10, y).reshape(-1, 1)})


def write_celeba(root: Path, rng: np.random.Generator, train: int, test: int) -> None:
    from PIL import Image

    folder = root / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    attrs, parts = [], []
    rows = [(0, c) for c in range(2) for _ in range(train)] + [(2, c) for c in range(2) for _ in range(test)]
    for i, (part, male) in enumerate(rows):
        name = f"{i + 1:06d}.jpg"
        colour = (200, 60, 60) if male else (60, 60, 200)
        noise = rng.integers(0, 40, (24, 20, 3))
        Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).save(
            folder / "img_align_celeba" / name, quality=95)
        attrs.append(f"{name} 1 {1 if male else -1}")
        parts.append(f"{name} {part}")
    (folder / "list_attr_celeba.txt").write_text(f"{len(rows)}\nBlack_Hair Male\n" + "\n".join(attrs) + "\n")
    (folder / "list_eval_partition.txt").write_text("\n".join(parts) + "\n")


def _one_epoch(doc: dict) -> dict:
    """The grid with 1 epoch, in epochs of the small files' sets (the cap sets the epoch)."""
    per_class = {"cifar10": TRAIN_PER_CLASS, "svhn": TRAIN_PER_CLASS, "celeba": CELEBA_TRAIN}
    doc = dict(doc, epochs=1)
    doc["experiments"] = [{**b, "epochs": 1, "max_per_class": per_class[b["dataset"]]} for b in doc["experiments"]]
    return doc


@pytest.fixture(scope="module")
def dablain_store(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setattr(datasets, "SVHN_PER_CLASS", (TRAIN_PER_CLASS, TEST_PER_CLASS))
    mp.setattr(datasets, "CELEBA_PER_CLASS", (CELEBA_TRAIN, TEST_PER_CLASS))
    root = tmp_path_factory.mktemp("dablain")
    rng = np.random.default_rng(0)
    write_cifar10(root / "data", rng)
    write_svhn(root / "data", rng)
    write_celeba(root / "data", rng, CELEBA_TRAIN, TEST_PER_CLASS)
    grid = expand(_one_epoch(yaml.safe_load((ROOT / "grids/dablain.yaml").read_text())),
                  source=str(ROOT / "grids/dablain.yaml"))
    assert max(s.recipe.iters for s in grid.specs) == 8  # 1,000 balanced images / 128
    trained, failed, _ = run_local(grid, str(root / "store"), device="cpu", data_dir=str(root / "data"))
    yield grid, ResultStore(str(root / "store")), trained, failed, root
    mp.undo()


def test_every_network_of_the_grid_is_trained_with_its_regime(dablain_store):
    grid, store, trained, failed, _ = dablain_store
    assert (trained, failed) == (13, 0)
    trials = store.read_table("trials")
    assert sorted(trials["network_id"]) == sorted(s.network_id for s in grid.specs)
    assert set(trials["status"]) == {"ok"}
    assert set(trials["selection"]) == {"test"}  # labelled as Cao et al.'s code selects
    # Cao et al.'s crop and flip; SVHN's digits cropped, never mirrored.
    assert set(zip(trials["dataset"], trials["augmentation"])) == {
        ("cifar10", "crop_flip"), ("celeba", "crop_flip"), ("svhn", "crop")}
    assert set(trials["normalization"]) == {"standardize"}
    assert set(trials.loc[trials["loss"] == "ldam", "head"]) == {"cosine"}
    assert set(trials.loc[trials["loss"] != "ldam", "head"]) == {"linear"}
    # Cao et al.'s truncated counts at rho = 100 from 100 per class.
    cifar = trials[(trials["dataset"] == "cifar10") & (trials["imbalance"] == "exponential")
                   & (trials["method"] == "baseline")]
    assert {tuple(c) for c in cifar["class_counts"]} == {(100, 59, 35, 21, 12, 7, 4, 2, 1, 1)}


def test_latent_statistics_use_k_7(dablain_store):
    grid, store, _, _, _ = dablain_store
    latent = store.read_table("latent_stats")
    k = latent[latent["statistic"] == "class_topk_k"]
    assert set(k["value"]) == {7.0}
    assert set(k["network_id"]) == {s.network_id for s in grid.specs}


def test_report_draws_dablain_s_tables(dablain_store):
    _, store, _, _, root = dablain_store
    summary = write_report(store.root, str(root / "report.html"))
    for fig in ("dablain-table1", "dablain-table2", "dablain-table3", "dablain-table4", "dablain-fig3",
                "dablain-fig8", "dablain-fig9", "dablain-fig10"):
        assert fig in summary.figures, (fig, summary.skipped)
    page = (root / "report.html").read_text()
    for loss in ("ce", "focal", "ldam"):  # Table 1's rows (the figure JSON escapes "/")
        assert f"cifar10 \\u002f {loss}" in page


def test_report_draws_buda_fig8_from_trained_train_and_test_curves(small_mnist, tmp_path):
    from sweep.core.plan import Pack
    from workers.run_pack import run_pack

    grid = expand({"name": "curves", "dataset": "mnist", "model": "lenet5",
                   "recipe": {"preset": "buda_mnist", "iters": 20, "eval_every": 10}, "max_per_class": 60,
                   "imbalance": {"step": {"rho": [10], "mu": [0.5]}}, "methods": ["baseline", "oversampling"],
                   "thresholding": [], "seed": 2})
    store = ResultStore(str(tmp_path / "store"))
    store.save_grid(grid)
    run_pack(Pack(grid.specs), store, dataset=small_mnist)
    curves = store.read_table("curves")
    assert set(curves["split"]) == {"train", "test"}
    assert sorted(set(curves["iter"])) == [10, 20]
    fig = buda_figure(8, store.read_table("trials"), curves)
    dashes = {t.line.dash for t in fig.data if t.mode and "lines" in t.mode}
    assert {"solid", "dot"} <= dashes  # test (solid) and train (dotted) lines, from the store
    summary = write_report(store.root, str(tmp_path / "r.html"))
    assert "buda-fig8" in summary.figures
