"""Compile the fused LeNet-5 kernels for a GPU that is not there, and print their resources.

Triton's interpreter (the tests) never compiles a kernel, so it cannot catch what only the
compiler rejects, nor register spills. This script builds every launch the fused LeNet-5
step makes (``workers.fused_kernels.launch_config`` at batch ``--batch``, fp32 / fp16 /
bf16) for ``--arch`` (default 90: the H200) with the ptxas that ships with Triton, and
prints registers per thread, spill stack, static shared memory and the tensor-core
instructions (wgmma / mma.sync) of each. No GPU needed.

    python bench/compile_fused_kernels.py            # TRITON_INTERPRET must be unset
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from workers import fused_kernels as fk  # noqa: E402

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# LeNet-5's two convolutions: (c_in, side of the input, c_out); kernels 5x5.
LAYERS = {"conv1": (1, 28, 20), "conv2": (20, 12, 50)}


def resources(kernel: object, pointers: dict[str, str], runtime: dict[str, str], consts: dict[str, object],
              arch: int) -> str:
    """Compile one specialisation; registers, spill stack and shared memory of its cubin."""
    warps = consts.pop("num_warps", 4)
    signature = {n: pointers.get(n) or runtime.get(n) or "constexpr" for n in kernel.arg_names}
    compiled = triton.compile(ASTSource(kernel, signature, consts), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+).*?SHARED:(\d+)", out, re.S)
    ptx = compiled.asm["ptx"]
    # Whether tl.dot reached the tensor cores (16-bit) or runs as fp32 FMAs (IEEE fp32).
    mma = f"{len(re.findall('wgmma.mma_async', ptx))} wgmma, {len(re.findall('mma.sync', ptx))} mma.sync"
    return f"warps {warps}, {m.group(1)} registers, spill stack {m.group(2)} B, static shared {m.group(3)} B, {mma}"


def conv_launches(batch: int, dtype: torch.dtype):
    """(name, kernel, pointer types, constexprs) of every convolution launch of one step."""
    t = TRITON_TYPES[dtype]
    for layer, (c_in, side, c_out) in LAYERS.items():
        hp = (side - 4) // 2
        shape = {"C_IN": c_in, "H": side, "W": side, "C_OUT": c_out, "KS": 5, "HP": hp, "WP": hp}
        yield (f"{layer} fwd", fk.conv_pool_fwd_kernel,
               {"x_ptr": f"*{t}", "w_ptr": "*fp32", "b_ptr": "*fp32", "y_ptr": f"*{t}", "arg_ptr": "*i8"},
               {**shape, **fk.launch_config("fwd", batch * hp * hp, c_in, c_out, 5, dtype)})
        if layer == "conv1":  # argmax selects, rows split over programs, a fixed-order sum
            yield (f"{layer} grad weight", fk.conv_pool_grad_weight_kernel,
                   {"x_ptr": f"*{t}", "gy_ptr": f"*{t}", "arg_ptr": "*i8", "gw_ptr": "*fp32", "CHUNK": "i32"},
                   {**shape, **fk.launch_config("grad_weight", batch * hp * hp, c_in, c_out, 5, dtype)})
            yield (f"{layer} split sum", fk.split_sum_kernel, {"part_ptr": "*fp32", "out_ptr": "*fp32", "S": "i32"},
                   {"N": c_out * c_in * 25, "BLOCK": triton.next_power_of_2(c_out * c_in * 25), "num_warps": 4})
        else:  # the images need no gradient; conv2's backward runs on the unpooled gradient
            cfg = fk.launch_config("grad_input", batch * side * side, c_in, c_out, 5, dtype)
            yield (f"{layer} unpool", fk.unpool_kernel, {"gy_ptr": f"*{t}", "arg_ptr": "*i8", "gz_ptr": f"*{t}"},
                   {"C_OUT": c_out, "HP": hp, "WP": hp, "CO_PAD": cfg["CO_PAD"],
                    "BLOCK_R": triton.next_power_of_2(4 * hp * hp), "num_warps": 4})
            yield (f"{layer} grad input", fk.conv_grad_input_kernel,
                   {"gz_ptr": f"*{t}", "wt_ptr": f"*{t}", "gx_ptr": f"*{t}"},
                   {k: v for k, v in {**shape, **cfg}.items() if k not in ("C_OUT",)})
            yield (f"{layer} grad weight", fk.conv_grad_weight_kernel,
                   {"x_ptr": f"*{t}", "gz_ptr": f"*{t}", "gw_ptr": "*fp32"},
                   {**shape, "CO_PAD": cfg["CO_PAD"],
                    **fk.launch_config("grad_weight_gz", batch * 4 * hp * hp, c_in, c_out, 5, dtype)})


def sgd_pointers(w16: torch.dtype | None) -> dict[str, str]:
    ptrs = {n: "*fp32" for n in ("w_ptr", "g_ptr", "buf_ptr", "hyper_ptr")}
    ptrs.update(block_seg_ptr="*i32", seg_start_ptr="*i64", seg_magic_ptr="*i64", seg_shift_ptr="*i32",
                seg_is_bias_ptr="*i32", w16_ptr="*" + TRITON_TYPES[w16 or torch.float32], P="i32")
    return ptrs


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args(argv)
    if fk.INTERPRETED or os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter compiles nothing")
    for dtype in TRITON_TYPES:
        for name, kernel, pointers, consts in conv_launches(args.batch, dtype):
            print(f"{TRITON_TYPES[dtype]} {name}: {resources(kernel, pointers, {'B': 'i32'}, consts, args.arch)}",
                  flush=True)
    for w16 in (None, torch.float16, torch.bfloat16):
        consts = {"BLOCK": fk.SGD_BLOCK, "WRITE16": w16 is not None, "EMULATE_FMA": False, "num_warps": 8}
        label = "" if w16 is None else f" + {TRITON_TYPES[w16]} copy"
        print(f"sgd{label}: {resources(fk.sgd_kernel, sgd_pointers(w16), {}, consts, args.arch)}", flush=True)


if __name__ == "__main__":
    main()
