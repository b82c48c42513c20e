"""Damaged dataset files (issue 22, item 9): a truncated or corrupt mnist.pkl.gz, random
IDX files, wrong shapes, labels out of range, a pickle that is not plain arrays. Each is
a one-line DatasetError (a UserError) naming the file and what is wrong, never a
traceback or click's bare "Aborted!" (what an EOFError from gzip became).

In-process: load_dataset on files written small in tmp_path, and `sweep run` through
click's CliRunner (the dataset is loaded in preflight, before Ray starts).
"""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from sweep.cli import cli
from sweep.core.errors import UserError
from workers import datasets
from workers.datasets import DatasetError, load_dataset

IDX_NAMES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


pytestmark = pytest.mark.usefixtures("isolated_datasets")  # conftest: private cache, fresh memo


def mnist_pickle(path: Path, n: int = 40, pixels: int = 784, labels: np.ndarray | None = None) -> bytes:
    rng = np.random.default_rng(1)
    k = rng.integers(0, 256, (n, pixels))
    y = rng.integers(0, 10, n) if labels is None else labels
    splits = [((k[a:b] / 256).astype(np.float32), y[a:b]) for a, b in ((0, 25), (25, 30), (30, n))]
    data = gzip.compress(pickle.dumps(splits, protocol=2))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def idx_bytes(array: np.ndarray, dims: tuple[int, ...] | None = None) -> bytes:
    dims = array.shape if dims is None else dims
    return bytes([0, 0, 0x08, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims) + array.astype(np.uint8).tobytes()


def write_idx_set(root: Path, **replace: bytes) -> Path:
    """A valid 30/20-image IDX set, with the files named in ``replace`` (by index 0-3) swapped."""
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (30, 28, 28)), np.arange(30) % 10, rng.integers(0, 256, (20, 28, 28)),
              np.arange(20) % 10]
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for i, (name, a) in enumerate(zip(IDX_NAMES, arrays)):
        (raw / name).write_bytes(replace.get(f"f{i}", idx_bytes(a)))
    return raw


def refused(data_dir: Path, name: str, *needles: str) -> str:
    with pytest.raises(DatasetError) as info:
        load_dataset(name, data_dir=str(data_dir))
    message = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in message and len(message) < 600, message
    for needle in needles:
        assert needle in message, message
    return message


# -- mnist.pkl.gz -----------------------------------------------------------------------------

def test_a_truncated_mnist_pickle_names_the_file(tmp_path) -> None:
    pkl = tmp_path / "d" / "mnist.pkl.gz"
    data = mnist_pickle(pkl)
    pkl.write_bytes(data[: len(data) // 2])
    refused(tmp_path / "d", "mnist", str(pkl), "truncated or corrupt")


@pytest.mark.parametrize("content", [b"", b"not gzip at all", gzip.compress(b"not a pickle")],
                         ids=["empty", "not-gzip", "gzip-of-garbage"])
def test_a_corrupt_mnist_pickle_names_the_file(tmp_path, content) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "mnist.pkl.gz").write_bytes(content)
    refused(tmp_path / "d", "mnist", str(tmp_path / "d" / "mnist.pkl.gz"))


def test_an_mnist_pickle_of_the_wrong_shape_or_labels(tmp_path) -> None:
    pkl = tmp_path / "a" / "mnist.pkl.gz"
    mnist_pickle(pkl, pixels=27 * 27)
    refused(tmp_path / "a", "mnist", str(pkl), "expected float (N, 784)")
    pkl = tmp_path / "b" / "mnist.pkl.gz"
    mnist_pickle(pkl, labels=np.full(40, 12))
    refused(tmp_path / "b", "mnist", str(pkl), "labels outside 0..9 (found 12..12)")
    pkl = tmp_path / "c" / "mnist.pkl.gz"
    pkl.parent.mkdir()
    pkl.write_bytes(gzip.compress(pickle.dumps({"train": [1, 2]})))
    refused(tmp_path / "c", "mnist", str(pkl), "expected (train, valid, test) pairs")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_pickle_that_would_run_code_is_refused_unrun(tmp_path) -> None:
    pkl = tmp_path / "d" / "mnist.pkl.gz"
    pkl.parent.mkdir()
    pkl.write_bytes(gzip.compress(pickle.dumps([(_Evil(), np.zeros(1))] * 3)))
    refused(tmp_path / "d", "mnist", str(pkl), "system", "not to numpy arrays")


def test_a_truncated_mnist_pickle_is_one_line_from_sweep_run_not_aborted(tmp_path) -> None:
    pkl = tmp_path / "d" / "mnist.pkl.gz"
    data = mnist_pickle(pkl)
    pkl.write_bytes(data[:-40])
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({
        "name": "g", "dataset": "mnist", "model": "lenet5", "recipe": {"preset": "buda_mnist", "iters": 2},
        "max_per_class": 2, "imbalance": {"none": {}}, "methods": ["baseline"], "resources": {"cpu": 1, "gpu": 0}}))
    res = CliRunner().invoke(cli, ["run", str(grid), "--store", str(tmp_path / "s"), "--data-dir", str(tmp_path / "d"),
                                   "-q"])
    assert res.exit_code == 1, res.output
    assert "Aborted" not in res.output and res.output.startswith(f"Error: {pkl}: "), res.output
    assert res.output.count("\n") == 1, res.output
    assert not (tmp_path / "s" / "_grids").exists()  # no sweep recorded


