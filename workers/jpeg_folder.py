"""ImageNet folders streamed from their JPEGs: Buda et al.'s 224-px regime (dataset ``imagenet224``).

Floor: workers (trial execution; imports sweep.core and sweep.store only).

Buda et al. Sec. 3.3.3: "The only data preprocessing applied is resizing such that the
smaller dimension is 256 pixels long and the aspect ratio is preserved. During training,
as input we use a randomly cropped 224 x 224 pixel square patch and a single centered crop
in a test phase. Moreover, during training we randomly mirror images". Caffe's data layer
(their framework; the ResNet-10 reference, cvjena/cnn-models ResNet10_cvgj, reads
pre-scaled images with ``crop_size: 224, mirror: true``) draws the crop offsets uniformly in
``0..H-224`` and ``0..W-224`` and mirrors with probability 1/2; its test phase crops at
``((H-224)/2, (W-224)/2)`` (integer division). That is what this module does:

- :func:`scan_folders` lists ``<root>/{train,val}/<class>/*.{JPEG,jpg,jpeg,png}`` (the layout
  ``torchvision.datasets.ImageFolder`` reads, and ``torchvision.datasets.ImageNet`` leaves
  after it has sorted the devkit's validation images into class folders). Labels are the
  class folders' indices in sorted order; a missing folder, a validation folder holding loose
  images (ILSVRC's flat ``val/``), a class without images or a validation class unknown to
  training raise :class:`JpegFolderError` naming the path.
- :class:`JpegImages` is one split: its file list and labels, with the shape
  ``[N, 3, CROP, CROP]`` the rest of the worker expects of an image table. Indexing it
  (``x[i:j]``, ``x[idx]``) decodes those images' centred crops (evaluation, curves, latent
  statistics); :meth:`JpegImages.crops` decodes random crops by a member's draws.
- :class:`ResizeCropDraws` is each network's own stream of crop offsets and mirror bits
  (one float64 per image, as ``workers.augment.CropFlipDraws``: the same crops alone or in
  any pack, whatever the chunking, and a checkpoint resumes it exactly).
- ``workers.crop_stream.CropStream`` feeds a training stage from a :class:`JpegImages`,
  decoding the next steps' batches in the background.

What feeds the GPU (``Decoder``). ``cpu``: a thread pool of Pillow decoders (libjpeg-turbo;
Pillow releases the GIL while decoding and resizing, so threads scale with cores; a process
pool would add a pickling copy of every batch for nothing). A 224-px crop is made by
resizing only its window of the source image (``Image.resize(box=...)``: the same pixel
mapping as resizing the whole image to the 256-px shorter side and cutting the crop, at a
fraction of the work). ``cuda``: the files are read on the host and decoded in one batched
call of ``torchvision.io.decode_jpeg(..., device="cuda")`` (nvJPEG), then resized and cropped
on the device; an image nvJPEG refuses (CMYK, a PNG named .JPEG: a few in ILSVRC-2012) is
decoded by Pillow instead. ``bench/jpeg_feed.py`` measures both (bench/RESULTS.md).
torchvision 0.29 deprecates its image decoders in favour of TorchCodec's (a DeprecationWarning
on first use); the nvJPEG path is written against torchvision.io while it lasts.

Resizing is Pillow's / torchvision's antialiased bilinear filter; Caffe's reference read
images its authors had pre-scaled with a tool they do not name, so the interpolation is
ours. Nothing is cached: every epoch decodes its JPEGs again, as Caffe's ImageData layer does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sweep.core.catalog import DATASETS
from sweep.core.errors import UserError

RESIZE_SIDE: int = 256  # Buda: "the smaller dimension is 256 pixels long"; tests shrink it
CROP_SIDE: int = DATASETS["imagenet224"].image_shape[-1]  # 224; tests shrink it
IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpeg", ".jpg", ".png"})
_FRACTION_BITS = 21  # crop offsets: a 21-bit fraction of the room, per axis
_FRACTION = 1 << _FRACTION_BITS


class Decoder(StrEnum):
    """Where JPEGs are decoded (module doc)."""

    AUTO = "auto"  # nvJPEG where the images go to a CUDA device, Pillow threads elsewhere
    CPU = "cpu"  # Pillow in a thread pool
    CUDA = "cuda"  # nvJPEG through torchvision.io.decode_jpeg, batched


class JpegFolderError(UserError, ValueError):
    """An ImageNet folder is missing or malformed; the one-line message names the path."""


# -- listing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FolderListing:
    """Both splits of an ImageNet folder: files, labels and the class names (folder names)."""

    root: Path
    classes: tuple[str, ...]
    train_files: tuple[str, ...]
    train_labels: np.ndarray  # int64 [N]
    val_files: tuple[str, ...]
    val_labels: np.ndarray


def scan_folders(root: Path) -> FolderListing:
    """List ``root/{train,val}/<class>/<image>`` (module doc); raise JpegFolderError naming
    the path that is missing or malformed."""
    root = Path(root)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise JpegFolderError(f"{root / split}: no such folder (expected {root}/{{train,val}}/<class>/*.JPEG)")
    classes = tuple(sorted(p.name for p in (root / "train").iterdir() if p.is_dir()))
    if not classes:
        raise JpegFolderError(f"{root / 'train'}: no class folders (expected train/<class>/*.JPEG)")
    train_files, train_labels = _list_split(root / "train", classes, every_class=True)
    val_files, val_labels = _list_split(root / "val", classes, every_class=False)
    if not val_files:
        raise JpegFolderError(f"{root / 'val'}: no images in its class folders")
    return FolderListing(root, classes, train_files, train_labels, val_files, val_labels)


def _list_split(folder: Path, classes: Sequence[str], every_class: bool) -> tuple[tuple[str, ...], np.ndarray]:
    loose = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if loose:
        raise JpegFolderError(
            f"{folder}: holds {len(loose)} image(s) directly ({loose[0]}, ...), not in class folders: sort them "
            f"into {folder.name}/<class>/ (torchvision.datasets.ImageNet does it from the ILSVRC devkit)")
    index = {c: i for i, c in enumerate(classes)}
    files: list[str] = []
    labels: list[int] = []
    for d in sorted(p for p in folder.iterdir() if p.is_dir()):
        if d.name not in index:
            raise JpegFolderError(f"{d}: class folder not among the training classes ({len(classes)} in "
                                  f"{folder.parent / 'train'})")
        images = sorted(str(p) for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not images and every_class:
            raise JpegFolderError(f"{d}: a class folder without images (*.JPEG, *.jpg, *.png)")
        files += images
        labels += [index[d.name]] * len(images)
    return tuple(files), np.asarray(labels, dtype=np.int64)


# -- one image ---------------------------------------------------------------------------------


def resized_size(width: int, height: int, side: int) -> tuple[int, int]:
    """(width, height) once the shorter side is ``side``, the aspect kept (rounded)."""
    if width <= height:
        return side, max(side, round(height * side / width))
    return max(side, round(width * side / height)), side


def crop_offsets(width: int, height: int, draw: np.ndarray | None, resize: int, crop: int) -> tuple[int, int, bool]:
    """(top, left, mirrored) of a ``crop`` square in the resized image: centred (Caffe's test
    phase: ``(H - crop) // 2``) when ``draw`` is None, else the draw's fractions of the room."""
    rw, rh = resized_size(width, height, resize)
    if draw is None:
        return (rh - crop) // 2, (rw - crop) // 2, False
    fy, fx, flip = (int(v) for v in draw)
    return (fy * (rh - crop + 1)) >> _FRACTION_BITS, (fx * (rw - crop + 1)) >> _FRACTION_BITS, bool(flip)


def decode_crop(path: str, draw: np.ndarray | None = None, resize: int | None = None,
                crop: int | None = None) -> np.ndarray:
    """uint8 ``[3, crop, crop]`` RGB: ``path`` resized to a ``resize``-px shorter side, cut at the
    draw's offsets (None: centred) and mirrored if it says so. Only the crop's window is
    resampled (the same pixels as resizing the whole image first)."""
    from PIL import Image  # pillow comes with torchvision

    resize, crop = resize or RESIZE_SIDE, crop or CROP_SIDE
    try:
        with Image.open(path) as img:
            w, h = img.size
            rw, rh = resized_size(w, h, resize)
            # Decode at a reduced DCT scale where the image is at least twice the size needed
            # (libjpeg's scaled IDCT, as the 32-px loader does); the window maps onto what is kept.
            img.draft("RGB", (rw, rh))
            img = img.convert("RGB")
            top, left, flip = crop_offsets(w, h, draw, resize, crop)
            sx, sy = img.size[0] / rw, img.size[1] / rh  # source pixels per resized pixel
            box = (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)
            out = np.asarray(img.resize((crop, crop), Image.Resampling.BILINEAR, box=box), dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise JpegFolderError(f"{path}: cannot be decoded as an image ({type(e).__name__}: {e})") from e
    out = out.transpose(2, 0, 1)
    return np.ascontiguousarray(out[:, :, ::-1] if flip else out)


# -- a split as an image table -------------------------------------------------------------------


class JpegImages:
    """One split's images, decoded on demand as ``crop``-px squares (module doc).

    Quacks like the worker's uint8 image tensors where the worker reads them: ``shape``,
    ``dtype``, ``dim()``, ``len()``, ``to(device)``, and indexing by an int, a slice or an
    index tensor/array of any shape, which returns the centred crops ``[*idx.shape, 3, S, S]``
    on the table's device. Random crops come from :meth:`crops`.
    """

    dtype = torch.uint8

    def __init__(self, files: Sequence[str], labels: np.ndarray, decoder: Decoder | str = Decoder.AUTO,
                 device: torch.device | str = "cpu", resize: int | None = None, crop: int | None = None,
                 threads: int | None = None) -> None:
        self.files = tuple(files)
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.files) != len(self.labels):
            raise ValueError(f"{len(self.files)} files but {len(self.labels)} labels")
        self.decoder = Decoder(decoder)
        self.device = torch.device(device)
        self.resize, self.crop = resize or RESIZE_SIDE, crop or CROP_SIDE
        if self.crop > self.resize:
            raise ValueError(f"a {self.crop}-px crop does not fit images resized to a {self.resize}-px side")
        self.threads = threads or min(32, os.cpu_count() or 1)
        self._pool: ThreadPoolExecutor | None = None

    # -- what the worker reads of an image tensor
    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.files), 3, self.crop, self.crop))

    def dim(self) -> int:
        return 4

    def __len__(self) -> int:
        return len(self.files)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "JpegImages":
        """The same table decoding onto ``device`` (``non_blocking``: a tensor's signature)."""
        return JpegImages(self.files, self.labels, self.decoder, device, self.resize, self.crop, self.threads)

    def __getitem__(self, index: Any) -> Tensor:
        if isinstance(index, slice):
            idx = np.arange(len(self.files))[index]
        elif isinstance(index, Tensor):
            idx = index.detach().cpu().numpy()
        else:
            idx = np.asarray(index)
        return self.crops(np.asarray(idx, dtype=np.int64), None)

    def __getstate__(self) -> dict[str, Any]:  # a thread pool does not pickle; a copy makes its own
        return {**self.__dict__, "_pool": None}

    # -- decoding
    def crops(self, idx: np.ndarray, draws: np.ndarray | None) -> Tensor:
        """uint8 ``[*idx.shape, 3, S, S]`` on the table's device: image ``idx[...]`` cut by
        ``draws[..., :]`` (:class:`ResizeCropDraws`), or centred where ``draws`` is None."""
        idx = np.asarray(idx, dtype=np.int64)
        flat = idx.reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= len(self.files)):
            raise IndexError(f"image index out of range 0..{len(self.files) - 1}")
        flat_draws = None if draws is None else np.asarray(draws).reshape(-1, 3)
        if self.decoder in (Decoder.CUDA, Decoder.AUTO) and self.device.type == "cuda":
            out = decode_crops_torchvision([self.files[i] for i in flat], flat_draws, self.resize, self.crop, self.device)
        else:
            out = torch.from_numpy(self._decode_cpu(flat, flat_draws))
            if self.device.type == "cuda":
                out = out.pin_memory().to(self.device, non_blocking=True)
            elif self.device.type != "cpu":
                out = out.to(self.device)
        return out.reshape(*idx.shape, 3, self.crop, self.crop)

    def _decode_cpu(self, flat: np.ndarray, draws: np.ndarray | None) -> np.ndarray:
        out = np.empty((len(flat), 3, self.crop, self.crop), dtype=np.uint8)
        if not len(flat):
            return out

        def one(k: int) -> None:
            out[k] = decode_crop(self.files[flat[k]], None if draws is None else draws[k], self.resize, self.crop)

        if self.threads <= 1 or len(flat) == 1:
            for k in range(len(flat)):
                one(k)
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="jpeg")
            list(self._pool.map(one, range(len(flat))))  # list(): raise the first decoder error here
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def decode_crops_torchvision(files: Sequence[str], draws: np.ndarray | None, resize: int, crop: int,
                             device: torch.device) -> Tensor:
    """uint8 ``[N, 3, crop, crop]``: torchvision.io's batched decoder on ``device`` (nvJPEG on
    CUDA; on the CPU libjpeg-turbo, where the tests check this path's crops against
    :func:`decode_crop`'s), then per image a resize to the shorter side and the crop there."""
    import torchvision.io as tio
    import torchvision.transforms.v2.functional as tvf

    data = [tio.read_file(f) for f in files]
    try:
        decoded = tio.decode_jpeg(data, mode=tio.ImageReadMode.RGB, device=device)
    except RuntimeError:  # one image nvJPEG refuses spoils the batch: decode one by one
        decoded = []
        for f, d in zip(files, data):
            try:
                decoded.append(tio.decode_jpeg(d, mode=tio.ImageReadMode.RGB, device=device))
            except RuntimeError:
                decoded.append(_pil_full(f).to(device))
    out = torch.empty((len(files), 3, crop, crop), dtype=torch.uint8, device=device)
    for k, img in enumerate(decoded):
        h, w = int(img.shape[-2]), int(img.shape[-1])
        rw, rh = resized_size(w, h, resize)
        top, left, flip = crop_offsets(w, h, None if draws is None else draws[k], resize, crop)
        window = tvf.resize(img, [rh, rw], antialias=True)[:, top:top + crop, left:left + crop]
        out[k] = window.flip(-1) if flip else window
    return out


