"""Tests for workers.transforms: fitted input transforms and their packed application."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workers.transforms import (
    GCN_SCALE,
    ZCA_BIAS,
    fit_transform,
    global_contrast_normalize,
    mean_and_covariance,
    stack_transforms,
    whitening_matrix,
)

SHAPE = (3, 4, 4)  # D = 48: small enough that every test fits in well under a second
D = 48


def correlated_images(n: int, seed: int, shape: tuple[int, int, int] = SHAPE) -> torch.Tensor:
    """uint8 images with strongly correlated pixels (a few smooth factors plus noise)."""
    rng = np.random.default_rng(seed)
    d = int(np.prod(shape))
    mixing = rng.normal(size=(8, d)) * 30
    z = 120 + rng.normal(size=(n, 8)) @ mixing + rng.normal(scale=12, size=(n, d))
    return torch.from_numpy(np.clip(np.rint(z), 0, 255).astype(np.uint8).reshape(n, *shape))


def covariance(y: torch.Tensor) -> torch.Tensor:
    flat = y.reshape(len(y), -1).to(torch.float64)
    return torch.cov(flat.T, correction=0)


def test_scale_is_exact_and_keeps_leading_shape() -> None:
    x = torch.randint(0, 256, (2, 5, 1, 6, 6), dtype=torch.uint8)
    t = fit_transform("scale", x[0])
    y = t.apply(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.equal(y, (x.to(torch.float64) / 256).to(torch.float32))
    assert float(y.max()) <= 255 / 256


def test_standardize_gives_zero_mean_unit_std_per_channel() -> None:
    x = correlated_images(500, seed=1)
    y = fit_transform("standardize", x).apply(x).to(torch.float64)
    per_channel = y.transpose(0, 1).reshape(3, -1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(per_channel.std(1, correction=0), torch.ones(3, dtype=torch.float64), atol=1e-5)


def test_gcn_zero_mean_and_fixed_norm_per_image() -> None:
    x = correlated_images(64, seed=2).reshape(64, -1).to(torch.float64)
    g = global_contrast_normalize(x)
    assert torch.allclose(g.mean(1), torch.zeros(64, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(g.norm(dim=1), torch.full((64,), GCN_SCALE, dtype=torch.float64))
    blank = global_contrast_normalize(torch.full((2, D), 77.0))
    assert torch.equal(blank, torch.zeros(2, D))  # no division by zero, no NaN


def test_zca_whitens_to_identity_with_tiny_bias() -> None:
    rng = np.random.default_rng(3)
    features = torch.from_numpy(rng.normal(size=(4000, 20)) @ rng.normal(size=(20, 20)) + 5.0)
    mean, cov = mean_and_covariance(features)
    w = whitening_matrix(cov, bias=1e-9)
    white = (features - mean) @ w
    assert (covariance(white) - torch.eye(20, dtype=torch.float64)).abs().max() < 1e-3


def test_zca_bias_shrinks_each_direction_by_lambda_over_lambda_plus_bias() -> None:
    rng = np.random.default_rng(4)
    features = torch.from_numpy(rng.normal(size=(4000, 20)) @ rng.normal(scale=0.5, size=(20, 20)))
    mean, cov = mean_and_covariance(features)
    white = (features - mean) @ whitening_matrix(cov, bias=ZCA_BIAS)
    lam = torch.linalg.eigvalsh(cov)
    expected = lam / (lam + ZCA_BIAS)
    assert torch.allclose(torch.linalg.eigvalsh(covariance(white)), expected, atol=1e-9)
    deviation = (covariance(white) - torch.eye(20, dtype=torch.float64)).abs().max()
    assert 0 < deviation <= float((ZCA_BIAS / (lam + ZCA_BIAS)).max()) + 1e-9


def test_gcn_zca_whitens_the_training_subset() -> None:
    x = correlated_images(3000, seed=5)
    # GCN'd images span only the zero-mean hyperplane: the best possible covariance is
    # I - 11^T/D (identity there, zero along the constant image).
    target = torch.eye(D, dtype=torch.float64) - 1.0 / D
    y = fit_transform("gcn_zca", x, zca_bias=1e-9).apply(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert (covariance(y) - target).abs().max() < 1e-3
    assert y.reshape(len(y), -1).to(torch.float64).mean(1).abs().max() < 1e-4

    # The default bias: eigenvalues shrink to lambda/(lambda+bias) of the GCN'd data,
    # computed here independently in numpy float64.
    flat = x.reshape(len(x), -1).numpy().astype(np.float64)
    centred = flat - flat.mean(1, keepdims=True)
    gcn = GCN_SCALE * centred / np.linalg.norm(centred, axis=1, keepdims=True)
    lam = np.linalg.eigvalsh(np.cov(gcn.T, bias=True))
    y_default = fit_transform("gcn_zca", x).apply(x)
    got = torch.linalg.eigvalsh(covariance(y_default)).numpy()
    np.testing.assert_allclose(got, np.clip(lam, 0, None) / (np.clip(lam, 0, None) + ZCA_BIAS), atol=1e-4)


def test_gcn_zca_applies_to_unseen_images_with_leading_dims() -> None:
    t = fit_transform("gcn_zca", correlated_images(300, seed=6))
    test = correlated_images(12, seed=7)
    y = t.apply(test.reshape(3, 4, *SHAPE))
    assert y.shape == (3, 4, *SHAPE) and torch.isfinite(y).all()
    assert torch.allclose(y.reshape(12, *SHAPE), t.apply(test), atol=1e-5)


@pytest.mark.parametrize("kind", ["scale", "standardize", "gcn_zca"])
def test_stacked_apply_equals_per_member_apply(kind: str) -> None:
    subsets = [correlated_images(200 + 50 * p, seed=10 + p) for p in range(3)]
    members = [fit_transform(kind, s) for s in subsets]
    packed = stack_transforms(members)
    batch = torch.stack([correlated_images(16, seed=20 + p) for p in range(3)])  # [P, B, C, H, W]
    y = packed.apply(batch)
    assert y.dtype == torch.float32 and y.shape == batch.shape
    for p, t in enumerate(members):
        assert torch.allclose(y[p], t.apply(batch[p]), atol=1e-4, rtol=1e-5)
    assert packed.shared == (kind == "scale")


def test_identical_members_share_one_parameter_set() -> None:
    t = fit_transform("gcn_zca", correlated_images(200, seed=30))
    copy = fit_transform("gcn_zca", correlated_images(200, seed=30))  # equal, not the same object
    packed = stack_transforms([t, copy, t, t])
    assert packed.shared and packed.whitening is not None and packed.whitening.shape == (1, D, D)
    batch = torch.stack([correlated_images(8, seed=31 + p) for p in range(4)])
    y = packed.apply(batch)
    for p in range(4):
        assert torch.allclose(y[p], t.apply(batch[p]), atol=1e-4, rtol=1e-5)
    scale = stack_transforms([fit_transform("scale", batch[0])] * 4)
    assert scale.shared and scale.mean is None and scale.whitening is None


def test_transforms_move_between_devices() -> None:
    t = fit_transform("standardize", correlated_images(100, seed=40))
    moved = t.to("cpu")
    assert moved.mean is not None and moved.mean.device.type == "cpu"
    packed = stack_transforms([t, t]).to("cpu")
    assert packed.std is not None and packed.std.device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_packed_gcn_zca_on_cuda_matches_cpu() -> None:
    members = [fit_transform("gcn_zca", correlated_images(300, seed=50 + p)) for p in range(2)]
    packed = stack_transforms(members)
    batch = torch.stack([correlated_images(8, seed=60 + p) for p in range(2)])
    on_gpu = packed.to("cuda").apply(batch.cuda()).cpu()
    assert torch.allclose(on_gpu, packed.apply(batch), atol=1e-2)  # TF32 may be enabled


def test_bad_inputs_raise() -> None:
    x = correlated_images(10, seed=70)
    with pytest.raises(ValueError, match="unknown transform"):
        fit_transform("whiten", x)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="uint8"):
        fit_transform("standardize", x.float())  # type: ignore[arg-type]
    t = fit_transform("standardize", x)
    with pytest.raises(TypeError, match="uint8"):
        t.apply(x.float())
    with pytest.raises(ValueError, match="fitted on images"):
        t.apply(torch.zeros(1, 1, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="kind and image shape"):
        stack_transforms([t, fit_transform("scale", x)])
    with pytest.raises(ValueError, match="constant"):
        fit_transform("standardize", torch.full((4, 3, 2, 2), 9, dtype=torch.uint8))
    with pytest.raises(ValueError, match="expected"):
        stack_transforms([t, t]).apply(torch.zeros(3, 2, *SHAPE, dtype=torch.uint8))
