"""The shipped paper grids expand to the counts the papers describe (arithmetic in comments)."""

from collections import Counter
from pathlib import Path

import pytest

from sweep.core.grid import GridError, expand, load_grid
from sweep.core.spec import Evaluation, ImbalanceKind, Loss, Method, MinorityChoice, Selection

GRIDS = Path(__file__).resolve().parents[1] / "grids"


def test_buda_cifar10():
    g = load_grid(GRIDS / "buda_cifar10.yaml")
    # 4 rho x 3 mu step + 4 rho linear = 16 sets; 5 trained methods; 4 lr x 2 runs = 8.
    assert g.trained_networks == 16 * 5 * 4 * 2 == 640
    # Thresholding evaluates baseline/over/under networks: 640 + 16 x 3 x 8.
    assert g.evaluations == 640 + 16 * 3 * 8 == 1024
    # The paper's "480 networks" equals the step sets alone: 12 x 5 x 8 (see the grid's comment).
    step = [s for s in g.specs if s.imbalance.kind == ImbalanceKind.STEP]
    assert len(step) == 12 * 5 * 8 == 480
    assert {s.recipe.base_lr for s in g.specs} == {0.05, 0.005, 0.0005, 0.00005}
    assert {s.lr_run for s in g.specs} == {0, 1}
    assert {s.selection for s in g.specs} == {Selection.VALIDATION}
    assert all(s.recipe.validation_fraction == 0.1 for s in g.specs)
    # Lowest labels are minority, nested: 2 in 5 in 8.
    mus = {s.imbalance.mu: s.imbalance.classes for s in step}
    assert mus == {0.2: (0, 1), 0.5: (0, 1, 2, 3, 4), 0.8: tuple(range(8))}
    assert Counter(s.method for s in g.specs) == {m: 128 for m in list(Method)[:5]}
    assert all(s.recipe.iters == 70_000 and s.model == "allcnn" for s in g.specs)


def test_buda_cifar10_paper_selection_is_one_word_away():
    doc = __import__("yaml").safe_load((GRIDS / "buda_cifar10.yaml").read_text())
    g = expand({**doc, "selection": "test"})
    assert g.trained_networks == 640 and {s.selection for s in g.specs} == {Selection.TEST}


def test_buda_mnist_partial():
    g = load_grid(GRIDS / "buda_mnist_partial.yaml")
    # rho = 1000, mu = 0.1..0.9, 50 repeats: 450 training sets.
    sets = {s.training_set_key for s in g.specs}
    assert len(sets) == 9 * 50 == 450
    # Per set: baseline + 9 levels x (over, under) = 19.
    assert g.trained_networks == 450 * (1 + 9 * 2) == 8550
    assert g.evaluations == g.trained_networks  # thresholding: [] (ROC AUC only in Fig. 7)
    assert {s.imbalance.rho for s in g.specs} == {1000}
    levels = Counter((s.method, s.resample_ratio) for s in g.specs)
    ratios = [1, 2.5, 5, 10, 25, 50, 100, 250, 500]
    assert levels == {(Method.BASELINE, 1.0): 450,
                      **{(Method.OVERSAMPLING, float(r)): 450 for r in ratios},
                      **{(Method.UNDERSAMPLING, float(r)): 450 for r in ratios}}


def test_buda_imagenet():
    g = load_grid(GRIDS / "buda_imagenet.yaml")
    # (0.1, 10) once, (0.8, 50) once, (0.9, 100) three times = 5 sets; 3 methods each = 15,
    # the paper's "15 ResNet-10 networks trained on five artificially imbalanced subsets".
    assert g.trained_networks == 5 * 3 == 15
    assert g.evaluations == 15 * 2  # raw + thresholded for all three methods
    cells = Counter((s.imbalance.mu, s.imbalance.rho) for s in g.specs if s.method == Method.BASELINE)
    assert cells == {(0.1, 10): 1, (0.8, 50): 1, (0.9, 100): 3}
    assert len({s.training_set_key for s in g.specs}) == 5
    highest = {s.imbalance.classes for s in g.specs if s.imbalance.rho == 100}
    assert len(highest) == 3  # minority classes redrawn for each of the three repeats
    assert all(len(s.imbalance.classes) == round(s.imbalance.mu * 1000) for s in g.specs)
    assert {s.imbalance.max_per_class for s in g.specs} == {1000}
    assert {s.model for s in g.specs} == {"resnet10"}


