"""The tiers' check (tests/conftest.py): a test that spawns a process, starts Ray, runs
Triton's interpreter or drives a browser without its mark fails, so the fast tier
(`-m "not ray and not subprocess and not interpreter and not browser"`) stays fast."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import conftest
from conftest import spawn_tier, tier_problem

pytest_plugins = ["pytester"]


@pytest.mark.parametrize("argv, tier", [
    ([sys.executable, "-m", "sweep.cli", "run"], "subprocess"),
    (["bash", "scripts/gpu.sh"], "subprocess"),
    (["/venv/lib/python3.11/site-packages/ray/core/src/ray/gcs/gcs_server", "--port=0"], "ray"),
    (["/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet", "--node_ip_address=1"], "ray"),
    ([sys.executable, "-u", "/venv/lib/python3.11/site-packages/ray/_private/log_monitor.py"], "ray"),
    (["/usr/bin/chromium", "--headless"], "browser"),
    (["google-chrome-stable", "--dump-dom"], "browser"),
    (["/usr/bin/sbatch", "--parsable", "job.sbatch"], "slurm"),
    (["/usr/local/cuda/bin/ptxas", "-arch=sm_90"], None),
    (["/sbin/ldconfig", "-p"], None),
    (["uname", "-p"], None),  # platform.processor()
])
def test_spawns_are_put_in_their_tier(argv, tier):
    assert spawn_tier(argv) == tier


def test_a_test_must_declare_what_it_did():
    python = ("subprocess", "python -m sweep.cli run")
    assert tier_problem(set(), []) is None
    assert "@pytest.mark.subprocess" in tier_problem(set(), [python])
    assert "python -m sweep.cli run" in tier_problem(set(), [python])
    assert tier_problem({"subprocess"}, [python]) is None
    assert tier_problem({"ray"}, [python, ("ray", "gcs_server")]) is None  # Ray's tests spawn besides Ray
    assert "@pytest.mark.ray" in tier_problem({"subprocess"}, [python, ("ray", "gcs_server")])
    assert "@pytest.mark.interpreter" in tier_problem(set(), [("interpreter", "_conv_kernel")])
    assert "@pytest.mark.browser" in tier_problem({"subprocess"}, [("browser", "chromium --headless")])


@pytest.mark.subprocess
def test_the_audit_hook_sees_a_spawn():
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    assert ("subprocess", f"{sys.executable} -c pass") in conftest._seen


@pytest.mark.subprocess
def test_an_unmarked_test_that_spawns_fails_and_a_marked_one_passes(pytester):
    """In a pytest of its own, with this conftest: an unmarked spawn fails, a marked one passes,
    a test that asks for a Ray temp folder without the mark fails."""
    pytester.makeini("[pytest]\nmarkers =\n    subprocess: spawns\n    ray: starts Ray\n")
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(test_spawns="""
        import subprocess, sys
        import pytest

        def test_unmarked():
            subprocess.run([sys.executable, "-c", "pass"], check=True)

        @pytest.mark.subprocess
        def test_marked():
            subprocess.run([sys.executable, "-c", "pass"], check=True)

        def test_in_process():
            assert sum(range(4)) == 6

        def test_ray_folder_unmarked(ray_dir):
            pass
    """)
    res = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA")
    res.assert_outcomes(passed=2, failed=1, errors=1)
    res.stdout.fnmatch_lines(["*_ test_unmarked _*", "this test needs @pytest.mark.subprocess*-c pass"])
    res.stdout.fnmatch_lines(["*ERROR at setup of test_ray_folder_unmarked*", "*mark it @pytest.mark.ray"])


@pytest.mark.subprocess
def test_two_workers_keep_files_whole_and_run_the_ray_tests_on_one_first(pytester):
    """With this conftest and `-n 2 --dist loadfile`: each file's in-process tests run on one
    worker, and the Ray tests of two files on one worker, the Ray unit, before anything else
    there; a SLURM file stays whole, its Ray test too (its cluster fixture is the file's). The
    tests start nothing: the marks alone decide. It failed silently once: pytest 9.2 broke
    xdist's own groups (conftest.py)."""
    pytester.makeini("[pytest]\nmarkers =\n    ray: starts Ray\n    slurm: SLURM\n")
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    body = """
        import pytest

        @pytest.mark.ray
        def test_ray_a():
            pass

        @pytest.mark.ray
        def test_ray_b():
            pass

        @pytest.mark.parametrize("i", range(8))  # more tests than the Ray unit: xdist would send it later
        def test_local(i):
            pass
    """
    pytester.makepyfile(test_one=body, test_three=body, test_slurm="""
        import pytest

        pytestmark = pytest.mark.slurm

        @pytest.mark.ray
        def test_in_a_job():
            pass

        def test_sbatch():
            pass
    """, test_four="def test_only_local():\n    pass\n")
    res = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-v", "-n", "2", "--dist", "loadfile")
    res.assert_outcomes(passed=23)
    ran: dict[str, list[str]] = {}  # worker -> its tests in the order they ran
    for line in res.stdout.lines:
        if line.startswith("[gw") and "PASSED" in line:
            ran.setdefault(line.split()[0], []).append(line.split()[-1])
    worker_of = {test: worker for worker, tests in ran.items() for test in tests}
    ray_tests = [t for t in worker_of if "::test_ray_" in t]
    assert len(ray_tests) == 4 and len({worker_of[t] for t in ray_tests}) == 1, ran
    assert set(ran[worker_of[ray_tests[0]]][:4]) == set(ray_tests), ran  # the Ray unit first, and only its tests
    for name in ("test_one.py", "test_three.py", "test_slurm.py", "test_four.py"):
        assert len({w for t, w in worker_of.items() if t.startswith(name) and t not in ray_tests}) == 1, ran


@pytest.mark.interpreter
def test_the_interpreter_watch_sees_a_kernel_launch():
    """Where Triton runs in its interpreter (no GPU), a kernel launch is recorded."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton compiles for the GPU here: no interpreter to watch")
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _double(x_ptr, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n) * 2, mask=i < n)

    x = torch.arange(4.0)
    _double[(1,)](x, 4, BLOCK=4)
    assert x.tolist() == [0.0, 2.0, 4.0, 6.0]
    assert ("interpreter", "_double") in conftest._seen
