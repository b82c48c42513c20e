"""Packed models: P networks of one architecture trained as one module.

Every model splits into ``body`` (frozen in two-phase phase 2 and in classifier
re-training) and ``head`` (the output layer(s) those stages train). ``forward``
returns the penultimate features FE (after ReLU, Dablain et al.) and the logits,
both ``[P, B, ...]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.packed_layers import (
    PackedBatchNorm2d,
    PackedConv2d,
    PackedLinear,
    from_grouped,
    to_grouped,
)


class PackedNet(nn.Module):
    """Base class: P members, per-member init and per-member state access."""

    members: int
    head_names: tuple[str, ...] = ()  # submodules trained by phase 2 / re-training

    def body(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def head(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Body output -> (features FE [P,B,F], logits [P,B,K])."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.head(self.body(x))

    def classifier(self) -> PackedLinear | None:
        """The final linear layer W_C (FE -> logits) when the model has one."""
        return None

    def reset_parameters(self, init: str, seeds: Sequence[int]) -> None:
        if len(seeds) != self.members:
            raise ValueError(f"{len(seeds)} seeds for {self.members} members")
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        # Layers in registration order, each drawing from every member's own stream.
        for m in self.modules():
            if hasattr(m, "reset") and m is not self:
                m.reset(init, gens)

    def head_parameters(self) -> list[nn.Parameter]:
        return [p for n in self.head_names for p in getattr(self, n).parameters()]

    # -- per-member state ---------------------------------------------------------------
    def _member_tensors(self) -> dict[str, Tensor]:
        """Every parameter and buffer, viewed as [P, ...]."""
        out: dict[str, Tensor] = {}
        for mod_name, mod in self.named_modules():
            for name, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
                if t.dim() == 0:
                    continue  # BatchNorm's shared step counter
                key = f"{mod_name}.{name}" if mod_name else name
                out[key] = t.view(self.members, -1) if isinstance(mod, PackedBatchNorm2d) else t
        return out

    def member_state(self, p: int) -> dict[str, Tensor]:
        return {k: t[p].detach().clone() for k, t in self._member_tensors().items()}

    def load_member_state(self, p: int, state: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for k, t in self._member_tensors().items():
                t[p].copy_(state[k].reshape(t[p].shape))


class LeNet5(PackedNet):
    """Caffe's LeNet-5 (Buda et al. Table 2): conv20-5 / pool / conv50-5 / pool / fc500 / relu / fc10."""

    head_names = ("fc2",)

    def __init__(self, members: int, num_classes: int = 10, in_shape: tuple[int, int, int] = (1, 28, 28)) -> None:
        super().__init__()
        c, h, w = in_shape
        self.members = members
        self.conv1 = PackedConv2d(members, c, 20, 5)
        self.conv2 = PackedConv2d(members, 20, 50, 5)
        side_h, side_w = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2  # two conv5 + pool2
        flat = 50 * side_h * side_w
        self.fc1 = PackedLinear(members, flat, 500)
        self.fc2 = PackedLinear(members, 500, num_classes)

    def body(self, x: Tensor) -> Tensor:
        z = F.max_pool2d(self.conv1(to_grouped(x)), 2)
        z = F.max_pool2d(self.conv2(z), 2)
        return F.relu(self.fc1(from_grouped(z, self.members)))

    def head(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return z, self.fc2(z)

    def classifier(self) -> PackedLinear:
        return self.fc2


ModelFactory = Callable[[int, int, tuple[int, int, int]], PackedNet]
MODELS: dict[str, ModelFactory] = {"lenet5": LeNet5}


def build_model(name: str, members: int, num_classes: int, in_shape: tuple[int, int, int]) -> PackedNet:
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r} (allowed: {', '.join(MODELS)})") from None
    return factory(members, num_classes, in_shape)
