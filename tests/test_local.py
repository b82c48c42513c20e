from sweep.core.grid import expand
from sweep.local import run_local
from sweep.store.results import ResultStore

DOC = {
    "name": "loc", "dataset": "mnist", "model": "lenet5", "recipe": {"preset": "buda_mnist", "iters": 5},
    "imbalance": {"step": {"rho": [10], "mu": [0.5]}}, "methods": ["baseline", "oversampling"],
    "repeats": 3, "seed": 4, "pack": {"max_networks": 2},
}


def test_local_runs_whole_repeats_first_and_resumes(tmp_path, mnist):
    g = expand(DOC)
    store = str(tmp_path / "s")
    trained, failed, _ = run_local(g, store, device="cpu", max_packs=2)
    assert (trained, failed) == (4, 0)
    repeats = set(ResultStore(store).read_table("trials")["repeat"])
    assert repeats == {0, 1}  # repeat-major: two whole repeats, not a ragged subset
    trained, _, _ = run_local(g, store, device="cpu")
    assert trained == 2
    trials = ResultStore(store).read_table("trials")
    assert trials["trial_id"].is_unique and len(trials) == g.evaluations


def test_local_command_stops_on_its_budget_and_resumes(tmp_path, mnist, capsys):
    import yaml

    from sweep.local import main

    grid = tmp_path / "loc.yaml"
    grid.write_text(yaml.safe_dump(DOC))
    store = tmp_path / "s"
    assert main([str(grid), "--store", str(store), "--device", "cpu", "--max-packs", "1"]) == 0
    assert len(ResultStore(str(store)).completed_network_ids()) == 2
    assert main([str(grid), "--store", str(store), "--device", "cpu"]) == 0
    assert "4 networks trained" in capsys.readouterr().out
    assert main([str(grid), "--store", str(store), "--device", "cuda"]) == 1  # no GPU here
    assert "CUDA is not available" in capsys.readouterr().err
