"""Which members' losses went non-finite, read from the device without stalling it.

Floor: workers (trial execution; imports sweep.core and sweep.store only). The engine's
step writes each member's first non-finite iteration into a device tensor;
:class:`DivergenceWatch` copies it to the host asynchronously on CUDA, and
:func:`note_divergence` records it in the stage's state (a diverged member's learning rate
stays masked to zero, on the device). ``state`` is the engine's ``StageState`` (its
``diverged_at``), not imported here: the engine imports this module.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)


class DivergenceWatch:
    """Reads the members' first non-finite iteration without stalling the device: each poll
    queues a copy and notes the copy the previous poll queued, if it has landed."""

    def __init__(self, first_bad: Tensor) -> None:
        self.first_bad = first_bad
        self.cuda = first_bad.device.type == "cuda"
        self.host = torch.empty(first_bad.shape, dtype=first_bad.dtype, pin_memory=self.cuda)
        self.landed: torch.cuda.Event | None = None

    def poll(self, state: Any) -> None:
        if not self.cuda:
            note_divergence(state, self.first_bad)
            return
        if self.landed is not None:
            if not self.landed.query():
                return  # still in flight: look again at the next poll
            note_divergence(state, self.host)
        self.host.copy_(self.first_bad, non_blocking=True)
        self.landed = torch.cuda.Event()
        self.landed.record()


def note_divergence(state: Any, first_bad: Tensor) -> None:
    fb = first_bad.cpu().numpy()
    newly = (fb >= 0) & (state.diverged_at < 0)
    if newly.any():
        log.warning("members %s diverged (non-finite loss); the others go on", np.flatnonzero(newly).tolist())
    state.diverged_at = np.where(state.diverged_at < 0, fb, state.diverged_at)
