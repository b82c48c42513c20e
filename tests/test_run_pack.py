import dataclasses

import pytest
import torch

from sweep.core.grid import expand
from sweep.core.plan import Pack, plan_packs
from sweep.core.spec import Method
from sweep.store.results import ResultStore
from workers.monitor import PackListener
from workers.run_pack import run_pack


def grid(**over):
    doc = {
        "name": "t", "dataset": "mnist", "model": "lenet5",
        "recipe": {"preset": "buda_mnist", "iters": 30},
        "max_per_class": 100,
        "imbalance": {"step": {"rho": [10], "mu": [0.5]}},
        "methods": ["baseline", "oversampling", "undersampling", "two_phase_over"],
        "repeats": 1, "seed": 3,
    }
    doc.update(over)
    return expand(doc)


def by_method(result):
    return {(r["method"], r["evaluation"]): r for r in result.tables["trials"]}


def test_rows_cover_every_evaluation_with_counts(small_mnist):
    g = grid()
    result = run_pack(Pack(g.specs), None, dataset=small_mnist)
    rows = by_method(result)
    assert len(result.tables["trials"]) == g.evaluations
    base = rows[("baseline", "raw")]
    minority = set(g.specs[0].imbalance.classes)
    assert base["class_counts"] == [10 if c in minority else 100 for c in range(10)]
    assert rows[("oversampling", "raw")]["sampled_counts"] == [100] * 10
    assert rows[("undersampling", "raw")]["sampled_counts"] == [10] * 10
    assert all(r["status"] == "ok" and 0.5 < r["roc_auc"] <= 1 for r in result.tables["trials"])
    assert len(result.tables["class_metrics"]) == 10 * g.evaluations
    # Confusion: every test image counted once per trial, no zero cell stored, and the
    # diagonal over the row sums is class_metrics' per-class recall.
    conf = result.tables["confusion"]
    per_trial = {}
    for r in conf:
        assert r["count"] > 0
        per_trial[r["trial_id"]] = per_trial.get(r["trial_id"], 0) + r["count"]
    assert per_trial == {t["trial_id"]: 1000 for t in result.tables["trials"]}
    for c in result.tables["class_metrics"][:10]:
        cells = [r for r in conf if r["trial_id"] == c["trial_id"] and r["true_class"] == c["class"]]
        hits = sum(r["count"] for r in cells if r["predicted_class"] == c["class"])
        assert hits / sum(r["count"] for r in cells) == pytest.approx(c["accuracy"])


def test_thresholding_keeps_auc_and_changes_accuracy(small_mnist):
    result = run_pack(Pack(grid(methods=["baseline"]).specs), None, dataset=small_mnist)
    rows = by_method(result)
    raw, thr = rows[("baseline", "raw")], rows[("baseline", "threshold")]
    assert raw["network_id"] == thr["network_id"] and raw["trial_id"] != thr["trial_id"]
    assert raw["roc_auc"] == pytest.approx(thr["roc_auc"], abs=1e-12)
    assert raw["accuracy"] != thr["accuracy"]


def test_member_in_a_pack_equals_member_alone(small_mnist):
    g = grid(methods=["baseline", "oversampling", "undersampling"])
    packed = by_method(run_pack(Pack(g.specs), None, dataset=small_mnist))
    alone = by_method(run_pack(Pack(g.specs[1:2]), None, dataset=small_mnist))
    key = (str(g.specs[1].method), "raw")
    assert alone[key]["roc_auc"] == pytest.approx(packed[key]["roc_auc"], abs=1e-4)
    assert alone[key]["accuracy"] == pytest.approx(packed[key]["accuracy"], abs=2e-3)


def test_same_spec_same_numbers(small_mnist):
    g = grid(methods=["baseline"])
    a = run_pack(Pack(g.specs), None, dataset=small_mnist).tables["trials"]
    b = run_pack(Pack(g.specs), None, dataset=small_mnist).tables["trials"]
    assert [r["roc_auc"] for r in a] == [r["roc_auc"] for r in b]