def test_imagenet_cap_is_checked_against_the_largest_class():
    doc = {"name": "x", "dataset": "imagenet", "model": "resnet10", "recipe": "buda_imagenet",
           "max_per_class": 1301}
    with pytest.raises(GridError, match="max_per_class"):
        expand(doc)


def test_dablain():
    g = load_grid(GRIDS / "dablain.yaml")
    # CIFAR-10: 1 balanced CE + 3 losses x (imbalanced + re-trained) = 7
    # SVHN and CelebA: 1 balanced CE + (imbalanced + re-trained) = 3 each
    assert g.trained_networks == 7 + 3 + 3 == 13
    assert g.evaluations == 13  # no thresholding
    rows = Counter((s.dataset, s.imbalance.kind, s.loss, s.method) for s in g.specs)
    e, n = ImbalanceKind.EXPONENTIAL, ImbalanceKind.NONE
    expected = {("cifar10", n, Loss.CE, Method.BASELINE): 1}
    for loss in Loss:
        expected[("cifar10", e, loss, Method.BASELINE)] = 1
        expected[("cifar10", e, loss, Method.CLASSIFIER_RETRAINING)] = 1
    for ds in ("svhn", "celeba"):
        expected[(ds, n, Loss.CE, Method.BASELINE)] = 1
        expected[(ds, e, Loss.CE, Method.BASELINE)] = 1
        expected[(ds, e, Loss.CE, Method.CLASSIFIER_RETRAINING)] = 1
    assert rows == expected
    assert all(s.latent and s.model == "resnet32" for s in g.specs)
    assert {(s.dataset, s.imbalance.rho) for s in g.specs if s.imbalance.kind == e} == \
        {("cifar10", 100), ("svhn", 100), ("celeba", 20)}
    # Cao et al.'s order: label 0 the most images.
    assert all(s.imbalance.classes == tuple(range(10 if s.dataset != "celeba" else 2))
               for s in g.specs if s.imbalance.kind == e)
    # DRW only with LDAM; 200 epochs (CelebA 50) of the set's own size, batch 128.
    for s in g.specs:
        assert (s.recipe.drw_start_iter is not None) == (s.loss == Loss.LDAM)
    exp_cifar = next(s for s in g.specs if s.dataset == "cifar10" and s.imbalance.kind == e)
    # 5000 * 100^(-c/9) summed over c: 12,406 images -> ceil(12406/128) = 97 iters/epoch.
    assert exp_cifar.recipe.iters == 200 * 97
    bal_cifar = next(s for s in g.specs if s.dataset == "cifar10" and s.imbalance.kind == n)
    assert bal_cifar.recipe.iters == 200 * 391  # 50,000 / 128 -> 391
    bal_celeba = next(s for s in g.specs if s.dataset == "celeba" and s.imbalance.kind == n)
    assert bal_celeba.recipe.iters == 50 * 79  # 10,000 / 128 -> 79
    # Cao et al.'s code: the best epoch on the test set, so no image is held out of training.
    assert {s.selection for s in g.specs} == {Selection.TEST}
    assert {s.recipe.validation_fraction for s in g.specs} == {0}
    assert exp_cifar.recipe.select_every == 97  # every epoch is a candidate
    # Cao et al.'s regime: per-channel standardisation, crops of padded images and flips,
    # and the normalised classifier for LDAM; SVHN's digits are cropped, never mirrored.
    assert {(s.dataset, s.normalization, s.recipe.augmentation) for s in g.specs} == {
        ("cifar10", "standardize", "crop_flip"), ("celeba", "standardize", "crop_flip"),
        ("svhn", "standardize", "crop")}
    assert {s.loss for s in g.specs if s.head == "cosine"} == {Loss.LDAM}
    assert all(s.head == "cosine" for s in g.specs if s.loss == Loss.LDAM)
    assert all(s.evaluations == (Evaluation.RAW,) for s in g.specs)
    assert all(s.parent_id in {p.network_id for p in g.specs}
               for s in g.specs if s.method == Method.CLASSIFIER_RETRAINING)


