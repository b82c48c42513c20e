import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sweep.core.grid import GridError, expand, load_grid
from sweep.core.spec import Evaluation, ImbalanceKind, Method, TrialSpec

ROOT = Path(__file__).resolve().parents[1]

MINI = {
    "name": "mini",
    "dataset": "mnist",
    "model": "lenet5",
    "recipe": {"preset": "buda_mnist", "iters": 10},
    "imbalance": {"step": {"rho": [10, 100], "mu": [0.2, 0.5]}, "linear": {"rho": [10]}},
    "methods": ["baseline", "oversampling", "undersampling", "two_phase_over"],
    "repeats": 3,
    "seed": 1,
}


def test_buda_mnist_counts_match_the_paper():
    g = load_grid(ROOT / "grids" / "buda_mnist.yaml")
    assert g.trained_networks == 22_500
    step = [s for s in g.specs if s.imbalance.kind == ImbalanceKind.STEP]
    assert len({s.training_set_key for s in step}) == 4_050
    assert len({s.training_set_key for s in g.specs}) == 4_500
    # Thresholding is an evaluation of baseline/over/under networks: 4,500 * 3 more evaluations.
    assert g.evaluations == 22_500 + 3 * 4_500


@pytest.mark.subprocess
def test_expand_json_reports_counts():
    # No timing here: a loaded CI machine is no measure of speed.
    out = subprocess.run([sys.executable, "-m", "sweep.cli", "expand", str(ROOT / "grids/buda_mnist.yaml"), "--json"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    info = json.loads(out.stdout)
    assert info["trained_networks"] == 22_500
    assert info["evaluations"] == 36_000
    assert info["packs"] >= 1


def test_ids_are_stable_across_expansion_order_and_runs():
    a = expand(MINI)
    shuffled = dict(reversed(list(MINI.items())))
    b = expand(shuffled)
    assert [s.network_id for s in a.specs] == [s.network_id for s in b.specs]
    # Known id: a change to hashing or spec content must be deliberate.
    again = expand(json.loads(json.dumps(MINI)))
    assert {s.network_id for s in a.specs} == {s.network_id for s in again.specs}
    assert len({s.network_id for s in a.specs}) == len(a.specs)


def test_integer_and_float_parameters_hash_the_same():
    other = json.loads(json.dumps(MINI))
    other["imbalance"]["step"]["rho"] = [10.0, 100.0]
    assert [s.network_id for s in expand(MINI).specs] == [s.network_id for s in expand(other).specs]


def test_minority_classes_are_redrawn_per_repeat_and_shared_by_methods():
    g = expand(MINI)
    cell = [s for s in g.specs if s.imbalance.kind == "step" and s.imbalance.rho == 10 and s.imbalance.mu == 0.5]
    by_repeat = {}
    for s in cell:
        by_repeat.setdefault(s.repeat, set()).add(s.imbalance.classes)
    assert all(len(v) == 1 for v in by_repeat.values())  # same draw for every method
    assert len({next(iter(v)) for v in by_repeat.values()}) > 1  # redrawn between repeats
    assert all(len(next(iter(v))) == 5 for v in by_repeat.values())


def test_thresholding_is_an_evaluation_not_a_training():
    g = expand(MINI)
    for s in g.specs:
        want = (Evaluation.RAW,) if s.method == Method.TWO_PHASE_OVER else (Evaluation.RAW, Evaluation.THRESHOLD)
        assert s.evaluations == want
    ids = [t for s in g.specs for t in s.trial_ids]
    assert len(set(ids)) == len(ids) == g.evaluations


def test_two_phase_depends_on_its_phase1_network():
    g = expand(MINI)
    by_id = {s.network_id: s for s in g.specs}
    for s in g.specs:
        if s.method == Method.TWO_PHASE_OVER:
            parent = by_id[s.parent_id]
            assert parent.method == Method.OVERSAMPLING
            assert parent.training_set_key == s.training_set_key and parent.seed == s.seed


@pytest.mark.parametrize("patch, message", [
    ({"datset": "mnist"}, "datset: unknown key"),
    ({"dataset": "mnst"}, "dataset: unknown value 'mnst'"),
    ({"methods": ["baseline", "smote"]}, "methods: unknown value 'smote'"),
    ({"methods": ["two_phase_under"]}, "add undersampling to methods"),
    ({"imbalance": {"step": {"rho": [10], "mu": [0.25]}}}, "whole number of minority classes"),
    ({"imbalance": {"stepp": {"rho": [10]}}}, "imbalance.stepp: unknown imbalance kind"),
    ({"imbalance": {"linear": {"rho": [0.5]}}}, "every rho must be >= 1"),
    ({"recipe": {"preset": "buda_mnist", "itrs": 5}}, "recipe.itrs: unknown key"),
    ({"recipe": "nope"}, "unknown recipe 'nope'"),
    ({"model": "allcnn"}, "allcnn does not take mnist images"),
    ({"repeats": "many"}, "repeats: bad value"),
    ({"thresholding": ["two_phase_under"]}, "not one of the grid's methods"),
])
def test_bad_grids_name_the_key_and_what_is_allowed(patch, message):
    doc = {**MINI, **patch}
    with pytest.raises(GridError) as e:
        expand(doc, source="grids/x.yaml")
    assert "grids/x.yaml" in str(e.value)
    assert message in str(e.value)


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(GridError, match="not valid YAML"):
        load_grid(bad)
    with pytest.raises(GridError, match="not found"):
        load_grid(tmp_path / "missing.yaml")


def test_experiments_blocks_mix_datasets_and_models(tmp_path):
    doc = {
        "name": "mixed", "recipe": {"preset": "buda_mnist", "iters": 5}, "methods": ["baseline"],
        "experiments": [
            {"dataset": "mnist", "model": "lenet5"},
            {"dataset": "cifar10", "model": "resnet32", "imbalance": {"exponential": {"rho": [100]}},
             "minority": "highest"},
        ],
    }
    g = expand(doc)
    assert {(s.dataset, s.model) for s in g.specs} == {("mnist", "lenet5"), ("cifar10", "resnet32")}
    exp = [s for s in g.specs if s.imbalance.kind == "exponential"][0]
    assert exp.imbalance.classes == tuple(range(10))
    with pytest.raises(GridError, match=r"experiments\[1\]\.model"):
        expand({**doc, "experiments": [{"dataset": "mnist", "model": "lenet5"},
                                       {"dataset": "mnist", "model": "nope"}]})


def test_demo_grid_is_small():
    g = load_grid(ROOT / "grids" / "demo.yaml")
    assert g.trained_networks <= 40
    assert all(s.recipe.iters <= 500 for s in g.specs)


def test_every_shipped_grid_expands():
    for path in sorted((ROOT / "grids").glob("*.yaml")):
        g = load_grid(path)
        assert g.trained_networks > 0, path
        yaml.safe_load(path.read_text())


def test_buda_mnist_recipe_trains_biases_at_twice_the_lr() -> None:
    from sweep.core.recipes import RECIPES

    assert RECIPES["buda_mnist"].bias_lr_factor == 2.0  # Caffe LeNet: lr_mult 2 on biases
    assert RECIPES["buda_imagenet224"].bias_lr_factor == 2.0  # the ResNet-10 reference's prototxt: the same
    assert all(r.bias_lr_factor == 1.0 for n, r in RECIPES.items() if n not in ("buda_mnist", "buda_imagenet224"))


def test_fields_added_later_leave_old_ids_unchanged() -> None:
    """A recipe field at the value it implicitly had before is not part of the identity."""
    g = expand({**MINI, "recipe": {"preset": "buda_mnist", "iters": 10, "bias_lr_factor": 1.0}})
    s = g.specs[0]
    assert "bias_lr_factor" not in s.identity()["recipe"]
    doubled = expand({**MINI, "recipe": {"preset": "buda_mnist", "iters": 10}}).specs[0]
    assert doubled.identity()["recipe"]["bias_lr_factor"] == 2
    assert doubled.network_id != s.network_id
    # A spec stored before the field existed reads back with the value it was trained with.
    old = json.loads(s.to_json())
    old["recipe"].pop("bias_lr_factor")
    assert TrialSpec.from_dict(old).network_id == s.network_id


def test_bad_bias_lr_factor_is_refused() -> None:
    with pytest.raises(GridError, match="bias_lr_factor"):
        expand({**MINI, "recipe": {"preset": "buda_mnist", "bias_lr_factor": 0}})


def test_a_grid_of_millions_is_refused_before_any_spec_is_built(monkeypatch):
    huge = {**MINI, "repeats": 2_000_000}
    # Refused by counting (building 40M specs would take hours and tens of GB).
    with pytest.raises(GridError, match=r"at least 40,000,000 networks.*SWEEP_MAX_GRID_NETWORKS"):
        expand(huge)
    monkeypatch.setenv("SWEEP_MAX_GRID_NETWORKS", "10")
    with pytest.raises(GridError, match="limit of 10"):
        expand(MINI)
    monkeypatch.setenv("SWEEP_MAX_GRID_NETWORKS", "100")
    assert expand(MINI).trained_networks == 5 * 3 * 4  # cells x repeats x methods, under the limit
