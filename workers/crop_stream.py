"""The training crops of a stage, decoded ahead of its steps (images streamed from JPEGs).

Floor: workers (trial execution; imports sweep.core and sweep.store only).

``workers.batch_feed.BatchFeed`` fills its host tables of indices and crop draws a chunk of
iterations at a time; for a dataset streamed from JPEG folders (``workers.jpeg_folder``) it
hands each chunk to a :class:`CropStream`, which keeps the next ``LOOKAHEAD_STEPS`` steps'
batches decoding in a background thread (Pillow's thread pool or nvJPEG underneath), so the
GPU trains on one batch while the next is decoded; each step takes the next batch in order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from workers.jpeg_folder import JpegImages

LOOKAHEAD_STEPS = 4  # training batches decoded ahead of the step that needs them


class CropStream:
    """A stage's training batches from a :class:`JpegImages`, decoded ahead of the steps.

    ``queue_chunk`` takes a chunk's host tables as ``BatchFeed`` fills them (indices
    ``[n, P, B]``, draws ``[n, P, B, 3]`` or None) and which members have no crop stream
    (they get centred crops); ``next`` returns the next step's uint8 ``[P, B, 3, S, S]`` on
    the device. A background thread keeps ``LOOKAHEAD_STEPS`` steps decoding, so the GPU
    trains on one batch while the CPU (or nvJPEG) decodes the next.
    """

    def __init__(self, images: JpegImages, lookahead: int = LOOKAHEAD_STEPS) -> None:
        self.images, self.lookahead = images, max(1, lookahead)
        self._waiting: deque[tuple[np.ndarray, np.ndarray | None, tuple[bool, ...]]] = deque()
        self._ready: deque[Future[Tensor]] = deque()
        self._worker: ThreadPoolExecutor | None = None

    def queue_chunk(self, idx: np.ndarray, draws: np.ndarray | None, centred: Sequence[bool] = ()) -> None:
        """Rows of a chunk (copied: the caller reuses its staging buffers)."""
        centred = tuple(centred) or (draws is None,) * idx.shape[1]
        for r in range(len(idx)):
            self._waiting.append((np.array(idx[r]), None if draws is None else np.array(draws[r]), centred))
        self._top_up()

    def next(self) -> Tensor:
        """The next queued step's images (waits for their decoding)."""
        if not self._ready:
            raise RuntimeError("a training step asked for a batch no chunk queued")
        out = self._ready.popleft().result()
        self._top_up()
        return out

    def _top_up(self) -> None:
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="crop-stream")
        while self._waiting and len(self._ready) < self.lookahead:
            self._ready.append(self._worker.submit(self._batch, *self._waiting.popleft()))

    def _batch(self, idx: np.ndarray, draws: np.ndarray | None, centred: tuple[bool, ...]) -> Tensor:
        if draws is None or all(centred):
            return self.images.crops(idx, None)
        if not any(centred):
            return self.images.crops(idx, draws)
        return torch.stack([self.images.crops(idx[p], None if c else draws[p]) for p, c in enumerate(centred)])

    def close(self) -> None:
        for f in self._ready:
            f.cancel()
        self._ready.clear()
        self._waiting.clear()
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
