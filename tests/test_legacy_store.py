"""A store written by main at 40e2c97 (2026-11-27, before the layout of sweep.core /
sweep.store) is still read, queried, reported on and resumed.

tests/data/legacy_store holds what ``python -m sweep.local`` wrote for its saved grid
(_grids/legacy.yaml: 6 LeNet-5s of 4 iterations with latent statistics; the embeddings
table was left out for size).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from sweep.cli import cli
from sweep.core.spec import TrialSpec
from sweep.local import run_local
from sweep.prepare import plan_for
from sweep.store.results import ResultStore

LEGACY = Path(__file__).resolve().parent / "data" / "legacy_store"


@pytest.fixture
def legacy(tmp_path: Path) -> Path:
    copy = tmp_path / "legacy"
    shutil.copytree(LEGACY, copy)
    return copy


def test_rows_and_specs_read_back(legacy: Path) -> None:
    store = ResultStore(str(legacy))
    trials = store.read_table("trials")
    # 2 training sets x (baseline raw+threshold, oversampling raw+threshold, two-phase raw)
    assert len(trials) == 10 and set(trials["status"]) == {"ok"}
    assert set(store.table_names()) >= {"trials", "class_metrics", "curves", "latent_stats"}
    # The ids of stored specs are what today's code computes from them: rows stay joinable.
    for row in trials.itertuples():
        spec = TrialSpec.from_json(row.spec_json)
        assert spec.network_id == row.network_id
        assert spec.recipe.bias_lr_factor == 1.0  # the value it was trained with


def test_query_status_and_report(legacy: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = runner.invoke(cli, ["query", str(legacy), "select method, count(*) as n from trials group by all "
                              "order by all", "--format", "json"])
    assert out.exit_code == 0, out.output
    assert {r["method"]: r["n"] for r in json.loads(out.output)} == {
        "baseline": 4, "oversampling": 4, "two_phase_over": 2}
    status = runner.invoke(cli, ["status", str(legacy), "--json"])
    assert status.exit_code == 0, status.output
    assert [g["grid"] for g in json.loads(status.output)["grids"]] == ["legacy"]
    html = tmp_path / "report.html"
    rep = runner.invoke(cli, ["report", str(legacy), "-o", str(html)])
    assert rep.exit_code == 0, rep.output
    assert html.stat().st_size > 10_000


def test_resume_trains_exactly_what_the_store_lacks(legacy: Path) -> None:
    """The saved grid's LeNet-5 recipe now trains biases at 2x the lr (Caffe), so its networks
    are new ones: resume plans exactly those, trains them, and keeps every old row."""
    saved = legacy / "_grids" / "legacy.yaml"
    # Latent statistics are measured, not part of a network's identity: turning them off
    # keeps the same networks and spares the test their pass over the training sets.
    saved.write_text(saved.read_text().replace("latent: true", "latent: false").replace("embeddings: 1", ""))
    store = ResultStore(str(legacy))
    (grid,) = store.saved_grids()
    stored = set(store.read_table("trials")["network_id"])
    packs, done = plan_for(grid, store)
    planned = {s.network_id for p in packs for s in p.stored_specs}
    assert planned == {s.network_id for s in grid.specs} - stored
    trained, failed, _ = run_local(grid, str(legacy), device="cpu", max_packs=1)
    assert (trained, failed) == (3, 0)
    after = store.read_table("trials")
    assert len(after) == 10 + 5 and stored <= set(after["network_id"])
    packs_left, _ = plan_for(grid, store)
    assert sum(len(p.stored_specs) for p in packs_left) == len(planned) - 3
