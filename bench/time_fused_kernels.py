"""Time every launch of one fused LeNet-5 training step, kernel by kernel (CUDA events).

    python3 bench/time_fused_kernels.py --pack 1024 --precision bf16            # on the GPU
    python3 bench/time_fused_kernels.py --device cpu --pack 2 --batch 4 --steps 1 --warmup 1
                                                            # a CPU check of the script itself

The step is the engine's own (``workers.engine._device_step``: batch gather from the feed
table, input transform, fused forward, cross-entropy, backward, ``FusedSGD``, divergence
counters) on random uint8 images of MNIST's shape, with the ``buda_mnist`` recipe. After
``--warmup`` untimed steps (Triton compiles, cuBLAS picks its algorithms), each of
``--steps`` timed steps records a pair of CUDA events around every Triton launch (a hook
on Triton's ``JITFunction.run``) and every aten op (a ``TorchDispatchMode``), so each
row's time is that launch's own time on the device, without the gaps between launches.
The table lists the launches in step order (the median over the timed steps), ops under
0.5 % of the step folded into one row; below it the whole step timed without hooks,
eagerly and replayed as a CUDA graph, and the network-iterations/s that gives.

The measured table is printed first (flushed); then, where ``bench/static_cost.py`` exists
and runs (as a program of its own, see ``static_predictions``), the table again with the
static cost model's prediction beside each Triton launch: the k-th launch of a kernel is
matched with the model's k-th row for that kernel name. Without it, the measured column
only. On the CPU the fused kernels run in Triton's interpreter (set
``TRITON_INTERPRET=1`` before starting) and the times are host wall times: they say
nothing about a GPU; that run only checks that the script works.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the CPU check: kernels in the interpreter

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

FOLD_SHARE = 0.005  # ops under this share of the step are folded into one row


@dataclass
class Launch:
    kind: str  # "triton" | "torch"
    name: str  # Triton function name, or the aten op
    grid: str = ""
    times: list[float] = field(default_factory=list)  # ms, one per timed step

    @property
    def ms(self) -> float:
        return statistics.median(self.times) if self.times else 0.0


class _Timer:
    """Start/stop stamps on the current stream (CUDA events) or the host clock (CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.pending: list[tuple[object, object]] = []

    def start(self) -> object:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def stop(self, t0: object) -> None:
        self.pending.append((t0, self.start()))

    def collect(self) -> list[float]:
        """Milliseconds of every start/stop pair since the last collect, in order."""
        if self.cuda:
            torch.cuda.synchronize()
            out = [a.elapsed_time(b) for a, b in self.pending]  # type: ignore[union-attr]
        else:
            out = [1000 * (b - a) for a, b in self.pending]  # type: ignore[operator]
        self.pending = []
        return out


class _Recorder(TorchDispatchMode):
    """Stamps every aten op, and (``triton_hooks``) every Triton launch, of the steps run under it."""

    def __init__(self, timer: _Timer) -> None:
        super().__init__()
        self.timer = timer
        self.names: list[tuple[str, str, str]] = []  # (kind, name, grid) per stamp pair
        self._saved: list[tuple[type, object]] = []
        self._in_triton = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if self._in_triton:  # a tensor op made by a launch wrapper inside Triton's run
            return func(*args, **(kwargs or {}))
        t0 = self.timer.start()
        out = func(*args, **(kwargs or {}))
        self.timer.stop(t0)
        self.names.append(("torch", str(func.overloadpacket.__name__), ""))
        return out

    def __enter__(self):
        self._hook_triton()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for cls, run in self._saved:
                cls.run = run  # type: ignore[attr-defined]
            self._saved = []

    def _hook_triton(self) -> None:
        classes = []
        try:
            from triton.runtime.jit import JITFunction

            classes.append(JITFunction)
        except ImportError:
            pass
        try:
            from triton.runtime.interpreter import InterpretedFunction

            classes.append(InterpretedFunction)
        except ImportError:
            pass
        rec = self

        for cls in classes:
            original = cls.run

            def run(fn, *args, grid, warmup, __original=original, **kwargs):  # noqa: ANN001
                if warmup or rec._in_triton:
                    return __original(fn, *args, grid=grid, warmup=warmup, **kwargs)
                name = getattr(getattr(fn, "fn", None), "__name__", None) or getattr(fn, "__name__", "triton kernel")
                rec._in_triton = True
                t0 = rec.timer.start()
                try:
                    return __original(fn, *args, grid=grid, warmup=warmup, **kwargs)
                finally:
                    rec.timer.stop(t0)
                    rec._in_triton = False
                    rec.names.append(("triton", name, _grid_text(grid, args, kwargs)))

            self._saved.append((cls, original))
            cls.run = run  # type: ignore[attr-defined]


def _grid_text(grid: object, args: tuple, kwargs: dict) -> str:
    if callable(grid):
        return "(callable)"
    if isinstance(grid, tuple):
        return "x".join(str(g) for g in grid)
    return str(grid)


def _build_step(pack: int, precision: str, device: torch.device, batch: int | None):
    """The engine's fused training step on random data, and the pack's model."""
    from bench.bench_packed import Bench
    from workers import engine
    from workers.batch_feed import BatchFeed

    bench = Bench("lenet5", pack, device, precision, kernels="fused", graph=False)
    if batch is not None:  # a smaller batch (the CPU check): recipe and samplers follow it
        bench.r = _with_batch(bench.r, batch)
        bench.samplers = _samplers(bench, batch)
    cfg = bench.cfg(1_000)
    model = bench.model
    params = list(model.parameters())
    opt = engine._optimizer(model, params, cfg)
    feed = BatchFeed(bench.samplers, None, cfg.batch_size, device, engine.CHUNK_ITERS)
    counters = engine._Counters(it=torch.zeros((), dtype=torch.int64, device=device),
                                alive=torch.ones(pack, device=device),
                                first_bad=torch.full((pack,), -1, dtype=torch.int64, device=device))
    step = engine._device_step(model, feed, bench.x, bench.y, bench.transform, bench.loss, cfg, opt, counters)
    return bench, feed, step


def _with_batch(r, batch: int):  # noqa: ANN001
    import dataclasses

    return dataclasses.replace(r, recipe=dataclasses.replace(r.recipe, batch_size=batch))


def _samplers(bench, batch: int):  # noqa: ANN001
    import numpy as np

    from bench.bench_packed import TRAIN_IMAGES
    from workers.samplers import EpochSampler

    return [EpochSampler(np.arange(TRAIN_IMAGES), batch, 7919 + p) for p in range(bench.members)]


def static_predictions(pack: int, precision: str, batch: int, timeout_s: float = 120.0,
                       json_path: str | None = None) -> tuple[dict[str, list[float]] | None, str]:
    """``{kernel name: [predicted ms of its 1st, 2nd, ... launch in the step]}`` from the
    static cost model, or None and the reason (any failure: the measured column only).

    ``bench/static_cost.py`` is written apart from this script, so it is run as a program of
    its own (``--pack --precision --batch --json FILE``, without ``TRITON_INTERPRET``, under
    ``timeout_s``), not imported; ``json_path`` reads a file it wrote earlier instead. The
    JSON's ``step.triton`` rows, in launch order, give ``name`` (several launches of one
    kernel relabelled ``name #i (...)``) and ``time_s``."""
    script = REPO / "bench" / "static_cost.py"
    t0 = time.perf_counter()
    if json_path is None:
        if not script.exists():
            return None, "bench/static_cost.py does not exist"
        import subprocess
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp, "static.json")
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            cmd = [sys.executable, str(script), "--pack", str(pack), "--precision", precision, "--batch", str(batch),
                   "--json", str(out)]
            try:
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s, cwd=REPO)
            except subprocess.TimeoutExpired:
                return None, f"bench/static_cost.py ran past {timeout_s:.0f} s"
            if proc.returncode != 0 or not out.exists():
                tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-2:])[-300:]
                return None, f"bench/static_cost.py failed (exit {proc.returncode}: {tail})"
            text = out.read_text(encoding="utf-8")
        how = f"`python3 bench/static_cost.py --pack {pack} --precision {precision} --batch {batch}`"
    else:
        text, how = Path(json_path).read_text(encoding="utf-8"), json_path
    try:
        import json

        data = json.loads(text)
        rows = (data.get("step") or data)["triton"]
        out_ms: dict[str, list[float]] = {}
        for row in rows:
            out_ms.setdefault(str(row["name"]).split(" #")[0], []).append(1000 * float(row["time_s"]))
        total = (data.get("step") or {}).get("net_it_per_s")
    except Exception as e:  # noqa: BLE001
        return None, f"{how}: its JSON has no step.triton rows with name and time_s ({type(e).__name__}: {e})"
    if not out_ms:
        return None, f"{how}: no Triton launches in its JSON"
    extra = f", predicted {total:,.0f} net-it/s for the whole step" if isinstance(total, (int, float)) else ""
    return out_ms, f"{how} ({time.perf_counter() - t0:.0f} s{extra})"


