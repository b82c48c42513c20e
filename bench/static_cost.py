"""A static cost model of the fused LeNet-5 training step on an H200, from the compiled code.

    python bench/static_cost.py --pack 1024 --precision bf16 [--batch 64] [--eval] [--head-only]
                                [--json out.json]

No GPU is needed, and TRITON_INTERPRET must be unset (the interpreter compiles nothing and
picks other tiles). What it does:

1. **Discovers the launches from the running code.** One real training step of the engine
   (``workers.engine.train_stage`` with a ``FusedLeNet5`` and its ``FusedSGD``: batch feed,
   input transform, cross-entropy, backward, SGD, divergence bookkeeping) runs at the asked
   P on PyTorch's ``meta`` device (shapes and strides, no data, no memory). The recorded step
   is the one the engine would capture as a CUDA graph (the first after
   ``step_graph.WARMUP_STEPS`` eager steps: no first-step re-cast of the 16-bit copy). Every
   Triton launch goes through ``JITFunction.run``, which the recorder replaces: it binds the
   arguments with Triton's own binder and ``_pack_args`` for an sm_90 backend, i.e. the
   signature, constexprs, ``num_warps``/``num_stages`` and the ``tt.divisibility = 16`` hints
   the JIT would give that launch (a meta tensor's ``data_ptr()`` is its byte offset in its
   storage; a CUDA allocation starts 512-byte aligned, so the hint is the real one), records
   the grid and the tensors' shapes and dtypes, and does not run the kernel. Every torch op
   of the step is recorded by a ``TorchDispatchMode``. Nothing is scaled: the grids are the
   asked P's own (the SGD grid, one program per 2,048-element block of each parameter
   segment, is not linear in P). ``--device cpu`` records the same on real CPU tensors (small
   P only; the kernels still do not run): the tests check that both record the same launches.
   Under ``TRITON_INTERPRET=1`` the launches would be the interpreter's (4x tiles, 16x SGD
   blocks), which is why the recording runs without it.
2. **Compiles each distinct launch** with ``triton.compile(ASTSource(...),
   target=GPUTarget("cuda", 90, 32))`` and the recorded options, under the installed
   Triton; reads the SASS with the ``cuobjdump`` shipped in Triton's wheel, registers from
   ``cuobjdump --dump-resource-usage``, dynamic shared memory from ``metadata.shared``,
   spills as STL/LDL instructions (and the local-memory size).
3. **Counts instructions.** A loop is a backward branch of the SASS (a ``BRA`` to a lower
   address; the trailing ``BRA`` to itself after ``EXIT`` is not). Its trip count comes from
   the ``scf.for`` of the kernel's TTGIR, matched in order of appearance: lower bound, upper
   bound and step are evaluated from ``arith`` constants, constexprs and the launch's integer
   arguments (e.g. ``B * HP * WP`` for a weight gradient). An instruction counts once per
   warp, times the trip counts of the loops around it; code outside loops counts once (both
   sides of a branch: an upper bound). Classes: integer (IMAD, IADD3, LOP3, SHF, ISETP, SEL,
   LEA, PRMT, ...; the uniform datapath's U* integer ops count as other), FP (FFMA, FADD,
   FMNMX, F2F, ...), global/local load-store (LDG, STG, LDGSTS, ATOM, RED, ...), shared
   memory (LDS, STS, LDSM, ...), tensor core (HGMMA, HMMA) and other (MOV, BAR, BRA, S2R, ...).
   Warp-instructions = per-warp count x num_warps x programs.
   Tensor-core FLOPs from the instruction shapes: ``HGMMA.64xNx16`` is a warpgroup's
   64 x N x 16 product (a quarter per warp), ``HMMA.16816`` a warp's 16 x 8 x 16.
4. **Bytes.** DRAM bytes of a Triton launch: the footprint (the bytes its elements span; an
   expanded dimension adds none) of every tensor argument the kernel loads from, plus the
   same for every one it stores to (``tt.load``/``tt.store`` of its TTIR traced back to the
   pointer argument): unique bytes read + written, re-reads assumed to hit L2. Torch ops: bytes of the tensors read
   (gathers: the gathered output and the indices, not the whole source) plus the tensors
   written; views and allocations move nothing. FLOPs of bmm/baddbmm/mm/addmm: 2 m n k per
   product.

The model: a launch takes ``max(issue time, byte time, tensor time, launch floor)``; the step
takes the sum over its launches (no overlap between launches, none of latency, occupancy,
tail waves or L2 bandwidth: an optimistic throughput bound per launch); net-it/s = P / step
time. issue time = (2 x integer + all other warp-instructions) / (SMs x 4 x clock);
byte time = bytes / HBM bandwidth; tensor time = tensor FLOPs / dense 16-bit peak (torch fp32
matrix products: / fp32 peak, no TF32 since the model computes IEEE fp32).

Ceilings (H200 SXM) and sources:
- 132 SMs, 1.98 GHz boost clock: NVIDIA's H200/H100 SXM datasheet (datasheet).
- 4 warp-instructions issued per clock per SM (one per scheduler, four schedulers):
  NVIDIA's Hopper tuning guide / architecture whitepaper (datasheet). Integer
  instructions at about half that rate (64 INT32 lanes per SM against 128 FP32 lanes:
  whitepaper; "about half" is a model choice, not measured).
- 4.3 TB/s HBM: a device-to-device copy (reads + writes) on the project's H200 (measured in an
  earlier session, the shared notes' PERFORMANCE.md; not by this script; datasheet 4.8 TB/s).
- 790 TFLOP/s dense bf16/fp16: 8192^3 matmuls on that H200 (measured likewise; datasheet 989
  dense). fp32 (IEEE, no tensor cores): 67 TFLOP/s (datasheet).
- 2 us per launch (a CUDA-graph kernel node): assumed, not measured.
None of these figures has been checked against a run of this step on a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

if os.environ.get("TRITON_INTERPRET") == "1" and __name__ == "__main__":
    sys.exit("unset TRITON_INTERPRET: the interpreter compiles nothing and launches other tiles")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

CEILINGS = {
    "sms": 132,  # datasheet
    "clock_hz": 1.98e9,  # datasheet, boost
    "issue_per_clock_per_sm": 4,  # warp-instructions; datasheet (four schedulers)
    "int_cost": 2.0,  # issue slots per integer warp-instruction ("about half rate")
    "hbm_bytes_per_s": 4.3e12,  # measured device-to-device copy
    "tensor_flops_16bit": 790e12,  # measured 8192^3 bf16 matmul
    "fp32_flops": 67e12,  # datasheet, IEEE fp32 (no TF32)
    "launch_floor_s": 2e-6,  # assumed
}
TARGET = GPUTarget("cuda", 90, 32)
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


# ----------------------------------------------------------------------------------------------
# 1. Recording
# ----------------------------------------------------------------------------------------------

@dataclass
class TensorArg:
    shape: tuple[int, ...]
    dtype: str
    nbytes: int  # footprint (see footprint)
    offset: int  # byte offset in its storage (data_ptr on meta)


@dataclass
class Launch:
    kernel: str
    grid: tuple[int, int, int]
    args: dict[str, Any]  # name -> int / float / bool / TensorArg / None
    signature: dict[str, str]
    constexprs: dict[str, Any]  # name -> value
    attrs: dict[str, list]  # name -> Triton attributes (tt.divisibility)
    options: dict[str, Any]
    fn: Any = field(repr=False, default=None)
    _raw: tuple = field(repr=False, default=())

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def spec_key(self) -> str:
        return json.dumps([self.kernel, self.signature, {k: repr(v) for k, v in self.constexprs.items()},
                           self.attrs, {k: repr(v) for k, v in sorted(self.options.items())}], sort_keys=True)


@dataclass
class TorchOp:
    op: str
    nbytes: int
    flops: int
    dtype: str


def footprint(t: torch.Tensor) -> int:
    """Bytes a tensor covers in memory: an expanded (stride 0) dimension adds none."""
    if t.numel() == 0:
        return 0
    span = 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))
    return min(t.numel(), span) * t.element_size()


def _tensor_arg(t: torch.Tensor) -> TensorArg:
    return TensorArg(tuple(t.shape), str(t.dtype).removeprefix("torch."), footprint(t),
                     t.storage_offset() * t.element_size())


class _Recorder:
    """Replaces ``JITFunction.run`` while active: binds, specialises for sm_90, records, skips."""

    def __init__(self) -> None:
        self.backend = make_backend(TARGET)
        self.binders: dict[int, Any] = {}
        self.launches: list[Launch] | None = None  # None: launches pass unrecorded (and unrun)

    def run(self, fn: JITFunction, args: tuple, grid: Any, kwargs: dict) -> None:
        if self.launches is None:
            return
        binder = self.binders.get(id(fn))
        if binder is None:
            binder = self.binders[id(fn)] = create_function_from_signature(fn.signature, fn.params, self.backend)
        kwargs = dict(kwargs)  # as JITFunction.run (Triton 3.6-3.8) completes them
        kwargs["debug"] = kwargs.get("debug", fn.debug) or triton.knobs.runtime.debug
        kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound, specialization, options)
        if callable(grid):
            grid = grid(bound)
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        names = list(bound)
        values = {n: (_tensor_arg(v) if isinstance(v, torch.Tensor) else v) for n, v in bound.items()}
        self.launches.append(Launch(
            kernel=fn.fn.__name__, grid=grid, args=values, signature=dict(signature),
            constexprs={names[k[0]]: v for k, v in constexprs.items()},
            attrs={names[k[0]]: v for k, v in attrs.items() if v},
            options={k: v for k, v in options.__dict__.items() if isinstance(v, (int, float, str, bool, type(None)))},
            fn=fn, _raw=(signature, constexprs, attrs, options)))


_VIEWLESS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias",
             "lift_fresh", "_local_scalar_dense", "set_"}
_GATHERS = {"index", "index_select", "gather", "embedding", "take"}
_WRITE_ONLY_INPLACE = {"copy_", "fill_", "zero_", "normal_", "uniform_", "random_", "bernoulli_", "resize_"}


def _flops(name: str, args: tuple) -> int:
    t = [a for a in args if isinstance(a, torch.Tensor)]
    if name == "bmm" and len(t) >= 2:
        (b, m, k), n = t[0].shape, t[1].shape[-1]
        return 2 * b * m * n * k
    if name == "baddbmm" and len(t) >= 3:
        (b, m, k), n = t[1].shape, t[2].shape[-1]
        return 2 * b * m * n * k
    if name == "mm" and len(t) >= 2:
        (m, k), n = t[0].shape, t[1].shape[-1]
        return 2 * m * n * k
    if name == "addmm" and len(t) >= 3:
        (m, k), n = t[1].shape, t[2].shape[-1]
        return 2 * m * n * k
    return 0


class _OpCounter(TorchDispatchMode):
    """Every aten op with the bytes it moves (see the module docstring) and matmul FLOPs."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[TorchOp] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        schema = func._schema
        rets = schema.returns
        is_view = bool(rets) and rets[0].alias_info is not None and not rets[0].alias_info.is_write
        if is_view or name in _VIEWLESS:
            return out
        written_inputs, read = set(), {}
        flat_args = list(args) + list(kwargs.values())
        for a, s in zip(list(args) + [kwargs.get(arg.name) for arg in schema.arguments[len(args):]],
                        schema.arguments):
            if isinstance(a, torch.Tensor) and s.alias_info is not None and s.alias_info.is_write:
                written_inputs.add(id(a))
        if name in _GATHERS:
            flat_args = [a for a in flat_args[1:]]  # the source is read only where gathered
        for a in flat_args:
            for t in (a if isinstance(a, (list, tuple)) else [a]):
                if isinstance(t, torch.Tensor) and (id(t) not in written_inputs or
                                                    (name.endswith("_") and name not in _WRITE_ONLY_INPLACE)):
                    read[id(t)] = footprint(t)
        outs = out if isinstance(out, (list, tuple)) else [out]
        written = {id(t): footprint(t) for t in outs if isinstance(t, torch.Tensor)}
        dtypes = [t.dtype for t in (list(outs) + list(args)) if isinstance(t, torch.Tensor)]
        self.ops.append(TorchOp(f"aten.{name}", sum(read.values()) + sum(written.values()), _flops(name, args),
                                str(dtypes[0]).removeprefix("torch.") if dtypes else "-"))
        return out


