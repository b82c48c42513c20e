"""Measures what ``sweep.catalog.FOOTPRINTS`` records: a model's size in values.

Pack planning (``sweep.plan.pack_size``) must run where torch is not wanted (the
driver, ``sweep expand``), so it reads the catalog's table; a test checks the table
against this measurement for every model and dataset. The model is run once on the CPU
with one member and two images, and the sizes of every layer's output are summed: what
autograd keeps for the backward pass, and what the backward pass allocates for the
gradients, is of that order.
"""

from __future__ import annotations

import torch

from sweep.catalog import DATASETS
from workers.models import build_model

PROBE_IMAGES = 2  # BatchNorm needs more than one image per channel in training mode


def measure_footprint(model: str, dataset: str) -> tuple[int, int]:
    """(parameters of one member, layer output values per image) of ``model`` on ``dataset``."""
    info = DATASETS[dataset]
    net = build_model(model, 1, info.num_classes, info.image_shape)
    values = 0

    def count(_module: torch.nn.Module, _inputs: object, output: object) -> None:
        nonlocal values
        for t in output if isinstance(output, tuple) else (output,):
            if isinstance(t, torch.Tensor):
                values += t.numel()

    hooks = [m.register_forward_hook(count) for m in net.modules() if not list(m.children())]
    try:
        net.train()
        with torch.no_grad():
            net(torch.zeros(1, PROBE_IMAGES, *info.image_shape))
    finally:
        for h in hooks:
            h.remove()
    return sum(p.numel() for p in net.parameters()), values // PROBE_IMAGES