def _pil_full(path: str) -> Tensor:
    """An image nvJPEG cannot decode, by Pillow, as uint8 [3, H, W]."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1).copy())
    except (OSError, ValueError) as e:
        raise JpegFolderError(f"{path}: cannot be decoded as an image ({type(e).__name__}: {e})") from e


# -- training crops ----------------------------------------------------------------------------


class ResizeCropDraws:
    """One network's stream of (row fraction, column fraction, mirror) per training image.

    One float64 of the network's own generator per image (so a network gets the same crops
    alone, in any pack and however the run is chunked): its 53 bits give two 21-bit
    fractions of the room the crop has in each axis, and the mirror bit.
    """

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def take(self, iters: int, batch_size: int) -> np.ndarray:
        """``[iters, batch_size, 3]`` int64: row and column fractions (0..2^21-1), mirror (0/1)."""
        bits = (self.rng.random((iters, batch_size)) * float(1 << 53)).astype(np.int64)  # exact: k / 2^53
        return np.stack([bits & (_FRACTION - 1), (bits >> _FRACTION_BITS) & (_FRACTION - 1), bits >> 52], axis=-1)

    def state(self) -> dict[str, Any]:
        return self.rng.bit_generator.state

    def load_state(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state


def open_folders(root: Path, decoder: Decoder | str = Decoder.AUTO) -> tuple[JpegImages, JpegImages, int]:
    """(train, test, number of classes) of the ImageNet folder ``root``."""
    listing = scan_folders(root)
    return (JpegImages(listing.train_files, listing.train_labels, decoder),
            JpegImages(listing.val_files, listing.val_labels, decoder), len(listing.classes))

