"""The GPU script (bench/gpu_fast_path.sh) cannot break unseen: its declared time budgets fit
the device's 450 s, and its CPU dry run (the same steps, small and short, CUDA-only steps
skipped) runs here, without the packages the GPU machine lacks (Ray, DuckDB, plotly).

The GPU machine hands back at most 8 files from $OUT, no folders deeper than two, names of
letters, digits, '.', '_' and '-' only: the dry run's files must fit that too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_fast_path.sh"
# The one test of tests/test_lr_search.py the GPU step runs (the script names it).
HALVING_TEST = next(line.split("=", 1)[1] for line in SCRIPT.read_text().splitlines()
                    if line.startswith("HALVING_TEST="))
LIMIT_S = 450  # one device command: 600 s; an allocation: 15 min with 1-2 min of start: room for two tries
ABSENT_ON_THE_GPU = ("ray", "duckdb", "plotly")  # not in the H200 image (device/KINDS.md); nothing may need them
MAX_FILES = 8
STEPS = ("versions", "tests", "kernels", "bench", "mnist", "reproduction")

# Makes the packages above absent for a child python3 (as on the GPU machine): Python's path
# finder is swapped for one that does not see them, so `import ray` raises
# ModuleNotFoundError and importlib.util.find_spec("ray") is None, as there.
_SITECUSTOMIZE = f'''
import importlib.machinery as _m
import sys as _sys

_ABSENT = {ABSENT_ON_THE_GPU!r}


class _WithoutThem(_m.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in _ABSENT:
            return None
        return _m.PathFinder.find_spec(name, path, target)


_sys.meta_path[:] = [_WithoutThem if f is _m.PathFinder else f for f in _sys.meta_path]
'''


def _without_gpu_absent_packages(tmp_path: Path) -> dict[str, str]:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "DRY_RUN", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO)])
    # The script calls python3: make it this interpreter (a wrapper: a symlink out of a
    # virtualenv's bin/ would lose the virtualenv).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "python3"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])
    return env


def _declared_budgets() -> dict[str, int]:
    text = SCRIPT.read_text()
    header = {m.group(1): int(m.group(2)) for m in re.finditer(r"^# budget ([A-Z_]+)=(\d+)\b", text, re.M)}
    code = {m.group(1): int(m.group(2)) for m in re.finditer(r"\bB_([A-Z_]+)=(\d+)\b", text)}
    assert header == code, "the header's budgets and the script's B_* variables differ"
    return code


def test_the_declared_budgets_fit_the_device_limit() -> None:
    budgets = _declared_budgets()
    assert len(budgets) == len(STEPS), budgets
    assert sum(budgets.values()) <= LIMIT_S, budgets
    text = SCRIPT.read_text()
    assert re.search(rf"^TOTAL={LIMIT_S}$", text, re.M)
    code = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    # One `timeout`, inside step(): every step is bounded by min(its budget, what is left of TOTAL).
    assert sum(len(re.findall(r"\btimeout\s+--", line)) for line in code) == 1
    calls = [line.split()[1:3] for line in code if re.match(r"\s*step [a-z]+ ", line)]
    assert [c[0] for c in calls] == list(STEPS)
    assert all(c[1] in (f'"$B_{c[0].upper()}"', '"$left"') for c in calls), calls
    assert "python " not in "\n".join(code) and "pip " not in "\n".join(code)  # python3 only, nothing installed


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    tmp = tmp_path_factory.mktemp("gpu_script")
    out = tmp / "out"
    env = _without_gpu_absent_packages(tmp)
    env["OUT"] = str(out)
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    return proc, out


@pytest.mark.subprocess
def test_the_dry_run_passes_every_step(dry_run) -> None:
    proc, out = dry_run
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 0, proc.stdout + proc.stderr + summary
    assert "DRY RUN" in summary
    for name in STEPS:
        assert re.search(rf"^step {name}: (rc=0 in|skipped: dry run)", summary, re.M), (name, summary)
    assert "step tests: skipped: dry run: the CUDA tests need a GPU" in summary
    assert re.search(r"^done in \d+ s \(limit 450 s\), 0 step\(s\) failed", summary, re.M)


@pytest.mark.subprocess
def test_the_dry_run_returns_files_the_device_tool_can_hand_back(dry_run) -> None:
    _, out = dry_run
    files = sorted(p for p in out.rglob("*"))
    assert all(p.is_file() for p in files), files  # no folders at all
    assert len(files) <= MAX_FILES, files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in files), files
    names = {p.name for p in files}
    assert {"summary.txt", "kernels.md", "bench.md", "mnist.txt", "reproduction.txt", "reproduction.tar"} <= names


@pytest.mark.subprocess
def test_each_step_wrote_its_figures(dry_run) -> None:
    _, out = dry_run
    kernels = (out / "kernels.md").read_text()
    for kernel in ("conv_pool_fwd_kernel", "conv_pool_grad_weight_kernel", "sgd_kernel"):
        assert f"| {kernel} |" in kernels, kernels
    assert "Whole step, eager:" in kernels
    bench = (out / "bench.md").read_text()
    assert bench.index("### rows as measured") < bench.index("### lenet5, bf16/fp32, cpu")
    rows = re.findall(r"^\| \((c|e)\) [^|]+\| (bf16|fp32) \| P=(\d+) \|", bench, re.M)
    measured = rows[:len(rows) // 2]  # the rows as measured, then the same rows in the final block
    assert measured == [(m, p, s) for p in ("bf16", "fp32") for s in ("2", "1") for m in ("e", "c")], rows
    assert "not run: the fused kernels need CUDA" in bench
    assert re.search(r"^PASS", (out / "mnist.txt").read_text(), re.M)
    with tarfile.open(out / "reproduction.tar") as tar:
        assert {"trials.parquet", "class_metrics.parquet"} <= set(tar.getnames())
    assert "1 networks trained this call (0 failed)" in (out / "reproduction.txt").read_text()


@pytest.mark.subprocess
def test_the_flat_store_unpacks_into_a_store(dry_run, tmp_path) -> None:
    from bench.gpu_reproduction import unpack

    _, out = dry_run
    assert unpack(str(out / "reproduction.tar"), str(tmp_path / "store")) >= 1


@pytest.mark.subprocess
def test_the_cuda_tests_import_without_the_packages_the_gpu_lacks(tmp_path) -> None:
    """Collecting the GPU step's tests imports everything they need: none of Ray, DuckDB, plotly."""
    env = _without_gpu_absent_packages(tmp_path)
    proc = subprocess.run([sys.executable, "-c", "import importlib.util, sys; "
                           f"assert all(importlib.util.find_spec(m) is None for m in {ABSENT_ON_THE_GPU!r}); "
                           "import pytest; sys.exit(pytest.main(['-o', 'addopts=', '--collect-only', '-q', '-p', 'no:cacheprovider', "
                           "'tests/test_fused_lenet.py', 'tests/test_fast_path.py', "
                           f"{HALVING_TEST!r}]))"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_a_failing_configuration_is_recorded_in_its_row_and_the_run_goes_on(tmp_path, monkeypatch) -> None:
    """Any error (not only out-of-memory) lands in its row, in the rows file as measured, and the
    next configuration still runs; the exit status says something failed."""
    from bench import bench_packed

    real = bench_packed.Bench

    class Flaky(real):  # type: ignore[misc, valid-type]
        def rate(self, iters: int, warmup: int) -> float:
            if self.members == 2:
                raise RuntimeError("a kernel broke | badly")
            return super().rate(iters, warmup)

    monkeypatch.setattr(bench_packed, "Bench", Flaky)
    rows = tmp_path / "rows.md"
    text, failed = bench_packed.run(["--device", "cpu", "--modes", "c", "--packs", "2,1", "--procs", "0",
                                     "--iters", "1", "--warmup", "0", "--rows", str(rows)])
    assert failed
    got = rows.read_text()
    assert "| (c) grouped packed path | fp32 | P=2 | - | - | - | - | error: RuntimeError: a kernel broke / badly |" in got
    assert re.search(r"^\| \(c\) grouped packed path \| fp32 \| P=1 \| [\d,.]+ \|", got, re.M)
    assert "error: RuntimeError" in text


def test_the_kernel_timing_reads_the_static_models_json(tmp_path) -> None:
    """bench/static_cost.py's --json rows (several launches of a kernel relabelled `#i (...)`)
    become per-kernel lists in launch order; a file without them gives a reason, no table."""
    import json

    from bench.time_fused_kernels import static_predictions

    good = tmp_path / "static.json"
    good.write_text(json.dumps({"step": {"net_it_per_s": 123456.0, "triton": [
        {"name": "conv_pool_fwd_kernel #1 (C_IN=1)", "time_s": 1e-3},
        {"name": "conv_pool_fwd_kernel #2 (C_IN=20)", "time_s": 2e-3},
        {"name": "sgd_kernel", "time_s": 5e-4}]}}))
    got, how = static_predictions(8, "bf16", 64, json_path=str(good))
    assert got == {"conv_pool_fwd_kernel": [1.0, 2.0], "sgd_kernel": [0.5]}
    assert "123,456 net-it/s" in how
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": []}))
    got, how = static_predictions(8, "bf16", 64, json_path=str(bad))
    assert got is None and "no step.triton rows" in how