def _whole_step_ms(step, feed, model, device: torch.device, n: int, graph: bool) -> tuple[float | None, str]:  # noqa: ANN001
    """Mean ms per step over ``n`` steps, eagerly or replayed as a CUDA graph."""
    from workers.step_graph import WARMUP_STEPS, StepRunner

    if graph and device.type != "cuda":
        return None, "CUDA graphs need a CUDA device"
    runner = StepRunner(step, device, graph, "time_fused_kernels", getattr(model, "forget_compute_copy", None))
    if graph:
        feed.load(WARMUP_STEPS + 1)
        for _ in range(WARMUP_STEPS + 1):  # warm-up on a side stream, then capture (+ one replay)
            runner()
        if runner.mode != "graph":
            return None, f"graph capture failed: {runner.reason}"
    timer = _Timer(device)
    feed.load(n)
    t0 = timer.start()
    for _ in range(n):
        runner()
    timer.stop(t0)
    return timer.collect()[0] / n, runner.mode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pack", type=int, default=1024, help="P, networks in the pack")
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=None, help="images per member (default: the recipe's 64)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (the table gives the median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--whole-steps", type=int, default=20, help="steps timed without hooks (eager, graph)")
    ap.add_argument("--no-static", action="store_true", help="no static model column (bench/static_cost.py)")
    ap.add_argument("--static-json", default=None, help="predictions from this `static_cost.py --json` file")
    ap.add_argument("--static-timeout", type=float, default=120.0, help="seconds for bench/static_cost.py")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 is IEEE fp32
    import triton

    bench, feed, step = _build_step(a.pack, a.precision, dev, a.batch)
    batch = bench.r.batch_size
    feed.load(max(a.warmup, 1))
    for _ in range(max(a.warmup, 1)):
        step()  # the step advances the feed itself
    timer = _Timer(dev)
    launches: list[Launch] = []
    feed.load(a.steps)
    for s in range(a.steps):
        rec = _Recorder(timer)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        with rec:
            step()
        ms = timer.collect()
        if s == 0:
            launches = [Launch(k, n, g) for k, n, g in rec.names]
        elif [(x.kind, x.name) for x in launches] != [(k, n) for k, n, _ in rec.names]:
            print(f"note: step {s + 1} launched a different sequence ({len(rec.names)} stamps, not "
                  f"{len(launches)}); timed steps from it on are left out")
            break
        for launch, t in zip(launches, ms):
            launch.times.append(t)

    head = [
        f"### Fused LeNet-5 step, kernel by kernel: P={a.pack}, batch {batch}, {a.precision}, {dev.type}",
        "",
        f"- Command: `python3 bench/time_fused_kernels.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- Device: {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU (Triton interpreter: host wall times, not a GPU measurement)'}; "
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, Triton {triton.__version__}",
        f"- Timing: {'CUDA events' if dev.type == 'cuda' else 'host clock'} around each launch; median of "
        f"{len(launches[0].times) if launches else 0} steps after {max(a.warmup, 1)} untimed",
    ]
    print("\n".join(head + [""] + _table(launches, None)), flush=True)  # measured: kept if what follows fails
    captured = True
    for graph in (False, True):
        try:
            ms, mode = _whole_step_ms(step, feed, bench.model, dev, a.whole_steps if dev.type == "cuda" else 1, graph)
        except Exception as e:  # noqa: BLE001 - report, keep the table printed above
            ms, mode = None, f"failed: {type(e).__name__}: {e}"
        what = "replayed as a CUDA graph" if graph else "eager"
        if ms is None:
            print(f"Whole step, {what}: not timed ({mode}).", flush=True)
            captured = captured and not (dev.type == "cuda" or not graph)  # on the CPU no graph is expected
        else:
            print(f"Whole step, {what}: {ms:.3f} ms = {a.pack * 1000 / ms:,.0f} network-iterations/s "
                  f"(step mode: {mode}).", flush=True)
    if a.no_static:
        print("\nStatic model: not asked (--no-static).", flush=True)
    else:
        predicted, source = static_predictions(a.pack, a.precision, batch, a.static_timeout, a.static_json)
        print(f"\nStatic model: {source}", flush=True)
        if predicted:
            print("\n".join([""] + _table(launches, predicted)), flush=True)
    return 0 if captured else 1