def test_a_diverging_member_is_marked_and_the_others_finish(small_mnist):
    g = grid(methods=["baseline", "oversampling"])
    bad = dataclasses.replace(g.specs[0], recipe=dataclasses.replace(g.specs[0].recipe, base_lr=1e6))
    result = run_pack(Pack((bad, g.specs[1])), None, dataset=small_mnist)
    rows = {(r["network_id"], r["evaluation"]): r for r in result.tables["trials"]}
    assert rows[(bad.network_id, "raw")]["status"] == "diverged"
    assert rows[(bad.network_id, "raw")]["diverged_at_iter"] is not None
    assert "non-finite" in rows[(bad.network_id, "raw")]["error"]
    assert rows[(g.specs[1].network_id, "raw")]["status"] == "ok"
    assert rows[(g.specs[1].network_id, "raw")]["roc_auc"] > 0.5


def test_two_phase_changes_only_the_output_layer_from_phase1_weights(small_mnist):
    g = grid(methods=["oversampling", "two_phase_over"])
    captured = {}

    def observe(plan, model, when):
        captured[(plan.head_only, when)] = model.member_state(0)

    run_pack(Pack(g.specs), None, dataset=small_mnist, observer=observe)
    captured[False] = (captured[(False, "start")], captured[(False, "end")])
    captured[True] = (captured[(True, "start")], captured[(True, "end")])
    phase1_after = captured[False][1]
    phase2_before, phase2_after = captured[True]
    for k in phase1_after:
        assert torch.equal(phase2_before[k], phase1_after[k]), k  # starts from phase-1 weights
        changed = not torch.equal(phase2_after[k], phase2_before[k])
        assert changed == k.startswith("fc2."), k  # only the output layer moves


def test_dependent_of_a_diverged_phase1_fails_with_the_reason(small_mnist):
    g = grid(methods=["oversampling", "two_phase_over"])
    over, two = g.specs
    over_bad = dataclasses.replace(over, recipe=dataclasses.replace(over.recipe, base_lr=1e6))
    two_bad = dataclasses.replace(two, recipe=dataclasses.replace(two.recipe, base_lr=1e6))
    rows = {r["method"]: r for r in run_pack(Pack((over_bad, two_bad)), None,
                                             dataset=small_mnist).tables["trials"]}
    assert rows["two_phase_over"]["status"] == "failed"
    assert "diverged" in rows["two_phase_over"]["error"] and over_bad.network_id in rows["two_phase_over"]["error"]


def test_rebuild_members_are_trained_but_not_stored(small_mnist, tmp_path):
    g = grid(methods=["oversampling", "two_phase_over"])
    over = [s for s in g.specs if s.method == Method.OVERSAMPLING]
    packs = plan_packs(g.specs, 8, done_network_ids={s.network_id for s in over})
    store = ResultStore(str(tmp_path / "store"))
    run_pack(packs[0], store, dataset=small_mnist)
    stored = store.read_table("trials")
    assert set(stored["method"]) == {"two_phase_over"}
    assert (stored["status"] == "ok").all()


def test_rows_go_to_the_store_atomically(small_mnist, tmp_path):
    g = grid(methods=["baseline"])
    store = ResultStore(str(tmp_path / "s"))
    run_pack(Pack(g.specs), store, dataset=small_mnist)
    assert store.completed_trial_ids() == set(g.specs[0].trial_ids)
    trials = store.read_table("trials")
    assert set(trials["grid"]) == {"t"}
    assert trials["spec_json"].iloc[0].startswith("{")
    assert not list((tmp_path / "s" / "_checkpoints").glob("*.pt"))


def test_unknown_precision_and_mixed_packs_are_rejected(small_mnist):
    g = grid(methods=["baseline"])
    with pytest.raises(ValueError, match="unknown precision"):
        run_pack(Pack(g.specs), None, dataset=small_mnist, precision="fp8")
    other = dataclasses.replace(g.specs[0], recipe=dataclasses.replace(g.specs[0].recipe, iters=31))
    with pytest.raises(ValueError, match="mixes incompatible"):
        run_pack(Pack((g.specs[0], other)), None, dataset=small_mnist)


