import pytest

from sweep.core.grid import expand
from sweep.local import run_local
from sweep.store.results import ResultStore

DOC = {
    "name": "loc", "dataset": "mnist", "model": "lenet5", "recipe": {"preset": "buda_mnist", "iters": 5},
    "imbalance": {"step": {"rho": [10], "mu": [0.5]}}, "methods": ["baseline", "oversampling"],
    "repeats": 3, "seed": 4, "pack": {"max_networks": 2},
}


def test_local_runs_whole_repeats_first_and_resumes(tmp_path, fewer_test_images):
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


def test_local_command_stops_on_its_budget_and_resumes(tmp_path, fewer_test_images, capsys, monkeypatch):
    import torch
    import yaml

    from sweep.local import main

    grid = tmp_path / "loc.yaml"
    grid.write_text(yaml.safe_dump(DOC))
    store = tmp_path / "s"
    assert main([str(grid), "--store", str(store), "--device", "cpu", "--max-packs", "1"]) == 0
    assert len(ResultStore(str(store)).completed_network_ids()) == 2
    assert main([str(grid), "--store", str(store), "--device", "cpu"]) == 0
    assert "4 networks trained" in capsys.readouterr().out
    # On a machine without CUDA (simulated, so the check runs on GPU machines too):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([str(grid), "--store", str(store), "--device", "cuda"]) == 1
    assert "CUDA is not available" in capsys.readouterr().err


TINY = {**DOC, "max_per_class": 50, "methods": ["baseline"], "repeats": 1, "resources": {"cpu": 2, "gpu": 0}}


def test_local_trains_with_the_packs_cpu_share_of_threads_and_records_it(tmp_path, fewer_test_images):
    """As `sweep run` (sweep.prepare.pack_threads): the grid's resources.cpu, or --cpus-per-pack;
    never the machine's core count. The rows say it, and the caller's count is restored."""
    import torch

    before = torch.get_num_threads()
    g = expand(TINY)
    run_local(g, str(tmp_path / "a"), device="cpu")
    assert set(ResultStore(str(tmp_path / "a")).read_table("trials")["device"]) == {"cpu, 2 threads"}
    run_local(g, str(tmp_path / "b"), device="cpu", cpus_per_pack=1)
    assert set(ResultStore(str(tmp_path / "b")).read_table("trials")["device"]) == {"cpu, 1 thread"}
    assert torch.get_num_threads() == before


@pytest.mark.subprocess
def test_ctrl_c_of_the_local_command_says_what_is_stored_and_exits_non_zero(tmp_path, mnist):
    """Ctrl-C (SIGINT) during the second pack: one line, the networks really stored (the first
    pack's two), exit 130, no traceback; running the command again trains only the rest."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    grid = tmp_path / "loc.yaml"
    grid.write_text(yaml.safe_dump({**DOC, "recipe": {"preset": "buda_mnist", "iters": 200}, "max_per_class": 50,
                                    "resources": {"cpu": 1, "gpu": 0}}))
    store = tmp_path / "s"
    cmd = [sys.executable, "-m", "sweep.local", str(grid), "--store", str(store), "--device", "cpu"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # SIGINT as a terminal delivers it: a shell's background job would start with it ignored.
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300
        while len(ResultStore(str(store)).completed_network_ids()) < 2:  # the first pack is stored
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [ln for ln in err.splitlines() if " INFO " not in ln]  # the log lines of the packs
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert lines == ["interrupted: 2 networks stored by this run (2 of 6 networks of loc in the store); "
                     "the same command continues"], err
    assert "networks trained" not in out
    assert len(ResultStore(str(store)).completed_network_ids()) == 2
