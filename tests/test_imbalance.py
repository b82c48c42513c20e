import numpy as np
import pytest

from sweep.core.counts import class_counts, resampled_counts
from sweep.core.spec import Imbalance, ImbalanceKind, Method
from workers.imbalance import draw_subset, resample


def test_step_counts():
    imb = Imbalance(ImbalanceKind.STEP, rho=10, mu=0.3, classes=(1, 4, 7))
    c = class_counts(imb, 10, 5000)
    assert c.tolist() == [5000, 500, 5000, 5000, 500, 5000, 5000, 500, 5000, 5000]


def test_step_extreme_ratio_keeps_one_example():
    c = class_counts(Imbalance(ImbalanceKind.STEP, rho=5000, mu=0.1, classes=(3,)), 10, 5000)
    assert c[3] == 1 and c.sum() == 9 * 5000 + 1


def test_linear_counts_are_evenly_spaced_from_max_to_max_over_rho():
    order = (3, 0, 9, 1, 2, 8, 4, 7, 5, 6)
    c = class_counts(Imbalance(ImbalanceKind.LINEAR, rho=10, classes=order), 10, 5000)
    ranked = c[list(order)]
    assert ranked[0] == 5000 and ranked[-1] == 500
    assert np.all(np.diff(ranked) == -500)  # (5000 - 500) / 9 = 500 per step


def test_linear_extreme_ratio_goes_to_one():
    c = class_counts(Imbalance(ImbalanceKind.LINEAR, rho=5000, classes=tuple(range(10))), 10, 5000)
    assert c[0] == 5000 and c[9] == 1


def test_exponential_counts_follow_cao_et_al():
    c = class_counts(Imbalance(ImbalanceKind.EXPONENTIAL, rho=100, classes=tuple(range(10))), 10, 5000)
    expected = [round(5000 * 100 ** (-i / 9)) for i in range(10)]
    assert c.tolist() == expected
    assert c[0] == 5000 and c[9] == 50


def test_none_is_balanced():
    assert class_counts(Imbalance(ImbalanceKind.NONE), 3, 7).tolist() == [7, 7, 7]


def test_bad_order_is_rejected():
    with pytest.raises(ValueError, match="order of all 10 labels"):
        class_counts(Imbalance(ImbalanceKind.LINEAR, rho=10, classes=(0, 1)), 10, 100)


def test_draw_subset_is_deterministic_and_exact():
    labels = np.repeat(np.arange(3), 100)
    counts = np.array([100, 10, 1])
    a = draw_subset(labels, counts, np.random.default_rng(5))
    b = draw_subset(labels, counts, np.random.default_rng(5))
    assert np.array_equal(a, b)
    assert np.bincount(labels[a]).tolist() == [100, 10, 1]
    assert len(np.unique(a)) == len(a)
    with pytest.raises(ValueError, match="class 2 has 100"):
        draw_subset(labels, np.array([1, 1, 101]), np.random.default_rng(0))


def test_oversampling_equalises_counts_and_keeps_every_original():
    labels = np.repeat(np.arange(3), 100)
    subset = draw_subset(labels, np.array([100, 10, 1]), np.random.default_rng(0))
    target = resampled_counts(np.bincount(labels[subset]), Method.OVERSAMPLING)
    over = resample(subset, labels, target, np.random.default_rng(1))
    assert np.bincount(labels[over]).tolist() == [100, 100, 100]
    assert set(subset) <= set(over)


def test_undersampling_equalises_counts_to_the_smallest_class():
    labels = np.repeat(np.arange(3), 100)
    subset = draw_subset(labels, np.array([100, 10, 2]), np.random.default_rng(0))
    target = resampled_counts(np.bincount(labels[subset]), Method.UNDERSAMPLING)
    under = resample(subset, labels, target, np.random.default_rng(1))
    assert np.bincount(labels[under]).tolist() == [2, 2, 2]
    assert set(under) <= set(subset)


def test_partial_levels_leave_the_requested_ratio():
    counts = np.array([1000, 1000, 1])
    assert resampled_counts(counts, Method.OVERSAMPLING, 10).tolist() == [1000, 1000, 100]
    assert resampled_counts(counts, Method.UNDERSAMPLING, 10).tolist() == [10, 10, 1]
    assert resampled_counts(counts, Method.BASELINE, 10).tolist() == [1000, 1000, 1]
    with pytest.raises(ValueError):
        resampled_counts(counts, Method.OVERSAMPLING, 0.5)


def test_exponential_counts_equal_cao_et_al_list() -> None:
    """CIFAR-10-LT at rho = 100 as Cao et al.'s code draws it (and Dablain et al. list it)."""
    from sweep.core.grid import expand
    from sweep.core.spec import Imbalance, ImbalanceKind

    cao = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    imb = Imbalance(ImbalanceKind.EXPONENTIAL, 100.0, classes=tuple(range(10)), rounding="truncate")
    assert class_counts(imb, 10, 5000).tolist() == cao
    nearest = Imbalance(ImbalanceKind.EXPONENTIAL, 100.0, classes=tuple(range(10)))
    assert class_counts(nearest, 10, 5000).tolist()[2:5] == [1797, 1077, 646]  # what main gave before
    spec = expand({"name": "lt", "dataset": "cifar10", "model": "resnet32", "recipe": "ldam_drw",
                   "minority": "highest", "imbalance": {"exponential": {"rho": [100]}}}).specs[0]
    assert spec.imbalance.rounding == "truncate"
    assert class_counts(spec.imbalance, 10, 5000).tolist() == cao
    # Step and linear specs keep their ids: the field is left out at its old value.
    assert "rounding" not in expand({"name": "s", "dataset": "mnist", "model": "lenet5", "recipe": "buda_mnist",
                                     "imbalance": {"linear": {"rho": [10]}}}).specs[0].identity()["imbalance"]
