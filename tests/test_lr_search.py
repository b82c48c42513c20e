"""Learning-rate search with early stopping (issue 25): the grid key, packing the candidates
together, the halving rule, and successive halving inside a pack (stopped rows, survivors
with the full search's numbers, a resumed pack with the same survivors and numbers).

The packs train 4 LeNet-5 candidates for 40 iterations on a 2,000-image MNIST slice, ranked
at iterations 10 and 20: seconds each on one core.
"""

import numpy as np
import pytest
import torch

from sweep.core.grid import GridError, expand
from sweep.core.lr_search import LrSearch, default_rungs
from sweep.core.options import LrScheduler, RungMetric
from sweep.core.plan import Pack, network_iterations, plan_packs
from sweep.core.spec import TrialSpec
from sweep.store.results import ResultStore
from workers.engine import StageState
from workers.halving import compact_state, rank, select_members
from workers.monitor import PackListener
from workers.run_pack import run_pack

GRID = {
    "name": "lrs", "dataset": "mnist", "model": "lenet5",
    "recipe": {"preset": "buda_mnist", "iters": 40},
    "max_per_class": 100,
    "imbalance": {"step": {"rho": [10], "mu": [0.5]}},
    "methods": ["baseline"], "thresholding": [],
    "lr": [0.05, 0.01, 0.001, 0.0001], "selection": "validation", "seed": 5,
    "lr_search": {"scheduler": "halving", "rungs": [10, 20], "reduction": 2},
}


def grid(**changes):
    return expand({**GRID, **changes})


# -- the grid key ---------------------------------------------------------------------------

@pytest.mark.parametrize(("search", "message"), [
    ({"scheduler": "asha"}, "lr_search.scheduler: unknown value 'asha'"),
    ({"rungs": [10, 40]}, "rung 40 is not before the last iteration (40 iters)"),
    ({"rungs": [20, 10]}, "strictly increasing"),
    ({"rungs": [10.5]}, "whole iterations"),
    ({"metric": "loss", "mode": "max"}, "contradicts the metric loss"),
    ({"metric": "auc"}, "lr_search.metric: unknown value 'auc'"),
    ({"reduction": 1}, "lr_search.reduction: 1 is out of range"),
    ({"patience": 3}, "lr_search.patience: unknown key"),
    ({"scheduler": "full", "rungs": [10]}, "would not be used"),
    ("halving", "expected a mapping"),
])
def test_a_bad_lr_search_is_a_clear_error(search, message):
    with pytest.raises(GridError, match=message.replace("(", r"\(").replace(")", r"\)")):
        grid(lr_search=search)


def test_halving_needs_a_selection_split_and_more_than_one_candidate():
    with pytest.raises(GridError, match="selection: final has none"):
        grid(selection="final")
    with pytest.raises(GridError, match="nothing to stop"):
        grid(lr=[0.01])


def test_a_rung_beyond_an_epoch_budgets_iterations_names_them():
    with pytest.raises(GridError, match=r"rung 100,000 is not before the last iteration"):
        grid(epochs=1, lr_search={"rungs": [100_000]})


def test_without_the_key_or_with_the_full_scheduler_the_networks_keep_their_ids():
    full = expand({k: v for k, v in GRID.items() if k != "lr_search"})
    assert all(s.lr_search is None for s in full.specs)
    assert [s.network_id for s in grid(lr_search={"scheduler": "full"}).specs] == [s.network_id for s in full.specs]
    halving = grid()
    # A stopped network reports its state at a rung: another network, another id.
    assert not {s.network_id for s in halving.specs} & {s.network_id for s in full.specs}
    # ... whose random streams are the full search's (same batches, same numbers up to its rung).
    assert [s.stream_id for s in halving.specs] == [s.network_id for s in full.specs]
    s = halving.specs[1]
    assert TrialSpec.from_json(s.to_json()) == s and TrialSpec.from_json(s.to_json()).network_id == s.network_id


def test_sweep_expand_names_the_search_and_the_network_iterations_it_spends(tmp_path):
    import json

    import yaml
    from click.testing import CliRunner

    from sweep.cli import cli

    grid_file = tmp_path / "g.yaml"
    grid_file.write_text(yaml.safe_dump({**GRID, "lr_runs": 2}))  # 8 candidates: 8x10 + 4x10 + 2x20 = 160
    out = CliRunner().invoke(cli, ["expand", str(grid_file)])
    assert out.exit_code == 0, out.output
    assert "lr search:     halving on balanced_accuracy, rungs 10, 20, the best 1/2 go on" in out.output
    assert "160 network-iterations with the lr search halved in packs (50% of the full search's 320" in out.output
    info = json.loads(CliRunner().invoke(cli, ["expand", str(grid_file), "--json"]).output)
    assert info["network_iterations"] == {"with_lr_search": 160, "full_search": 320}
    grid_file.write_text(yaml.safe_dump({k: v for k, v in GRID.items() if k != "lr_search"}))
    out = CliRunner().invoke(cli, ["expand", str(grid_file)])
    assert "lr search" not in out.output and "network-iterations" not in out.output


