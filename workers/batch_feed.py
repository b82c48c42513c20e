"""Each member's next batches, in device tables filled a chunk of iterations ahead.

Floor: workers (trial execution; imports sweep.core and sweep.store only).

A training step reads its batch indices (and crop/flip draws) from ``BatchFeed.idx`` /
``BatchFeed.draws`` at row ``BatchFeed.pos``, a device counter that the step advances
itself: the step needs nothing from the host, so a CUDA graph can replay it. Between
chunks the host refills the tables from the members' own seeded streams
(``EpochSampler``, ``CropFlipDraws``), so a member gets the same batches alone, in any
pack and after a resume, exactly as before the tables existed.

On CUDA the host writes a chunk into one of two pinned staging buffers and queues an
asynchronous copy on the training stream, behind the steps already queued: the copy
cannot overtake a step still reading the previous chunk, and the host computes the next
chunk while the GPU trains on this one. A staging buffer is rewritten only after its
previous copy has run (an event wait, not a device-wide sync).

Images streamed from JPEG folders (``workers.jpeg_folder``, dataset imagenet224) are not on
the device to be indexed: the feed hands each chunk's host tables to a
:class:`workers.crop_stream.CropStream`, which decodes the steps' crops ahead of them, and
:meth:`BatchFeed.images` returns the next decoded batch. Such a step reads from the host, so
it is not replayed as a CUDA graph (``BatchFeed.streamed``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from workers.augment import CropFlipDraws, crop_flip, take_stacked_draws
from workers.crop_stream import CropStream
from workers.jpeg_folder import JpegImages, ResizeCropDraws
from workers.samplers import EpochSampler, take_stacked


class BatchFeed:
    """Device tables ``idx`` [rows, P, B] (int64) and, with augmentation, ``draws``
    [rows, P, B, 3]; ``pos`` (0-dim int64) is the row the next step reads."""

    def __init__(self, samplers: Sequence[EpochSampler],
                 augment: Sequence[CropFlipDraws | ResizeCropDraws | None] | None,
                 batch_size: int, device: torch.device, rows: int, images: Tensor | JpegImages | None = None) -> None:
        self.samplers, self.augment = list(samplers), None if augment is None else list(augment)
        # Images streamed from JPEGs are decoded on the host side, ahead of the steps; a
        # tensor of images is on the device already, and each step indexes it.
        self.stream = CropStream(images) if isinstance(images, JpegImages) else None
        self.batch_size, self.device, self.rows = batch_size, device, rows
        p = len(self.samplers)
        shape = (rows, p, batch_size)
        self.idx = torch.zeros(shape, dtype=torch.int64, device=device)
        self.draws = None if self.augment is None else torch.zeros((*shape, 3), dtype=torch.int64, device=device)
        self.pos = torch.zeros((), dtype=torch.int64, device=device)
        self._pinned = device.type == "cuda"
        # Two host staging sets, alternated per chunk, each with the event of its last copy.
        self._staging = [self._host_tables(shape) for _ in range(2 if self._pinned else 1)]
        self._copied: list[torch.cuda.Event | None] = [None] * len(self._staging)
        self._turn = 0

    def _host_tables(self, shape: tuple[int, int, int]) -> tuple[Tensor, Tensor | None]:
        idx = torch.empty(shape, dtype=torch.int64, pin_memory=self._pinned)
        draws = None if self.augment is None else torch.empty((*shape, 3), dtype=torch.int64,
                                                              pin_memory=self._pinned)
        return idx, draws

    def load(self, iters: int) -> None:
        """Put the members' next ``iters`` batches in rows ``0..iters-1`` and rewind ``pos``."""
        if not 0 < iters <= self.rows:
            raise ValueError(f"a chunk of {iters} iterations does not fit {self.rows} table rows")
        turn = self._turn
        self._turn = (turn + 1) % len(self._staging)
        if self._copied[turn] is not None:
            self._copied[turn].synchronize()  # its previous copy has left the buffer
        idx, draws = self._staging[turn]
        # Each member's own stream, stacked straight into the staging rows.
        take_stacked(self.samplers, iters, out=idx.numpy()[:iters])
        if draws is not None:
            take_stacked_draws(self.augment, iters, self.batch_size, out=draws.numpy()[:iters])
        self.idx[:iters].copy_(idx[:iters], non_blocking=self._pinned)
        if draws is not None:
            self.draws[:iters].copy_(draws[:iters], non_blocking=self._pinned)
        if self.stream is not None:
            centred = [True] * len(self.samplers) if self.augment is None else [a is None for a in self.augment]
            self.stream.queue_chunk(idx.numpy()[:iters], None if draws is None else draws.numpy()[:iters], centred)
        if self._pinned:
            event = torch.cuda.Event()
            event.record()
            self._copied[turn] = event
        self.pos.zero_()

    def batch(self) -> tuple[Tensor, Tensor | None]:
        """This step's ``[P, B]`` indices and ``[P, B, 3]`` draws (device reads, no host sync)."""
        row = self.pos.view(1)
        idx = self.idx.index_select(0, row).squeeze(0)
        draws = None if self.draws is None else self.draws.index_select(0, row).squeeze(0)
        return idx, draws

    def advance(self) -> None:
        self.pos.add_(1)

    @property
    def streamed(self) -> bool:
        """Whether the step's images come from the host (JPEGs): no CUDA graph then."""
        return self.stream is not None

    def images(self, x: Tensor, batch: Tensor, draws: Tensor | None) -> Tensor:
        """This step's uint8 images ``[P, B, C, H, W]``: ``x[batch]`` cropped and flipped by
        ``draws``, or the next batch the stream decoded (``x`` is then a JpegImages)."""
        if self.stream is not None:
            return self.stream.next()
        return x[batch] if draws is None else crop_flip(x[batch], draws)
