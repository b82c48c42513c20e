"""SIGTERM (a SLURM time limit or preemption): the running pack saves its checkpoint where
it stands and stops as on Ctrl-C; the next run continues from there with the same numbers.

The request is what a SIGTERM handler sets (workers.preemption); the first test sets it
from a listener mid-pack, in-process, on a recipe with no periodic checkpoints at all; the
second sends a real SIGTERM to ``python -m sweep.local``. (Under SLURM, with a requeued job:
tests/test_slurm.py.)
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sweep.core.grid import expand
from sweep.core.plan import Pack
from sweep.store.results import ResultStore
from workers.monitor import PackListener
from workers.preemption import Preempted, clear_stop, request_stop, sigterm_stops, stop_requested
from workers.run_pack import run_pack

from conftest import tiny_grid

ROOT = Path(__file__).resolve().parents[1]
# 60 iterations in chunks of 50 (workers.engine.CHUNK_ITERS): a stop requested as training
# starts lands at iteration 50, where no checkpoint_every would ever save one.
GRID = tiny_grid("pre", recipe={"preset": "buda_mnist", "iters": 60, "checkpoint_every": 0})


class _SigtermAtStart(PackListener):
    """Does what the SIGTERM handler does, as the pack's training starts."""

    def on_stage_start(self, plan, model):
        request_stop()


def test_a_stop_request_checkpoints_the_running_pack_and_the_next_run_continues_with_the_same_numbers(
        small_mnist, tmp_path):
    pack = Pack(expand(GRID).specs)
    reference = run_pack(pack, None, dataset=small_mnist).tables["trials"]
    store = ResultStore(str(tmp_path / "store"))
    try:
        with pytest.raises(Preempted, match="stopped at stage 1, iteration 50, after its checkpoint"):
            run_pack(pack, store, dataset=small_mnist, listeners=[_SigtermAtStart()])
    finally:
        clear_stop()
    assert store.completed_trial_ids() == set()  # nothing of the pack stored
    assert (tmp_path / "store" / "_checkpoints" / f"{pack.pack_id}.pt").exists()
    result = run_pack(pack, store, dataset=small_mnist)
    assert result.resumed_from_iter == 50
    by_id = {r["trial_id"]: r for r in result.tables["trials"]}
    for r in reference:
        assert (by_id[r["trial_id"]]["roc_auc"], by_id[r["trial_id"]]["accuracy"]) == (r["roc_auc"], r["accuracy"])


def test_sigterm_only_requests_a_stop_and_a_second_one_raises():
    # Whatever was installed before (SIG_DFL alone, Ray's handler after an earlier test's ray.init)
    # must be back afterwards.
    before = signal.getsignal(signal.SIGTERM)
    with sigterm_stops():
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop_requested()
        with pytest.raises(Preempted):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs between bytecodes: at once
    assert not stop_requested()  # cleared on the way out, and the previous handler is back
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.subprocess
def test_sigterm_to_the_local_runner_checkpoints_says_interrupted_and_the_same_command_finishes(tmp_path, mnist):
    grid = tmp_path / "pre.yaml"
    grid.write_text(yaml.safe_dump({**GRID, "recipe": {"preset": "buda_mnist", "iters": 200, "checkpoint_every": 0}}))
    store = tmp_path / "s"
    cmd = [sys.executable, "-m", "sweep.local", str(grid), "--store", str(store), "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if ": training (" in line:  # _PackLog: the pack has begun training
                break
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (out, err)
    assert "interrupted: 0 networks stored by this run" in err and "Traceback" not in err, err
    assert list((store / "_checkpoints").glob("*.pt"))
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    trials = ResultStore(str(store)).read_table("trials")
    assert len(trials) == trials["trial_id"].nunique() == 2  # 1 network x (raw, threshold), once
    assert (trials["resumed_from_iter"] > 0).all()


def test_sigterm_reaches_sweep_run_through_whatever_handles_ctrl_c_now(monkeypatch):
    """sweep.cli's SIGTERM handler: Ray Tune's Ctrl-C handler during a sweep (it stops the
    trials), else a KeyboardInterrupt, even where SIGINT is ignored (a shell's background job)."""
    from sweep.cli import _sigterm_as_ctrl_c

    heard = []
    for handler in (lambda signum, frame: heard.append(signum), signal.SIG_IGN, signal.default_int_handler):
        monkeypatch.setattr(signal, "getsignal", lambda signum, h=handler: h)
        if handler is signal.SIG_IGN or handler is signal.default_int_handler:
            with pytest.raises(KeyboardInterrupt):
                _sigterm_as_ctrl_c(signal.SIGTERM, None)
        else:
            _sigterm_as_ctrl_c(signal.SIGTERM, None)
    assert heard == [signal.SIGINT]


def test_the_driver_puts_back_the_sigterm_handler_ray_init_replaces():
    from sweep.driver import _keep_sigterm_handler

    def ours(signum, frame):
        pass

    before = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as ray.init leaves it, to Python's eyes
        _keep_sigterm_handler(ours)
        assert signal.getsignal(signal.SIGTERM) is ours
        _keep_sigterm_handler(signal.SIG_DFL)  # a caller without a handler of its own: Ray's stays
        assert signal.getsignal(signal.SIGTERM) is ours
    finally:
        signal.signal(signal.SIGTERM, before)
