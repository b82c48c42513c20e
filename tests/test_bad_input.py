"""Bad input never starts training: a clear message, a non-zero exit, nothing started.

Each test runs the real CLI in a subprocess (as tests/test_fault_tolerance.py does) with
one kind of bad input: a malformed or contradictory grid, an unwritable store, a dataset
that is not there, resources the cluster cannot provide, bad option values, and reading
commands on a store that is not there. Each checks the message names the problem, and
that nothing started: no trials, failures, grid copy (``_grids``) or checkpoint in the
store, and a store that already held results is left byte for byte as it was.

The grids are tiny (one step cell, 50 images per class, 5 iterations), so a run that
wrongly started would still end quickly and fail the assertions, not the time limit.
"""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sweep.core.grid import load_grid
from sweep.store.results import ResultStore
from conftest import tiny_grid

ROOT = Path(__file__).resolve().parents[1]

GRID = tiny_grid("bad")
# Embedded Ray on this machine's CPUs only, even where it has a GPU: the resource and
# device cases below must be refused everywhere, never trained.
CPU_ONLY = {**os.environ, "RAY_AUTH_MODE": "disabled", "CUDA_VISIBLE_DEVICES": ""}


def sweep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sweep.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env=CPU_ONLY)


def grid_file(tmp_path: Path, changes: dict | None = None, drop: tuple = (), text: str | None = None,
              name: str = "grid.yaml") -> Path:
    doc = copy.deepcopy(GRID)
    doc.update(changes or {})
    for key in drop:
        doc.pop(key)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc) if text is None else text)
    return path


def assert_refused(res: subprocess.CompletedProcess, *needles: str, rc: int = 1) -> None:
    """Exit code ``rc``, every needle on stderr, no traceback, nothing trained."""
    out = f"rc={res.returncode}\nstdout:\n{res.stdout[-2000:]}\nstderr:\n{res.stderr[-4000:]}"
    assert res.returncode == rc, out
    assert "Traceback" not in res.stderr, out
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


# -- 5. resources the cluster cannot provide (embedded CPU-only Ray) -----------------------

@pytest.mark.ray
def test_a_gpu_per_pack_on_a_cpu_only_cluster_is_refused(tmp_path, ray_dir):
    store = tmp_path / "store"
    res = sweep("run", str(grid_file(tmp_path)), "--store", str(store), "--gpus-per-pack", "1",
                "--num-cpus", "2", "--ray-temp-dir", ray_dir, "-q")
    assert_refused(res, "no Ray node can provide 1.0 CPU and 1.0 GPU per pack",
                   "nodes have (CPU, GPU): [(2.0, 0)]", "--gpus-per-pack")
    assert_nothing_started(store)


@pytest.mark.ray
def test_more_cpus_per_pack_than_any_node_has_is_refused_and_the_store_kept(tmp_path, ray_dir, stored):
    before = snapshot(stored)
    path = grid_file(tmp_path, {"repeats": 2})  # one network of two still to train
    res = sweep("run", str(path), "--store", str(stored), "--cpus-per-pack", "64",
                "--num-cpus", "2", "--ray-temp-dir", ray_dir, "-q")
    assert_refused(res, "no Ray node can provide 64.0 CPU and 0.0 GPU per pack",
                   "nodes have (CPU, GPU): [(2.0, 0)]", "--cpus-per-pack")
    assert snapshot(stored) == before


@pytest.mark.ray
def test_device_cuda_on_a_cpu_only_cluster_is_refused_before_any_pack(tmp_path, ray_dir):
    # Used to start the pack, fail it in the worker after every retry and record it failed.
    store = tmp_path / "store"
    res = sweep("run", str(grid_file(tmp_path)), "--store", str(store), "--device", "cuda",
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


@pytest.mark.parametrize("kind", ["silent", "http1"])
@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_an_address_that_accepts_tcp_but_is_not_ray_is_refused_within_10_s(tmp_path, not_ray, kind, scheme):
    import time

    from sweep.prepare import ADDRESS_TIMEOUT_SECONDS

    address = f"{scheme}127.0.0.1:{not_ray[kind]}"
    t0 = time.monotonic()
    res = sweep("run", str(grid_file(tmp_path)), "--store", str(tmp_path / "s"), "--address", address)
    seconds = time.monotonic() - t0
    assert_refused(res, f"{address} is not a Ray cluster")
    assert res.stderr.strip().count("\n") == 0, res.stderr
    assert_nothing_started(tmp_path / "s")
    # The check itself is bounded by ADDRESS_TIMEOUT_SECONDS; the rest is the command's start.
    assert seconds < ADDRESS_TIMEOUT_SECONDS + 30, seconds
    if kind == "silent":
        assert f"answered nothing within {ADDRESS_TIMEOUT_SECONDS:g} s" in res.stderr


def test_the_address_check_keeps_its_time_bound(not_ray):
    import time

    from sweep.prepare import SweepError, check_address

    for kind in ("silent", "http1"):
        t0 = time.monotonic()
        with pytest.raises(SweepError, match="is not a Ray cluster"):
            check_address(f"127.0.0.1:{not_ray[kind]}", timeout_s=1.0)
        assert time.monotonic() - t0 < (2.0 if kind == "silent" else 0.5)
