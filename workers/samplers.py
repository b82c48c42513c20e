"""Per-network mini-batch index streams.

Floor: workers (trial execution; imports sweep.core and sweep.store only).

Each network walks its own index set (the imbalanced, possibly re-sampled subset)
in epochs, reshuffled every epoch from its own generator, like Caffe reading a
shuffled database. Streams are produced in chunks of iterations and stacked over
the pack's members, so the device receives one index tensor per chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


class EpochSampler:
    """Batches of ``batch_size`` indices from ``indices``, reshuffled every epoch."""

    def __init__(self, indices: np.ndarray, batch_size: int, seed: int) -> None:
        if len(indices) == 0:
            raise ValueError("cannot sample batches from an empty training set")
        self.indices = np.asarray(indices, dtype=np.int64)
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)
        self._order = self.rng.permutation(self.indices)
        self._pos = 0

    def take(self, iters: int) -> np.ndarray:
        """The next ``iters`` batches as an ``[iters, batch_size]`` array."""
        need = iters * self.batch_size
        out = np.empty(need, dtype=np.int64)
        filled = 0
        while filled < need:
            if self._pos == len(self._order):
                self._order = self.rng.permutation(self.indices)
                self._pos = 0
            n = min(need - filled, len(self._order) - self._pos)
            out[filled:filled + n] = self._order[self._pos:self._pos + n]
            filled += n
            self._pos += n
        return out.reshape(iters, self.batch_size)

    def state(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state, "order": self._order, "pos": self._pos}

    def load_state(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self._order = np.asarray(state["order"], dtype=np.int64)
        self._pos = int(state["pos"])


def take_stacked(samplers: Sequence[EpochSampler], iters: int, out: np.ndarray | None = None) -> np.ndarray:
    """``[iters, P, batch]`` indices for all members (members keep their own streams),
    written into ``out`` when given (a staging buffer)."""
    return np.stack([s.take(iters) for s in samplers], axis=1, out=out)
