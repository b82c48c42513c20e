"""Measures what ``sweep.core.catalog.FOOTPRINTS`` records: a model's size in values.

Floor: workers (trial execution; imports sweep.core and sweep.store only).

Pack planning (``sweep.core.plan.pack_size``) must run where torch is not wanted (the
driver, ``sweep expand``), so it reads the catalog's table; a test checks the table
against this measurement for every model and dataset. The model is run once on the CPU
(one member, two images, training mode) and every tensor autograd saves for the
backward pass is counted once (parameters aside): that is what a training step keeps
per image, whatever the layers fuse or compute functionally.
"""

from __future__ import annotations

import torch

from sweep.core.catalog import DATASETS, model_revision
from workers.models import build_model

PROBE_IMAGES = 2  # BatchNorm needs more than one image per channel in training mode


def measure_footprint(model: str, dataset: str) -> tuple[int, int]:
    """(parameters of one member, values saved for the backward pass per image)."""
    info = DATASETS[dataset]
    net = build_model(model, 1, info.num_classes, info.image_shape, model_revision(model, dataset))
    params = {p.data_ptr() for p in net.parameters()}
    saved: dict[tuple[int, int], int] = {}  # (storage pointer, offset) -> values, each tensor once

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in params:
            saved[(t.untyped_storage().data_ptr(), t.storage_offset())] = t.numel()
        return t

    net.train()
    x = torch.zeros(1, PROBE_IMAGES, *info.image_shape)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x)[1].sum()
    return sum(p.numel() for p in net.parameters()), sum(saved.values()) // PROBE_IMAGES