class _Done(Exception):
    """Raised after the recorded step: the rest of the stage is not needed."""


@contextmanager
def _patched(recorder: _Recorder):
    """JITFunction.run records instead of launching; autocast accepts the meta device (the fused
    model calls ``torch.autocast(x.device.type, enabled=False)``; meta has no autocast backend)."""
    saved_run, saved_autocast = JITFunction.run, torch.autocast

    def run(self, *args, grid, warmup, **kwargs):  # noqa: ANN001, ANN202
        recorder.run(self, args, grid, kwargs)

    class _Autocast(saved_autocast):
        def __init__(self, device_type: str, *a: Any, **k: Any) -> None:
            super().__init__("cpu" if device_type == "meta" else device_type, *a, **k)

    JITFunction.run, torch.autocast = run, _Autocast
    try:
        yield
    finally:
        JITFunction.run, torch.autocast = saved_run, saved_autocast


def record(pack: int, precision: str, batch: int = 64, device: str = "meta", eval_chunk: bool = False,
           head_only: bool = False, train_images: int = 1000) -> dict[str, dict[str, list]]:
    """The launches and torch ops of one training step (and, with ``eval_chunk``, of one
    evaluation chunk of ``engine.EVAL_CHUNK_IMAGES`` images per member). ``head_only``: a
    head-only stage (body frozen, PackedSGD on the head's views), as phase 2 trains.
    The stage: cross-entropy, the "scale" input transform, no augmentation, momentum 0.9,
    weight decay 5e-4, biases at 2x lr (as bench/ab_train_stage.py)."""
    from workers import engine
    from workers.fused_lenet import FusedLeNet5
    from workers.losses import PackedLoss
    from workers.samplers import EpochSampler
    from workers.step_graph import WARMUP_STEPS
    from workers.transforms import InputTransform, stack_transforms

    dev = torch.device(device)
    dtype = PRECISIONS[precision]
    recorder = _Recorder()
    out: dict[str, dict[str, list]] = {}
    with _patched(recorder):
        with dev:
            model = FusedLeNet5(pack, compute_dtype=dtype)
        iters = WARMUP_STEPS + 1
        cfg = engine.StageConfig(iters=iters, batch_size=batch, lr=torch.full((iters, pack), 0.01, device=dev),
                                 momentum=torch.full((pack,), 0.9, device=dev),
                                 weight_decay=torch.full((pack,), 5e-4, device=dev),
                                 bias_lr_factor=torch.full((pack,), 2.0, device=dev), head_only=head_only,
                                 cuda_graph=True)
        if dev.type == "meta":
            x = torch.empty((train_images, 1, 28, 28), dtype=torch.uint8, device=dev)
            y = torch.empty(train_images, dtype=torch.int64, device=dev)
        else:
            g = torch.Generator().manual_seed(0)
            x = torch.randint(0, 256, (train_images, 1, 28, 28), dtype=torch.uint8, generator=g).to(dev)
            y = torch.randint(0, 10, (train_images,), generator=g).to(dev)
        samplers = [EpochSampler(np.arange(train_images), batch, p) for p in range(pack)]
        transform = stack_transforms([InputTransform("scale", None)] * pack).to(dev)
        loss = PackedLoss(["ce"] * pack, torch.ones(pack, 10)).to(dev)
        counter = _OpCounter()
        real_device_step, calls = engine._device_step, [0]

        def device_step(*a: Any, **k: Any):  # noqa: ANN202
            step = real_device_step(*a, **k)

            def recorded() -> None:
                calls[0] += 1
                if calls[0] < iters:
                    return step()
                recorder.launches = []
                with counter:
                    step()
                out["step"] = {"launches": recorder.launches, "ops": counter.ops}
                recorder.launches = None
                raise _Done

            return recorded

        engine._device_step = device_step
        try:
            engine.train_stage(model, samplers, x, y, transform, loss, cfg)
        except _Done:
            pass
        finally:
            engine._device_step = real_device_step
        if "step" not in out:
            raise RuntimeError("train_stage ran no step")
        if eval_chunk:
            n = engine.EVAL_CHUNK_IMAGES
            xe = torch.empty((n, 1, 28, 28), dtype=torch.uint8, device=dev) if dev.type == "meta" else x[:1].expand(
                n, 1, 28, 28).contiguous()
            recorder.launches, counter = [], _OpCounter()
            with counter:
                engine.predict(model, xe, transform)
            out["eval"] = {"launches": recorder.launches, "ops": counter.ops}
            recorder.launches = None
    return out


