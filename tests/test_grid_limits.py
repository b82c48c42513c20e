"""Hostile grid files (issue 22, item 9): YAML alias bombs, oversized files, non-finite or
absurd numbers. Each is a one-line GridError naming the file and the key, raised while the
grid is read (so `sweep expand` refuses it too), never a traceback deep in a worker.

In-process: load_grid, and the CLI through click's CliRunner.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from sweep.cli import cli
from sweep.core.grid import GridError, load_grid
from sweep.core.grid_checks import MAX_GRID_BYTES, MAX_GRID_NODES
from sweep.core.grid_recipe import RECIPE_BOUNDS

from conftest import tiny_grid

GRID = tiny_grid("hostile")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    return path


def changed(tmp_path: Path, changes: dict, recipe: dict | None = None) -> Path:
    doc = copy.deepcopy(GRID)
    doc.update(changes)
    if recipe is not None:
        doc["recipe"] = {**doc["recipe"], **recipe}
    return write(tmp_path, yaml.safe_dump(doc))


def bomb(key: str, levels: int) -> str:
    """A grid whose ``key`` is ``levels`` levels of nine aliases each (9**levels values)."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        refs = ", ".join([f"*a{i - 1}"] * 9)
        lines.append(f"a{i}: &a{i} [{refs}]")
    anchors = "\n".join(lines)
    # The anchors live under `description` (free text), the bomb under `key`.
    body = yaml.safe_dump({k: v for k, v in GRID.items() if k != key})
    return "description:\n" + "\n".join("  " + ln for ln in anchors.splitlines()) + f"\n{key}: *a{levels - 1}\n" + body


def refused(path: Path, *needles: str) -> str:
    with pytest.raises(GridError) as info:
        load_grid(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message and len(message) < 1000, message[:2000]
    for needle in needles:
        assert needle in message, message
    return message


@pytest.mark.parametrize("key", ["name", "resources", "seed"])
def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path, key) -> None:
    path = write(tmp_path, bomb(key, 9))  # 387 million values in about 1.5 KB
    assert path.stat().st_size < 2000
    refused(path, "YAML aliases expand to more than", f"{MAX_GRID_NODES:,}")


def test_expand_refuses_an_alias_bomb_in_one_short_line(tmp_path) -> None:
    path = write(tmp_path, bomb("name", 6))  # 531,441 values: small enough for the old code to print
    res = CliRunner().invoke(cli, ["expand", str(path)])
    assert res.exit_code == 1, res.output[:2000]
    assert res.output.startswith(f"Error: {path}: ") and res.output.count("\n") == 1, res.output[:2000]
    assert "aliases" in res.output


def test_a_recursive_alias_and_deep_nesting_are_refused(tmp_path) -> None:
    refused(write(tmp_path, "description: &d [1, *d]\n" + yaml.safe_dump(GRID)), "alias refers to a value that contains it")
    refused(write(tmp_path, "description: " + "[" * 5000 + "]" * 5000 + "\n" + yaml.safe_dump(GRID)),
            "nested more than")


def test_a_few_aliases_are_fine(tmp_path) -> None:
    text = yaml.safe_dump({k: v for k, v in GRID.items() if k != "imbalance"}) + (
        "imbalance: {step: {rho: &rhos [10, 100], mu: [0.5]}, linear: {rho: *rhos}}\n")
    assert load_grid(write(tmp_path, text)).trained_networks == 4  # step x 2 rho, linear x 2 rho


def test_a_grid_file_over_the_size_limit_is_refused_unread(tmp_path) -> None:
    path = write(tmp_path, yaml.safe_dump(GRID) + "# " + "x" * MAX_GRID_BYTES + "\n")
    refused(path, f"more than the {MAX_GRID_BYTES:,} a grid file may have")


