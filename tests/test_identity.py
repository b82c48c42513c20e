"""A network's identity follows what determines its weights (sweep.core.spec.FIELD_ROLES).

Every field of TrialSpec, Recipe and Imbalance is classified once: training-relevant
(in the network id), evaluation-only or bookkeeping (not in it). The lists below are the
identity rule written out: adding a field, or moving one between the lists, fails here
until the rule and this file agree.
"""

import dataclasses
from enum import StrEnum

import numpy as np
import pytest

from sweep.core.grid import expand
from sweep.core.spec import (
    FIELD_ROLES,
    ID_KEPT,
    ID_PINNED,
    FieldRole,
    Imbalance,
    Method,
    Recipe,
    TrialSpec,
)
from tests.conftest import tiny_grid

TRAINING = {
    TrialSpec: {"dataset", "model", "recipe", "imbalance", "method", "repeat", "seed", "resample_ratio", "loss",
                "lr_run", "selection", "model_revision", "head", "data_seed", "method_revision", "lr_search"},
    Recipe: {"iters", "batch_size", "base_lr", "momentum", "weight_decay", "lr_policy", "lr_gamma", "lr_power",
             "lr_milestones", "warmup_iters", "init", "phase2_lr_factor", "drw_start_iter", "drw_beta",
             "focal_gamma", "ldam_max_margin", "ldam_scale", "select_every", "validation_fraction",
             "bias_lr_factor", "normalization", "augmentation"},
    Imbalance: {"kind", "rho", "mu", "classes", "max_per_class", "rounding"},
}
EVALUATION = {TrialSpec: {"evaluations", "latent", "embeddings"}, Recipe: {"eval_every"}, Imbalance: set()}
BOOKKEEPING = {TrialSpec: {"grid"}, Recipe: {"checkpoint_every"}, Imbalance: set()}


@pytest.mark.parametrize("cls", [TrialSpec, Recipe, Imbalance], ids=lambda c: c.__name__)
def test_every_field_is_classified_and_the_classification_is_the_written_one(cls):
    fields = {f.name for f in dataclasses.fields(cls)}
    roles = FIELD_ROLES[cls]
    assert set(roles) == fields, f"unclassified: {fields - set(roles)}; stale: {set(roles) - fields}"
    assert {n for n, r in roles.items() if r == FieldRole.TRAINING} == TRAINING[cls]
    assert {n for n, r in roles.items() if r == FieldRole.EVALUATION} == EVALUATION[cls]
    assert {n for n, r in roles.items() if r == FieldRole.BOOKKEEPING} == BOOKKEEPING[cls]


def test_only_two_non_training_fields_are_written_into_ids_and_why():
    """eval_every is pinned at 0 (curves never change an id; stored curve-less ids hold) and
    checkpoint_every keeps its value (the presets' values are in stored ids)."""
    assert ID_PINNED == {"eval_every": 0} and ID_KEPT == {"checkpoint_every"}


def _spec() -> TrialSpec:
    """A spec whose fields all hold values that identity writes (none at an 'added later' default)."""
    doc = tiny_grid("ident", methods=["baseline", "two_phase_over", "oversampling"], lr=[0.01], lr_runs=2,
                    resample_ratios=[2], selection="validation")
    spec = next(s for s in expand(doc).specs if s.method == Method.TWO_PHASE_OVER)
    return spec


def _other(value):
    """Another value of the same kind."""
    if isinstance(value, StrEnum):
        return next(m for m in type(value) if m != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, tuple):
        return value + (7,) if value else (7,)
    if value is None:
        return 3
    raise AssertionError(f"no other value for {value!r}")


def _changed(spec: TrialSpec, cls: type, name: str) -> TrialSpec:
    if cls is TrialSpec:
        return dataclasses.replace(spec, **{name: _other(getattr(spec, name))})
    part = "recipe" if cls is Recipe else "imbalance"
    inner = getattr(spec, part)
    return dataclasses.replace(spec, **{part: dataclasses.replace(inner, **{name: _other(getattr(inner, name))})})


@pytest.mark.parametrize("cls", [TrialSpec, Recipe, Imbalance], ids=lambda c: c.__name__)
def test_a_training_field_changes_the_network_id_and_nothing_else_does(cls):
    spec = _spec()
    for name, role in FIELD_ROLES[cls].items():
        if cls is TrialSpec and name in ("recipe", "imbalance"):
            continue  # their own fields are checked one by one
        other = _changed(spec, cls, name)
        if role == FieldRole.TRAINING or name in ID_KEPT:
            assert other.network_id != spec.network_id, f"{cls.__name__}.{name} is left out of the id"
        else:
            assert other.network_id == spec.network_id, f"{cls.__name__}.{name} changes the id"
            assert other.trial_id("raw") == spec.trial_id("raw")


def test_a_parent_is_its_dependents_network_measured_plainly():
    spec = dataclasses.replace(_spec(), latent=True, embeddings=True)
    parent = spec.parent
    assert parent.method == Method.OVERSAMPLING and parent.method_revision == 1
    assert (parent.latent, parent.embeddings, parent.evaluations) == (False, False, ("raw",))
    assert parent.network_id == dataclasses.replace(spec, method=Method.OVERSAMPLING, latent=False,
                                                    embeddings=False).network_id