# ----------------------------------------------------------------------------------------------
# 2./3. Compiling and counting
# ----------------------------------------------------------------------------------------------

_INT = ("IMAD", "IADD", "IADD3", "LOP", "LOP3", "SHF", "SHL", "SHR", "ISETP", "SEL", "LEA", "IMNMX", "VIMNMX",
        "IABS", "POPC", "FLO", "BMSK", "BREV", "PRMT", "SGXT", "IMUL", "I2I", "IDP", "ISCADD", "VIADD")
# Uniform-datapath integer ops (UIMAD, UIADD3, ...) are "other": one issue slot, not the INT32 lanes.
_FP = ("FFMA", "FADD", "FMUL", "FMNMX", "FSETP", "FSEL", "FSET", "FCHK", "FRND", "MUFU", "HADD2", "HMUL2", "HFMA2",
       "HMNMX2", "HSETP2", "HSET2", "F2F", "F2FP", "F2I", "I2F", "I2FP", "DADD", "DMUL", "DFMA", "DSETP", "DMNMX",
       "F2IP")
_MEM = ("LDG", "STG", "LD", "ST", "LDL", "STL", "LDGSTS", "LDGDEPBAR", "ATOM", "ATOMG", "RED", "REDG", "UBLKCP",
        "UTMALDG", "UTMASTG", "CCTL")
