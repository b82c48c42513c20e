"""Each regime field of a recipe reaches the worker: normalisation, LDAM's head, re-training's
sets, test-set selection, K = 7; and fields added later keep the ids of older networks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from sweep.core.grid import expand
from sweep.core.grid_checks import GridError
from sweep.core.spec import Method, Normalization, Selection
from workers.members import member_data

LDAM_CIFAR = {"name": "r", "dataset": "cifar10", "model": "resnet32", "recipe": "ldam_drw",
              "imbalance": {"exponential": {"rho": [100]}}, "minority": "highest", "seed": 1}


def test_normalisation_comes_from_the_recipe_not_the_dataset() -> None:
    dablain = expand(LDAM_CIFAR).specs[0]
    buda = expand({"name": "b", "dataset": "cifar10", "model": "allcnn", "recipe": "buda_cifar10"}).specs[0]
    assert dablain.normalization == Normalization.STANDARDIZE  # CIFAR-10, Dablain's regime
    assert buda.normalization == Normalization.GCN_ZCA  # CIFAR-10, Buda's
    other = expand({**LDAM_CIFAR, "recipe": {"preset": "ldam_drw", "normalization": "gcn_zca"}}).specs[0]
    assert other.normalization == Normalization.GCN_ZCA and other.network_id != dablain.network_id
    with pytest.raises(GridError, match="recipe.normalization.*allowed: scale, standardize, gcn_zca"):
        expand({**LDAM_CIFAR, "recipe": {"preset": "ldam_drw", "normalization": "whiten"}})
    with pytest.raises(GridError, match="recipe.augmentation.*allowed: none, crop_flip"):
        expand({**LDAM_CIFAR, "recipe": {"preset": "ldam_drw", "augmentation": "mixup"}})


def test_fields_added_later_keep_old_ids_at_their_old_values() -> None:
    """A network that existed before a field did keeps its id while the field holds what the
    worker did then (MNIST scaled, Buda's CIFAR-10 whitened, no augmentation, a linear head)."""
    spec = expand({"name": "m", "dataset": "mnist", "model": "lenet5", "recipe": "buda_mnist"}).specs[0]
    identity = spec.identity()
    for name in ("normalization", "augmentation", "select_every"):
        assert name not in identity["recipe"], name
    assert "head" not in identity
    # Another normalisation is another network.
    scaled = dataclasses.replace(spec, recipe=dataclasses.replace(spec.recipe, normalization=Normalization.STANDARDIZE))
    assert scaled.network_id != spec.network_id


def test_ldam_networks_get_the_cosine_head_unless_the_grid_says_linear() -> None:
    g = expand({**LDAM_CIFAR, "losses": ["ce", "ldam"]})
    assert {(str(s.loss), str(s.head)) for s in g.specs} == {("ce", "linear"), ("ldam", "cosine")}
    lin = expand({**LDAM_CIFAR, "losses": ["ldam"], "ldam_head": "linear"}).specs[0]
    assert lin.head == "linear" and "head" not in lin.identity()  # the old LDAM network
    with pytest.raises(GridError, match="ldam_head: set, but no network"):
        expand({**LDAM_CIFAR, "ldam_head": "linear"})
    with pytest.raises(GridError, match="allcnn ends in a ReLU"):
        expand({"name": "a", "dataset": "cifar10", "model": "allcnn", "recipe": "buda_cifar10", "losses": ["ldam"]})


def test_retraining_is_selected_on_images_outside_its_training_set() -> None:
    labels = np.repeat(np.arange(10), 60)
    g = expand({**LDAM_CIFAR, "max_per_class": 50, "selection": "validation",
                "methods": ["baseline", "classifier_retraining"]})
    spec = next(s for s in g.specs if s.method == Method.CLASSIFIER_RETRAINING)
    m = member_data(spec, labels, 10)
    assert len(m.validation) > 0
    assert np.intersect1d(m.train_indices, m.validation).size == 0
    counts = np.bincount(labels[m.train_indices], minlength=10)
    assert len(set(counts.tolist())) == 1  # balanced
    # As many per class as the cap and the held-out images of the largest class allow.
    held = np.bincount(labels[m.validation], minlength=10)
    assert counts[0] == min(50, 60 - held.max())


def test_test_selection_holds_nothing_out() -> None:
    """At rho = 100 the smallest class trains on all its 50 images under test selection."""
    labels = np.repeat(np.arange(10), 5000)
    spec = expand({**LDAM_CIFAR, "selection": "test"}).specs[0]
    assert spec.selection == Selection.TEST and spec.recipe.validation_fraction == 0
    m = member_data(spec, labels, 10)
    assert len(m.validation) == 0
    assert m.counts.tolist() == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]  # Cao et al.'s list
    held = member_data(expand({**LDAM_CIFAR, "selection": "validation"}).specs[0], labels, 10)
    assert held.counts[-1] == 45


def test_class_topk_uses_k_7_against_a_naive_reference() -> None:
    from workers.latent import latent_statistics
    from workers.latent_tables import CLASS_TOPK_K

    assert CLASS_TOPK_K == 7
    g = torch.Generator().manual_seed(0)
    fe = torch.rand(1, 60, 20, generator=g, dtype=torch.float64) * (torch.rand(1, 60, 20, generator=g) > 0.3)
    w = torch.randn(1, 20, 3, generator=g, dtype=torch.float64)
    y = (fe[0] @ w[0]).argmax(1)  # every instance correct: all belong to their class group
    rows = latent_statistics(fe, w, None, y, "train", top=20, fixed_k=7)
    got = {(r["class"], r["feature"]): r["value"] for r in rows if r["statistic"] == "class_topk_ce_frequency"}
    assert {r["value"] for r in rows if r["statistic"] == "class_topk_k"} == {7.0}
    for c in range(3):
        inst = fe[0][y == c]
        ce = inst * w[0][:, c]  # [n, H] ce of the reference (= predicted = true) class
        freq = np.zeros(20)
        for row in ce:
            order = sorted(range(20), key=lambda h: (-float(row[h]), h))[:7]  # ties: lower id first
            for h in order:
                if row[h] > 0:  # zero or negative ce are never members
                    freq[h] += 1
        freq /= len(inst)
        for h in range(20):
            assert got.get((c, h), 0.0) == pytest.approx(freq[h]), (c, h)