def test_the_defaults_metric_reduction_and_a_ladder_that_leaves_one_candidate():
    s = grid(lr_search={}).specs[0].lr_search
    assert s == LrSearch(LrScheduler.HALVING, RungMetric.BALANCED_ACCURACY, (10, 20), 2)
    assert str(s.mode) == "max" and str(LrSearch(LrScheduler.HALVING, RungMetric.LOSS, (1,), 2).mode) == "min"
    assert default_rungs(10_000, 8, 2) == (1250, 2500, 5000)  # 8 -> 4 -> 2 -> 1
    assert default_rungs(10_000, 4, 3) == (1111, 3333)  # 4 -> 2 (ceil 4/3) -> 1
    assert [s.keep(n) for n in (1, 2, 3, 4, 5, 8)] == [1, 1, 2, 2, 3, 4]


def test_candidates_of_one_search_share_a_search_group_and_a_pack():
    g = grid(methods=["baseline", "oversampling"], lr_runs=2, thresholding=[])  # 2 groups of 8 candidates
    groups = {}
    for s in g.specs:
        groups.setdefault(s.search_group, []).append(s)
    assert sorted(len(v) for v in groups.values()) == [8, 8]
    for members in groups.values():
        assert len({s.method for s in members}) == 1 and len({(s.recipe.base_lr, s.lr_run) for s in members}) == 8
    packs = plan_packs(g.specs, 5)  # fewer than a group: a group is never split
    assert sorted(len(p.specs) for p in packs) == [8, 8]
    assert all(len({s.search_group for s in p.specs}) == 1 for p in packs)
    # One network per pack: Ray Tune's ASHA stops trials instead (sweep.driver).
    assert len(plan_packs(g.specs, 1)) == 16
    # The full search keeps packing as before.
    full = expand({**GRID, "methods": ["baseline", "oversampling"], "lr_runs": 2, "lr_search": None})
    assert max(len(p.specs) for p in plan_packs(full.specs, 5)) <= 5


# -- the halving rule and the compaction --------------------------------------------------

def _specs(n_groups, per_group):
    g = grid(lr=[0.1 / 10**i for i in range(per_group)],
             methods=["baseline", "oversampling", "undersampling"][:n_groups])
    return list(g.specs)


def test_rank_keeps_the_best_half_of_each_group_ties_to_the_earlier_and_diverged_last():
    specs = _specs(2, 4)
    order = sorted(range(8), key=lambda i: (specs[i].method, i))  # group members by position
    scores = np.zeros(8)
    base = [i for i in order if str(specs[i].method) == "baseline"]
    over = [i for i in order if str(specs[i].method) == "oversampling"]
    scores[base] = [0.2, 0.9, 0.5, 0.9]  # a tie for the best: both go on
    scores[over] = [0.7, 0.1, 0.8, 0.3]
    diverged = np.zeros(8, bool)
    search = specs[0].lr_search
    assert rank(specs, scores, diverged, search) == sorted([base[1], base[3], over[0], over[2]])
    diverged[over[2]] = True  # diverged: last, whatever its score
    assert rank(specs, scores, diverged, search) == sorted([base[1], base[3], over[0], over[3]])
    scores[base] = [0.5, 0.5, 0.5, 0.5]  # all tied: the earlier members
    assert set(rank(specs, scores, np.zeros(8, bool), search)) >= {base[0], base[1]}
    loss = LrSearch(LrScheduler.HALVING, RungMetric.LOSS, (10,), 2)  # lower is better
    scores[base] = [0.2, 0.9, 0.5, 0.1]
    assert {i for i in rank(specs, scores, np.zeros(8, bool), loss) if i in base} == {base[0], base[3]}


def test_select_members_cuts_member_major_and_batchnorm_layouts():
    t = torch.arange(4 * 3 * 2).reshape(4, 3, 2)  # [P, ...]
    assert torch.equal(select_members(t, [1, 3], 4), t[[1, 3]])
    bn = torch.arange(4 * 5)  # [P*C]: a BatchNorm's channels, member-major
    assert torch.equal(select_members(bn, [0, 2], 4), torch.cat([bn[0:5], bn[10:15]]))


