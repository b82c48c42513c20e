"""Input transforms fitted on a training subset, applied to uint8 batches on any device.

Floor: workers (trial execution; imports sweep.core and sweep.store only).

Each network of a pack trains on its own (imbalanced, re-sampled) subset, so a fitted
transform (mean, std, whitening matrix) belongs to one member. ``fit_transform`` fits
one; ``stack_transforms`` stacks a pack's into a ``PackedTransform`` whose ``apply``
preprocesses a ``[P, B, C, H, W]`` batch in one batched op per stage. When every member
has the same transform (all "scale", or one subset shared by all), one set of
parameters is broadcast: no per-member copies, no per-member work.

Kinds (the values of ``sweep.core.spec.Normalization``; each recipe names its paper's choice):

- "scale": ``x / 256``. Caffe's LeNet example scales by 0.00390625 = 1/256 (Buda MNIST);
  the float pixels are exact (a power-of-two divisor).
- "raw": the pixel values 0..255 as float32, nothing subtracted or scaled (Buda's ImageNet
  regime: "the only data preprocessing applied is resizing"; fits nothing).
- "standardize": ``(x - mean_c) / std_c`` with the subset's per-channel mean and
  (population) std in pixel units (Cao et al.'s code, which Dablain follows, normalises
  per channel).
- "gcn_zca": Buda's CIFAR-10 preprocessing, "global contrast normalization and ZCA
  whitening" as in Goodfellow et al.'s maxout data (pylearn2 ``make_cifar10_gcn_whitened``):
  each image (flattened to D = C*H*W values) has its mean subtracted and is scaled to
  L2 norm ``GCN_SCALE`` = 55; then ``(g - mean) @ W`` with
  ``W = V diag((lambda + ZCA_BIAS)^-1/2) V^T`` from the eigendecomposition (float64,
  ``torch.linalg.eigh``) of the GCN'd subset's covariance (divided by n). Every GCN'd
  image has zero mean, so the data lie in the hyperplane orthogonal to the constant
  image; W is projected onto that hyperplane (P W P, P = I - 11^T/D) so float32 rounding
  along the constant direction is not amplified by ``ZCA_BIAS^-1/2``. As a consequence
  the whitened images also have zero per-image mean.

Matrix products run in float32; under ``torch.set_float32_matmul_precision("high")``
(TF32 on NVIDIA GPUs) the whitening is accurate to about 1e-3 relative, plenty for
training inputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from sweep.core.spec import Normalization

TransformKind = Literal["scale", "standardize", "gcn_zca", "raw"]
# Kinds that fit nothing on the training images (a streamed dataset takes only these).
FITS_NOTHING: frozenset[str] = frozenset({"scale", "raw"})
TRANSFORM_KINDS: tuple[str, ...] = get_args(TransformKind)
assert set(TRANSFORM_KINDS) == {str(n) for n in Normalization}, "one transform per Normalization"

SCALE = 0.00390625  # 1/256: Caffe LeNet's input scale (Buda MNIST)
GCN_SCALE = 55.0  # pylearn2 CIFAR10(gcn=55.): L2 norm of each image after GCN (~sqrt(3072))
GCN_MIN_DIVISOR = 1e-8  # pylearn2: a (norm / scale) below this is treated as 1 (blank images)
ZCA_BIAS = 0.1  # pylearn2 ZCA(filter_bias=0.1), the default its CIFAR-10 script uses;
#                 added to the covariance eigenvalues (per-pixel variance is ~1 after GCN)
MAX_ZCA_DIM = 8192  # W is D x D: 3x32x32 = 3072 is fine, 224x224 images are not
_FIT_CHUNK = 2048  # images per chunk while accumulating statistics (bounds float64 memory)
_TENSOR_FIELDS = ("mean", "std", "whitening", "offset")  # fitted parameters, moved by .to()


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no boolean ==
class InputTransform:
    """One member's fitted transform. ``apply`` maps uint8 ``[..., C, H, W]`` to float32."""

    kind: TransformKind
    image_shape: tuple[int, int, int] | None  # None: any shape ("scale" and "raw" fit nothing)
    mean: torch.Tensor | None = None  # standardize: [C], pixel units; gcn_zca: [D], GCN'd
    std: torch.Tensor | None = None  # standardize: [C], pixel units
    whitening: torch.Tensor | None = None  # gcn_zca: [D, D], symmetric
    offset: torch.Tensor | None = None  # gcn_zca: -(mean @ whitening), [D]
    gcn_scale: float = GCN_SCALE
    zca_bias: float = ZCA_BIAS  # provenance: the epsilon W was fitted with

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x, self.image_shape, min_dim=3)
        if self.kind == "scale":
            return x.to(torch.float32) * SCALE
        if self.kind == "raw":
            return x.to(torch.float32)
        xf = x.to(torch.float32)
        if self.kind == "standardize":
            assert self.mean is not None and self.std is not None
            return (xf - self.mean[:, None, None]) / self.std[:, None, None]
        assert self.whitening is not None and self.offset is not None
        g = global_contrast_normalize(xf.flatten(-3), self.gcn_scale)
        flat = g.reshape(-1, g.shape[-1])
        return torch.addmm(self.offset, flat, self.whitening).reshape(x.shape)

    def to(self, device: torch.device | str) -> "InputTransform":
        return dataclasses.replace(self, **_moved(self, device))

    def same_as(self, other: "InputTransform") -> bool:
        """Equal kind, settings and parameters (so members can share one copy)."""
        if self is other:
            return True
        if (self.kind, self.image_shape, self.gcn_scale) != (other.kind, other.image_shape, other.gcn_scale):
            return False
        return all(_equal(getattr(self, f), getattr(other, f)) for f in _TENSOR_FIELDS)


