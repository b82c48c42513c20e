"""Bad input never starts training: a clear message, a non-zero exit, nothing started.

Each test runs the CLI in-process (click's CliRunner, on ``sweep.cli.cli``, the group the
``sweep`` console script's ``main`` runs) with one kind of bad input: a malformed or
contradictory grid, an unwritable store, a dataset that is not there, resources the cluster
cannot provide, bad option values, and reading commands on a store that is not there. Each
checks the exit status, that the message names the problem, and that nothing started: no
trials, failures, grid copy (``_grids``) or checkpoint in the store, and a store that already
held results is left byte for byte as it was. Two smoke tests run the real ``sweep`` console
script in a subprocess (a refusal and a success), and one the real embedded Ray; the
other cluster checks run on fake Ray nodes (``ray.nodes()``), Ray never started.

The grids are tiny (one step cell, 50 images per class, 5 iterations), so a run that
wrongly started would still end quickly and fail the assertions, not the time limit.
"""

import copy
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from click.testing import CliRunner

from sweep.cli import cli
from sweep.core.grid import load_grid
from sweep.store.results import ResultStore

from conftest import tiny_grid

ROOT = Path(__file__).resolve().parents[1]

GRID = tiny_grid("bad")
# Embedded Ray on this machine's CPUs only, even where it has a GPU: the resource and
# device cases below must be refused everywhere, never trained.
CPU_ONLY = {**os.environ, "RAY_AUTH_MODE": "disabled", "CUDA_VISIBLE_DEVICES": ""}


@dataclass(frozen=True)
class Ran:
    """What a command did: its exit status, its two streams, and an exception it let escape
    (in-process; a subprocess shows it as a traceback on stderr)."""

    returncode: int
    stdout: str
    stderr: str
    escaped: BaseException | None = None


def sweep(*args: str) -> Ran:
    """The CLI in-process, as the console script runs it (standalone mode: exit statuses,
    ``Error: ...`` on stderr)."""
    res = CliRunner().invoke(cli, list(args))
    escaped = None if res.exception is None or isinstance(res.exception, SystemExit) else res.exception
    return Ran(res.exit_code, res.stdout, res.stderr, escaped)


def sweep_process(*args: str) -> Ran:
    """The real ``sweep`` console script (``sweep.cli:main``) in a subprocess."""
    script = shutil.which("sweep", path=os.path.dirname(sys.executable)) or shutil.which("sweep")
    if script is None:  # pragma: no cover - the README's install makes it (pip install -e .)
        pytest.skip("the `sweep` console script is not installed (pip install -e .)")
    res = subprocess.run([script, *args], capture_output=True, text=True, cwd=ROOT, timeout=120, env=CPU_ONLY)
    return Ran(res.returncode, res.stdout, res.stderr)


def grid_file(tmp_path: Path, changes: dict | None = None, drop: tuple = (), text: str | None = None,
              name: str = "grid.yaml") -> Path:
    doc = copy.deepcopy(GRID)
    doc.update(changes or {})
    for key in drop:
        doc.pop(key)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc) if text is None else text)
    return path


def assert_refused(res: Ran, *needles: str, rc: int = 1) -> None:
    """Exit code ``rc``, every needle on stderr, no traceback, nothing trained."""
    out = (f"rc={res.returncode}\nstdout:\n{res.stdout[-2000:]}\nstderr:\n{res.stderr[-4000:]}"
           f"\nescaped: {res.escaped!r}")
    assert res.returncode == rc, out
    assert res.escaped is None and "Traceback" not in res.stderr, out
    for needle in needles:
        assert needle in res.stderr, f"{needle!r} missing\n{out}"
    assert "networks trained" not in res.stdout, out


