"""Training-image augmentation drawn from each network's own stream, applied on the device.

Floor: workers (trial execution; imports sweep.core and sweep.store only).

``crop_flip`` is Cao et al.'s CIFAR training transform (``RandomCrop(32, padding=4)`` then
``RandomHorizontalFlip()``), which Dablain et al. train with: each image is zero-padded by
``PAD`` pixels on every side, a window of the original size is cut at a random offset
(``dy, dx`` uniform in ``0..2*PAD``), and the window is mirrored left-right with
probability 1/2 (``Augmentation.CROP``, for digits: never mirrored). Padding is in pixel space (value 0) before normalisation, as
torchvision pads the image before ``Normalize``.

Randomness. Each network has a :class:`CropFlipDraws` seeded from its own id, and one
image's draw is one float64 of that stream (``rng.random``), turned into the three
choices. numpy yields the same doubles however a run splits its draws into chunks, so
a network gets the same crops alone or in any pack, whatever the chunking around
checkpoints, and a checkpoint of the stream's state resumes it exactly. The draws are
made on the host per chunk of iterations, like the batch indices, and sent with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sweep.core.spec import Augmentation
from workers.jpeg_folder import ResizeCropDraws

PAD = 4  # pixels of zero padding on each side (Cao et al.: RandomCrop(32, padding=4))
_OFFSETS = 2 * PAD + 1  # offsets 0..2*PAD on each axis
_CHOICES = _OFFSETS * _OFFSETS * 2  # (dy, dx, flip)


class CropFlipDraws:
    """One network's stream of (dy, dx, flip) per training image; ``mirror=False``: the crop
    alone (``Augmentation.CROP``, digits), every flip 0."""

    def __init__(self, seed: int, mirror: bool = True) -> None:
        self.rng = np.random.default_rng(seed)
        self.mirror = mirror

    def take(self, iters: int, batch_size: int) -> np.ndarray:
        """``[iters, batch_size, 3]`` int64: row offset, column offset (0..2*PAD), flip (0/1)."""
        choices = _CHOICES if self.mirror else _OFFSETS * _OFFSETS
        u = np.minimum((self.rng.random((iters, batch_size)) * choices).astype(np.int64), choices - 1)
        return np.stack([u % _OFFSETS, (u // _OFFSETS) % _OFFSETS, u // (_OFFSETS * _OFFSETS)], axis=-1)

    def state(self) -> dict[str, Any]:
        return self.rng.bit_generator.state

    def load_state(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state


def augment_stream(augmentation: Augmentation, seed: int) -> CropFlipDraws | ResizeCropDraws | None:
    """The draws a recipe's ``augmentation`` asks for (None: images as they are; for images
    streamed from JPEGs, their centred crops)."""
    if augmentation == Augmentation.NONE:
        return None
    if augmentation == Augmentation.RESIZE_CROP_FLIP:  # Buda's ImageNet crops (workers.jpeg_folder)
        return ResizeCropDraws(seed)
    if augmentation in (Augmentation.CROP_FLIP, Augmentation.CROP):
        return CropFlipDraws(seed, mirror=augmentation == Augmentation.CROP_FLIP)
    raise ValueError(f"unknown augmentation {augmentation!r} (allowed: {', '.join(a.value for a in Augmentation)})")


def identity_draws(iters: int, batch_size: int) -> np.ndarray:
    """The draws that leave an image as it is (a member of the pack without augmentation)."""
    out = np.zeros((iters, batch_size, 3), dtype=np.int64)
    out[..., :2] = PAD
    return out


def take_stacked_draws(draws: Sequence[CropFlipDraws | ResizeCropDraws | None], iters: int, batch_size: int,
                       out: np.ndarray | None = None) -> np.ndarray:
    """``[iters, P, batch, 3]`` draws of all members; members without a stream get the identity.
    Written into ``out`` when given (a staging buffer)."""
    return np.stack([identity_draws(iters, batch_size) if d is None else d.take(iters, batch_size)
                     for d in draws], axis=1, out=out)


def crop_flip(x: Tensor, draws: Tensor) -> Tensor:
    """Images ``[P, B, C, H, W]`` (any dtype) cropped and flipped by ``draws`` ``[P, B, 3]``.

    Pure indexing: out[i, j] = padded[i + dy, j' + dx] with j' = W-1-j when flipped, where
    ``padded`` is the image with PAD zero pixels around it; the padded image is never built.
    """
    p, b, c, h, w = x.shape
    if h != w:
        raise ValueError(f"crop_flip needs square images, got {h}x{w}")
    dy, dx, flip = draws[..., 0:1], draws[..., 1:2], draws[..., 2:3].bool()  # [P, B, 1]
    pos = torch.arange(h, device=x.device)
    rows = pos + dy - PAD  # [P, B, H]: source row of each output row
    cols = torch.where(flip, h - 1 - pos, pos) + dx - PAD  # [P, B, W]
    inside = ((rows >= 0) & (rows < h))[..., :, None] & ((cols >= 0) & (cols < w))[..., None, :]  # [P, B, H, W]
    r = rows.clamp(0, h - 1)[:, :, None, :, None].expand(p, b, c, h, w)
    k = cols.clamp(0, w - 1)[:, :, None, None, :].expand(p, b, c, h, w)
    out = x.gather(3, r).gather(4, k)
    return out * inside[:, :, None].to(out.dtype)