# -- IDX ----------------------------------------------------------------------------------------

def test_random_idx_files_name_the_file(tmp_path) -> None:
    rng = np.random.default_rng(5)
    raw = write_idx_set(tmp_path / "d", f0=rng.bytes(5000))
    refused(tmp_path / "d", "mnist", str(raw / IDX_NAMES[0]), "not an IDX file")


def test_a_gzipped_idx_file_that_is_truncated(tmp_path) -> None:
    raw = write_idx_set(tmp_path / "d")
    data = gzip.compress((raw / IDX_NAMES[0]).read_bytes())
    (raw / IDX_NAMES[0]).unlink()
    (raw / (IDX_NAMES[0] + ".gz")).write_bytes(data[: len(data) - 100])
    refused(tmp_path / "d", "mnist", str(raw / (IDX_NAMES[0] + ".gz")), "truncated or corrupt")


@pytest.mark.parametrize("replace, file, needles", [
    pytest.param({"f0": idx_bytes(np.zeros((30, 27, 27)))}, 0, ["images of 27x27 pixels, expected 28x28"],
                 id="wrong-image-shape"),
    pytest.param({"f0": idx_bytes(np.zeros((30, 28, 28)))[:-10]}, 0, ["body has", "bytes"], id="short-body"),
    pytest.param({"f0": idx_bytes(np.zeros((30, 28, 28))) + b"extra"}, 0, ["body has more bytes"], id="long-body"),
    pytest.param({"f0": idx_bytes(np.zeros(0), dims=(4_000_000_000, 28, 28))}, 0,
                 ["header says 4,000,000,000 items"], id="huge-header"),
    pytest.param({"f1": idx_bytes(np.full(30, 10))}, 1, ["labels outside 0..9 (found 10..10)"], id="label-10"),
    pytest.param({"f3": idx_bytes(np.arange(19) % 10)}, 3, ["19 labels", "for 20 images"], id="label-count"),
    pytest.param({"f1": idx_bytes(np.zeros((30, 28, 28)))}, 1, ["not an IDX file", "1 dimensions"],
                 id="images-as-labels"),
])
def test_idx_files_of_the_wrong_shape_or_labels(tmp_path, replace, file, needles) -> None:
    raw = write_idx_set(tmp_path / "d", **replace)
    refused(tmp_path / "d", "mnist", str(raw / IDX_NAMES[file]), *needles)


# -- CIFAR-10 batches -----------------------------------------------------------------------------

def write_cifar(root: Path, bad: dict | bytes | None = None) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8), b"labels": list(range(10))}
        (folder / name).write_bytes(pickle.dumps(batch))
    if bad is not None:
        (folder / "data_batch_3").write_bytes(bad if isinstance(bad, bytes) else pickle.dumps(bad))
    return folder / "data_batch_3"


