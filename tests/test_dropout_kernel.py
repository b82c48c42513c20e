"""workers.dropout_kernel against the torch dropout of workers.noise, bit for bit.

Without CUDA the kernel runs in Triton's interpreter (tests/conftest.py). PyTorch on CUDA
divides by a Python scalar as a multiplication by its fp32 reciprocal (what the kernel
does), on the CPU it divides: so on the CPU the kernel is compared with the torch path's
mask and that multiplication (``_cuda_formula``), and with the torch path itself where the
two agree exactly (keep = 0.5: 1 / 0.5 = 2). On CUDA it is compared with the torch path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from workers import dropout_kernel as dk, noise

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CPU = torch.device("cpu")


def _z(shape, dtype, channels_last, seed=0, device=CPU):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(shape, generator=g) * 3).to(dtype).to(device)
    return z.to(memory_format=torch.channels_last) if channels_last else z


def _mask(z, members, keys, draws, keep):
    per = z.unflatten(1, (members, -1))
    return noise.keep_mask(per.shape, keys, draws, keep, z.dtype)


def _inv(keep):
    return float(np.float32(1.0) / np.float32(keep))


def _cuda_formula(z, members, keys, draws, keep):
    """torch_dropout as PyTorch computes it on CUDA: (x * mask) * fp32(1 / keep)."""
    per = z.unflatten(1, (members, -1))
    t = per * _mask(z, members, keys, draws, keep)
    return (t.float() * _inv(keep)).to(z.dtype).flatten(1, 2)


def _cuda_formula_grad(g, z, members, keys, draws, keep):
    """The backward of torch_dropout on CUDA: (g * fp32(1 / keep)) * mask."""
    t = (g.float() * _inv(keep)).to(g.dtype).unflatten(1, (members, -1))
    return (t * _mask(z, members, keys, draws, keep)).flatten(1, 2)


def _strides(t):
    """The strides that matter: of dimensions longer than 1."""
    return tuple(st for st, n in zip(t.stride(), t.shape) if n > 1)


def _bits(t):
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def _kernel(z, members, keys, draws, keep):
    return noise.member_dropout(z, members, keys, draws, keep, kernel=True)


# (B, P, C, H, W), odd sizes and a 3-channel input; rows (contiguous C*H*W, channels last
# P*C) not powers of two, so the last block of a row is masked. With the block cut to 32,
# rows span several programs (the interpreter is slow: small shapes).
SHAPES = [(2, 3, 5, 3, 7), (2, 4, 3, 2, 3), (1, 2, 96, 1, 3)]


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block", [32, dk.BLOCK])
def test_masks_and_outputs_are_the_torch_paths_bits(shape, channels_last, dtype, block, monkeypatch) -> None:
    monkeypatch.setattr(dk, "BLOCK", block)
    b, p, c, h, w = shape
    z = _z((b, p * c, h, w), dtype, channels_last, seed=sum(shape))
    for seeds, n, keep in [(range(p), 0, 0.8), ([7 + 3 * i for i in range(p)], 5, 0.5),
                           ([2 ** 32 - 1 - i for i in range(p)], 2 ** 33 + 17, 0.8)]:
        keys, draws = noise.member_keys(list(seeds), CPU), torch.tensor(n)
        mask = _mask(z, p, keys, draws, keep).flatten(1, 2)
        ones = torch.ones_like(z)
        assert torch.equal(_kernel(ones, p, keys, draws, keep) != 0, mask != 0)
        y = _kernel(z, p, keys, draws, keep)
        assert _strides(y) == _strides(noise.torch_dropout(z, p, keys, draws, keep))
        assert torch.equal(_bits(y), _bits(_cuda_formula(z, p, keys, draws, keep)))  # -0 too
        if keep == 0.5:
            assert torch.equal(y, noise.torch_dropout(z, p, keys, draws, keep))
        assert int(draws) == n  # the caller advances the stream


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
def test_specials_and_signed_zeros_follow_torch() -> None:
    """inf * 0 is NaN, -x * 0 is -0, overflow of x / keep is inf, as the torch path."""
    z = torch.tensor([3e38, -3e38, float("inf"), float("-inf"), float("nan"), -1.0, 0.0, -0.0] * 4)
    z = z.view(2, 4, 2, 2)  # P = 2, C = 2
    keys, draws = noise.member_keys([1, 2], CPU), torch.tensor(3)
    for keep in (0.5, 0.8):
        y = _kernel(z, 2, keys, draws, keep)
        ref = _cuda_formula(z, 2, keys, draws, keep)
        assert torch.equal(_bits(y)[~ref.isnan()], _bits(ref)[~ref.isnan()])
        assert torch.equal(y.isnan(), ref.isnan())


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_backward_regenerates_the_forwards_mask(channels_last, dtype) -> None:
    b, p, c, h, w = 2, 4, 5, 3, 3
    keys, draws = noise.member_keys([11, 12, 13, 14], CPU), torch.tensor(41)
    for keep in (0.5, 0.8):
        z = _z((b, p * c, h, w), dtype, channels_last, seed=1).requires_grad_()
        g = _z((b, p * c, h, w), dtype, channels_last, seed=2)
        y = _kernel(z, p, keys, draws, keep)
        used = draws.clone()
        draws.add_(3)  # later draws (other layers) before the backward
        (gx,) = torch.autograd.grad(y, z, g)
        assert _strides(gx) == _strides(g)
        assert torch.equal(_bits(gx), _bits(_cuda_formula_grad(g, z.detach(), p, keys, used, keep)))
        if keep == 0.5:  # the torch path's own autograd
            z2 = z.detach().clone().requires_grad_()
            (ref,) = torch.autograd.grad(noise.torch_dropout(z2, p, keys, used, keep), z2, g)
            assert torch.equal(gx, ref)
        # a gradient of another layout (here expanded, stride 0) is copied first
        (gx2,) = torch.autograd.grad(_kernel(z, p, keys, used, keep).sum(), z)
        assert torch.equal(gx2, _cuda_formula_grad(torch.ones_like(g), z.detach(), p, keys, used, keep))


@pytest.mark.interpreter
def test_other_layouts_are_copied_to_contiguous_first() -> None:
    z = _z((2, 6, 5, 4), torch.float32, False).transpose(2, 3)  # neither layout
    keys, draws = noise.member_keys([3, 4], CPU), torch.tensor(2)
    assert torch.equal(_kernel(z, 2, keys, draws, 0.8), _cuda_formula(z, 2, keys, draws, 0.8))


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


class _Launches:
    """Counts launches of the wrapped kernel."""

    def __init__(self, kernel):
        self.kernel, self.count = kernel, 0

    def __getitem__(self, grid):
        self.count += 1
        return self.kernel[grid]


@pytest.mark.interpreter
def test_one_launch_per_call_at_any_pack_size_and_no_host_read(monkeypatch) -> None:
    launches = _Launches(dk.dropout_kernel)
    monkeypatch.setattr(dk, "dropout_kernel", launches)

    def run(members: int) -> tuple[list, int]:
        keys, draws = noise.member_keys(list(range(members)), CPU), torch.tensor(0)
        z = torch.ones(2, members * 8, 4, 4, requires_grad=True)
        before = launches.count
        with _Ops() as mode:
            y = _kernel(z, members, keys, draws, 0.5)
            (gx,) = torch.autograd.grad(y, z, torch.ones_like(y))
        return mode.ops, launches.count - before

    ops2, n2 = run(2)
    ops16, n16 = run(16)
    assert n2 == n16 == 2  # one forward, one backward
    assert [str(f) for f in ops2] == [str(f) for f in ops16]
    assert torch.ops.aten._local_scalar_dense.default not in ops2
    # No torch arithmetic besides the kernel (the interpreter adds its own copies and views).
    torch_path = {str(f).split(".")[1] for f in ops2} & {"mul", "div", "div_", "bitwise_xor", "bitwise_and",
                                                          "__rshift__", "rshift", "lt", "arange"}
    assert not torch_path, torch_path


def test_the_cpu_runs_the_torch_path() -> None:
    """Without kernel=True the CPU keeps the torch ops: same bits as before, no Triton."""
    z = _z((2, 6, 3, 3), torch.float32, False)
    keys, draws = noise.member_keys([1, 2], CPU), torch.tensor(0)
    assert torch.equal(noise.member_dropout(z, 2, keys, draws, 0.8), noise.torch_dropout(z, 2, keys, draws, 0.8))


_SM90 = """
import json, torch
from bench import static_cost as sc
from workers import dropout_kernel as dk
rec = sc._Recorder()
rec.launches = []
meta = torch.device("meta")
with sc._patched(rec):
    for dtype in (torch.bfloat16, torch.float32):
        for cl in (False, True):
            z = torch.empty(4, 3 * 96, 5, 7, dtype=dtype, device=meta)
            z = z.to(memory_format=torch.channels_last) if cl else z
            keys = torch.empty(3, dtype=torch.int64, device=meta)
            draws = torch.empty((), dtype=torch.int64, device=meta)
            dk._launch(z, 3, keys, draws, 0.8, False, torch.empty_like(draws))
            dk._launch(z, 3, keys, draws, 0.8, True, None)
