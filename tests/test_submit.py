"""``sweep submit --slurm``: the sbatch script it writes, and what it refuses.

In-process (click's CliRunner on ``sweep.cli.cli``), no SLURM needed: ``--dry-run`` writes
the script under ``DIR/_slurm`` and prints it. Each refusal exits 1 with a message naming
the option and writes nothing. The script's run on a real slurmctld is in
tests/test_slurm.py.
"""

import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from sweep.cli import cli

from conftest import tiny_grid

# Two packs of one network each: enough to tell one task or node per pack from more.
GRID = tiny_grid("sub", methods=["baseline", "oversampling"], pack={"max_networks": 1})


@pytest.fixture
def grid_file(tmp_path):
    path = tmp_path / "sub.yaml"
    path.write_text(yaml.safe_dump(GRID))
    return path


def submit(grid_file, store, *args, env=None):
    res = CliRunner().invoke(cli, ["submit", str(grid_file), "--store", str(store), "--slurm", *args], env=env)
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    return res


def sbatch_options(script: str) -> list[str]:
    return [line.split(" ", 1)[1] for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_dry_run_multi_node_prints_the_script_it_writes_under_the_store(grid_file, tmp_path):
    store = tmp_path / "store"
    res = submit(grid_file, store, "--time", "02:00:00", "--partition", "gpu", "--account", "lab", "--qos", "normal",
                 "--gpus-per-node", "2", "--sbatch-arg=--mem=16G", "--module", "cuda/12.4",
                 "--setup", "echo hello", "--dry-run", env={"SWEEP_DATA_DIR": "/shared/data dir"})
    assert res.exit_code == 0, res.output
    script = res.stdout
    written = store / "_slurm" / "sweep-sub.sbatch"
    assert written.read_text() == script
    assert (store / "_slurm" / "sweep-sub.yaml").read_bytes() == grid_file.read_bytes()  # the job's own copy
    assert script.startswith("#!/bin/bash\n")
    assert sbatch_options(script) == [
        "--job-name=sweep-sub", f"--output={store}/_slurm/sweep-sub-%j.out", "--open-mode=append", "--nodes=1",
        "--ntasks-per-node=1", "--cpus-per-task=2", "--gpus-per-node=2", "--time=02:00:00", "--partition=gpu",
        "--account=lab", "--qos=normal", "--signal=B:TERM@120", "--no-requeue", "--mem=16G"]
    # The environment is written out, the user's lines in order, values quoted for the shell.
    assert "module load cuda/12.4\n" in script and "\necho hello\n" in script
    assert "export SWEEP_DATA_DIR='/shared/data dir'\n" in script
    root = str(Path(__file__).resolve().parents[1])
    assert f"export PYTHONPATH={root}${{PYTHONPATH:+:$PYTHONPATH}}" in script and f"\ncd {root}\n" in script
    # Ray head on the first node, workers on the others, ports from the job id; sweep run on the head.
    assert 'ray start --head --node-ip-address="$head_ip" --port="$port"' in script
    assert 'ray start --address="$address"' in script
    assert "port=$((20000 + (SLURM_JOB_ID % 400) * 100))" in script
    assert "--num-gpus=2" in script
    assert 'step=(srun --nodes=1 --ntasks=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" --gpus-per-node=2)' in script
    run = next(line for line in script.splitlines() if "-m sweep.cli run" in line)
    assert run.endswith('run "$GRID" --store "$STORE" --address "$address" -q --device cuda --precision fp32 '
                        "--kernels auto --gpus-per-pack 1 &")  # one pack per GPU
    assert "trap " in script and 'kill -TERM "$runner"' in script
    assert "scontrol requeue" not in script  # only with --requeue


def test_dry_run_array_mode_runs_the_local_runner_and_requeues_after_the_signal(grid_file, tmp_path):
    store = tmp_path / "store"
    res = submit(grid_file, store, "--array", "2", "--requeue", "--signal", "B:TERM@300", "--time", "1-00:00",
                 "--force", "--dry-run")
    assert res.exit_code == 0, res.output
    script = res.stdout
    assert sbatch_options(script) == [
        "--job-name=sweep-sub", f"--output={store}/_slurm/sweep-sub-%A_%a.out", "--open-mode=append", "--nodes=1",
        "--ntasks-per-node=1", "--cpus-per-task=1", "--array=0-1", "--time=1-00:00", "--signal=B:TERM@300",
        "--requeue"]
    assert 'python -m sweep.local "$GRID" --store "$STORE" --device cpu --precision fp32 --kernels auto &' in script
    assert "ray start" not in script and "--address" not in script  # no Ray in array mode
    assert 'if [ "$status" -eq 130 ]; then' in script
    assert 'scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"' in script  # this task alone
    assert '  if [ "$state" = JobState=RUNNING ]; then' in script  # not after `scancel`


@pytest.mark.subprocess
@pytest.mark.parametrize("mode", [(), ("--array", "2", "--force", "--requeue")])
def test_the_script_is_valid_bash(grid_file, tmp_path, mode):
    res = submit(grid_file, tmp_path / "store", *mode, "--dry-run")
    assert res.exit_code == 0, res.output
    check = subprocess.run(["bash", "-n", str(tmp_path / "store" / "_slurm" / "sweep-sub.sbatch")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize(("args", "message"), [
    (("--array", "2", "--nodes", "2"), "--nodes 2 with --array"),
    (("--array", "2", "--gpus-per-node", "2"), "--gpus-per-node 2 with --array"),
    (("--array", "3", "--force"), "--array 3: the store lacks only 2 pack(s)"),
    (("--nodes", "3", "--force"), "--nodes 3: the store lacks only 2 pack(s)"),
    (("--gpus-per-node", "4"), "4 packs would run at once (one per GPU), but the store lacks only 2 pack(s)"),
    (("--array", "2"), "is on /tmp (node-local), which each node has on its own"),
    (("--nodes", "2"), "pass --force if this path is shared"),
    (("--cpus-per-task", "0"), "--cpus-per-task must be at least 1"),
    (("--nodes", "-1"), "--nodes -1: cannot be negative"),
    (("--time", "2 hours"), "--time '2 hours': not a SLURM time"),
    (("--time", "01:00", "--signal", "B:TERM@120"), "--time 01:00 is not longer than the 120 s warning"),
    (("--signal", "B:USR1@60"), "--signal 'B:USR1@60': the job stops cleanly on SIGTERM"),
    (("--signal", "TERM@60"), "give B:TERM@SECONDS"),
    (("--partition", "gpu;rm"), "--partition 'gpu;rm': not a SLURM name"),
    (("--sbatch-arg=--array=0-9",), "sweep submit sets this itself; use --array"),
    (("--sbatch-arg=-o log",), "use (the log goes under DIR/_slurm)"),
    (("--sbatch-arg=mem=4G",), "one sbatch option per --sbatch-arg"),
    (("--module", "cuda 12"), "--module 'cuda 12': one name per --module"),
    (("--venv", "/nonexistent/venv"), "--venv /nonexistent/venv: no virtualenv there"),
    (("--data-dir", "/nonexistent/data"), "--data-dir /nonexistent/data: missing or empty"),
    (("--kernels", "fused"), "--kernels fused needs a CUDA device"),
    (("--gpu-memory-gb", "0"), "--gpu-memory-gb must be > 0"),
])
def test_refusals_name_the_option_and_write_nothing(grid_file, tmp_path, args, message):
    store = tmp_path / "store"
    res = submit(grid_file, store, *args, "--dry-run")
    assert res.exit_code == 1, res.output
    assert message in res.stderr, res.stderr
    assert not store.exists()


def test_a_uri_store_is_refused(grid_file):
    res = submit(grid_file, "s3://bucket/store", "--dry-run")
    assert res.exit_code == 1 and "not a URI" in res.stderr


def test_without_slurm_or_sbatch_nothing_is_written(grid_file, tmp_path, monkeypatch):
    store = tmp_path / "store"
    res = CliRunner().invoke(cli, ["submit", str(grid_file), "--store", str(store), "--dry-run"])
    assert res.exit_code == 1 and "needs a scheduler: --slurm" in res.stderr
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    res = submit(grid_file, store)
    assert res.exit_code == 1 and "sbatch not found on the PATH" in res.stderr and "--dry-run" in res.stderr
    assert not store.exists()


def test_a_grid_the_store_already_holds_submits_nothing(grid_file, tmp_path, fewer_test_images):
    from sweep.core.grid import load_grid
    from sweep.local import run_local

    store = tmp_path / "store"
    run_local(load_grid(grid_file), str(store), device="cpu")
    res = submit(grid_file, store, "--dry-run")
    assert res.exit_code == 0, res.output
    assert res.stdout == f"every network of grid sub is in {store}: nothing to submit\n"
    assert not (store / "_slurm").exists()