def assert_nothing_started(store: Path) -> None:
    """No file at all in a store the bad run was the first to use (it may create the empty folder)."""
    if not store.exists():
        return
    assert store.is_dir()
    assert not (store / "trials").exists() and not (store / "failures").exists()
    assert not (store / "_grids").exists()  # no sweep recorded for `sweep resume` to pick up
    assert not list((store / "_checkpoints").glob("*"))
    assert not (store / "_ray").exists()  # Tune never started
    assert [p for p in store.rglob("*") if p.is_file()] == []


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def stored(tmp_path) -> Path:
    """A store holding results of grid `bad` (1 of its 2 networks), its grid copy and a checkpoint."""
    path = grid_file(tmp_path, {"repeats": 2}, name="stored.yaml")
    g = load_grid(path)
    store = ResultStore(str(tmp_path / "stored"))
    store.save_grid(g)
    spec = g.specs[0]
    store.write_pack("p1", g.name, {"trials": [
        {"trial_id": spec.trial_id(e), "network_id": spec.network_id, "pack_id": "p1", "status": "ok"}
        for e in spec.evaluations]})
    (Path(store.checkpoint_dir()) / "p2.pt").write_bytes(b"a pack's checkpoint")
    assert store.completed_network_ids() == {spec.network_id}
    return tmp_path / "stored"


# -- 1. malformed grids ------------------------------------------------------------------

@pytest.mark.parametrize("changes, text, needles", [
    pytest.param(None, "name: bad\ndataset: [mnist\nmodel: lenet5\n", ["not valid YAML", "line 2"], id="yaml-syntax"),
    pytest.param(None, "- just\n- a list\n", ["the grid must be a YAML mapping", "top-level keys:"], id="not-a-mapping"),
    pytest.param({"repeat": 3}, None, ["repeat: unknown key", "allowed:", "repeats"], id="unknown-key"),
    pytest.param({"imbalance": {"step": {"rho": [10], "mus": [0.5]}}}, None,
                 ["imbalance.step.mus: unknown key", "allowed:", "mu"], id="unknown-nested-key"),
    pytest.param({"methods": ["baseline", "smote"]}, None,
                 ["methods: unknown value 'smote'", "oversampling"], id="unknown-method"),
    pytest.param({"dataset": "mnits"}, None, ["dataset: unknown value 'mnits'", "cifar10"], id="unknown-dataset"),
    pytest.param({"repeats": "two"}, None, ["repeats: bad value 'two'", "an integer"], id="bad-type"),
])
def test_a_malformed_grid_names_the_file_and_the_key(tmp_path, changes, text, needles):
    path = grid_file(tmp_path, changes, text=text)
    res = sweep("run", str(path), "--store", str(tmp_path / "store"))
    assert_refused(res, f"Error: {path}:", *needles)
    assert not (tmp_path / "store").exists()  # refused before the store is even created


def test_a_grid_file_that_is_not_there(tmp_path):
    res = sweep("run", str(tmp_path / "nothere.yaml"), "--store", str(tmp_path / "store"))
    assert_refused(res, f"{tmp_path / 'nothere.yaml'}: grid file not found")
    assert not (tmp_path / "store").exists()


# -- 2. contradictory grids --------------------------------------------------------------

@pytest.mark.parametrize("changes, needles", [
    pytest.param({"methods": ["baseline", "two_phase_over"]},
                 ["methods: two_phase_over starts from the oversampling network, which is not in methods",
                  "add oversampling to methods"], id="two-phase-without-phase-1"),
    pytest.param({"thresholding": ["oversampling"]},
                 ["thresholding: oversampling is not one of the grid's methods", "(allowed: methods: baseline)"],
                 id="thresholding-a-method-not-trained"),
    pytest.param({"imbalance": {"step": {"rho": [10], "mu": [0.25]}}},
                 ["imbalance.step.mu: 0.25 does not give a whole number of minority classes",
                  "multiples of 1/10"], id="fractional-minority-classes"),
    pytest.param({"model": "lenet5", "dataset": "cifar10"},
                 ["model: lenet5 does not take cifar10 images"], id="model-and-dataset"),
    pytest.param({"max_per_class": 100000}, ["max_per_class: 100000 is outside the dataset's range"],
                 id="more-images-than-the-dataset"),
    pytest.param({"resources": {"cpu": -1, "gpu": 0}}, ["resources: cpu -1, gpu 0: cannot be negative"],
                 id="negative-resources"),
    pytest.param({"pack": {"max_networks": -4}}, ["pack.max_networks: -4: cannot be negative"],
                 id="negative-pack-size"),
])
def test_a_contradictory_grid_names_the_file_and_the_key(tmp_path, changes, needles):
    path = grid_file(tmp_path, changes)
    res = sweep("run", str(path), "--store", str(tmp_path / "store"))
    assert_refused(res, f"Error: {path}:", *needles)
    assert not (tmp_path / "store").exists()