out = []
for launch in rec.launches:
    k = sc.analyse(launch)
    out.append({"registers": k.registers, "spills": k.spill_instructions, "local": k.local,
                "warp_instructions_per_element": sum(k.per_warp.values()) * 4 / launch.constexprs["BLOCK"]})
print(json.dumps(out))
"""


@pytest.mark.subprocess
def test_the_kernel_compiles_for_sm90_without_spills() -> None:
    """Every specialisation the model launches (layout x direction x dtype) compiles for sm_90
    with the installed Triton, on the GPU's code path (not the interpreter's): in a subprocess,
    as bench/static_cost.py does. About 1.1 warp-instructions per element (Triton 3.8)."""
    pytest.importorskip("triton")
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(repo), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, "-c", _SM90], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(rows) == 8
    for r in rows:
        assert r["spills"] == 0 and r["local"] == 0 and r["registers"] <= 64, r
        assert r["warp_instructions_per_element"] < 2.0, r  # the hash, not index arithmetic


_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.interpreter
@_CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_on_cuda_the_kernel_is_the_torch_path(channels_last, dtype) -> None:
    dev = torch.device("cuda")
    b, p, c, h, w = 8, 6, 96, 9, 11
    keys, draws = noise.member_keys(list(range(100, 100 + p)), dev), torch.tensor(12, device=dev)
    for keep in (0.8, 0.5):
        z = _z((b, p * c, h, w), dtype, channels_last, device=dev).requires_grad_()
        g = _z((b, p * c, h, w), dtype, channels_last, seed=3, device=dev)
        y = noise.member_dropout(z, p, keys, draws, keep)  # the kernel on CUDA
        ref = noise.torch_dropout(z, p, keys, draws, keep)
        assert y.stride() == ref.stride() and torch.equal(y, ref)
        assert torch.equal(torch.autograd.grad(y, z, g)[0], torch.autograd.grad(ref, z, g)[0])


@pytest.mark.interpreter
@_CUDA
def test_on_cuda_the_kernel_replays_in_a_graph() -> None:
    dev = torch.device("cuda")
    keys, draws = noise.member_keys([1, 2, 3], dev), torch.zeros((), dtype=torch.int64, device=dev)
    z = torch.randn(4, 3 * 96, 8, 8, device=dev, requires_grad=True)

    def step():
        y = noise.member_dropout(z, 3, keys, draws, 0.5)
        draws.add_(1)
        return torch.autograd.grad(y, z, torch.ones_like(y))[0]

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # compiles
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    draws.fill_(5)
    graph.replay()
    assert int(draws) == 6
    expect = _mask(z, 3, keys, torch.tensor(5, device=dev), 0.5).flatten(1, 2) * 2
    assert torch.equal(out, expect)