def test_compact_state_renumbers_curves_and_cuts_every_member_table():
    state = StageState(iteration=10, diverged_at=np.array([-1, 5, -1]),
                       curves=[{"member": p, "iter": 10} for p in range(3)],
                       best_score=np.array([0.1, 0.2, 0.3]), best_iter=np.array([5, 10, 10]),
                       best_state={"w": torch.arange(6.0).reshape(3, 2)},
                       optimizer=[torch.arange(3.0), None])
    out = compact_state(state, [0, 2], 3)
    assert out.diverged_at.tolist() == [-1, -1] and out.best_score.tolist() == [0.1, 0.3]
    assert [c["member"] for c in out.curves] == [0, 1]
    assert out.best_state["w"].tolist() == [[0.0, 1.0], [4.0, 5.0]]
    assert out.optimizer[0].tolist() == [0.0, 2.0] and out.optimizer[1] is None
    assert out.iteration == 10


# -- successive halving inside a pack --------------------------------------------------------

def _raw(tables):
    return {r["network_id"]: r for r in tables["trials"] if r["evaluation"] == "raw"}


@pytest.fixture(scope="module")
def full_and_halved(small_mnist):
    full = expand({**GRID, "lr_search": None})
    halved = grid()
    return (full, _raw(run_pack(Pack(full.specs), None, dataset=small_mnist).tables),
            halved, _raw(run_pack(Pack(halved.specs), None, dataset=small_mnist).tables))


def test_halving_stops_the_worse_candidates_at_each_rung_and_records_them(full_and_halved):
    _, _, halved, rows = full_and_halved
    by_status = {}
    for r in rows.values():
        by_status.setdefault(r["status"], []).append(r)
    # 4 candidates: 2 stopped at rung 0 (iteration 10), 1 at rung 1 (iteration 20), 1 to the end.
    assert sorted((r["rung"], r["stopped_at_iter"]) for r in by_status["stopped"]) == [(0, 10), (0, 10), (1, 20)]
    (winner,) = by_status["ok"]
    assert winner["rung"] == 1 and np.isnan(winner["stopped_at_iter"] or np.nan) and winner["best_iter"] > 0
    for r in by_status["stopped"]:
        assert r["best_iter"] == r["stopped_at_iter"]  # its test metrics are of the network at its rung
        assert np.isfinite(r["roc_auc"]) and np.isfinite(r["rung_metric"])
        assert "stopped at rung" in r["error"]
    # At each rung the stopped scored no better than those that went on.
    for rung in (0, 1):
        out = [r["rung_metric"] for r in by_status["stopped"] if r["rung"] == rung]
        on = [r["rung_metric"] for r in rows.values() if (r["rung"] or 0) > rung or r["status"] == "ok"]
        assert max(out) <= min(on)
    # Fewer network-iterations than the full search: 10+10+20+40 of 4 x 40.
    spent = sum(r["stopped_at_iter"] if r["status"] == "stopped" else r["iters"] for r in rows.values())
    assert spent == 80 < 4 * 40
    assert network_iterations(halved.specs) == (80, 160)  # what `sweep expand` says it will spend


def test_the_survivor_has_the_full_searchs_numbers(full_and_halved):
    full, full_rows, halved, rows = full_and_halved
    (winner,) = [r for r in rows.values() if r["status"] == "ok"]
    spec = next(s for s in halved.specs if s.network_id == winner["network_id"])
    twin = full_rows[spec.stream_id]  # the same lr and run in the full search
    assert twin["base_lr"] == winner["base_lr"]
    for col in ("roc_auc", "accuracy", "balanced_accuracy", "val_balanced_accuracy", "best_iter"):
        assert winner[col] == twin[col], col


class _Killed(Exception):
    pass


class _DieAtIteration(PackListener):
    def __init__(self, at):
        self.at = at

    def on_iteration(self, event):
        if event.iteration >= self.at:
            raise _Killed


# Killed after the checkpoint at 10 (taken before rung 0 ranks: the resumed pack ranks again),
# and after the one at 30 (two rungs done: the checkpoint holds 1 survivor and 3 stopped).
@pytest.fixture(scope="module")
def checkpointed(small_mnist):
    """The pack with a checkpoint every 10 iterations (checkpoint_every is in the ids, so these
    are other networks than the fixture above's) and its rows run without a stop (no store)."""
    pack = Pack(grid(recipe={**GRID["recipe"], "checkpoint_every": 10}).specs)
    return pack, _raw(run_pack(pack, None, dataset=small_mnist).tables)