_SHARED = ("LDS", "STS", "LDSM", "STSM", "ATOMS", "LDSLK", "STSCUL")
_TENSOR = ("HGMMA", "HMMA", "IMMA", "QGMMA", "IGMMA", "BGMMA", "DMMA")
CLASSES = ("int", "fp", "ldst", "shared", "tensor", "other")


def _class(op: str) -> str:
    base = op.split(".")[0]
    if base in _TENSOR:
        return "tensor"
    if base in _SHARED:
        return "shared"
    if base in _MEM:
        return "ldst"
    if base in _FP:
        return "fp"
    if base in _INT:
        return "int"
    return "other"


def _mma_flops_per_warp(op: str) -> int:
    m = re.match(r"[A-Z]GMMA\.(\d+)x(\d+)x(\d+)", op)
    if m:  # a warpgroup's product, issued by each of its 4 warps
        a, b, c = map(int, m.groups())
        return 2 * a * b * c // 4
    m = re.match(r"[A-Z]MMA\.(16)(8)(\d+)", op)
    if m:
        a, b, c = map(int, m.groups())
        return 2 * a * b * c
    return 0


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def parse_sass(sass: str) -> list[tuple[int, str, int | None]]:
    """(address, opcode with modifiers, branch target or None) of every instruction."""
    out = []
    for m in _SASS_LINE.finditer(sass):
        addr, text = int(m.group(1), 16), m.group(2).strip()
        text = re.sub(r"^@!?U?P[T0-9]+\s+", "", text)
        op = text.split()[0] if text else ""
        target = None
        if op.startswith("BRA"):
            t = re.search(r"0x([0-9a-f]+)", text)
            target = int(t.group(1), 16) if t else None
        out.append((addr, op, target))
    return out


