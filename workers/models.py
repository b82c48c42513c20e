"""Packed models: P networks of one architecture trained as one module.

Floor: workers (trial execution; imports sweep.core and sweep.store only).
It is longer than 400 lines because it holds every architecture of the papers (LeNet-5,
All-CNN, ResNet-32, both ResNet-10 revisions) beside the one registry that builds them by
name and revision; their layers live in workers.packed_layers.

Every model splits into ``body`` (frozen in two-phase phase 2 and in classifier
re-training) and ``head`` (the output layer(s) those stages train). ``forward``
returns the penultimate features FE (after ReLU, Dablain et al.) and the logits,
both ``[P, B, ...]``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sweep.core.catalog import MODEL_REVISIONS
from sweep.core.spec import TrialSpec
from workers import noise
from workers.packed_layers import (
    PackedBasicBlock,
    PackedBatchNorm2d,
    PackedConv2d,
    PackedCosineLinear,
    PackedLinear,
    classifier_layer,
    fill_weight,
    from_grouped,
    grouped_avg_pool,
    to_grouped,
)

log = logging.getLogger(__name__)


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

    def classifier(self) -> PackedLinear | PackedCosineLinear | None:
        """The final layer W_C (FE -> logits) when the model has one; its ``linear_form``
        gives what it multiplies, as a linear layer."""
        return None

    def reset_parameters(self, init: str, seeds: Sequence[int]) -> None:
        if len(seeds) != self.members:
            raise ValueError(f"{len(seeds)} seeds for {self.members} members")
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        # Layers in registration order, each drawing from every member's own stream.
        for m in self.modules():
            if hasattr(m, "reset") and m is not self:
                m.reset(init, gens)

    # -- per-member noise (dropout) ------------------------------------------------------
    def seed_noise(self, seeds: Sequence[int]) -> None:
        """Seed each member's own random stream for dropout masks (default: 0..P-1).

        A member's masks then depend on its seed alone, not on the pack around it or on
        torch's global state: the same numbers alone or in any pack, run after run.
        """
        if len(seeds) != self.members:
            raise ValueError(f"{len(seeds)} seeds for {self.members} members")
        self._noise_seeds = [int(s) for s in seeds]
        self._noise_keys: Tensor | None = None
        self._noise_draws: Tensor | None = None

    def _noise(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """The members' keys [P] and the number of masks drawn so far (0-dim), on ``device``."""
        keys, draws = getattr(self, "_noise_keys", None), getattr(self, "_noise_draws", None)
        if keys is None or keys.device != device:
            seeds = getattr(self, "_noise_seeds", None) or list(range(self.members))
            keys = noise.member_keys(seeds, device)
            draws = torch.zeros((), dtype=torch.int64, device=device) if draws is None else draws.to(device)
            self._noise_keys, self._noise_draws = keys, draws
        return keys, draws

    def noise_state(self) -> dict[str, int] | None:
        """Where the members' dropout streams are (for checkpoints); None before any draw."""
        draws = getattr(self, "_noise_draws", None)
        return None if draws is None else {"dropout_draws": int(draws)}

    def load_noise_state(self, state: dict[str, int] | list[Tensor], device: torch.device) -> None:
        _, draws = self._noise(device)
        if not isinstance(state, dict):  # a checkpoint from before counter-based masks
            log.warning("the checkpoint holds dropout streams of an older format: masks restart "
                        "from the members' seeds (the run continues, not bit for bit)")
            draws.zero_()
            return
        draws.fill_(int(state["dropout_draws"]))

    def member_dropout(self, z: Tensor, rate: float) -> Tensor:
        """Dropout on grouped activations ``[B, P*C, H, W]``, member p's mask from member p's
        stream (``workers.noise``: counter-based, one kernel for all members on CUDA, no host work)."""
        if not self.training or rate == 0:
            return z
        keys, draws = self._noise(z.device)
        out = noise.member_dropout(z, self.members, keys, draws, 1.0 - rate)
        draws.add_(1)
        return out

    def bias_parameters(self) -> list[nn.Parameter]:
        """The additive biases of convolutions and linear layers (Caffe's second blob)."""
        return [m.bias for m in self.modules() if isinstance(m, (PackedConv2d, PackedLinear)) and m.bias is not None]

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


def _pool2(z: Tensor) -> Tensor:
    return F.max_pool2d(z, 2)


