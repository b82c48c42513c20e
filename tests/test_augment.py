"""Crop-and-flip augmentation: the right rates, the right pixels, each member's own stream."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from workers.augment import PAD, CropFlipDraws, crop_flip, identity_draws, take_stacked_draws


def _naive(img: torch.Tensor, dy: int, dx: int, flip: int) -> torch.Tensor:
    """torchvision's order: zero-pad, crop at (dy, dx), then mirror."""
    h, w = img.shape[-2:]
    out = F.pad(img, (PAD, PAD, PAD, PAD))[..., dy:dy + h, dx:dx + w]
    return out.flip(-1) if flip else out


def test_crop_flip_equals_pad_crop_flip() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (2, 5, 3, 8, 8), generator=g, dtype=torch.uint8)  # no zero pixel
    draws = torch.from_numpy(take_stacked_draws([CropFlipDraws(1), CropFlipDraws(2)], 1, 5)[0])
    draws[0, 0] = torch.tensor([0, 8, 1])  # extreme offsets, flipped
    draws[0, 1] = torch.tensor([8, 0, 0])
    out = crop_flip(x, draws)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    for p in range(2):
        for b in range(5):
            dy, dx, flip = draws[p, b].tolist()
            assert torch.equal(out[p, b], _naive(x[p, b], dy, dx, flip)), (p, b, dy, dx, flip)
    assert (out[0, 0, :, :, :4] == 0).all()  # a corner crop shows the zero padding


def test_identity_draws_leave_images_unchanged() -> None:
    x = torch.randint(0, 256, (1, 3, 1, 6, 6), dtype=torch.uint8)
    assert torch.equal(crop_flip(x, torch.from_numpy(identity_draws(1, 3)[0])[None]), x)


def test_offsets_uniform_and_flips_at_one_half() -> None:
    d = CropFlipDraws(7).take(400, 64)  # 25,600 images
    assert d.shape == (400, 64, 3)
    n = d.shape[0] * d.shape[1]
    for axis in (0, 1):
        freq = np.bincount(d[..., axis].ravel(), minlength=2 * PAD + 1) / n
        assert len(freq) == 2 * PAD + 1
        assert np.abs(freq - 1 / 9).max() < 0.01  # 9 offsets, each ~1/9 (sd ~0.002)
    assert abs(d[..., 2].mean() - 0.5) < 0.01
    # The three choices are independent: all 162 combinations occur.
    combos = d[..., 0] * 18 + d[..., 1] * 2 + d[..., 2]
    assert len(np.unique(combos)) == 162


def test_stream_does_not_depend_on_chunking_or_the_pack() -> None:
    whole = CropFlipDraws(3).take(10, 4)
    split = CropFlipDraws(3)
    parts = np.concatenate([split.take(3, 4), split.take(7, 4)])
    assert np.array_equal(whole, parts)
    packed = take_stacked_draws([CropFlipDraws(9), None, CropFlipDraws(3)], 10, 4)
    assert np.array_equal(packed[:, 2], whole)
    assert np.array_equal(packed[:, 1], identity_draws(10, 4))


def test_state_resumes_the_stream() -> None:
    a = CropFlipDraws(5)
    a.take(4, 2)
    state = a.state()
    want = a.take(3, 2)
    b = CropFlipDraws(123)
    b.load_state(state)
    assert np.array_equal(b.take(3, 2), want)


def test_an_augmented_network_trains_to_the_same_numbers_alone_or_packed(small_mnist) -> None:
    """Each member crops and flips from its own stream: the pack around it changes nothing,
    and an augmented network differs from the same network without augmentation."""
    from sweep.core.grid import expand
    from sweep.core.plan import Pack
    from workers.run_pack import run_pack

    def grid(augmentation: str):
        return expand({"name": "aug", "dataset": "mnist", "model": "lenet5", "max_per_class": 40,
                       "recipe": {"preset": "buda_mnist", "iters": 6, "augmentation": augmentation},
                       "imbalance": {"step": {"rho": [4], "mu": [0.5]}}, "lr": [0.01, 0.02],
                       "methods": ["baseline"], "thresholding": [], "seed": 5})

    def auc(specs) -> dict[str, float]:
        t = run_pack(Pack(tuple(specs)), None, dataset=small_mnist).tables["trials"]
        return {r["network_id"]: r["roc_auc"] for r in t}

    specs = grid("crop_flip").specs
    assert len(specs) == 2
    packed, alone = auc(specs), auc(specs[1:])
    assert packed[specs[1].network_id] == alone[specs[1].network_id]
    plain = grid("none").specs[1]
    assert plain.network_id != specs[1].network_id
    assert auc([plain])[plain.network_id] != alone[specs[1].network_id]


def test_an_svhn_recipe_never_flips_and_cifar10_still_does() -> None:
    """Digits are not mirror-symmetric: the LDAM-DRW preset's flip (Cao et al.'s CIFAR regime)
    is dropped for SVHN, its crop kept; CIFAR-10 keeps both; a grid that asks for the flip
    by name gets it."""
    from sweep.core.grid import expand
    from sweep.core.spec import Augmentation
    from workers.augment import augment_stream

    def spec(dataset: str, recipe: object = "ldam_drw"):
        return expand({"name": "a", "dataset": dataset, "model": "resnet32", "recipe": recipe,
                       "imbalance": {"exponential": {"rho": [100]}}, "seed": 1}).specs[0]

    svhn, cifar = spec("svhn"), spec("cifar10")
    assert svhn.recipe.augmentation == Augmentation.CROP
    assert cifar.recipe.augmentation == Augmentation.CROP_FLIP
    svhn_draws = augment_stream(svhn.recipe.augmentation, 11).take(400, 64)
    cifar_draws = augment_stream(cifar.recipe.augmentation, 11).take(400, 64)
    assert not svhn_draws[..., 2].any()  # 25,600 images, none mirrored
    assert abs(cifar_draws[..., 2].mean() - 0.5) < 0.01
    for axis in (0, 1):  # the crop is still uniform over the 9 offsets on each axis
        freq = np.bincount(svhn_draws[..., axis].ravel(), minlength=2 * PAD + 1) / svhn_draws[..., 0].size
        assert np.abs(freq - 1 / 9).max() < 0.01
    asked = spec("svhn", {"preset": "ldam_drw", "augmentation": "crop_flip"})
    assert asked.recipe.augmentation == Augmentation.CROP_FLIP and asked.network_id != svhn.network_id
    assert augment_stream(Augmentation.NONE, 11) is None