@dataclass(frozen=True, eq=False)
class PackedTransform:
    """The transforms of a pack's P members; tensors lead with P, or with 1 when shared."""

    kind: TransformKind
    members: int  # P
    shared: bool  # every member has the same transform: parameters are broadcast
    image_shape: tuple[int, int, int] | None
    mean: torch.Tensor | None = None  # standardize [P|1, C]; gcn_zca [P|1, D]
    std: torch.Tensor | None = None  # standardize [P|1, C]
    whitening: torch.Tensor | None = None  # gcn_zca [P|1, D, D]
    offset: torch.Tensor | None = None  # gcn_zca [P|1, D]
    gcn_scale: float = GCN_SCALE

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 ``[P, B, C, H, W]`` -> float32, member p's transform on slice p."""
        _check_images(x, self.image_shape, min_dim=5)
        if x.dim() != 5 or x.shape[0] != self.members:
            raise ValueError(f"expected [{self.members}, B, C, H, W], got {tuple(x.shape)}")
        if self.kind == "scale":
            return x.to(torch.float32) * SCALE
        if self.kind == "raw":
            return x.to(torch.float32)
        xf = x.to(torch.float32)
        if self.kind == "standardize":
            assert self.mean is not None and self.std is not None
            view = (-1, 1, x.shape[2], 1, 1)
            return (xf - self.mean.view(view)) / self.std.view(view)
        assert self.whitening is not None and self.offset is not None
        g = global_contrast_normalize(xf.flatten(2), self.gcn_scale)  # [P, B, D]
        if self.shared:  # one matrix: a single matmul over all P*B images
            out = torch.addmm(self.offset[0], g.reshape(-1, g.shape[-1]), self.whitening[0])
        else:  # one batched matmul: member p's images times member p's W
            out = torch.baddbmm(self.offset[:, None, :], g, self.whitening)
        return out.reshape(x.shape)

    def to(self, device: torch.device | str) -> "PackedTransform":
        return dataclasses.replace(self, **_moved(self, device))