def _table(launches: list[Launch], predicted: dict[str, list[float]] | None) -> list[str]:
    """The launches in step order (torch ops under FOLD_SHARE folded), with the prediction beside."""
    total = sum(x.ms for x in launches)
    seen: Counter[str] = Counter()
    lines = [f"| # | launch | grid | measured ms | share |{' predicted ms | measured / predicted |' if predicted else ''}",
             "|---:|---|---|---:|---:|" + ("---:|---:|" if predicted else "")]
    folded, folded_ms = 0, 0.0
    for i, x in enumerate(launches):
        seen[x.name] += 1
        if x.kind == "torch" and x.ms < FOLD_SHARE * total:
            folded, folded_ms = folded + 1, folded_ms + x.ms
            continue
        label = x.name if x.kind == "triton" else f"torch {x.name}"
        row = f"| {i + 1} | {label} | {x.grid} | {x.ms:.3f} | {100 * x.ms / max(total, 1e-12):.1f} % |"
        if predicted:
            pm, k = predicted.get(x.name, []), seen[x.name] - 1
            if x.kind == "triton" and k < len(pm):
                row += f" {pm[k]:.3f} | {x.ms / pm[k]:.2f}x |" if pm[k] > 0 else f" {pm[k]:.3f} | - |"
            else:
                row += " - | - |"
        lines.append(row)
    if folded:
        lines.append(f"| | {folded} other torch ops (each under {FOLD_SHARE:.1%}) | | {folded_ms:.3f} | "
                     f"{100 * folded_ms / max(total, 1e-12):.1f} % |" + (" - | - |" if predicted else ""))
    triton_ms = sum(x.ms for x in launches if x.kind == "triton")
    lines += ["", f"Sum of the launches: {total:.3f} ms per step ({triton_ms:.3f} ms in Triton kernels, "
              f"{total - triton_ms:.3f} ms in torch ops)."]
    if predicted:
        pred = sum(sum(v) for v in predicted.values())
        lines.append(f"Predicted for the Triton kernels: {pred:.3f} ms (measured {triton_ms:.3f} ms).")
    return lines


if __name__ == "__main__":
    sys.exit(main())
