"""How much device memory one member of a packed model needs while it trains.

Pack planning (``sweep.plan.pack_size``) divides a GPU's memory by this figure, so
that a pack fills the GPU without running out of memory. The estimate is measured,
not tabulated: the model is run once on the CPU with one member and two images, and
the sizes of every layer's output are summed (what autograd keeps for the backward
pass, and what the backward pass allocates for the gradients, is of that order).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from sweep.catalog import DATASETS
from workers.models import build_model

FLOAT_BYTES = 4
# Per parameter: the weight, its gradient, the momentum buffer, and a best-state copy
# when a selection keeps one.
PARAMETER_COPIES = 4
# Per activation value kept for the backward pass: the value, its gradient, and the
# temporaries of the fused kernels (conservative; measured peaks stay below this).
ACTIVATION_COPIES = 3
PROBE_IMAGES = 2  # BatchNorm needs more than one image per channel in training mode


@lru_cache(maxsize=64)
def member_training_bytes(model: str, dataset: str, batch_size: int) -> int:
    """Bytes of device memory one member needs to train on ``batch_size`` images."""
    info = DATASETS[dataset]
    net = build_model(model, 1, info.num_classes, info.image_shape)
    params = sum(p.numel() for p in net.parameters())
    values = 0

    def count(_module: torch.nn.Module, _inputs: object, output: object) -> None:
        nonlocal values
        for t in output if isinstance(output, tuple) else (output,):
            if isinstance(t, torch.Tensor):
                values += t.numel()

    leaves = [m for m in net.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        net.train()
        with torch.no_grad():
            net(torch.zeros(1, PROBE_IMAGES, *info.image_shape))
    finally:
        for h in hooks:
            h.remove()
    # Functional ops between layers (ReLU, pooling) are not modules: count the input too.
    per_image = values / PROBE_IMAGES + 2 * int(torch.Size(info.image_shape).numel())
    return int(FLOAT_BYTES * (PARAMETER_COPIES * params + ACTIVATION_COPIES * per_image * batch_size))