# -- fitting ------------------------------------------------------------------------------


def fit_transform(
    kind: TransformKind, x_subset: torch.Tensor, *, zca_bias: float = ZCA_BIAS
) -> InputTransform:
    """Fit a transform on a training subset's uint8 images ``[n, C, H, W]``.

    Pass the unique images a member trains on (its imbalanced subset before
    over-sampling replicates them). Statistics are computed in float64 on the
    subset's device; the transform's tensors are float32 on that device.

    Cost: "gcn_zca" takes O(n D^2) float64 work plus a D x D ``eigh`` (about 6 s for
    5,000 CIFAR-sized images on 2 CPU cores; far less on a GPU). Fit once per training
    subset and give every member on that subset the same object.
    """
    if kind not in TRANSFORM_KINDS:
        raise ValueError(f"unknown transform {kind!r}; known: {', '.join(TRANSFORM_KINDS)}")
    if x_subset.dtype != torch.uint8 or x_subset.dim() != 4:
        raise TypeError(f"expected uint8 [n, C, H, W], got {x_subset.dtype} {tuple(x_subset.shape)}")
    if kind in FITS_NOTHING:
        return InputTransform(kind, None)
    if len(x_subset) < 2:
        raise ValueError(f"cannot fit {kind!r} on {len(x_subset)} image(s)")
    shape = (int(x_subset.shape[1]), int(x_subset.shape[2]), int(x_subset.shape[3]))
    if kind == "standardize":
        mean, std = _channel_mean_std(x_subset)
        return InputTransform("standardize", shape, mean=mean.float(), std=std.float())
    return _fit_gcn_zca(x_subset, shape, zca_bias)


def _chunks(x: torch.Tensor) -> Iterator[torch.Tensor]:
    for start in range(0, len(x), _FIT_CHUNK):
        yield x[start:start + _FIT_CHUNK]


