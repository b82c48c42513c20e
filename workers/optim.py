"""SGD with momentum for packed parameters, and learning-rate tables.

Floor: workers (trial execution; imports sweep.core and sweep.store only).

Every member has its own learning rate at every iteration (lr searches, two-phase
factors, different schedules in one pack), so the step takes a ``[P]`` vector.
The update is PyTorch's SGD (buf = m*buf + g + wd*w; w -= lr*buf), applied to
stacked tensors: a handful of fused element-wise kernels per step for all members.
Caffe (Buda et al.) keeps the lr inside the buffer (v = m*v + lr*(g + wd*w); w -= v): the
two agree exactly under a constant lr and differ by the lr's change over the momentum's
memory otherwise: under the MNIST recipe's inv policy the lr falls by at most 0.75e-4 per
step and momentum 0.9 remembers about 9 steps, so a step differs by at most 6.75e-4 of its
size (tests/test_packed_oracles.py checks both, and this form against torch.optim.SGD).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from sweep.core.spec import LrPolicy, Recipe


def lr_at(recipe: Recipe, base_lr: float, t: np.ndarray) -> np.ndarray:
    """Learning rate at iterations ``t`` (0-based) under the recipe's policy."""
    t = np.asarray(t, dtype=np.float64)
    if recipe.lr_policy == LrPolicy.INV:
        lr = base_lr * (1.0 + recipe.lr_gamma * t) ** (-recipe.lr_power)
    elif recipe.lr_policy == LrPolicy.MULTISTEP:
        passed = np.searchsorted(np.asarray(recipe.lr_milestones), t, side="right")
        lr = base_lr * recipe.lr_gamma ** passed
    elif recipe.lr_policy == LrPolicy.LINEAR:
        lr = base_lr * np.clip(1.0 - t / recipe.iters, 0.0, 1.0)
    elif recipe.lr_policy == LrPolicy.CONSTANT:
        lr = np.full_like(t, base_lr)
    else:  # pragma: no cover - closed enum
        raise ValueError(f"unknown lr policy {recipe.lr_policy!r}")
    if recipe.warmup_iters > 0:
        lr = lr * np.minimum(1.0, (t + 1) / recipe.warmup_iters)
    return lr


def lr_table(recipes: Sequence[Recipe], base_lrs: Sequence[float], iters: int) -> np.ndarray:
    """``[iters, P]`` learning rates, one column per member."""
    t = np.arange(iters)
    return np.stack([lr_at(r, lr, t) for r, lr in zip(recipes, base_lrs)], axis=1).astype(np.float32)


class PackedSGD:
    """Momentum SGD over parameters whose dim 0 (or BatchNorm's P*C) indexes members."""

    def __init__(self, params: Sequence[nn.Parameter], members: int, momentum: Tensor,
                 weight_decay: Tensor, bias_lr_factor: Tensor | None = None,
                 biases: Sequence[nn.Parameter] = ()) -> None:
        self.params = list(params)
        self.members = members
        self.momentum = momentum  # [P]
        self.weight_decay = weight_decay  # [P]
        # Per parameter: None (the step's lr) or a [P] multiplier of it (Caffe's lr_mult
        # of biases). Weight decay is not scaled (Caffe's decay_mult stays 1).
        bias_ids = {id(b) for b in biases}
        self.lr_factors: list[Tensor | None] = [
            bias_lr_factor if bias_lr_factor is not None and id(p) in bias_ids else None for p in self.params]
        self.buffers: list[Tensor | None] = [None] * len(self.params)

    def _per_member(self, v: Tensor, p: Tensor) -> Tensor:
        """Broadcast a [P] vector over a parameter laid out [P, ...] or [P*C]."""
        if p.shape[0] == self.members:
            return v.view(-1, *([1] * (p.dim() - 1)))
        return v.repeat_interleave(p.shape[0] // self.members)  # BatchNorm [P*C]

    @torch.no_grad()
    def step(self, lr: Tensor) -> None:
        # Three fused passes per parameter and no temporaries: packed parameters outgrow
        # the CPU caches, so every extra pass over them costs memory bandwidth.
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None:
                continue
            factor = self.lr_factors[i]
            rate = lr if factor is None else lr * factor
            g.addcmul_(p, self._per_member(self.weight_decay, p))  # g + wd*w (zero_grad drops g)
            buf = self.buffers[i]
            if buf is None:
                buf = self.buffers[i] = g.clone()  # PyTorch: first step buf = g
            else:
                torch.addcmul(g, buf, self._per_member(self.momentum, p), out=buf)  # m*buf + g
            p.addcmul_(buf, self._per_member(rate, p), value=-1.0)  # w -= lr*buf

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state(self) -> list[Tensor | None]:
        return [None if b is None else b.detach().cpu() for b in self.buffers]

    def load_state(self, buffers: Sequence[Tensor | None], device: torch.device) -> None:
        self.buffers = [None if b is None else b.to(device) for b in buffers]
