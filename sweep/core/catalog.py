"""What the expander must know about datasets and models, without loading any data.

Floor: sweep.core (what a study is; pure: imports sweep.core only, no torch, no store).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    image_shape: tuple[int, int, int]  # C, H, W as the model sees it
    train_per_class: int  # the smallest class of the full training set
    test_per_class: int  # balanced test set: images per class
    # The largest class of the full training set (0: all classes have train_per_class).
    # max_per_class may go up to it; a class with fewer images then keeps all it has.
    train_largest_class: int = 0

    @property
    def max_cap(self) -> int:
        return max(self.train_per_class, self.train_largest_class)


DATASETS: dict[str, DatasetInfo] = {
    # MNIST's smallest training class (5) has 5,421 images; Buda caps every class at 5,000.
    "mnist": DatasetInfo(10, (1, 28, 28), 5_421, 892, 6_742),
    "cifar10": DatasetInfo(10, (3, 32, 32), 5_000, 1_000),
    # Dablain: 4,600 training and 1,500 test images per class.
    "svhn": DatasetInfo(10, (3, 32, 32), 4_600, 1_500),
    # Dablain: men and women with black hair, 5,000 training and 1,000 test per class.
    "celeba": DatasetInfo(2, (3, 32, 32), 5_000, 1_000),
    # ImageNet-style folders: 1,000 classes of 732..1,300 images; Buda caps majority
    # classes at 1,000 (max_per_class: 1000, above the smallest class). Held in memory at
    # 32x32 (workers.datasets.IMAGENET_SIDE), not the paper's 224x224 crops.
    "imagenet": DatasetInfo(1000, (3, 32, 32), 732, 50, 1_300),
    # The same folders in Buda's own regime (Sec. 3.3.3): images streamed from their JPEGs,
    # resized to a 256-px shorter side, 224x224 crops (random and mirrored in training, one
    # centred crop for testing). Nothing is held in memory but the file list
    # (workers.jpeg_folder).
    "imagenet224": DatasetInfo(1000, (3, 224, 224), 732, 50, 1_300),
}

# Datasets whose images are streamed from files at their full size rather than held in memory
# at a fixed one (workers.jpeg_folder): only they take Augmentation.RESIZE_CROP_FLIP, and only
# normalisations that fit nothing on the training images (a mean over a million JPEGs per
# training subset is not worth decoding them all).
STREAMED: frozenset[str] = frozenset({"imagenet224"})

# The normalisation a dataset's images get when the recipe names none (the value of
# sweep.core.spec.Normalization). It was chosen by the dataset's name alone before recipes
# named it, so a spec whose recipe gives this value keeps its old id.
DEFAULT_NORMALIZATION: dict[str, str] = {
    "mnist": "scale",  # Buda: Caffe LeNet scales pixels by 0.00390625 = 1/256
    "cifar10": "gcn_zca",  # Buda: global contrast normalisation + ZCA whitening
    "svhn": "standardize",  # Dablain follows Cao et al.'s LDAM-DRW code: per-channel mean/std
    "celeba": "standardize",
    # Buda: "the only data preprocessing applied is resizing"; per-channel standardizing
    # (our choice) is the usual input of a batch-normalised ResNet and changes little.
    "imagenet": "standardize",
    "imagenet224": "raw",  # Buda: "the only data preprocessing applied is resizing"
}

# Datasets whose images are digits: a mirrored digit is another symbol or none, so a recipe
# preset's horizontal flip (Cao et al.'s CIFAR regime, ``crop_flip``) becomes ``crop`` for
# them at expansion (sweep.core.grid). A grid that writes `augmentation: crop_flip` itself
# keeps it. Buda's MNIST recipe has no augmentation at all.
NOT_MIRRORED: frozenset[str] = frozenset({"mnist", "svhn"})

# model name -> the datasets' image shapes it accepts (by name, for the error message)
MODELS: dict[str, tuple[str, ...]] = {
    "lenet5": ("mnist",),
    "allcnn": ("cifar10", "svhn", "celeba"),
    "resnet32": ("cifar10", "svhn", "celeba"),
    "resnet10": ("imagenet", "imagenet224"),
}

# The current revision of each model's architecture (1 when never revised); specs record it.
# allcnn 2: ReLU after the last 1x1 convolution, before global average pooling, as in Buda
# et al.'s released All-CNN (revision 1 had none there).
# resnet10 2: the pre-activation layout of Buda et al.'s ResNet-10 reference (cvjena/cnn-models
# ResNet10_cvgj: an input BatchNorm instead of mean subtraction, pre-activation blocks, a last
# BN-ReLU; workers.models.ResNet10PreAct). Revision 1 is a post-activation ResNet-18 with one
# block per stage, which the paper's words also describe.
MODEL_REVISIONS: dict[str, int] = {"allcnn": 2, "resnet10": 2}
# (model, dataset) that keep an older revision, so that their networks keep their ids: the
# 32-px ImageNet stand-in was run with ResNet-10 revision 1 (Buda's regime is imagenet224).
KEPT_REVISIONS: dict[tuple[str, str], int] = {("resnet10", "imagenet"): 1}


def model_revision(model: str, dataset: str) -> int:
    """The architecture revision a new spec of ``model`` on ``dataset`` gets."""
    return KEPT_REVISIONS.get((model, dataset), MODEL_REVISIONS.get(model, 1))
# (model, revision) whose logits are not FE @ W_C + b (a ReLU follows the classifier):
# Dablain et al.'s latent statistics do not apply to them.
NO_LINEAR_HEAD: set[tuple[str, int]] = {("allcnn", 2)}

# Width of the penultimate features FE (Dablain et al.): what an embedding row holds.
FEATURE_WIDTH: dict[str, int] = {"lenet5": 500, "allcnn": 192, "resnet32": 64, "resnet10": 512}

# (model, dataset) -> (parameters of one network, values autograd saves for the backward
# pass per image), as measured by workers.sizing.measure_footprint (a test keeps the two
# equal). Pack planning turns these into bytes of GPU memory per network without torch.
FOOTPRINTS: dict[tuple[str, str], tuple[int, int]] = {
    ("lenet5", "mnist"): (431_080, 23_364),
    ("allcnn", "cifar10"): (1_369_738, 422_760),
    ("allcnn", "svhn"): (1_369_738, 422_760),
    ("allcnn", "celeba"): (1_368_194, 422_472),
    ("resnet32", "cifar10"): (464_154, 611_616),
    ("resnet32", "svhn"): (464_154, 611_616),
    ("resnet32", "celeba"): (463_634, 611_616),
    ("resnet10", "imagenet"): (5_418_792, 84_608),
    ("resnet10", "imagenet224"): (5_417_070, 3_817_862),  # revision 2 (catalog.model_revision)
}