def test_progress_says_what_the_pack_is_doing(small_mnist):
    g = grid(methods=["baseline", "two_phase_over", "oversampling"], latent=True)
    seen = []

    class Listen(PackListener):
        def on_phase(self, event):
            seen.append((event.fraction, str(event.phase)))

        on_iteration = on_phase

    run_pack(Pack(g.specs), None, dataset=small_mnist, listeners=[Listen()])
    phases = list(dict.fromkeys(p for _, p in seen))
    assert phases == ["loading data", "training", "evaluating", "latent statistics",
                      "training (from phase-1 networks)", "writing"]
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and 0 <= fractions[0] and fractions[-1] < 1


def test_curves_on_the_test_set_and_each_networks_own_training_subset(small_mnist):
    """Buda Fig. 8: accuracy on the training and the test set as training goes on."""
    g = grid(methods=["baseline", "oversampling"], recipe={"preset": "buda_mnist", "iters": 30, "eval_every": 10},
             thresholding=[])
    result = run_pack(Pack(g.specs), None, dataset=small_mnist)
    curves = result.tables["curves"]
    for s in g.specs:
        mine = [c for c in curves if c["network_id"] == s.network_id]
        assert sorted({(c["split"], c["iter"]) for c in mine}) == [
            (split, it) for split in ("test", "train") for it in (10, 20, 30)]
        assert all(0 <= c["accuracy"] <= 1 and c["loss"] > 0 for c in mine)
        assert {(c["split"], c["curve_set"]) for c in mine} == {("test", "test"), ("train", "trained")}
    # The training split is the network's own imbalanced subset: members of one training
    # set see the same images, so its baseline fits them at least as well as the test set.
    last = {(c["network_id"], c["split"]): c["accuracy"] for c in curves if c["iter"] == 30}
    base = g.specs[0].network_id
    assert last[(base, "train")] >= last[(base, "test")] - 0.05


# -- Fig. 8's training curves: on the set each network trains on --------------------------
def _trained_curve_set(small_mnist, methods, **over):
    """The pack's stage-1 specs, their member data and the "trained" curve set _curve_sets builds."""
    import types

    import workers.pack_stage as rp  # a stage's tables: workers.pack_stage
    from workers.members import member_data
    from workers.stages import plan_stages

    g = grid(methods=methods, **over)
    labels = small_mnist.train_y.numpy()
    md = [member_data(s, labels, 10) for s in g.specs]
    ctx = types.SimpleNamespace(x_train=small_mnist.train_x, y_train=small_mnist.train_y,
                                x_test=small_mnist.test_x, y_test=small_mnist.test_y)
    plan = plan_stages(Pack(g.specs))[0]
    test, trained = rp._curve_sets(ctx, plan, md)
    assert (test.curve_set, trained.curve_set) == ("test", "trained") and test.idx is None
    return g.specs, md, trained


def test_an_under_sampled_curve_uses_exactly_the_under_sampled_images(small_mnist):
    """At rho = 100 with 100 images per majority class a minority class keeps one image, so
    under-sampling trains on 10 images: the curve is measured on those, not on the subset."""
    import numpy as np

    specs, md, trained = _trained_curve_set(small_mnist, ["baseline", "undersampling"],
                                            imbalance={"step": {"rho": [100], "mu": [0.5]}})
    under = next(i for i, s in enumerate(specs) if s.method == Method.UNDERSAMPLING)
    base = next(i for i, s in enumerate(specs) if s.method == Method.BASELINE)
    n = len(md[under].train_indices)
    assert n == 10 and len(md[under].subset) == 5 * 100 + 5 * 1
    assert np.array_equal(trained.idx[under, :n].numpy(), np.sort(md[under].train_indices))
    assert (trained.y[under, n:] == -1).all() and (trained.weight[under, :n] == 1).all()
    assert (trained.weight[under, n:] == 0).all()
    # The baseline's curve is its own imbalanced subset, each image once.
    m = len(md[base].subset)
    assert np.array_equal(trained.idx[base, :m].numpy(), md[base].subset) and (trained.weight[base, :m] == 1).all()