def test_a_bad_grid_leaves_an_existing_store_and_its_grid_copy_untouched(tmp_path, stored):
    before = snapshot(stored)
    path = grid_file(tmp_path, {"methods": ["baseline", "two_phase_over"]})  # same name: `bad`
    res = sweep("run", str(path), "--store", str(stored))
    assert_refused(res, "two_phase_over starts from the oversampling network")
    assert snapshot(stored) == before


# -- 3. an unwritable store --------------------------------------------------------------

def test_a_store_under_a_regular_file_is_refused_and_nothing_is_created(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    store = afile / "store"  # root ignores permissions: a file as parent stops any write
    res = sweep("run", str(grid_file(tmp_path)), "--store", str(store))
    assert_refused(res, f"results store {store} is not writable", "Not a directory")
    assert afile.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "grid.yaml"]


def test_a_store_that_is_a_regular_file_is_refused_and_left_alone(tmp_path):
    store = tmp_path / "store"
    store.write_text("my notes")
    res = sweep("run", str(grid_file(tmp_path)), "--store", str(store))
    assert_refused(res, f"results store {store} is not writable")
    assert store.read_text() == "my notes"


# -- 4. a dataset that is not there -------------------------------------------------------

@pytest.mark.parametrize("folder", ["empty", "missing"])
def test_a_missing_dataset_names_the_dataset_and_where_it_was_looked_for(tmp_path, folder):
    data = tmp_path / folder
    if folder == "empty":
        data.mkdir()
    path = grid_file(tmp_path, {"dataset": "cifar10", "model": "allcnn"})
    store = tmp_path / "store"
    res = sweep("run", str(path), "--store", str(store), "--data-dir", str(data))
    looked = f"{data} (an empty folder)" if folder == "empty" else f"{data} (no such folder)"
    assert_refused(res, "dataset 'cifar10' not found", looked, "To provide it:", "--data-dir")
    assert_nothing_started(store)


def test_a_missing_dataset_leaves_an_existing_store_untouched(tmp_path, stored):
    before = snapshot(stored)
    (tmp_path / "empty").mkdir()
    path = grid_file(tmp_path, {"dataset": "cifar10", "model": "allcnn", "repeats": 2})  # same name: `bad`
    res = sweep("run", str(path), "--store", str(stored), "--data-dir", str(tmp_path / "empty"))
    assert_refused(res, "dataset 'cifar10' not found", str(tmp_path / "empty"))
    assert snapshot(stored) == before


# -- 5. resources the cluster cannot provide (fake Ray nodes; one real embedded Ray) ---------

def ray_node(cpu: float, gpu: float = 0, alive: bool = True) -> dict:
    """One entry of ``ray.nodes()`` as Ray gives it: no "GPU" key on a node without GPUs."""
    resources = {"CPU": float(cpu), "memory": 2.0e9, "object_store_memory": 1.0e9, "node:127.0.0.1": 1.0}
    if gpu:
        resources["GPU"] = float(gpu)
    return {"NodeID": "f" * 56, "Alive": alive, "NodeManagerAddress": "127.0.0.1", "Resources": resources}


