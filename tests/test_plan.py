from sweep.grid import expand
from sweep.plan import Pack, plan_packs
from sweep.spec import Method

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