def sass_loops(instrs: list[tuple[int, str, int | None]]) -> list[tuple[int, int]]:
    """(first, last) addresses of each loop: a branch back to a lower address, by header address."""
    return sorted((t, a) for a, _, t in instrs if t is not None and t < a)


_FOR = re.compile(r"scf\.for\s+%[\w]+\s*=\s*(%[\w#-]+)\s+to\s+(%[\w#-]+)\s+step\s+(%[\w#-]+)")
_DEF = re.compile(r"^\s*(%[\w]+)\s*=\s*(arith\.\w+)\s+(.*?)\s*(?:loc\(.*)?$")


def _int_env(ir: str, ints: dict[str, int]) -> dict[str, int]:
    """Integer SSA values of ``ir`` that can be evaluated from constants and ``ints`` (arguments)."""
    env = {f"%{k}": v for k, v in ints.items()}
    binary = {"arith.addi": lambda a, b: a + b, "arith.subi": lambda a, b: a - b, "arith.muli": lambda a, b: a * b,
              "arith.divsi": lambda a, b: int(a / b), "arith.divui": lambda a, b: a // b,
              "arith.ceildivsi": lambda a, b: -(-a // b), "arith.floordivsi": lambda a, b: a // b,
              "arith.remsi": lambda a, b: int(math.fmod(a, b)), "arith.remui": lambda a, b: a % b,
              "arith.maxsi": max, "arith.minsi": min}
    for line in ir.splitlines():
        m = _DEF.match(line)
        if not m:
            continue
        name, op, rest = m.groups()
        if op == "arith.constant":
            c = re.match(r"(-?\d+)\s*:\s*(i\d+|index)", rest)
            if c:
                env[name] = int(c.group(1))
            continue
        operands = re.findall(r"%[\w]+", rest.split(":")[0])
        if op in binary and len(operands) == 2 and all(o in env for o in operands):
            env[name] = binary[op](env[operands[0]], env[operands[1]])
        elif op in ("arith.extsi", "arith.extui", "arith.trunci", "arith.index_cast") and operands and \
                operands[0] in env:
            env[name] = env[operands[0]]
    return env


def ir_loops(ir: str, ints: dict[str, int]) -> list[int | None]:
    """Trip count of each ``scf.for`` of ``ir`` in order of appearance (None: not evaluable)."""
    env = _int_env(ir, ints)
    trips = []
    for m in _FOR.finditer(ir):
        lo, hi, st = (env.get(v.split("#")[0]) for v in m.groups())
        trips.append(None if None in (lo, hi, st) or st <= 0 else max(0, -(-(hi - lo) // st)))
    return trips


def ir_accesses(ttir: str) -> dict[str, set[str]]:
    """Pointer argument -> {"load", "store"}: each tt.load / tt.store traced to its argument."""
    head = re.search(r"tt\.func\s+\w*\s*@\w+\((.*?)\)\s*(?:attributes|\{)", ttir, re.S)
    args = re.findall(r"%([\w]+)\s*:\s*!tt\.ptr", head.group(1)) if head else []
    defs: dict[str, list[str]] = {}
    for line in ttir.splitlines():
        m = re.match(r"^\s*(%[\w]+)(?::\d+)?\s*=\s*([\w.]+)\s+(.*)$", line)
        if m:
            defs[m.group(1)] = [m.group(2)] + re.findall(r"%[\w]+", m.group(3).split(" : ")[0])

    def root(v: str, depth: int = 0) -> str | None:
        if v[1:] in args:
            return v[1:]
        d = defs.get(v)
        if d is None or depth > 200:
            return None
        if d[0] in ("tt.addptr", "tt.splat", "tt.broadcast", "tt.expand_dims", "tt.reshape", "tt.trans",
                    "ttg.convert_layout", "tt.bitcast", "arith.select") and len(d) > 1:
            for o in (d[1:] if d[0] != "arith.select" else d[2:]):
                r = root(o, depth + 1)
                if r is not None:
                    return r
        return None

    out: dict[str, set[str]] = defaultdict(set)
    for line in ttir.splitlines():
        m = re.search(r"\btt\.(load|store|atomic_rmw|atomic_cas)\s+(?:\w+,\s*)?(?:\w+,\s*)?(%[\w]+)", line)
        if m:
            kind = {"load": "load", "store": "store"}.get(m.group(1), "atomic")
            r = root(m.group(2))
            out[r or "?"].add(kind)
    return dict(out)


@dataclass
class KernelCost:
    """One compiled specialisation: static facts and per-warp dynamic instruction counts."""

    sass_instructions: int
    loops: list[dict[str, Any]]
    per_warp: dict[str, float]  # class -> instructions per warp per program
    mma_flops_per_warp: float
    registers: int
    stack: int
    local: int
    spill_instructions: int
    shared: int
    accesses: dict[str, list[str]]
    atomics: int
    mma: dict[str, int]  # tensor-core opcode -> static count (none: dots ran as FMAs)
    warnings: list[str]


def _resources(cubin: bytes) -> tuple[str, dict[str, int]]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(CUOBJDUMP), "-sass", f.name], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    usage = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", res)}
    return sass, usage


def analyse(launch: Launch) -> KernelCost:
    signature, constexprs, attrs, options = launch._raw
    compiled = triton.compile(ASTSource(launch.fn, signature, constexprs, attrs), target=TARGET,
                              options=options.__dict__)
    sass, usage = _resources(compiled.asm["cubin"])
    instrs = parse_sass(sass)
    loops = sass_loops(instrs)
    ints = {k: int(v) for k, v in {**launch.args, **launch.constexprs}.items()
            if isinstance(v, (int, bool)) and not isinstance(v, TensorArg)}
    trips = ir_loops(compiled.asm["ttgir"], ints)
    warnings = []
    if len(trips) != len(loops):
        warnings.append(f"{len(loops)} SASS loops for {len(trips)} scf.for: trip counts matched in order, "
                        "the rest counted once")
    loop_rows = []
    for i, (lo, hi) in enumerate(loops):
        t = trips[i] if i < len(trips) else None
        if t is None:
            warnings.append(f"loop at 0x{lo:x}: trip count not evaluable, counted once")
        loop_rows.append({"first": lo, "last": hi, "instructions": (hi - lo) // 16 + 1, "trips": t})
    per_warp = dict.fromkeys(CLASSES, 0.0)
    flops = 0.0
    spills = atomics = 0
    mma: dict[str, int] = defaultdict(int)
    for addr, op, target in instrs:
        if op.startswith("BRA") and target == addr:
            continue  # the trap loop after EXIT
        mult = 1
        for row in loop_rows:
            if row["first"] <= addr <= row["last"] and row["trips"] is not None:
                mult *= row["trips"]
        c = _class(op)
        per_warp[c] += mult
        flops += mult * _mma_flops_per_warp(op)
        base = op.split(".")[0]
        spills += base in ("STL", "LDL")
        atomics += base in ("ATOM", "ATOMG", "RED", "REDG", "ATOMS")
        if c == "tensor":
            mma[op] += 1
    acc = {k: sorted(v) for k, v in ir_accesses(compiled.asm["ttir"]).items()}
    if "?" in acc:
        warnings.append("a load/store not traced to a pointer argument (its bytes are not counted)")
    return KernelCost(len(instrs), loop_rows, per_warp, flops, usage.get("reg", 0), usage.get("stack", 0),
                      usage.get("local", 0), spills, int(compiled.metadata.shared), acc, atomics, dict(mma), warnings)


# ----------------------------------------------------------------------------------------------
# 4. The model
# ----------------------------------------------------------------------------------------------

def _peak_issue() -> float:
    return CEILINGS["sms"] * CEILINGS["issue_per_clock_per_sm"] * CEILINGS["clock_hz"]


def launch_row(launch: Launch, cost: KernelCost) -> dict[str, Any]:
    warps = launch.options.get("num_warps", 4)
    n = launch.programs * warps
    counts = {c: cost.per_warp[c] * n for c in CLASSES}
    total = sum(counts.values())
    issue_s = (CEILINGS["int_cost"] * counts["int"] + (total - counts["int"])) / _peak_issue()
    nbytes = 0
    for name, kinds in cost.accesses.items():
        a = launch.args.get(name)
        if isinstance(a, TensorArg):
            nbytes += a.nbytes * (("load" in kinds) + ("store" in kinds or "atomic" in kinds))
    byte_s = nbytes / CEILINGS["hbm_bytes_per_s"]
    tflops = cost.mma_flops_per_warp * n
    tensor_s = tflops / CEILINGS["tensor_flops_16bit"]
    return {"name": launch.kernel, "kind": "triton", "programs": launch.programs, "warps": warps,
            "grid": launch.grid, "loops": [r["trips"] for r in cost.loops],
            "loop_sass": [r["instructions"] for r in cost.loops], "sass": cost.sass_instructions,
            "warp_instructions": total, "by_class": counts, "issue_s": issue_s, "bytes": nbytes, "byte_s": byte_s,
            "tensor_flops": tflops, "tensor_s": tensor_s,
            "time_s": max(issue_s, byte_s, tensor_s, CEILINGS["launch_floor_s"]),
            "shared": cost.shared, "registers": cost.registers, "spills": cost.spill_instructions,
            "stack": cost.stack, "local": cost.local, "atomics": cost.atomics, "mma": cost.mma,
            "warnings": cost.warnings,
            "constexprs": {k: v for k, v in launch.constexprs.items()}}


def op_rows(ops: list[TorchOp]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for o in ops:
        g = groups.setdefault((o.op, o.dtype), {"name": o.op, "kind": "torch", "dtype": o.dtype, "count": 0,
                                                "bytes": 0, "flops": 0, "time_s": 0.0, "byte_s": 0.0,
                                                "tensor_s": 0.0})
        peak = CEILINGS["fp32_flops"] if o.dtype in ("float32", "float64") else CEILINGS["tensor_flops_16bit"]
        b, f = o.nbytes / CEILINGS["hbm_bytes_per_s"], o.flops / peak
        g["count"] += 1
        g["bytes"] += o.nbytes
        g["flops"] += o.flops
        g["byte_s"] += b
        g["tensor_s"] += f
        g["time_s"] += max(b, f, CEILINGS["launch_floor_s"])
    return sorted(groups.values(), key=lambda g: -g["time_s"])


def _label(rows: list[dict[str, Any]]) -> None:
    """Name launches of one kernel apart by the constexprs in which they differ."""
    by_name: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_name[r["name"]].append(r)
    for name, rs in by_name.items():
        if len(rs) < 2:
            continue
        keys = [k for k in rs[0]["constexprs"] if len({repr(r["constexprs"].get(k)) for r in rs}) > 1]
        for i, r in enumerate(rs):
            r["name"] = f"{name} #{i + 1} (" + " ".join(f"{k}={r['constexprs'][k]}" for k in keys[:2]) + ")"


def model(recording: dict[str, list], pack: int) -> dict[str, Any]:
    costs: dict[str, KernelCost] = {}
    rows = []
    for launch in recording["launches"]:
        key = launch.spec_key()
        if key not in costs:
            costs[key] = analyse(launch)
        rows.append(launch_row(launch, costs[key]))
    _label(rows)
    torch_rows = op_rows(recording["ops"])
    total = sum(r["time_s"] for r in rows) + sum(r["time_s"] for r in torch_rows)
    return {"triton": rows, "torch": torch_rows, "step_s": total, "net_it_per_s": pack / total,
            "bytes": sum(r["bytes"] for r in rows + torch_rows),
            "kernels": sorted({lc.kernel for lc in recording["launches"]}), "compiled": len(costs)}


def _g(x: float) -> str:
    return f"{x / 1e9:.3f} G" if x >= 1e7 else f"{x / 1e6:.3f} M"


TORCH_ROWS = 10  # torch op kinds shown one by one (by time); the rest in one row (all in --json)


def table(result: dict[str, Any], title: str) -> str:
    lines = [f"### {title}", "",
             "| launch | programs | loop trips | SASS in loops | warp-instructions | int % | issue ms | DRAM bytes "
             "| byte ms | tensor ms | time ms | shared KB | regs | spills |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["triton"]:
        intp = 100 * r["by_class"]["int"] / r["warp_instructions"] if r["warp_instructions"] else 0
        lines.append(f"| {r['name']} | {r['programs']:,} x {r['warps']} warps | "
                     f"{', '.join(str(t) for t in r['loops']) or '-'} | "
                     f"{', '.join(str(t) for t in r['loop_sass']) or '-'} | {_g(r['warp_instructions'])} | "
                     f"{intp:.0f} | {1e3 * r['issue_s']:.3f} | {r['bytes'] / 1e9:.3f} GB | {1e3 * r['byte_s']:.3f} | "
                     f"{1e3 * r['tensor_s']:.3f} | **{1e3 * r['time_s']:.3f}** | {r['shared'] / 1024:.0f} | "
                     f"{r['registers']} | {r['spills']} |")
    shown, rest = result["torch"][:TORCH_ROWS], result["torch"][TORCH_ROWS:]
    if rest:
        sums = {k: sum(r[k] for r in rest) for k in ("count", "bytes", "flops", "byte_s", "tensor_s", "time_s")}
        shown = shown + [{"name": f"other aten ops ({len(rest)} kinds)", "dtype": "-", **sums}]
    for r in shown:
        fl = f", {r['flops'] / 1e9:.1f} GFLOP" if r["flops"] else ""
        dtype = f" ({r['dtype']})" if r["dtype"] != "-" else ""
        lines.append(f"| {r['name']}{dtype} x{r['count']} | - | - | - | - | - | - | "
                     f"{r['bytes'] / 1e9:.3f} GB{fl} | {1e3 * r['byte_s']:.3f} | {1e3 * r['tensor_s']:.3f} | "
                     f"**{1e3 * r['time_s']:.3f}** | - | - | - |")
    return "\n".join(lines)


SHARED_LIMIT = 227 * 1024  # dynamic shared memory per block on sm_90 (CUDA programming guide)
GRID_YZ_LIMIT = 65535  # grid dimensions y and z (CUDA programming guide)


def ctas_per_sm(registers: int, shared: int, warps: int) -> int:
    """Resident blocks per SM on sm_90 (CUDA occupancy rules: 64 K registers allocated per warp
    in units of 256, 228 KB shared with 1 KB reserved per block, 64 warps, 32 blocks).
    Reported, not used by the time model."""
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = 65536 // (per_warp * warps)
    by_shared = (228 * 1024) // (shared + 1024)
    return max(0, min(by_regs, by_shared, 64 // warps, 32))


def compile_checks(rows: list[dict[str, Any]], title: str) -> str:
    """What bench/compile_fused_kernels.py used to print: per compiled launch, whether it
    spills, fits in shared memory, uses atomics, and whether its dots reach the tensor cores."""
    lines, seen = [f"compile checks, {title} (sm_90a):"], set()
    for r in rows:
        if r["name"] in seen:
            continue
        seen.add(r["name"])
        mma = ", ".join(f"{n} {op}" for op, n in sorted(r["mma"].items())) or "no tensor-core instructions"
        ctas = ctas_per_sm(r["registers"], r["shared"], r["warps"])
        waves = r["programs"] / (CEILINGS["sms"] * ctas) if ctas else math.inf
        big = [d for d in r["grid"][1:] if d > GRID_YZ_LIMIT]
        flags = [f"grid {tuple(r['grid'])}" + (" EXCEEDS the y/z limit 65,535" if big else ""),
                 f"{ctas} CTAs/SM, {waves:,.1f} waves", f"{r['registers']} registers",
                 f"{r['spills']} spill instructions" +
                 (f" ({r['local']} B local)" if r["local"] else ""),
                 f"{r['shared'] / 1024:.0f} KB shared" + (" EXCEEDS 227 KB" if r["shared"] > SHARED_LIMIT else ""),
                 f"{r['atomics']} atomics", mma] + [f"WARNING {w}" for w in r["warnings"]]
        lines.append(f"- {r['name']}: " + "; ".join(flags))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pack", type=int, default=1024, help="P, members trained together")
    ap.add_argument("--precision", choices=sorted(PRECISIONS), default="bf16")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--eval", action="store_true", help="also one evaluation chunk (engine.predict)")
    ap.add_argument("--head-only", action="store_true", help="a head-only stage's step (phase 2)")
    ap.add_argument("--device", choices=("meta", "cpu"), default="meta",
                    help="where the step is recorded (cpu: small P only, same launches)")
    ap.add_argument("--json", type=Path, help="write every figure here")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1" or triton.knobs.runtime.interpret:
        sys.exit("unset TRITON_INTERPRET: the interpreter compiles nothing and launches other tiles")
    rec = record(a.pack, a.precision, a.batch, a.device, a.eval, a.head_only)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = (f"PREDICTION (static, no GPU): fused LeNet-5 {'head-only ' if a.head_only else ''}step, "
            f"P = {a.pack}, batch {a.batch}, {a.precision}, "
            f"H200 (sm_90) ceilings; Triton {triton.__version__}, torch {torch.__version__}; {when}")
    print(head, flush=True)
    out: dict[str, Any] = {"pack": a.pack, "precision": a.precision, "batch": a.batch, "head_only": a.head_only,
                           "triton": triton.__version__,
                           "torch": torch.__version__, "date": when, "ceilings": CEILINGS}
    if a.eval:
        ev = model(rec["eval"], a.pack)
        out["eval"] = ev
        print(table(ev, "One evaluation chunk (engine.predict, no gradient)") + "\n")
        from workers.engine import EVAL_CHUNK_IMAGES
        print(f"eval chunk: {1e3 * ev['step_s']:.3f} ms for {EVAL_CHUNK_IMAGES} images x {a.pack} members\n")
    st = model(rec["step"], a.pack)
    out["step"] = st
    print(table(st, "One training step (the step a CUDA graph captures)") + "\n")
    if a.eval:
        print(compile_checks(out["eval"]["triton"], "evaluation chunk") + "\n")
    print(compile_checks(st["triton"], "training step") + "\n")
    n_torch = sum(r["count"] for r in st["torch"])
    print(f"kernels: {', '.join(st['kernels'])} ({len(st['triton'])} Triton launches, {st['compiled']} compiled "
          f"specialisations; {n_torch} torch ops)")
    print(f"step: {1e3 * st['step_s']:.3f} ms = sum over launches of max(issue, bytes, tensor, "
          f"{1e6 * CEILINGS['launch_floor_s']:.0f} us); {st['bytes'] / 1e9:.2f} GB moved")
    if a.json:
        a.json.write_text(json.dumps(out, indent=1, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__")
                                     else repr(o)))
    print(f"predicted: {st['net_it_per_s']:,.0f} net-it/s")


if __name__ == "__main__":
    main()
