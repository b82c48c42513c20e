"""Named training recipes from the papers. A grid names one and may override fields.

Floor: sweep.core (what a study is; pure: imports sweep.core only, no torch, no store).
"""

from __future__ import annotations

import dataclasses
import math

from sweep.core.counts import class_counts
from sweep.core.spec import Augmentation, Imbalance, LrPolicy, Normalization, Recipe

RECIPES: dict[str, Recipe] = {
    # Buda et al. Sec. 3.3 (MNIST, LeNet-5): 10,000 iterations whatever the set size.
    "buda_mnist": Recipe(
        iters=10_000,
        batch_size=64,  # images per step
        base_lr=0.01,
        momentum=0.9,
        weight_decay=5e-4,
        lr_policy=LrPolicy.INV,
        lr_gamma=1e-4,  # lr = 0.01 * (1 + 1e-4 t)^-0.75
        lr_power=0.75,
        init="xavier",
        # Caffe's LeNet (examples/mnist/lenet_train_test.prototxt), which Buda et al. train:
        # biases at lr_mult 2, weights at 1; decay_mult 1 for both.
        bias_lr_factor=2.0,
        normalization=Normalization.SCALE,  # Caffe's LeNet: scale 0.00390625; no augmentation
    ),
    # Buda et al. Sec. 3.3 (CIFAR-10, All-CNN): lr x0.1 at 40k/50k/60k; base lr is searched.
    "buda_cifar10": Recipe(
        iters=70_000,
        batch_size=256,
        base_lr=0.05,
        momentum=0.9,
        weight_decay=1e-3,
        lr_policy=LrPolicy.MULTISTEP,
        lr_gamma=0.1,
        lr_milestones=(40_000, 50_000, 60_000),
        init="xavier",
        checkpoint_every=5_000,
        # "global contrast normalization and ZCA whitening" (Sec. 3.3); no augmentation.
        normalization=Normalization.GCN_ZCA,
    ),
    # Buda et al. Sec. 3.3 (ILSVRC-2012, ResNet-10): lr decays linearly to 0.
    "buda_imagenet": Recipe(
        iters=320_000,
        batch_size=256,
        base_lr=0.1,
        momentum=0.9,
        weight_decay=1e-4,
        lr_policy=LrPolicy.LINEAR,
        init="kaiming",
        checkpoint_every=10_000,
        # Deviation: the paper only resizes (and crops 224 px at random); here images are held
        # at 32 px and standardised per channel, without random crops.
        normalization=Normalization.STANDARDIZE,
    ),
    # Buda et al. Sec. 3.3.3 in their own regime, on ImageNet folders streamed from JPEG
    # (dataset imagenet224). The schedule is the paper's, and every number of it is also in
    # the solver of the ResNet-10 reference (cvjena/cnn-models ResNet10_cvgj/train.solver:
    # base_lr 0.1, lr_policy "poly" with power 1 = linear to 0 at max_iter 320,000, momentum
    # 0.9, weight_decay 1e-4, MSRA init). Deviations (README "Fidelity"): the reference
    # accumulates 16 batches of 16 (iter_size 16), so its BatchNorm sees 16 images, ours 256;
    # its BatchNorm shift (Caffe's Scale bias) learns at 2x and is decayed, ours at 1x.
    "buda_imagenet224": Recipe(
        iters=320_000,
        batch_size=256,  # images per step (the reference: 16 x iter_size 16)
        base_lr=0.1,
        momentum=0.9,
        weight_decay=1e-4,
        lr_policy=LrPolicy.LINEAR,  # Caffe "poly", power 1: 0.1 * (1 - t/320,000)
        init="kaiming",
        checkpoint_every=10_000,
        # The reference's biases (lr_mult 2, as in Caffe's examples): the classifier's bias here.
        bias_lr_factor=2.0,
        # "The only data preprocessing applied is resizing such that the smaller dimension is
        # 256 pixels long": raw pixels; 224-px random crops with mirroring, one centred crop
        # for testing (workers.jpeg_folder).
        normalization=Normalization.RAW,
        augmentation=Augmentation.RESIZE_CROP_FLIP,
    ),
    # Dablain et al. follow LDAM-DRW (Cao et al.): 200 epochs of batch 128, lr 0.1 with
    # 5 warm-up epochs, x0.01 at epochs 160 and 180, DRW from epoch 160. Budgets here are
    # in iterations: grids that want epochs say `epochs:` and expansion converts.
    "ldam_drw": Recipe(
        iters=200 * 100,  # 200 "epochs" of 100 iterations: grids set `epochs:` and it rescales
        batch_size=128,
        base_lr=0.1,
        momentum=0.9,
        weight_decay=2e-4,
        lr_policy=LrPolicy.MULTISTEP,
        lr_gamma=0.01,
        lr_milestones=(160 * 100, 180 * 100),
        warmup_iters=5 * 100,
        init="kaiming",
        drw_start_iter=160 * 100,
        checkpoint_every=5_000,
        # Cao et al.'s CIFAR transforms: RandomCrop(32, padding=4), RandomHorizontalFlip(),
        # Normalize(per-channel mean, std). Digit datasets (catalog.NOT_MIRRORED: SVHN) get
        # the crop without the flip at expansion (Augmentation.CROP).
        normalization=Normalization.STANDARDIZE,
        augmentation=Augmentation.CROP_FLIP,
    ),
}


def iters_per_epoch(imb: Imbalance, num_classes: int, n_max: int, batch_size: int) -> int:
    """Batches in one pass over the imbalanced set (the last one partial, as a DataLoader's)."""
    return math.ceil(int(class_counts(imb, num_classes, n_max).sum()) / batch_size)


def epochs_to_iters(recipe: Recipe, epochs: float, imb: Imbalance, num_classes: int, n_max: int) -> Recipe:
    """An epoch budget for this imbalanced set, in iterations; the schedule scales with it.

    Milestones, warm-up and the DRW start keep their fraction of the budget, so a recipe
    written for 200 epochs (LDAM-DRW) keeps its shape for any set size.
    """

    iters = max(1, round(epochs * iters_per_epoch(imb, num_classes, n_max, recipe.batch_size)))
    scale = iters / recipe.iters
    return dataclasses.replace(
        recipe,
        iters=iters,
        lr_milestones=tuple(round(m * scale) for m in recipe.lr_milestones),
        warmup_iters=round(recipe.warmup_iters * scale),
        drw_start_iter=None if recipe.drw_start_iter is None else round(recipe.drw_start_iter * scale),
    )
