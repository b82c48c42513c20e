import dataclasses

import pytest

from sweep.core.grid import expand
from sweep.core.plan import Pack, plan_packs
from sweep.core.spec import Method

DOC = {
    "name": "p", "dataset": "mnist", "model": "lenet5", "recipe": {"preset": "buda_mnist", "iters": 10},
    "imbalance": {"step": {"rho": [10], "mu": [0.1, 0.2, 0.3]}},
    "methods": ["baseline", "oversampling", "undersampling", "two_phase_over", "two_phase_under"],
    "repeats": 4,
}


def test_every_network_lands_in_exactly_one_pack():
    g = expand(DOC)
    packs = plan_packs(g.specs, 7)
    ids = [s.network_id for p in packs for s in p.specs]
    assert sorted(ids) == sorted(s.network_id for s in g.specs)
    assert all(len(p.specs) <= 7 for p in packs)


def test_dependents_share_a_pack_with_their_parent_and_come_after_it():
    g = expand(DOC)
    for size in (2, 3, 5, 64):
        for p in plan_packs(g.specs, size):
            pos = {s.network_id: i for i, s in enumerate(p.specs)}
            for s in p.specs:
                if s.parent_id is not None:
                    assert s.parent_id in pos and pos[s.parent_id] < pos[s.network_id]


def test_done_networks_are_skipped_and_orphaned_dependents_rebuild_their_parent():
    g = expand(DOC)
    over = [s for s in g.specs if s.method == Method.OVERSAMPLING]
    done = {s.network_id for s in g.specs if s.method != Method.TWO_PHASE_OVER}
    packs = plan_packs(g.specs, 64, done)
    stored = [s for p in packs for s in p.stored_specs]
    assert {s.method for s in stored} == {Method.TWO_PHASE_OVER}
    rebuilt = set().union(*(p.rebuild for p in packs))
    assert rebuilt == {s.network_id for s in over}
    assert not set(packs[0].trial_ids) & {t for s in over for t in s.trial_ids}


def test_plan_is_deterministic_and_round_trips():
    g = expand(DOC)
    a, b = plan_packs(g.specs, 5), plan_packs(list(reversed(g.specs)), 5)
    assert [p.pack_id for p in a] == [p.pack_id for p in b]
    assert Pack.from_dict(a[0].to_dict()) == a[0]


def test_gpu_packs_are_sized_from_memory_and_the_model():
    from sweep.core.plan import (
        DEFAULT_CPU_PACK,
        DEFAULT_GPU_PACK,
        MEMORY_FRACTION,
        member_training_bytes,
        pack_size,
        pack_sizer,
    )

    g = expand({"name": "m", "recipe": "buda_mnist", "repeats": 1, "experiments": [
        {"dataset": "mnist", "model": "lenet5", "methods": ["baseline", "oversampling"],
         "imbalance": {"step": {"rho": [10], "mu": [0.1, 0.2, 0.3]}}},
        {"dataset": "cifar10", "model": "allcnn", "recipe": "buda_cifar10", "methods": ["baseline"],
         "imbalance": {"step": {"rho": [10, 20], "mu": [0.2, 0.5]}}},
    ]})
    lenet = next(s for s in g.specs if s.model == "lenet5")
    allcnn = next(s for s in g.specs if s.model == "allcnn")
    # per member: All-CNN with 256-image batches needs far more than LeNet-5 with 64
    assert member_training_bytes("allcnn", "cifar10", 256) > 20 * member_training_bytes("lenet5", "mnist", 64)
    assert member_training_bytes("allcnn", "cifar10", 128) < member_training_bytes("allcnn", "cifar10", 256)
    per = member_training_bytes("allcnn", "cifar10", 256)
    assert pack_size(allcnn, "cuda", 8 * 2**30) == int(MEMORY_FRACTION * 8 * 2**30 // per)
    assert pack_size(allcnn, "cuda", 80 * 2**30) > pack_size(allcnn, "cuda", 8 * 2**30)
    assert pack_size(allcnn, "cuda", 2**20) == 1  # never zero
    assert pack_size(lenet, "cuda", 80 * 2**30) == DEFAULT_GPU_PACK  # capped
    assert pack_size(allcnn, "cpu") == DEFAULT_CPU_PACK
    # one plan, a size per pack key: every All-CNN pack within its memory bound
    packs = plan_packs(g.specs, pack_sizer(0, "cuda", 4 * 2**30))
    cap = pack_size(allcnn, "cuda", 4 * 2**30)
    assert cap < 4
    assert all(len(p.specs) <= cap for p in packs if p.specs[0].model == "allcnn")
    assert sum(p.specs[0].model == "lenet5" for p in packs) == 1
    assert pack_sizer(7, "cuda")(allcnn) == 7  # asked for: taken as given
    with pytest.raises(ValueError, match=">= 0"):
        pack_sizer(-1, "cpu")


def test_specs_that_differ_in_a_pack_wide_setting_never_share_a_pack():
    base = {"dataset": "mnist", "model": "lenet5", "methods": ["baseline"],
            "imbalance": {"step": {"rho": [10], "mu": [0.5]}}}
    g = expand({"name": "k", "recipe": {"preset": "buda_mnist", "iters": 10}, "experiments": [
        {**base, "selection": "final"},
        {**base, "selection": "validation"},
        {**base, "recipe": {"preset": "buda_mnist", "iters": 10, "init": "kaiming"}},
        {**base, "recipe": {"preset": "buda_mnist", "iters": 10, "checkpoint_every": 5}},
    ]})
    packs = plan_packs(g.specs, 100)
    assert len(g.specs) == 4 and len(packs) == 4  # one pack each, although all fit in one
    # Curve points are pack-wide too, but they are no part of the network: the same network
    # (same id) with curves sits in another pack.
    plain = g.specs[0]
    curves = dataclasses.replace(plain, recipe=dataclasses.replace(plain.recipe, eval_every=5))
    assert curves.network_id == plain.network_id and curves.pack_key != plain.pack_key
    assert curves.pack_key.eval_every == 5 and plain.pack_key.eval_every == 0


def test_the_catalogs_footprints_are_what_the_models_measure():
    from sweep.core.catalog import FOOTPRINTS, MODELS
    from workers.sizing import measure_footprint

    pairs = {(m, d) for m, datasets in MODELS.items() for d in datasets}
    assert set(FOOTPRINTS) == pairs
    for model, dataset in sorted(pairs):
        assert measure_footprint(model, dataset) == FOOTPRINTS[(model, dataset)], (model, dataset)