@pytest.fixture
def fake_cluster(monkeypatch):
    """Ray as a cluster of the nodes given, never started: ``ray.init`` is not called (what it
    would have been asked for is recorded) and ``ray.nodes()`` answers the fake nodes.
    Returns ``set_nodes(*nodes) -> list of (CPU, GPU) per pack that Ray was started for``."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.tune")
    from sweep import driver

    started: list[tuple[float, float]] = []
    monkeypatch.setattr(driver, "_init_ray", lambda options, cpu, gpu: started.append((cpu, gpu)))
    monkeypatch.setattr(ray, "shutdown", lambda *a, **k: None)

    def set_nodes(*nodes: dict) -> list[tuple[float, float]]:
        monkeypatch.setattr(ray, "nodes", lambda: list(nodes))
        return started

    return set_nodes


@pytest.mark.parametrize("cpu, gpu, device, nodes, needles", [
    pytest.param(1.0, 1.0, "cuda", [ray_node(2)],
                 ["no Ray node can provide 1.0 CPU and 1.0 GPU per pack", "nodes have (CPU, GPU): [(2.0, 0)]",
                  "--gpus-per-pack"], id="gpu-on-cpu-only"),
    pytest.param(64.0, 0.0, "cpu", [ray_node(2), ray_node(32, 1)],
                 ["no Ray node can provide 64.0 CPU and 0.0 GPU per pack",
                  "nodes have (CPU, GPU): [(2.0, 0), (32.0, 1.0)]", "--cpus-per-pack"], id="more-cpus-than-any-node"),
    pytest.param(4.0, 1.0, "cuda", [ray_node(8), ray_node(2, 1)],
                 ["no Ray node can provide 4.0 CPU and 1.0 GPU per pack"], id="cpus-and-gpus-on-different-nodes"),
    pytest.param(1.0, 0.0, "cuda", [ray_node(2)],
                 ["--device cuda: no Ray node has a GPU", "nodes have (CPU, GPU): [(2.0, 0)]", "use --device cpu"],
                 id="device-cuda-on-cpu-only"),
    pytest.param(1.0, 0.0, "cuda:0", [ray_node(4), ray_node(4, 2, alive=False)],
                 ["--device cuda:0: no Ray node has a GPU", "nodes have (CPU, GPU): [(4.0, 0)]"],
                 id="a-dead-node-s-gpu-does-not-count"),
])
def test_resources_no_node_can_provide_are_refused(monkeypatch, cpu, gpu, device, nodes, needles):
    ray = pytest.importorskip("ray")
    from sweep.driver import _check_resources
    from sweep.prepare import SweepError

    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    with pytest.raises(SweepError) as refused:
        _check_resources(cpu, gpu, device)
    for needle in needles:
        assert needle in str(refused.value)


@pytest.mark.parametrize("cpu, gpu, device, nodes", [
    pytest.param(2.0, 0.0, "cpu", [ray_node(2)], id="exactly-one-node's-cpus"),
    pytest.param(4.0, 1.0, "cuda", [ray_node(2), ray_node(4, 1)], id="one-node-of-two"),
    pytest.param(1.0, 0.5, "cuda:0", [ray_node(1, 1)], id="a-fraction-of-a-gpu"),
    pytest.param(1.0, 0.0, "cuda", [ray_node(2), ray_node(2, 1)], id="cuda-with-a-gpu-somewhere"),
])
def test_resources_some_node_can_provide_pass(monkeypatch, cpu, gpu, device, nodes):
    ray = pytest.importorskip("ray")
    from sweep.driver import _check_resources

    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    _check_resources(cpu, gpu, device)  # no exception


def test_a_gpu_per_pack_on_a_cpu_only_cluster_is_refused(tmp_path, fake_cluster):
    started = fake_cluster(ray_node(2))
    store = tmp_path / "store"
    res = sweep("run", str(grid_file(tmp_path)), "--store", str(store), "--gpus-per-pack", "1",
                "--num-cpus", "2", "-q")
    assert_refused(res, "no Ray node can provide 1.0 CPU and 1.0 GPU per pack",
                   "nodes have (CPU, GPU): [(2.0, 0)]", "--gpus-per-pack")
    assert started == [(1.0, 1.0)]  # refused by the cluster check, not before it
    assert_nothing_started(store)


def test_more_cpus_per_pack_than_any_node_has_is_refused_and_the_store_kept(tmp_path, fake_cluster, stored):
    fake_cluster(ray_node(2))
    before = snapshot(stored)
    path = grid_file(tmp_path, {"repeats": 2})  # one network of two still to train
    res = sweep("run", str(path), "--store", str(stored), "--cpus-per-pack", "64", "--num-cpus", "2", "-q")
    assert_refused(res, "no Ray node can provide 64.0 CPU and 0.0 GPU per pack",
                   "nodes have (CPU, GPU): [(2.0, 0)]", "--cpus-per-pack")
    assert snapshot(stored) == before


def test_device_cuda_on_a_cpu_only_cluster_is_refused_before_any_pack(tmp_path, fake_cluster):
    # Used to start the pack, fail it in the worker after every retry and record it failed.
    fake_cluster(ray_node(2))
    store = tmp_path / "store"
    res = sweep("run", str(grid_file(tmp_path)), "--store", str(store), "--device", "cuda", "--num-cpus", "2", "-q")
    assert_refused(res, "--device cuda: no Ray node has a GPU", "nodes have (CPU, GPU): [(2.0, 0)]",
                   "use --device cpu")
    assert_nothing_started(store)


@pytest.mark.ray
@pytest.mark.subprocess
def test_a_real_embedded_ray_refuses_device_cuda_on_its_cpus(tmp_path, ray_dir):
    """The fake nodes above stand for what a real Ray reports: one real CPU-only embedded Ray."""
    store = tmp_path / "store"
    res = sweep_process("run", str(grid_file(tmp_path)), "--store", str(store), "--device", "cuda",
                        "--num-cpus", "2", "--ray-temp-dir", ray_dir, "-q")
    assert_refused(res, "--device cuda: no Ray node has a GPU", "nodes have (CPU, GPU): [(2.0, 0)]",
                   "use --device cpu")
    assert_nothing_started(store)


# -- 6. bad option values ----------------------------------------------------------------

@pytest.mark.parametrize("option, needles, rc", [
    pytest.param(["--max-networks", "-1"], ["--max-networks -1: cannot be negative"], 1, id="max-networks"),
    pytest.param(["--retries", "-1"], ["--retries -1: cannot be negative"], 1, id="retries"),
    pytest.param(["--cpus-per-pack", "-0.5"], ["--cpus-per-pack -0.5: cannot be negative"], 1, id="cpus"),
    pytest.param(["--device", "tpu"], ["--device 'tpu': not a worker device", "cpu, cuda, cuda:N, auto"], 1,
                 id="unknown-device"),
    pytest.param(["--device", "cuda:1", "--gpus-per-pack", "1"],
                 ["--device cuda:1: a pack holding 1 GPU sees only cuda:0..cuda:0"], 1, id="device-index"),
    pytest.param(["--precision", "fp8"], ["Invalid value for '--precision'", "'fp8' is not one of"], 2,
                 id="precision"),
    pytest.param(["--retries", "two"], ["Invalid value for '--retries'", "'two' is not a valid integer"], 2,
                 id="not-a-number"),
    pytest.param(["--ray-temp-dir", "/tmp/" + "x" * 60], ["is too long", "for Ray's Unix sockets"], 1,
                 id="ray-temp-dir-too-long"),
])
def test_a_bad_option_value_is_refused_before_the_store_or_data_are_touched(tmp_path, option, needles, rc):
    store = tmp_path / "store"
    res = sweep("run", str(grid_file(tmp_path)), "--store", str(store), *option)
    assert_refused(res, *needles, rc=rc)
    if option[0] == "--ray-temp-dir":
        assert_nothing_started(store)  # checked when Ray starts, after the store's write probe
    else:
        assert not store.exists()  # checked first: not even the folder is made


def test_bad_option_values_leave_an_existing_store_untouched(tmp_path, stored):
    before = snapshot(stored)
    res = sweep("run", str(grid_file(tmp_path, {"repeats": 2})), "--store", str(stored), "--retries", "-1")
    assert_refused(res, "--retries -1: cannot be negative")
    assert snapshot(stored) == before


# -- reading and resuming a store that is not there or holds no sweep -------------------------

def test_resume_of_a_folder_with_no_recorded_sweep(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    res = sweep("resume", str(folder))
    assert_refused(res, f"Error: {folder}: no sweep recorded in this store (start one with `sweep run`)")
    assert res.stderr.strip().count("\n") == 0
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("command", [["resume"], ["status"], ["status", "--json"], ["query", "select 1"],
                                     ["report", "-o", "REPORT"]])
def test_reading_a_store_that_is_not_there_is_a_one_line_error(tmp_path, command):
    missing = tmp_path / "results" / "dmeo"  # a typo: must not read as an empty store
    args = [str(tmp_path / "r.html") if a == "REPORT" else a for a in command[1:]]
    res = sweep(command[0], str(missing), *args)
    assert_refused(res, f"Error: results store {missing} not found (no such folder)")
    assert res.stderr.strip().count("\n") == 0
    assert res.stdout == ""
    assert not (tmp_path / "results").exists() and not (tmp_path / "r.html").exists()


@pytest.mark.parametrize("command", [["status"], ["query", "select 1"]])
def test_reading_a_store_that_is_a_regular_file_is_a_one_line_error(tmp_path, command):
    afile = tmp_path / "afile"
    afile.write_text("x")
    res = sweep(command[0], str(afile), *command[1:])
    assert_refused(res, f"Error: results store {afile} is not a folder")
    assert res.stderr.strip().count("\n") == 0


# -- 7. names that become paths, outputs that cannot be written, options not applied ------

@pytest.mark.parametrize("name", ["../evil", "a/b", ".hidden", "x=y", "_private"])
def test_a_grid_name_that_would_become_a_bad_path_is_refused_when_read(tmp_path, name):
    res = sweep("run", str(grid_file(tmp_path, {"name": name})), "--store", str(tmp_path / "s"),
                "--num-cpus", "1")
    assert_refused(res, "name:", repr(name), "becomes a folder name")
    assert not (tmp_path / "s").exists()  # refused before the store, Ray or the data


def test_report_to_a_path_that_cannot_be_written_is_a_one_line_error(tmp_path, stored):
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile" / "report.html", tmp_path / "no-such-folder" / "report.html", tmp_path):
        res = sweep("report", str(stored), "-o", str(out))
        assert_refused(res, f"cannot write the report to {out}")
        assert res.stderr.strip().count("\n") == 0


def test_an_empty_data_dir_is_refused_not_replaced_by_the_bundled_mnist(tmp_path):
    (tmp_path / "empty").mkdir()
    res = sweep("run", str(grid_file(tmp_path)), "--store", str(tmp_path / "s"), "--data-dir",
                str(tmp_path / "empty"), "--num-cpus", "1")
    assert_refused(res, "'mnist'", str(tmp_path / "empty"))
    assert_nothing_started(tmp_path / "s")


@pytest.mark.parametrize("address", ["127.0.0.1:9", "ray://127.0.0.1:9"])
def test_a_cluster_address_that_does_not_answer_is_a_clear_error(tmp_path, address):
    res = sweep("run", str(grid_file(tmp_path)), "--store", str(tmp_path / "s"), "--address", address)
    assert_refused(res, f"cannot reach the Ray cluster at {address}")
    assert_nothing_started(tmp_path / "s")


@pytest.fixture
def not_ray():
    """Ports that accept TCP but are no Ray: one silent (a listener that never answers; the
    probe's 209 s hang), one answering as an HTTP/1 server would. Yields {kind: port}."""
    import socket
    import threading

    socks, conns, stop = [], [], threading.Event()

    def listener(reply: bytes | None) -> int:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        s.settimeout(0.2)
        socks.append(s)

        def serve() -> None:
            while not stop.is_set():
                try:
                    c, _ = s.accept()
                except OSError:
                    continue
                conns.append(c)  # kept open: silence, not a closed connection
                if reply is not None:
                    c.sendall(reply)

        threading.Thread(target=serve, daemon=True).start()
        return s.getsockname()[1]

    yield {"silent": listener(None), "http1": listener(b"HTTP/1.1 400 Bad Request\r\n\r\n")}
    stop.set()
    for s in socks + conns:
        s.close()


class FakeClock:
    """``time.monotonic`` for sweep.prepare: it moves only when a fake connection waits."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class SilentConnection:
    """A TCP connection that was accepted and never answers: each ``recv`` waits out its
    whole timeout on the fake clock, then times out (as a real silent peer does)."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock, self.timeout, self.waits = clock, None, []

    def __enter__(self) -> "SilentConnection":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def settimeout(self, timeout: float) -> None:
        self.timeout = timeout

    def sendall(self, data: bytes) -> None:
        pass

    def recv(self, n: int) -> bytes:
        self.waits.append(self.timeout)
        self.clock.now += self.timeout
        raise TimeoutError


@pytest.fixture
def silent_peer(monkeypatch):
    """check_address against a silent peer on a fake clock: no real waiting. Yields the
    connection (its ``waits``), the clock, and the timeout ``create_connection`` was given."""
    from sweep import prepare

    clock = FakeClock()
    conn = SilentConnection(clock)
    connects: list[float] = []

    def create_connection(address: tuple, timeout: float) -> SilentConnection:
        connects.append(timeout)
        return conn

    monkeypatch.setattr(prepare, "time", SimpleNamespace(monotonic=clock.monotonic))
    monkeypatch.setattr(prepare, "socket", SimpleNamespace(create_connection=create_connection, socket=socket.socket))
    return SimpleNamespace(conn=conn, clock=clock, connects=connects)


@pytest.mark.parametrize("kind", ["silent", "http1"])
@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_an_address_that_accepts_tcp_but_is_not_ray_is_refused(tmp_path, request, kind, scheme):
    """A silent peer on the fake clock (its wait bounded as the next test checks), a real
    listener answering as HTTP/1 does."""
    from sweep.prepare import ADDRESS_TIMEOUT_SECONDS

    port = 9 if kind == "silent" else request.getfixturevalue("not_ray")[kind]
    if kind == "silent":
        request.getfixturevalue("silent_peer")
    address = f"{scheme}127.0.0.1:{port}"
    res = sweep("run", str(grid_file(tmp_path)), "--store", str(tmp_path / "s"), "--address", address)
    assert_refused(res, f"{address} is not a Ray cluster")
    assert res.stderr.strip().count("\n") == 0, res.stderr
    assert_nothing_started(tmp_path / "s")
    if kind == "silent":
        assert f"answered nothing within {ADDRESS_TIMEOUT_SECONDS:g} s" in res.stderr


@pytest.mark.parametrize("timeout_s", [10.0, 1.0])
def test_the_address_check_keeps_its_time_bound(silent_peer, timeout_s):
    """Every wait of the check is bounded by what is left of ``timeout_s``, and in all it
    waits ``timeout_s`` for a silent peer (on the fake clock: no wall-clock assertion)."""
    from sweep.prepare import SweepError, check_address

    start = silent_peer.clock.now
    with pytest.raises(SweepError, match=f"answered nothing within {timeout_s:g} s"):
        check_address("127.0.0.1:9", timeout_s=timeout_s)
    assert silent_peer.connects == [timeout_s]  # the TCP connect itself is bounded
    waits = silent_peer.conn.waits
    assert waits and all(0 < w <= timeout_s for w in waits)
    assert silent_peer.clock.now - start == pytest.approx(timeout_s)  # not one wait more


def test_the_address_check_refuses_real_listeners_that_are_not_ray(not_ray):
    from sweep.prepare import SweepError, check_address

    with pytest.raises(SweepError, match="answered nothing within 0.3 s"):
        check_address(f"127.0.0.1:{not_ray['silent']}", timeout_s=0.3)
    with pytest.raises(SweepError, match="is not a Ray cluster: it answered b'HTTP/1.1 '"):
        check_address(f"127.0.0.1:{not_ray['http1']}", timeout_s=1.0)


# -- 8. the real console script (smoke tests: the rest runs in-process) --------------------

@pytest.mark.subprocess
def test_the_sweep_script_refuses_a_malformed_grid(tmp_path):
    path = grid_file(tmp_path, text="name: bad\ndataset: [mnist\nmodel: lenet5\n")
    res = sweep_process("run", str(path), "--store", str(tmp_path / "store"))
    assert_refused(res, f"Error: {path}:", "not valid YAML", "line 2")
    assert res.stderr.strip().count("\n") == 0
    assert not (tmp_path / "store").exists()


@pytest.mark.subprocess
def test_the_sweep_script_expands_a_grid(tmp_path):
    import json

    path = grid_file(tmp_path)
    res = sweep_process("expand", str(path), "--json")
    assert res.returncode == 0 and res.stderr == "", res.stderr
    info = json.loads(res.stdout)
    g = load_grid(path)
    assert (info["grid"], info["trained_networks"], info["evaluations"], info["packs"]) == (
        "bad", g.trained_networks, g.evaluations, 1)
    assert g.trained_networks == 1