@pytest.mark.parametrize("bad, needles", [
    pytest.param({b"data": np.zeros((10, 3072), np.uint8), b"labels": [0] * 9 + [11]},
                 ["labels outside 0..9 (found 0..11)"], id="label-out-of-range"),
    pytest.param({b"data": np.zeros((10, 3072), np.uint8), b"labels": [0] * 9}, ["9 labels", "for 10 images"],
                 id="label-count"),
    pytest.param({b"data": np.zeros((10, 1000), np.uint8), b"labels": [0] * 10}, ["expected uint8 (N, 3072)"],
                 id="wrong-shape"),
    pytest.param({b"data": np.zeros((10, 3072), np.uint8), b"labels": ["cat"] * 10}, ["labels are <U3"],
                 id="labels-not-numbers"),
    pytest.param({b"images": 1}, ["not a CIFAR-10 batch"], id="no-data"),
    pytest.param(b"\x80\x04random bytes", ["truncated or corrupt"], id="garbage"),
])
def test_a_bad_cifar_batch_names_the_file(tmp_path, bad, needles) -> None:
    path = write_cifar(tmp_path / "d", bad)
    refused(tmp_path / "d", "cifar10", str(path), *needles)


def test_good_files_still_load_and_a_bad_cache_is_rebuilt(tmp_path) -> None:
    write_cifar(tmp_path / "d")
    ds = load_dataset("cifar10", data_dir=str(tmp_path / "d"))
    assert ds.train_x.shape == (50, 3, 32, 32)
    # A cache whose labels were damaged (say by hand) is rebuilt from the files, not trusted.
    [cache] = (tmp_path / "cache" / "datasets").glob("*.npz")
    with np.load(cache) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["train_y"] = np.full_like(arrays["train_y"], 99)
    np.savez(cache, **arrays)
    datasets.clear_memo()
    again = load_dataset("cifar10", data_dir=str(tmp_path / "d"))
    assert int(again.train_y.max()) == 9


# -- SVHN -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("x, y, needles", [
    pytest.param(np.zeros((32, 32, 3, 10), np.uint8), np.arange(10).reshape(-1, 1), ["labels outside 1..10 (found 0)"],
                 id="label-0"),
    pytest.param(np.zeros((32, 32, 3, 10), np.uint8), np.full((10, 1), 11), ["labels outside 0..10 (found 11..11)"],
                 id="label-11"),
    pytest.param(np.zeros((28, 28, 1, 10), np.uint8), np.arange(1, 11).reshape(-1, 1),
                 ["expected uint8 (32, 32, 3, N)"], id="wrong-shape"),
    pytest.param(np.zeros((32, 32, 3, 10), np.uint8), np.arange(1, 10).reshape(-1, 1), ["9 labels", "for 10 images"],
                 id="label-count"),
    pytest.param(None, None, ["cannot be read as an SVHN .mat file"], id="garbage"),
])
def test_a_bad_svhn_file_names_the_file(tmp_path, monkeypatch, x, y, needles) -> None:
    from scipy.io import savemat

    monkeypatch.setattr(datasets, "SVHN_PER_CLASS", (1, 1))
    folder = tmp_path / "svhn"
    folder.mkdir()
    savemat(folder / "test_32x32.mat", {"X": np.zeros((32, 32, 3, 10), np.uint8), "y": np.arange(1, 11).reshape(-1, 1)})
    if x is None:
        (folder / "train_32x32.mat").write_bytes(b"MATLAB 5.0 MAT-file, truncated" + bytes(50))
    else:
        savemat(folder / "train_32x32.mat", {"X": x, "y": y})
    refused(tmp_path, "svhn", str(folder / "train_32x32.mat"), *needles)


def test_too_few_svhn_images_of_a_class_names_the_file(tmp_path, monkeypatch) -> None:
    from scipy.io import savemat

    monkeypatch.setattr(datasets, "SVHN_PER_CLASS", (5, 1))
    (tmp_path / "svhn").mkdir()
    for split in ("train", "test"):
        savemat(tmp_path / "svhn" / f"{split}_32x32.mat",
                {"X": np.zeros((32, 32, 3, 10), np.uint8), "y": np.arange(1, 11).reshape(-1, 1)})
    refused(tmp_path, "svhn", str(tmp_path / "svhn" / "train_32x32.mat"), "1 examples, 5 needed")