def test_thresholding_may_be_empty_but_other_lists_may_not():
    base = {"name": "x", "dataset": "mnist", "model": "lenet5", "recipe": "buda_mnist"}
    assert expand({**base, "thresholding": []}).evaluations == 1
    with pytest.raises(GridError, match="empty list"):
        expand({**base, "methods": []})


def test_minority_choice_values_are_all_used_by_some_grid():
    used = {s.imbalance for p in GRIDS.glob("*.yaml") for s in load_grid(p).specs}
    assert used  # sanity; the choice values are checked per grid above
    assert {c.value for c in MinorityChoice} == {"random", "lowest", "highest"}


def test_buda_mnist_slice_is_part_of_the_full_grids():
    """The CPU slice trains the full grid's own networks (same ids), 35 per repeat: 7 cells x
    (baseline, over-, under-sampling, two-phase over and under); and its Fig. 7 block is
    grids/buda_mnist_partial.yaml's own networks, on the slice's own training sets."""
    sl = load_grid(GRIDS / "buda_mnist_slice.yaml")
    full = load_grid(GRIDS / "buda_mnist.yaml")
    partial = load_grid(GRIDS / "buda_mnist_partial.yaml")
    assert sl.name == full.name  # completion is per grid name: the full grid skips them
    fig7 = [s for s in sl.specs if s.resample_ratio != 1.0]
    cells = [s for s in sl.specs if s.resample_ratio == 1.0]
    assert len(cells) == 7 * 5 * 3 and len(fig7) == 3 * 2 * 2  # 3 mu x levels 10, 100 x over, under
    assert sl.trained_networks == 105 + 12
    assert sl.evaluations == 7 * 3 * (5 + 3) + 12  # raw for five methods, thresholded for three; Fig. 7 raw
    assert {s.network_id for s in cells} <= {s.network_id for s in full.specs}
    assert {s.network_id for s in fig7} <= {s.network_id for s in partial.specs}
    assert {s.training_set_key for s in fig7} <= {s.training_set_key for s in cells}
    assert all(s.recipe.iters == 10_000 and s.recipe.bias_lr_factor == 2.0 for s in sl.specs)


def test_buda_mnist_fig8_trains_the_slices_own_networks_with_curves():
    """Fig. 8's grid is the slice's rho = 1000 networks of repeats 0 and 1 (same ids), with curves."""
    fig8 = load_grid(GRIDS / "buda_mnist_fig8.yaml")
    sl = load_grid(GRIDS / "buda_mnist_slice.yaml")
    assert fig8.trained_networks == 4 * 3 * 2
    want = {s.network_id for s in sl.specs if s.imbalance.rho == 1000 and s.repeat < 2 and s.resample_ratio == 1.0
            and str(s.method) in ("baseline", "oversampling", "undersampling")}
    assert {s.network_id for s in fig8.specs} == want
    assert all(s.recipe.eval_every == 500 for s in fig8.specs)


@pytest.mark.parametrize("name", ["buda_mnist_slice", "buda_mnist_fig8"])
def test_the_committed_slice_keeps_its_ids(name):
    """Every network and every evaluation in a committed store (the slice, and Fig. 8's curves
    of its rho = 1000 networks) is one of today's grid of that name, and every one of the grid's
    is there: no change of the code's identity rules has orphaned a stored result (or made a
    stored network look undone)."""
    from analysis.load import load

    stored = load(str(GRIDS.parent / "docs" / "results" / name), columns=["network_id", "trial_id"])
    specs = load_grid(GRIDS / f"{name}.yaml").specs
    assert set(stored["network_id"]) == {s.network_id for s in specs}
    assert set(stored["trial_id"]) == {t for s in specs for t in s.trial_ids}