class LeNet5(PackedNet):
    """Caffe's LeNet-5 (Buda et al. Table 2): conv20-5 / pool / conv50-5 / pool / fc500 / relu / fc10."""

    head_names = ("fc2",)

    def __init__(self, members: int, num_classes: int = 10, in_shape: tuple[int, int, int] = (1, 28, 28),
                 head: str = "linear") -> None:
        super().__init__()
        c, h, w = in_shape
        self.members = members
        self.conv1 = PackedConv2d(members, c, 20, 5)
        self.conv2 = PackedConv2d(members, 20, 50, 5)
        side_h, side_w = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2  # two conv5 + pool2
        flat = 50 * side_h * side_w
        self.fc1 = PackedLinear(members, flat, 500)
        self.fc2 = classifier_layer(head, members, 500, num_classes)

    def body(self, x: Tensor) -> Tensor:
        z = self.conv1(to_grouped(x), then=_pool2)
        z = self.conv2(z, then=_pool2)
        return F.relu(self.fc1(from_grouped(z, self.members)))

    def head(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return z, self.fc2(z)

    def classifier(self) -> PackedLinear | PackedCosineLinear:
        return self.fc2


class AllCNN(PackedNet):
    """All-CNN-C (Springenberg et al. 2015), Buda et al.'s CIFAR-10 model (Table 3).

    ======================================  =========================================
    conv1..conv3  3x3 conv 96, 96, 96/2     pad 1, ReLU (conv3 has stride 2: 32 -> 16)
    conv4..conv6  3x3 conv 192, 192, 192/2  pad 1, ReLU (conv6 has stride 2: 16 -> 8)
    conv7         3x3 conv 192, valid       ReLU (8 -> 6)
    conv8         1x1 conv 192              ReLU                      \
    conv9         1x1 conv K                global average over 6x6   / head
    ======================================  =========================================

    Choices (Buda et al.'s table text is lost; this follows Springenberg's All-CNN-C):

    * ``conv9`` is a 1x1 convolution to the K classes followed by a ReLU and global
      average pooling, as in Buda et al.'s released All-CNN Caffe model (revision 2,
      ``relu_logits=True``): logits are therefore >= 0 and are not a linear map of the
      pooled features, so this network has no W_C in Dablain et al.'s sense
      (``classifier()`` is None; grids refuse latent statistics for it). Its weights
      live in ``fc`` (192 -> K, the same parameters as a 1x1 conv). Revision 1
      (``relu_logits=False``, stored before 2026-12) pooled first and had no ReLU:
      ``mean_hw(W x_hw + b) = W mean_hw(x_hw) + b``, FE = the pooled ReLU output of
      ``conv8`` (192-d) and W_C = ``fc``.
    * Dropout (``dropout=True``, the default): 20 % on the input and 50 % after
      each stride-2 layer (conv3, conv6), as Springenberg trained All-CNN-C. Buda
      et al. do not mention dropout, but they copy Springenberg's recipe otherwise
      (weight decay 1e-3, lr x0.1 after ~200/250/300 epochs, lr searched over a
      fixed set) and report 9.75 % test error without augmentation, close to
      Springenberg's 9.08 % with dropout; without dropout All-CNN-C overfits
      CIFAR-10 well above that. Pass ``dropout=False`` for the plain network.
      Dropout masks are drawn per element from each member's own random stream
      (``seed_noise``), so every member gets its own, the same alone or in a pack.
    * Two-phase training fine-tunes "the two last convolutional layers with kernels
      of size 1": ``head_names = ("conv8", "fc")``.

    1,369,738 parameters for 10 classes (Springenberg et al.: "1.4M").
    """

    head_names = ("conv8", "fc")

    def __init__(self, members: int, num_classes: int = 10, in_shape: tuple[int, int, int] = (3, 32, 32),
                 dropout: bool = True, channels_last: bool = False, relu_logits: bool = True) -> None:
        super().__init__()
        c = in_shape[0]
        self.members, self.dropout, self.channels_last = members, dropout, channels_last
        self.relu_logits, self.num_classes = relu_logits, num_classes
        self.conv1 = PackedConv2d(members, c, 96, 3, 1, 1)
        self.conv2 = PackedConv2d(members, 96, 96, 3, 1, 1)
        self.conv3 = PackedConv2d(members, 96, 96, 3, 2, 1)
        self.conv4 = PackedConv2d(members, 96, 192, 3, 1, 1)
        self.conv5 = PackedConv2d(members, 192, 192, 3, 1, 1)
        self.conv6 = PackedConv2d(members, 192, 192, 3, 2, 1)
        self.conv7 = PackedConv2d(members, 192, 192, 3, 1, 0)
        self.conv8 = PackedConv2d(members, 192, 192, 1)
        self.fc = PackedLinear(members, 192, num_classes)  # conv9 (1x1) after the pooling

    def _drop(self, z: Tensor, rate: float) -> Tensor:
        return self.member_dropout(z, rate) if self.dropout else z

    def body(self, x: Tensor) -> Tensor:
        z = self._drop(to_grouped(x, self.channels_last), 0.2)
        z = F.relu_(self.conv1(z))
        z = F.relu_(self.conv2(z))
        z = self._drop(F.relu_(self.conv3(z)), 0.5)
        z = F.relu_(self.conv4(z))
        z = F.relu_(self.conv5(z))
        z = self._drop(F.relu_(self.conv6(z)), 0.5)
        return F.relu_(self.conv7(z))  # [B, P*192, 6, 6]

    def head(self, z: Tensor) -> tuple[Tensor, Tensor]:
        h = F.relu(self.conv8(z))  # [B, P*192, h, w]
        fe = grouped_avg_pool(h, self.members)  # [P, B, 192]
        if not self.relu_logits:
            return fe, self.fc(fe)
        # Buda et al.'s model: conv9 (1x1, the fc weights at every position), ReLU, then pooling.
        w = self.fc.weight.transpose(1, 2).reshape(self.members * self.num_classes, -1, 1, 1)
        z9 = F.relu(F.conv2d(h, w, self.fc.bias.reshape(-1), groups=self.members))
        return fe, grouped_avg_pool(z9, self.members)

    def classifier(self) -> PackedLinear | None:
        # With the ReLU after conv9 the logits are not FE @ W_C + b: no W_C in Dablain's sense.
        return None if self.relu_logits else self.fc


class ResNet32(PackedNet):
    """ResNet-32 for 32x32 images (He et al. 2016, Sec. 4.2), as in LDAM-DRW / Dablain et al.

    3x3 conv 16 + BN + ReLU, three stages of ``n = 5`` basic blocks with 16, 32, 64
    channels (the first block of stages 2 and 3 has stride 2), global average pooling
    (FE: 64-d, after the last block's ReLU) and one linear layer ``fc`` (W_C).
    Depth 6n + 2 = 32. Shortcuts that change the shape are option A (subsample +
    zero-padded channels, no parameters), as in He et al.'s CIFAR experiments and the
    LDAM-DRW code Dablain et al. train with: 464,154 parameters for 10 classes, the
    "0.46M" of He et al.'s Table 6. ``shortcut="projection"`` gives option B.
    """

    head_names = ("fc",)
    widths = (16, 32, 64)

    def __init__(self, members: int, num_classes: int = 10, in_shape: tuple[int, int, int] = (3, 32, 32),
                 blocks_per_stage: int = 5, shortcut: str = "pad", channels_last: bool = False,
                 head: str = "linear") -> None:
        super().__init__()
        c = in_shape[0]
        self.members, self.channels_last = members, channels_last
        self.conv1 = PackedConv2d(members, c, 16, 3, 1, 1, bias=False)
        self.bn1 = PackedBatchNorm2d(members, 16)
        blocks: list[nn.Module] = []
        c_in = 16
        for stage, width in enumerate(self.widths):
            for i in range(blocks_per_stage):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(PackedBasicBlock(members, c_in, width, stride, shortcut))
                c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = classifier_layer(head, members, c_in, num_classes)

    def body(self, x: Tensor) -> Tensor:
        z = F.relu_(self.bn1(self.conv1(to_grouped(x, self.channels_last))))
        return grouped_avg_pool(self.blocks(z), self.members)  # FE [P, B, 64]

    def head(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return z, self.fc(z)

    def classifier(self) -> PackedLinear | PackedCosineLinear:
        return self.fc


class ResNet10(PackedNet):
    """ResNet-10 revision 1 (the 32-px ``imagenet`` stand-in keeps it; ``imagenet224`` builds
    revision 2, :class:`ResNet10PreAct`, the layout of Buda et al.'s reference): ResNet-18
    with one block per stage. It matches the paper's words (Sec. 3.3.3: four residual blocks,
    nine convolutional layers and one fully connected, 64 channels doubling per block) but
    not its reference's pre-activation layout.

    Stem: 7x7 conv 64 stride 2 + BN + ReLU + 3x3 max pool stride 2; four residual
    (basic) blocks of 64, 128, 256, 512 channels, strides 1, 2, 2, 2 - nine
    convolutional layers with the stem - then adaptive (global) average pooling (FE:
    512-d, after the last ReLU) and one linear layer ``fc`` to the classes. Shortcuts
    that change the shape are 1x1 conv + BN projections (He et al.'s ImageNet option
    B, not counted among the nine layers). Any square input works (224 in the paper).
    5,418,792 parameters for 1,000 classes (11,689,512 for ResNet-18 with two blocks per stage).
    """

    head_names = ("fc",)
    widths = (64, 128, 256, 512)

    def __init__(self, members: int, num_classes: int = 1000, in_shape: tuple[int, int, int] = (3, 224, 224),
                 channels_last: bool = False, head: str = "linear") -> None:
        super().__init__()
        c = in_shape[0]
        self.members, self.channels_last = members, channels_last
        self.conv1 = PackedConv2d(members, c, 64, 7, 2, 3, bias=False)
        self.bn1 = PackedBatchNorm2d(members, 64)
        blocks: list[nn.Module] = []
        c_in = 64
        for stage, width in enumerate(self.widths):
            blocks.append(PackedBasicBlock(members, c_in, width, 1 if stage == 0 else 2, "projection"))
            c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = classifier_layer(head, members, c_in, num_classes)

    def body(self, x: Tensor) -> Tensor:
        z = F.relu_(self.bn1(self.conv1(to_grouped(x, self.channels_last))))
        z = F.max_pool2d(z, 3, 2, 1)
        return grouped_avg_pool(self.blocks(z), self.members)  # FE [P, B, 512]

    def head(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return z, self.fc(z)

    def classifier(self) -> PackedLinear | PackedCosineLinear:
        return self.fc


class _FanOutConv2d(PackedConv2d):
    """A convolution whose Kaiming (MSRA) init uses the fan-out, ``c_out * k * k`` (Caffe's
    ``variance_norm: FAN_OUT``, on the ResNet-10 reference's first convolution)."""

    def reset(self, init: str, generators: Sequence[torch.Generator]) -> None:
        fan = self.c_out * self.kernel * self.kernel if init == "kaiming" else self.c_in * self.kernel * self.kernel
        fill_weight(self.weight, fan, init, generators)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class _PreActBlock(nn.Module):
    """P pre-activation basic blocks as in the ResNet-10 reference (cvjena ResNet10_cvgj).

    ``a = relu(bn(x))`` (none in the first block, whose input is the stem's ReLU output);
    ``conv2(relu(bn(conv1(a)))) + shortcut(a)``, the shortcut the identity or, where the
    width or resolution changes, a 1x1 convolution of ``a`` with the block's stride
    (``conv_expand``, no BatchNorm). No ReLU after the sum: the next block's or the last
    BatchNorm-ReLU comes first.
    """

    def __init__(self, members: int, c_in: int, c_out: int, stride: int, first: bool) -> None:
        super().__init__()
        self.pre_bn = None if first else PackedBatchNorm2d(members, c_in)
        self.conv1 = PackedConv2d(members, c_in, c_out, 3, stride, 1, bias=False)
        self.bn = PackedBatchNorm2d(members, c_out)
        self.conv2 = PackedConv2d(members, c_out, c_out, 3, 1, 1, bias=False)
        same = stride == 1 and c_in == c_out
        self.expand = None if same else PackedConv2d(members, c_in, c_out, 1, stride, 0, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        a = x if self.pre_bn is None else F.relu(self.pre_bn(x))
        out = self.conv2(F.relu_(self.bn(self.conv1(a))))
        return out.add_(a if self.expand is None else self.expand(a))


class ResNet10PreAct(PackedNet):
    """ResNet-10 revision 2: the layout of Buda et al.'s reference [60] (Simon et al.'s
    ImageNet models with batch normalisation; cvjena/cnn-models ResNet10_cvgj/train.prototxt,
    whose solver has every number of Buda's Sec. 3.3.3), a pre-activation ResNet.

    Input BatchNorm with a learnt scale and shift on the raw pixels (the reference's
    ``data_bn``: "no mean subtraction is required"); 7x7 conv 64 stride 2 with a bias
    (MSRA init on the fan-out), BN, ReLU, 3x3 max pool stride 2 without padding, rounding
    up (Caffe's pooling: 112 -> 56); four pre-activation blocks of 64, 128, 256, 512 channels,
    strides 1, 2, 2, 2 (:class:`_PreActBlock`): nine convolutional layers with the stem, as
    the paper counts them; a last BN + ReLU, global average pooling (FE: 512-d) and one
    linear layer ``fc``. 5,417,070 parameters for 1,000 classes.

    What differs from the reference: Caffe's BatchNorm keeps running statistics with a
    moving-average fraction of 0.999 (PyTorch's momentum 0.1 here; both only matter for
    testing, and both have settled after 320,000 iterations); its ``fc`` has no weight filler,
    so Caffe zeroes it, where the paper says Kaiming for the network's weights (we follow
    the paper).
    """

    head_names = ("fc",)
    widths = (64, 128, 256, 512)

    def __init__(self, members: int, num_classes: int = 1000, in_shape: tuple[int, int, int] = (3, 224, 224),
                 channels_last: bool = False, head: str = "linear") -> None:
        super().__init__()
        c = in_shape[0]
        self.members, self.channels_last = members, channels_last
        self.data_bn = PackedBatchNorm2d(members, c)
        # The reference's conv1 has a bias although BatchNorm follows (it learns nothing: the
        # batch mean removes it); kept so the parameters are the reference's.
        self.conv1 = _FanOutConv2d(members, c, 64, 7, 2, 3, bias=True)
        self.bn1 = PackedBatchNorm2d(members, 64)
        blocks: list[nn.Module] = []
        c_in = 64
        for stage, width in enumerate(self.widths):
            blocks.append(_PreActBlock(members, c_in, width, 1 if stage == 0 else 2, first=stage == 0))
            c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.last_bn = PackedBatchNorm2d(members, c_in)
        self.fc = classifier_layer(head, members, c_in, num_classes)

    def body(self, x: Tensor) -> Tensor:
        z = self.data_bn(to_grouped(x, self.channels_last))
        z = F.relu_(self.bn1(self.conv1(z)))
        z = F.max_pool2d(z, 3, 2, 0, ceil_mode=True)
        z = F.relu_(self.last_bn(self.blocks(z)))
        return grouped_avg_pool(z, self.members)  # FE [P, B, 512]

    def head(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return z, self.fc(z)

    def classifier(self) -> PackedLinear | PackedCosineLinear:
        return self.fc


ModelFactory = Callable[[int, int, tuple[int, int, int]], PackedNet]
MODELS: dict[str, ModelFactory] = {"lenet5": LeNet5, "allcnn": AllCNN, "resnet32": ResNet32, "resnet10": ResNet10}


def build_model(name: str, members: int, num_classes: int, in_shape: tuple[int, int, int],
                revision: int | None = None, head: str = "linear") -> PackedNet:
    """A packed model; ``revision`` (sweep.core.catalog.MODEL_REVISIONS, default: the current
    one) selects an architecture version: All-CNN revision 1 has no ReLU after conv9;
    ResNet-10 revision 1 is :class:`ResNet10` (post-activation), 2 :class:`ResNet10PreAct`.
    ``head`` (a ``sweep.core.spec.Head`` value) is the final layer's kind."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r} (allowed: {', '.join(MODELS)})") from None
    current = MODEL_REVISIONS.get(name, 1)
    revision = current if revision is None else revision
    if not 1 <= revision <= current:
        raise ValueError(f"{name} has revisions 1..{current}, not {revision}")
    if name == "allcnn":
        if head != "linear":
            raise ValueError(f"allcnn has no {head} head: its classifier is a 1x1 convolution")
        return AllCNN(members, num_classes, in_shape, relu_logits=revision >= 2)
    if name == "resnet10" and revision >= 2:
        return ResNet10PreAct(members, num_classes, in_shape, head=head)
    return factory(members, num_classes, in_shape, head=head)


def model_for(specs: Sequence[TrialSpec], num_classes: int, in_shape: tuple[int, int, int]) -> PackedNet:
    """The packed model of a pack's members on the grouped layers (one architecture: specs
    share the pack key), with each member's logit scale when the head is normalised. Not yet
    initialised. (``workers.compute.new_model`` picks between this and the fused LeNet-5.)"""
    s0 = specs[0]
    model = build_model(s0.model, len(specs), num_classes, in_shape, s0.model_revision, str(s0.head))
    head = model.classifier()
    if isinstance(head, PackedCosineLinear):
        head.scale.copy_(torch.tensor([s.recipe.ldam_scale for s in specs]))
    return model
