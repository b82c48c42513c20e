"""``sweep submit --slurm`` against a real SLURM: a one-node CPU cluster on this machine.

The module's fixture starts Debian's munged, slurmctld and slurmd (``apt-get install
slurm-wlm munge``; .ci/run installs them) as children of the test, with their configuration,
key, state and logs in a temp folder and ports of their own, so nothing of the machine's own
SLURM (if any) is touched; the tests are skipped, saying why, where the daemons are not
installed or cannot start. The grid: two packs of one LeNet-5 on 50 MNIST images per class,
300 iterations. Each job, in either mode, is sent SIGTERM mid-pack (as before a time limit),
requeues itself and finishes; the store then holds every network exactly once, with the
numbers ``python -m sweep.local`` stores for the same grid on this machine.
"""

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from sweep.cli import cli
from sweep.core.grid import load_grid
from sweep.local import run_local
from sweep.store.results import ResultStore

from conftest import tiny_grid

pytestmark = pytest.mark.slurm

# Two packs of one LeNet-5 each, long enough to be stopped mid-training. In array mode SIGTERM
# comes as training starts, and the runner checkpoints at the end of its chunk of 50
# iterations, before the first periodic checkpoint; multi-node mode (Ray Tune stops its
# trials) resumes from the periodic one.
CHECKPOINT_EVERY = 100
GRID = tiny_grid("slurm", methods=["baseline", "oversampling"], pack={"max_networks": 1},
                 recipe={"preset": "buda_mnist", "iters": 300, "checkpoint_every": CHECKPOINT_EVERY})
DAEMONS = ("munged", "slurmctld", "slurmd")
WAIT_SECONDS = 240  # for one job; they take seconds to a minute on a busy 2-core machine

SLURM_CONF = """\
ClusterName=sweeptest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=socket={dir}/munge.socket,cred_expire=5
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmUser=root
SlurmdUser=root
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=30
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path.name}: none)"


@pytest.fixture(scope="module")
def slurm():
    """A running one-node cluster; its folder. Client commands find it through SLURM_CONF."""
    missing = [t for t in (*DAEMONS, "sbatch", "squeue", "scontrol", "scancel") if shutil.which(t) is None
               and not os.path.exists(f"/usr/sbin/{t}")]
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} not found): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("slurmd must run as root to start jobs; these tests start their own cluster")
    d = Path(tempfile.mkdtemp(prefix="slurm", dir="/tmp"))
    for sub in ("state", "spool"):
        (d / sub).mkdir()
    d.chmod(0o700)
    key = d / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    host = socket.gethostname()
    conf = d / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=host, ctld_port=_free_port(), slurmd_port=_free_port(), dir=d,
                                      cpus=os.cpu_count()))
    sbin = {t: shutil.which(t) or f"/usr/sbin/{t}" for t in DAEMONS}
    procs = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", str(conf))
        try:
            procs.append(subprocess.Popen(
                [sbin["munged"], "-F", "-f", f"--socket={d}/munge.socket", f"--key-file={key}",
                 f"--log-file={d}/munged.log", f"--pid-file={d}/munged.pid", f"--seed-file={d}/munged.seed"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            _wait_for(lambda: (d / "munge.socket").exists(), 10)
            procs.append(subprocess.Popen([sbin["slurmctld"], "-D", "-i", "-f", str(conf)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            procs.append(subprocess.Popen([sbin["slurmd"], "-D", "-f", str(conf)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            if not _wait_for(lambda: _sinfo_state() == "idle", 30):
                pytest.skip(f"the one-node SLURM cluster did not start (node state {_sinfo_state()!r}); "
                            f"slurmctld.log:\n{_tail(d / 'slurmctld.log')}\nslurmd.log:\n{_tail(d / 'slurmd.log')}")
            yield d
        finally:
            subprocess.run(["scancel", "--full", "--user", "root"], capture_output=True, timeout=30)
            for p in reversed(procs):  # slurmd first: it ends the steps it still runs
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            shutil.rmtree(d, ignore_errors=True)


def _sinfo_state() -> str:
    res = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    return res.stdout.strip()


def _wait_for(ready, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ready():
            return True
        time.sleep(0.5)
    return False


def _job(job_id: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30).stdout


def _states(job_id: str) -> list[str]:
    """Every task's state (one for a plain job)."""
    return re.findall(r"JobState=(\S+)", _job(job_id))