def test_an_over_sampled_curve_is_the_accuracy_over_the_explicit_multiset(small_mnist):
    """Each image of the over-sampled stream counts as often as the stream holds it: the
    weighted metrics equal those over the multiset written out image by image, and differ
    from the imbalanced subset's (each image once)."""
    import numpy as np

    from workers.engine import _member_metrics

    specs, md, trained = _trained_curve_set(small_mnist, ["oversampling"],
                                            imbalance={"step": {"rho": [100], "mu": [0.5]}})
    m = md[0]
    assert len(m.train_indices) == 1000 and len(np.unique(m.train_indices)) == len(m.subset) == 505
    # A fixed "network": random scores per training image, shared by every view of the image.
    scores = torch.randn(len(small_mnist.train_y), 10, generator=torch.Generator().manual_seed(1)) * 3
    acc, bac, loss = _member_metrics(scores[trained.idx], trained.y, trained.weight)
    multiset = torch.from_numpy(m.train_indices)
    want = _member_metrics(scores[multiset][None], small_mnist.train_y[multiset][None])
    assert acc[0] == pytest.approx(want[0][0], abs=1e-6)
    assert bac[0] == pytest.approx(want[1][0], abs=1e-9)
    assert loss[0] == pytest.approx(want[2][0], rel=1e-5)
    subset = torch.from_numpy(m.subset)
    once = _member_metrics(scores[subset][None], small_mnist.train_y[subset][None])
    assert abs(acc[0] - once[0][0]) > 1e-3  # the subset weighs the classes 100:1, the stream evenly


def test_a_multiset_larger_than_the_cap_is_sampled_by_element(small_mnist, monkeypatch):
    """Above TRAIN_CURVE_IMAGES elements the curve is a seeded sample of the stream's elements,
    collapsed to distinct images with their counts: the weights add up to the cap."""
    import numpy as np

    import workers.pack_stage as rp  # a stage's tables: workers.pack_stage

    monkeypatch.setattr(rp, "TRAIN_CURVE_IMAGES", 300)
    specs, md, trained = _trained_curve_set(small_mnist, ["oversampling"],
                                            imbalance={"step": {"rho": [100], "mu": [0.5]}})
    assert float(trained.weight[0].sum()) == 300
    held = trained.idx[0][trained.weight[0] > 0].numpy()
    assert set(held) <= set(md[0].train_indices.tolist())
    again = _trained_curve_set(small_mnist, ["oversampling"], imbalance={"step": {"rho": [100], "mu": [0.5]}})[2]
    assert torch.equal(again.idx, trained.idx) and torch.equal(again.weight, trained.weight)
    assert np.all(np.diff(held) > 0)


def test_curve_rows_of_old_stores_still_read_and_name_their_set(tmp_path):
    """A store with curves written before ``curve_set`` and after it reads as one table; the
    old "train" rows are the imbalanced subset (schema.curve_set)."""
    from sweep.store.schema import curve_set

    store = ResultStore(str(tmp_path / "s"))
    old = [{"network_id": "a", "iter": 10, "split": s, "loss": 1.0, "accuracy": 0.5, "balanced_accuracy": 0.5}
           for s in ("test", "train")]
    new = [{"network_id": "b", "iter": 10, "split": s, "curve_set": cs, "loss": 1.0, "accuracy": 0.5,
            "balanced_accuracy": 0.5} for s, cs in (("test", "test"), ("train", "trained"))]
    store.write_pack("p1", "g", {"curves": old})
    store.write_pack("p2", "g", {"curves": new})
    table = store.read_table("curves").sort_values(["network_id", "split"])
    named = [curve_set(sp, cs) for sp, cs in zip(table["split"], table["curve_set"])]
    assert named == ["test", "subset", "test", "trained"]