def _channel_mean_std(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c = x.shape[1]
    total = torch.zeros(c, dtype=torch.float64, device=x.device)
    squares = torch.zeros(c, dtype=torch.float64, device=x.device)
    for chunk in _chunks(x):
        v = chunk.to(torch.float64).transpose(0, 1).reshape(c, -1)
        total += v.sum(1)  # integer-valued sums below 2**53: exact in float64
        squares += (v * v).sum(1)
    count = x.numel() // c
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt()
    if bool((std == 0).any()):
        raise ValueError(f"a channel is constant over the subset (std {std.tolist()}): cannot standardize")
    return mean, std


def global_contrast_normalize(x: torch.Tensor, scale: float = GCN_SCALE) -> torch.Tensor:
    """Per image (last dim = its D values): subtract its mean, scale to L2 norm ``scale``.

    Pylearn2's ``global_contrast_normalize(X, scale=55.)`` (norm version, no sqrt bias);
    a blank image (norm/scale < GCN_MIN_DIVISOR) stays all zeros.
    """
    centred = x - x.mean(dim=-1, keepdim=True)
    divisor = torch.linalg.vector_norm(centred, dim=-1, keepdim=True) / scale
    divisor = torch.where(divisor < GCN_MIN_DIVISOR, torch.ones_like(divisor), divisor)
    return centred / divisor


def mean_and_covariance(
    x: torch.Tensor, features: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 mean ``[D]`` and covariance ``[D, D]`` (divided by n) of rows of ``x``.

    ``features`` maps a chunk of ``x`` to float64 ``[b, D]`` rows (default: flatten).
    Two passes (mean, then centred products) so no precision is lost to cancellation.
    """
    featurize = features or (lambda c: c.reshape(len(c), -1).to(torch.float64))
    n = len(x)
    total = None
    for chunk in _chunks(x):
        s = featurize(chunk).sum(0)
        total = s if total is None else total + s
    if total is None:
        raise ValueError("no rows to fit on")
    mean = total / n
    cov = torch.zeros(len(mean), len(mean), dtype=torch.float64, device=x.device)
    for chunk in _chunks(x):
        c = featurize(chunk) - mean
        cov.addmm_(c.T, c)
    return mean, cov / n


def whitening_matrix(cov: torch.Tensor, bias: float) -> torch.Tensor:
    """ZCA: ``V diag((lambda + bias)^-1/2) V^T`` of a float64 covariance (eigh).

    ``bias`` > 0 damps directions of variance below about ``bias`` instead of blowing up
    noise: the whitened covariance is ``V diag(lambda / (lambda + bias)) V^T``.
    """
    if bias <= 0:
        raise ValueError(f"the ZCA bias must be > 0, got {bias}")
    evals, evecs = torch.linalg.eigh(cov.to(torch.float64))
    scale = (evals.clamp_min(0) + bias).rsqrt()  # tiny negative eigenvalues are rounding
    return (evecs * scale) @ evecs.T


def _fit_gcn_zca(x: torch.Tensor, shape: tuple[int, int, int], bias: float) -> InputTransform:
    d = shape[0] * shape[1] * shape[2]
    if d > MAX_ZCA_DIM:
        raise ValueError(f"ZCA on {d}-value images needs a {d}x{d} matrix; the limit is {MAX_ZCA_DIM}")

    def gcn64(chunk: torch.Tensor) -> torch.Tensor:
        return global_contrast_normalize(chunk.reshape(len(chunk), -1).to(torch.float64), GCN_SCALE)

    mean, cov = mean_and_covariance(x, gcn64)
    w = _project_out_constant(whitening_matrix(cov, bias))
    return InputTransform(
        "gcn_zca", shape, mean=mean.float(), whitening=w.float(), offset=(-(mean @ w)).float(),
        gcn_scale=GCN_SCALE, zca_bias=bias,
    )


def _project_out_constant(w: torch.Tensor) -> torch.Tensor:
    """P W P with P = I - 11^T/D, by rank-one updates (W symmetric): no D^3 products."""
    d = w.shape[0]
    u = w.sum(1, keepdim=True) / d  # W 1 / D
    return w - u - u.T + u.sum() / d


# -- stacking -----------------------------------------------------------------------------


def stack_transforms(transforms: list[InputTransform]) -> PackedTransform:
    """Stack a pack's member transforms (all of one kind and image shape)."""
    if not transforms:
        raise ValueError("no transforms to stack")
    first = transforms[0]
    for t in transforms[1:]:
        if (t.kind, t.image_shape, t.gcn_scale) != (first.kind, first.image_shape, first.gcn_scale):
            raise ValueError(
                f"a pack's transforms must share kind and image shape: {first.kind} {first.image_shape}"
                f" vs {t.kind} {t.image_shape}"
            )
    shared = all(first.same_as(t) for t in transforms[1:])
    members = transforms[:1] if shared else transforms
    stacked = {
        f: None if getattr(first, f) is None else torch.stack([getattr(t, f) for t in members])
        for f in _TENSOR_FIELDS
    }
    return PackedTransform(first.kind, len(transforms), shared, first.image_shape,
                           gcn_scale=first.gcn_scale, **stacked)


# -- helpers ------------------------------------------------------------------------------


def _check_images(x: torch.Tensor, shape: tuple[int, int, int] | None, min_dim: int) -> None:
    if x.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"expected at least {min_dim} dimensions, got {tuple(x.shape)}")
    if shape is not None and tuple(x.shape[-3:]) != shape:
        raise ValueError(f"fitted on images {shape}, got {tuple(x.shape[-3:])}")


def _equal(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a is b or (a.shape == b.shape and a.device == b.device and torch.equal(a, b))


def _moved(obj: object, device: torch.device | str) -> dict[str, torch.Tensor | None]:
    out = {}
    for f in _TENSOR_FIELDS:
        t = getattr(obj, f)
        out[f] = None if t is None else t.to(device)
    return out
