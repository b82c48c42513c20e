"""Count the SASS of each loop of one fused-kernel launch compiled for sm_90, without a GPU.

A local measuring aid for restructuring the kernels (the full step model is
bench/static_cost.py): compiles a kernel with the specialisation a real launch gets
(constexprs, num_warps, ``tt.divisibility`` 16 on the pointers and on integer arguments
that are multiples of 16), disassembles the cubin with the cuobjdump Triton ships, and
prints, for every backward branch, the loop body's instruction count by class.

    python bench/sass_loops.py            # TRITON_INTERPRET must be unset
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
INT = ("IMAD", "IADD3", "LOP3", "SHF", "ISETP", "SEL", "LEA", "IABS", "IMNMX", "PRMT", "I2F", "F2I", "VIADD",
       "IMUL", "ISCADD", "BMSK", "LOP", "SGXT", "FLO", "POPC", "VIMNMX")


def compile_kernel(kernel, types: dict[str, str], consts: dict[str, object], div16: tuple[str, ...] = (),
                   arch: int = 90):
    consts = dict(consts)
    warps = consts.pop("num_warps", 4)
    stages = consts.pop("num_stages", 3)
    signature = {n: types.get(n, "constexpr") for n in kernel.arg_names}
    attrs = {}
    for i, n in enumerate(kernel.arg_names):
        if n in types and (types[n].startswith("*") or n in div16):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(kernel, signature, consts, attrs), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": warps, "num_stages": stages})


def sass(compiled) -> list[tuple[int, str]]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([str(CUOBJDUMP), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    ins = []
    for line in out.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2).strip()))
    return ins


def classify(op: str) -> str:
    op = re.sub(r"^@!?U?P\w+\s+", "", op).split()[0]
    base = op.split(".")[0]
    if base in ("HGMMA", "HMMA", "WARPGROUP", "WARPSYNC"):
        return "mma" if base in ("HGMMA", "HMMA") else "other"
    if base in INT or base.startswith("U"):
        return "int" if not base.startswith("U") else "uniform"
    if base.startswith(("LD", "ST", "LDG", "STG", "LDS", "STS", "LDGSTS", "UBLKCP", "SYNCS")):
        return "mem"
    if base in ("MOV", "S2R", "CS2R", "S2UR"):
        return "move"
    if base in ("NOP",):
        return "nop"
    if base.startswith(("F", "H", "D")) and base not in ("FLO",):
        return "fp"
    return "other"


def loops(compiled) -> list[dict]:
    ins = sass(compiled)
    addr = {a: i for i, (a, _) in enumerate(ins)}
    found = []
    for i, (a, op) in enumerate(ins):
        tgt = re.search(r"0x([0-9a-f]+)", op) if "BRA" in op else None
        if tgt is None:
            continue
        ta = int(tgt.group(1), 16)
        if ta <= a and ta in addr:
            body = ins[addr[ta]:i + 1]
            counts: dict[str, int] = {}
            for _, o in body:
                c = classify(o)
                counts[c] = counts.get(c, 0) + 1
            found.append({"start": ta, "end": a, "n": len(body), **counts})
    return found


def resources(compiled) -> tuple[int, int]:
    """Registers per thread and spill stack bytes of the cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", out, re.S)
    return int(m.group(1)), int(m.group(2))


def report(name: str, compiled) -> None:
    md = compiled.metadata
    ins = sass(compiled)
    counts: dict[str, int] = {}
    for _, o in ins:
        c = classify(o)
        counts[c] = counts.get(c, 0) + 1
    regs, stack = resources(compiled)
    print(f"{name}: {len(ins)} SASS {counts}, {regs} registers, spill stack {stack} B, shared {md.shared} B, "
          f"warps {md.num_warps}")
    for lp in loops(compiled):
        print("   loop", {k: v for k, v in lp.items() if k not in ("start", "end")})