def test_curves_do_not_change_the_networks_of_a_grid():
    plain = expand(tiny_grid("c", methods=["baseline", "oversampling", "two_phase_over"]))
    curves = expand(tiny_grid("c", methods=["baseline", "oversampling", "two_phase_over"],
                              recipe={"preset": "buda_mnist", "iters": 5, "eval_every": 2}))
    assert [s.network_id for s in curves.specs] == [s.network_id for s in plain.specs]
    assert [s.trial_ids for s in curves.specs] == [s.trial_ids for s in plain.specs]
    assert all(s.recipe.eval_every == 2 for s in curves.specs)


def test_the_runs_of_one_lr_share_their_training_set_and_repeats_redraw_it():
    from workers.members import member_data

    g = expand(tiny_grid("lr", lr=[0.01, 0.001], lr_runs=2, repeats=2))
    by = {(s.repeat, s.recipe.base_lr, s.lr_run): s for s in g.specs}
    labels = np.repeat(np.arange(10), 60)
    for repeat in range(2):
        runs = [by[(repeat, lr, run)] for lr in (0.01, 0.001) for run in range(2)]
        assert len({s.training_set_key for s in runs}) == 1  # one set per repeat
        assert len({s.seed for s in runs}) == 2  # the two runs of an lr start from other weights
        subsets = [member_data(s, labels, 10).subset for s in runs]
        assert all(np.array_equal(subsets[0], x) for x in subsets[1:])
    assert by[(0, 0.01, 0)].training_set_key != by[(1, 0.01, 0)].training_set_key
    # One run per lr: the set's seed is the network seed, as it always was (unchanged ids).
    single = expand(tiny_grid("lr", repeats=2)).specs
    assert all(s.data_seed is None for s in single)
    assert [s.training_set_seed for s in single] == [s.seed for s in single]


def test_classifier_retraining_names_its_procedure_revision_in_its_id():
    doc = {"name": "d", "dataset": "cifar10", "model": "resnet32", "recipe": "ldam_drw",
           "imbalance": {"exponential": {"rho": [100]}}, "minority": "highest",
           "methods": ["baseline", "classifier_retraining"], "selection": "validation"}
    base, retrain = expand(doc).specs
    assert Method.CLASSIFIER_RETRAINING.revision == 2 and retrain.method_revision == 2
    assert retrain.identity()["method_revision"] == 2
    assert "method_revision" not in base.identity()  # unrevised methods keep their ids
    assert retrain.parent_id == base.network_id
    old = dataclasses.replace(retrain, method_revision=1)
    assert old.network_id != retrain.network_id
    # Planning refuses to train the old procedure's spec: it would store new weights under its id.
    from sweep.core.plan import plan_packs

    assert len(plan_packs([base, retrain], 8)) == 1
    with pytest.raises(ValueError, match="classifier_retraining revision 1 is no longer run"):
        plan_packs([base, old], 8)
    # A stored spec of the first procedure reads back as such.
    d = dataclasses.asdict(retrain)
    d.pop("method_revision")
    assert TrialSpec.from_dict(d).method_revision == 1


def test_a_pack_trains_bit_equal_weights_with_and_without_curves(small_mnist):
    """Curve points (and the selection points beside them) evaluate between steps: the
    networks, their weights after each stage and what they report are the same."""
    from sweep.core.plan import Pack
    from workers.run_pack import run_pack

    methods = ["baseline", "oversampling", "two_phase_over"]

    def train(recipe):
        # lr 0.05: validation accuracy peaks between curve points, so a selection that only
        # looked at curve points (as it once did) would report other states.
        g = expand(tiny_grid("bits", methods=methods, recipe=recipe, selection="validation", lr=[0.05]))
        ends = {}

        def observe(plan, model, when):
            if when == "end":
                ends[plan.number] = {p: model.member_state(p) for p in range(model.members)}

        result = run_pack(Pack(g.specs), None, dataset=small_mnist, observer=observe)
        return g, ends, result

    plain_g, plain, plain_r = train({"preset": "buda_mnist", "iters": 12})
    curve_g, curves, curve_r = train({"preset": "buda_mnist", "iters": 12, "eval_every": 5})
    assert [s.network_id for s in curve_g.specs] == [s.network_id for s in plain_g.specs]
    assert curve_r.tables["curves"] and not plain_r.tables.get("curves")
    assert plain.keys() == curves.keys() == {1, 2}
    for stage in plain:
        for p, state in plain[stage].items():
            for k, v in state.items():
                assert np.array_equal(v.numpy(), curves[stage][p][k].numpy()), (stage, p, k)
    rows = {(r["network_id"], r["evaluation"]): r for r in plain_r.tables["trials"]}
    assert {r["best_iter"] for r in rows.values()} - {5, 10, 12}  # the test is sharp
    for r in curve_r.tables["trials"]:
        mine = rows[(r["network_id"], r["evaluation"])]
        assert (r["roc_auc"], r["accuracy"], r["best_iter"]) == \
            (mine["roc_auc"], mine["accuracy"], mine["best_iter"])
