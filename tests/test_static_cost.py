"""bench/static_cost.py, the static cost model of the fused LeNet-5 step: it runs without a GPU
and its table holds every kernel the step launches. No timing is asserted.

The model compiles for sm_90 and needs TRITON_INTERPRET unset, so it runs in a subprocess
(tests/conftest.py sets the interpreter for CPU sessions). The set of kernels it must show is
recorded independently here: one real fused training step of the engine at P = 2, batch 2
(in Triton's interpreter on the CPU, compiled on a GPU) with every kernel launch noted.
Cost: about 45 s on 2 cores with a cold Triton cache (compiling the step's 6 bf16
specialisations and the evaluation chunk's), 25 s with a warm one.
Under Triton 3.6.0 the model's tests pass but the interpreter step does not run:
3.6's interpreter fails on ``conv_pool_grad_weight_kernel``'s loop bound ``B * HW_OUT``
(TypeError: only 0-dimensional arrays can be converted to Python scalars); the pin is 3.8.0.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed: the fused kernels and their model need it",
                    exc_type=ImportError)

from workers import engine, fused_kernels as fk  # noqa: E402
from workers.fused_lenet import FusedLeNet5, fused_available  # noqa: E402
from workers.losses import PackedLoss  # noqa: E402
from workers.samplers import EpochSampler  # noqa: E402
from workers.transforms import InputTransform, stack_transforms  # noqa: E402

pytestmark = [pytest.mark.subprocess, pytest.mark.interpreter]  # tiers: pyproject.toml, tests/conftest.py

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "static_cost.py"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _launched_kernels(members: int = 2, batch: int = 2) -> Counter:
    """Kernel name -> launches in one real training step of the engine on the fused model."""
    if not fused_available(DEVICE):
        pytest.skip("the fused kernels cannot run here (no GPU, and no TRITON_INTERPRET=1 before triton)")
    kernel_type = type(fk.sgd_kernel)  # JITFunction on a GPU, InterpretedFunction in the interpreter
    launched: Counter = Counter()
    real_run = kernel_type.run

    def run(self, *args, **kwargs):  # noqa: ANN001, ANN202
        launched[self.fn.__name__] += 1
        return real_run(self, *args, **kwargs)

    model = FusedLeNet5(members, compute_dtype=torch.float32, device=DEVICE)
    cfg = engine.StageConfig(iters=1, batch_size=batch, lr=torch.full((1, members), 0.01, device=DEVICE),
                             momentum=torch.full((members,), 0.9, device=DEVICE),
                             weight_decay=torch.full((members,), 5e-4, device=DEVICE), cuda_graph=False)
    x = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8, device=DEVICE)
    y = torch.randint(0, 10, (16,), device=DEVICE)
    samplers = [EpochSampler(np.arange(16), batch, p) for p in range(members)]
    transform = stack_transforms([InputTransform("scale", None)] * members).to(DEVICE)
    kernel_type.run = run
    # conv1's weight gradient splits a member's rows over programs once there are enough of them
    # (batch 64 on a GPU); at batch 2 in the interpreter only if each part may be one row tile.
    split_steps, fk.SPLIT_STEPS = fk.SPLIT_STEPS, 1
    try:
        engine.train_stage(model, samplers, x, y, transform, PackedLoss(["ce"] * members, torch.ones(members, 10))
                           .to(DEVICE), cfg)
    finally:
        kernel_type.run = real_run
        fk.SPLIT_STEPS = split_steps
    return launched


@pytest.fixture(scope="module")
def modelled(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("static_cost") / "cost.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--pack", "3", "--precision", "bf16", "--eval",
                        "--json", str(out)], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(out.read_text()), r.stdout


def test_every_kernel_of_the_step_is_in_the_table(modelled) -> None:
    result, stdout = modelled
    launched = _launched_kernels()
    rows = Counter(r["name"].split(" ")[0] for r in result["step"]["triton"])
    assert rows == launched, f"table {dict(rows)} vs the step's launches {dict(launched)}"
    table = stdout.split("### One training step")[1]
    for kernel in launched:
        assert f"| {kernel}" in table


def test_figures_are_positive_and_the_last_line_parses(modelled) -> None:
    result, stdout = modelled
    for part in ("step", "eval"):
        rows = result[part]["triton"]
        assert rows, part
        for r in rows:
            assert r["programs"] > 0 and r["warp_instructions"] > 0 and r["bytes"] > 0, r["name"]
            assert r["issue_s"] > 0 and r["byte_s"] > 0 and r["time_s"] > 0, r["name"]
            assert r["registers"] > 0 and r["shared"] >= 0 and r["spills"] >= 0, r["name"]
            assert all(t is not None and t > 0 for t in r["loops"]), (r["name"], r["loops"])
            assert not r["warnings"], (r["name"], r["warnings"])
        assert any(r["name"] in ("aten.bmm", "aten.baddbmm") and r["flops"] > 0 for r in result[part]["torch"]), part
        assert result[part]["step_s"] > 0
    # the 16-bit step reaches the tensor cores
    assert any(r["tensor_flops"] > 0 for r in result["step"]["triton"])
    last = stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"predicted: ([\d,]+) net-it/s", last)
    assert m, last
    assert int(m.group(1).replace(",", "")) > 0


def test_meta_recording_equals_a_cpu_recording() -> None:
    """The model records on the meta device (any P, no memory); real CPU tensors (real
    addresses, hence the same divisibility hints) give the same launches."""
    code = (
        "import sys; sys.path.insert(0, 'bench'); import static_cost as sc\n"
        "def key(rec):\n"
        "    return [(l.kernel, l.grid, l.signature, repr(l.constexprs), l.attrs, l.options.get('num_warps'))\n"
        "            for l in rec['step']['launches'] + rec['eval']['launches']]\n"
        "a = sc.record(3, 'bf16', 8, 'meta', True)\n"
        "b = sc.record(3, 'bf16', 8, 'cpu', True)\n"
        "assert key(a) == key(b), (key(a), key(b))\n"
        "assert len(key(a)) > 0\n"
        "print('same', len(key(a)))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=REPO,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.startswith("same")