@pytest.mark.parametrize("kill_at", [10, 30])
def test_a_halving_pack_resumed_from_its_checkpoint_has_the_same_survivors_and_numbers(
        small_mnist, tmp_path, kill_at, checkpointed):
    pack, reference = checkpointed
    store = ResultStore(str(tmp_path / "store"))
    with pytest.raises(_Killed):
        run_pack(pack, store, dataset=small_mnist, listeners=[_DieAtIteration(kill_at)])
    assert list((tmp_path / "store" / "_checkpoints").glob("*.pt"))
    result = run_pack(pack, store, dataset=small_mnist)
    assert result.resumed_from_iter == kill_at
    rows = _raw(result.tables)
    assert set(rows) == set(reference)
    for nid, r in rows.items():
        ref = reference[nid]
        for col in ("status", "rung", "stopped_at_iter", "rung_metric", "roc_auc", "accuracy", "best_iter"):
            assert r[col] == ref[col] or (r[col] != r[col] and ref[col] != ref[col]), (col, r[col], ref[col])
    stored = store.read_table("trials")
    assert sorted(stored["status"]) == ["ok", "stopped", "stopped", "stopped"]
    # Resume skips a stopped network as it skips a trained one: training it again gives the same.
    assert store.completed_network_ids() >= set(reference)


def test_two_phase_networks_follow_their_phase1_networks_search(small_mnist):
    # Phase 1 (over-sampling) halves 4 -> 2 -> 1; a two-phase network whose phase-1 network was
    # stopped is stopped with it, untrained; the survivor's goes on to the end.
    g = grid(methods=["oversampling", "two_phase_over"], lr=[0.05, 0.01, 0.001, 0.0001])
    rows = _raw(run_pack(Pack(g.specs), None, dataset=small_mnist).tables)
    by_method = {}
    for s in g.specs:
        by_method.setdefault(str(s.method), []).append(rows[s.network_id])
    assert sorted(r["status"] for r in by_method["oversampling"]) == ["ok", "stopped", "stopped", "stopped"]
    phase2 = {r["parent_id"]: r for r in by_method["two_phase_over"]}
    for parent in by_method["oversampling"]:
        child = phase2[parent["network_id"]]
        if parent["status"] == "stopped":
            assert child["status"] == "stopped" and child["stopped_at_iter"] == 0
            assert "stopped at iteration" in child["error"]
        else:
            assert child["status"] == "ok" and np.isfinite(child["roc_auc"])


# -- on the fused LeNet-5 kernels (the GPU's path; here in Triton's interpreter) -------------

@pytest.mark.interpreter
def test_halving_on_the_fused_kernels_keeps_the_survivor_bit_equal_to_its_full_search_twin(mnist):
    """Compaction of the fused path: the stacked fp32 parameters, the fused SGD's buffers and its
    per-member hyper-parameter table, and the batch tables cut to the survivors. Under the
    interpreter a member's work does not depend on the pack's size, so the survivor's weights
    equal its twin's in the full search bit for bit (on a GPU cuBLAS may pick another algorithm
    for the smaller pack: there the rows are asked to agree, tests/test_fast_path.py)."""
    from workers import fused_kernels as fk
    from workers.datasets import ArrayDataset

    tiny = ArrayDataset(name="mnist", train_x=mnist.train_x[:400], train_y=mnist.train_y[:400],
                        test_x=mnist.test_x[:24], test_y=mnist.test_y[:24], num_classes=10, source="mnist[:400]")
    doc = {**GRID, "recipe": {"preset": "buda_mnist", "iters": 4, "batch_size": 8}, "max_per_class": 20,
           "lr": [0.05, 0.01], "lr_search": {"scheduler": "halving", "rungs": [2], "reduction": 2}}
    full, halved = expand({**doc, "lr_search": None}), expand(doc)
    weights: dict[str, dict[str, torch.Tensor]] = {}

    def observe(plan, model, when):  # noqa: ANN001
        if when == "end":
            weights.update({s.network_id: model.member_state(i) for i, s in enumerate(plan.specs)})

    full_rows = _raw(run_pack(Pack(full.specs), None, dataset=tiny, kernels="fused", observer=observe).tables)
    rows = _raw(run_pack(Pack(halved.specs), None, dataset=tiny, kernels="fused", observer=observe).tables)
    assert sorted(r["status"] for r in rows.values()) == ["ok", "stopped"]
    assert all(r["kernels"] == "fused" for r in rows.values())
    (winner,) = [r for r in rows.values() if r["status"] == "ok"]
    twin = next(s for s in halved.specs if s.network_id == winner["network_id"]).stream_id
    for col in ("roc_auc", "accuracy", "val_balanced_accuracy"):
        if fk.INTERPRETED:
            assert winner[col] == full_rows[twin][col], col
        else:  # 24 test images: one of them may go the other way
            assert winner[col] == pytest.approx(full_rows[twin][col], abs=0.05), col
    if fk.INTERPRETED:
        for name, v in weights[winner["network_id"]].items():
            assert torch.equal(v, weights[twin][name]), name