@pytest.mark.parametrize("changes, recipe, needles", [
    pytest.param({"lr": [float("inf")]}, None, ["lr: bad value inf", "finite"], id="lr-inf"),
    pytest.param({"lr": [10**400]}, None, ["lr: bad value", "finite"], id="lr-int-overflows-float"),
    pytest.param({"lr": [1e9]}, None, ["lr: 1000000000.0 is out of range", "> 0 and <= 100"], id="lr-huge"),
    pytest.param({}, {"momentum": float("inf")}, ["recipe.momentum: inf is not a finite number", ">= 0 and < 1"],
                 id="momentum-inf"),
    pytest.param({}, {"weight_decay": float("nan")}, ["recipe.weight_decay: nan is not a finite number", "0..1"],
                 id="weight-decay-nan"),
    pytest.param({}, {"iters": 100000000000000000000},
                 ["recipe.iters: 100000000000000000000 is out of range", "1..100,000,000"], id="iters-1e20-int"),
    pytest.param({}, {"iters": 1e20}, ["recipe.iters:", "out of range", "1..100,000,000"], id="iters-1e20-float"),
    pytest.param({}, {"iters": float("inf")}, ["recipe.iters: bad value inf"], id="iters-inf"),
    pytest.param({}, {"batch_size": 10**9}, ["recipe.batch_size:", "1..65,536"], id="batch-size"),
    pytest.param({}, {"base_lr": float("nan")}, ["recipe.base_lr: nan is not a finite number"], id="base-lr-nan"),
    pytest.param({}, {"lr_milestones": [5, 10**12]}, ["recipe.lr_milestones:", "0..100,000,000"], id="milestones"),
    pytest.param({}, {"drw_start_iter": float("inf")}, ["recipe.drw_start_iter: bad value inf"], id="drw-inf"),
    pytest.param({}, {"focal_gamma": -1.0}, ["recipe.focal_gamma: -1.0 is out of range", "0..100"], id="focal"),
    pytest.param({"seed": 10**30}, None, ["seed: 1000000000000000000000000000000 is out of range"], id="seed"),
    pytest.param({"imbalance": {"step": {"rho": [1e300], "mu": [0.5]}}}, None,
                 ["imbalance.step.rho: 1e+300 is out of range", "1..1,000,000"], id="rho"),
    pytest.param({"imbalance": {"step": {"rho": [10], "mu": [float("nan")]}}}, None,
                 ["imbalance.step.mu: bad value nan"], id="mu-nan"),
    pytest.param({"resample_ratios": [float("inf")]}, None, ["resample_ratios: bad value inf"], id="ratios"),
    pytest.param({"resources": {"cpu": 1e9, "gpu": 0}}, None, ["resources.cpu:", "0..1,024"], id="cpus"),
    pytest.param({"resources": {"cpu": 1, "gpu": float("inf")}}, None, ["resources.gpu: bad value inf"],
                 id="gpus-inf"),
    pytest.param({"pack": {"max_networks": 10**12}}, None, ["pack.max_networks:", "0..65,536"], id="pack"),
    pytest.param({"epochs": 1e9}, None, ["epochs:", "0 and <= 100,000"], id="epochs"),
    pytest.param({"epochs": 90_000, "max_per_class": 5000}, {"batch_size": 1},
                 ["epochs: 90000 epochs are", "at most 100,000,000 iterations"],
                 id="epochs-to-iters"),
    pytest.param({"latent": "no"}, None, ["latent: bad value 'no'", "true, false"], id="latent-not-a-bool"),
    pytest.param({"name": "g" * 300}, None, ["name:", "at most 128 characters"], id="name-too-long"),
])
def test_every_number_is_finite_and_bounded(tmp_path, changes, recipe, needles) -> None:
    refused(changed(tmp_path, changes, recipe), *needles)


def test_every_numeric_recipe_field_has_a_bound() -> None:
    import dataclasses

    from sweep.core.spec import Recipe

    numeric = {f.name for f in dataclasses.fields(Recipe)
               if f.type in ("int", "float", "int | None", "tuple[int, ...]")}
    assert numeric and numeric <= set(RECIPE_BOUNDS), numeric - set(RECIPE_BOUNDS)


def test_iters_1e20_is_refused_by_expand_with_the_allowed_range(tmp_path) -> None:
    path = changed(tmp_path, {}, {"iters": 100000000000000000000})
    res = CliRunner().invoke(cli, ["expand", str(path)])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert f"Error: {path}: recipe.iters: 100000000000000000000 is out of range (allowed: 1..100,000,000)" in res.output


@pytest.mark.parametrize("key", ["name", "resources", "seed", "dataset", "lr"])
def test_expand_quotes_a_shared_billion_value_document_in_a_few_characters(key) -> None:
    # What a YAML alias bomb builds, handed to expand() without parse_grid_yaml (the Python
    # API, a saved grid read by another path): quoting it must not print it.
    from sweep.core.grid import expand

    value: object = ["x"] * 9
    for _ in range(9):
        value = [value] * 9
    with pytest.raises(GridError) as info:
        expand({**GRID, key: value})
    assert len(str(info.value)) < 1000 and "\n" not in str(info.value)