def _logs(store: Path) -> str:
    return "\n".join(f"== {p.name}\n{_tail(p, 40)}" for p in sorted((store / "_slurm").glob("*.out")))


def _wait_until_done(job_id: str, store: Path) -> None:
    finished = _wait_for(lambda: (s := _states(job_id)) and all(x in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
                                                                for x in s), WAIT_SECONDS)
    assert finished, f"job {job_id} not done after {WAIT_SECONDS} s: {_states(job_id)}\n{_logs(store)}"
    assert set(_states(job_id)) == {"COMPLETED"}, f"{_job(job_id)}\n{_logs(store)}"


def _submit(grid_file: Path, store: Path, *args: str) -> str:
    res = CliRunner().invoke(cli, ["submit", str(grid_file), "--store", str(store), "--slurm", *args])
    assert res.exit_code == 0, (res.output, res.exception)
    m = re.match(r"submitted job (\d+) ", res.stdout)
    assert m, res.stdout
    assert f"squeue -j {m.group(1)}" in res.stdout and f"sweep status {store}" in res.stdout
    return m.group(1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """What the local runner stores for a grid on this machine: trial id -> its numbers."""
    cache = {}

    def numbers(doc):
        if doc["name"] not in cache:
            path = tmp_path_factory.mktemp("ref") / "grid.yaml"
            path.write_text(yaml.safe_dump(doc))
            store = str(path.parent / "store")
            run_local(load_grid(path), store, device="cpu")
            cache[doc["name"]] = _numbers(ResultStore(store).read_table("trials"))
        return cache[doc["name"]]

    return numbers


def _numbers(trials: pd.DataFrame) -> dict:
    return {r.trial_id: (r.roc_auc, r.accuracy) for r in trials.itertuples()}


def _stored_once(store: Path, doc: dict) -> pd.DataFrame:
    """The store holds every evaluation of the grid exactly once, all ``ok``."""
    trials = ResultStore(str(store)).read_table("trials")
    grid = load_grid(store / "_slurm" / f"sweep-{doc['name']}.yaml")
    assert len(trials) == trials["trial_id"].nunique() == grid.evaluations, trials[["trial_id", "status"]]
    assert set(trials["status"]) == {"ok"}
    assert not list((store / "_checkpoints").glob("*.pt"))  # removed once stored
    return trials


@pytest.fixture
def grid_file(tmp_path):
    def write(doc):
        path = tmp_path / f"{doc['name']}.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path

    return write


def _stop_and_requeue(job: str, store: Path, tasks: int) -> None:
    """`scancel --signal=TERM --batch`, as SLURM does before a time limit; the script requeues
    the job (every task). SLURM starts it again once its credential has expired (cred_expire:
    120 s by default, 5 s here; starting it sooner with `scontrol update StartTime=now` made
    the launch fail now and then) and its scheduler looks (every second here)."""
    subprocess.run(["scancel", "--signal=TERM", "--batch", job], check=True, timeout=30)
    requeued = _wait_for(lambda: _job(job).count("Restarts=1") == tasks, WAIT_SECONDS)
    assert requeued, f"{_job(job)}\n{_logs(store)}"


def test_array_mode_two_tasks_stopped_mid_pack_resume_from_their_sigterm_checkpoints(slurm, grid_file, tmp_path,
                                                                                      reference):
    """Two tasks, one pack each; SIGTERM mid-training: each runner saves its pack's checkpoint
    where it stands and stops (exit 130), the script requeues the task, and the task, started
    again, continues its pack from that checkpoint: each network once, the local numbers."""
    store = tmp_path / "store"
    job = _submit(grid_file(GRID), store, "--array", "2", "--force", "--requeue")  # --force: /tmp is this node's
    logs = [store / "_slurm" / f"sweep-slurm-{job}_{task}.out" for task in (0, 1)]
    training = _wait_for(lambda: all(": training (" in _tail(log, 100) for log in logs), WAIT_SECONDS)
    assert training, _logs(store)
    _stop_and_requeue(job, store, tasks=2)
    local = reference(GRID)  # while the tasks start again
    _wait_until_done(job, store)
    trials = _stored_once(store, GRID)
    assert (trials["resumed_from_iter"] > 0).all(), trials["resumed_from_iter"]  # the checkpoints SIGTERM made
    assert _numbers(trials) == local
    for log in logs:
        text = log.read_text()
        assert "interrupted: 0 networks stored by this run" in text and "requeueing job" in text, text


@pytest.mark.ray  # Ray runs in the job on this machine: the Ray tier
def test_multi_node_mode_on_one_node_stopped_and_requeued_resumes_its_packs(slurm, grid_file, tmp_path, reference):
    """Ray on the allocation, `sweep run` on its head; SIGTERM once both packs have saved a
    checkpoint: the sweep stops as on Ctrl-C ("interrupted", exit 130), Ray stops, the job is
    requeued and continues both packs from their checkpoints: each network once, the local numbers."""
    store = tmp_path / "store"
    # A CPU cluster's job (--gpus-per-node 0), with both packs at once on the node's two CPUs.
    job = _submit(grid_file(GRID), store, "--gpus-per-node", "0", "--cpus-per-task", "2", "--requeue")
    checkpointed = _wait_for(lambda: len(list((store / "_checkpoints").glob("*.pt"))) == 2, WAIT_SECONDS)
    assert checkpointed, _logs(store)
    _stop_and_requeue(job, store, tasks=1)
    _wait_until_done(job, store)
    trials = _stored_once(store, GRID)
    assert (trials["resumed_from_iter"] >= CHECKPOINT_EVERY).all(), trials["resumed_from_iter"]
    assert _numbers(trials) == reference(GRID)
    log = _logs(store)
    assert "Ray at " in log and "interrupted: 2 networks of this run are not stored" in log, log
    # Ray stopped with the job: none of its processes is left on the node.
    left = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline(p).find(f"ray-{job}") >= 0]
    assert not left, [_cmdline(p) for p in left]


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_a_job_cancelled_with_scancel_is_not_requeued(slurm, grid_file, tmp_path):
    """`scancel` sends SIGTERM as the time limit's warning does; the runner stops the same way,
    but the job is not requeued: the user asked it to end."""
    store = tmp_path / "store"
    job = _submit(grid_file(GRID), store, "--array", "1", "--requeue")
    log = store / "_slurm" / f"sweep-slurm-{job}_0.out"
    assert _wait_for(lambda: ": training (" in _tail(log, 100), WAIT_SECONDS), _logs(store)
    subprocess.run(["scancel", job], check=True, timeout=30)
    assert _wait_for(lambda: "not requeued" in _tail(log, 100), WAIT_SECONDS), _logs(store)
    assert _wait_for(lambda: _states(job) == ["CANCELLED"], WAIT_SECONDS), _job(job)
    assert "Restarts=0" in _job(job) and "requeueing" not in log.read_text()


def test_a_partition_slurm_rejects_is_refused_in_its_own_words(slurm, grid_file, tmp_path):
    store = tmp_path / "store"
    res = CliRunner().invoke(cli, ["submit", str(grid_file(GRID)), "--store", str(store), "--slurm",
                                   "--partition", "nosuchpartition"])
    assert res.exit_code == 1
    assert "SLURM refused the job, nothing was submitted: sbatch: error: invalid partition specified: " \
           "nosuchpartition" in res.stderr, res.stderr

