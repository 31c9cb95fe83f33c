#!/usr/bin/env bash
# The GPU check (issue 10; docs/architecture.md §6.2-6.3). Run it once on a
# machine with an NVIDIA GPU and the CUDA toolkit, in one call:
#   tests/gpu/run.sh [OUTPUT_FILE]
# It builds the CUDA variant in build-gpu (only the targets it needs), runs
#   1. the transfer unit tests (recording fake of the CUDA runtime, CPU
#      reference of the scatter kernel's index math),
#   2. the GPU tests (ctest -L gpu): a real icecached and gpu_kv_client, two
#      processes on one GPU; the client registers a paged KV cache and a plain
#      device buffer by CUDA IPC and checks every byte pushed (scatter into
#      blocks with CUDA IPC events, plain fetch),
#   3. icecache-bench transfer --gpu: push + scatter vs a pinned cudaMemcpy of
#      the same bytes (staged and zero-copy), 8 KV heads x 2048 and x 256
#      tokens (the per-layer latency),
# all under a budget of 8 minutes, and prints the figures. With OUTPUT_FILE
# (e.g. docs/bench/gpu_run.txt) everything printed is also written there.
# Exit: 0 all passed; 1 a step failed; 77 no CUDA device (the GPU tests
# skipped: nothing was checked on a GPU); 2 no nvcc.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
OUT=${1:-}
if [ -n "$OUT" ]; then exec > >(tee "$OUT") 2>&1; fi
BUILD=${BUILD_DIR:-$ROOT/build-gpu}
JOBS=${JOBS:-$(nproc)}
DEADLINE=$((SECONDS + 480))
left() { local l=$((DEADLINE - SECONDS)); [ $l -gt 0 ] && echo $l || echo 1; }

echo "==> tests/gpu/run.sh at $(git rev-parse --short HEAD 2>/dev/null || echo '?') on $(hostname), $(date -u +%FT%TZ)"
if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH=/usr/local/cuda/bin:$PATH
fi
if ! command -v nvcc >/dev/null; then
  echo "no nvcc (CUDA toolkit) on PATH or in /usr/local/cuda/bin: cannot build the CUDA variant" >&2
  exit 2
fi
nvcc --version | tail -n 1
nvidia-smi --query-gpu=name,uuid,driver_version,memory.total --format=csv,noheader 2>/dev/null ||
  echo "(nvidia-smi: no GPU visible)"

echo "==> building the CUDA variant in $BUILD"
cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DICECACHE_ENABLE_CUDA=ON \
  -DICECACHE_BUILD_TESTS=ON -DICECACHE_BUILD_BENCH=ON ${CMAKE_ARGS:-} >"$BUILD.configure.log" 2>&1 ||
  { cat "$BUILD.configure.log"; exit 1; }
timeout "$(left)" cmake --build "$BUILD" -j "$JOBS" --target icecached gpu_kv_client gpu_push_test \
  icecache-bench device_push_test paged_kv_layout_test cuda_runtime_test || exit 1

status=0
echo "==> transfer unit tests (recording fake, scatter index math)"
for t in device_push_test paged_kv_layout_test cuda_runtime_test; do
  timeout "$(left)" "$BUILD/tests/unit/transfer/$t" --gtest_brief=1 || status=1
done

echo "==> GPU tests: icecached + gpu_kv_client on one GPU"
gpu_log=$(mktemp)
(cd "$BUILD" && timeout "$(left)" ctest -L gpu --output-on-failure -V) | tee "$gpu_log" || status=1
skipped=0
if grep -q "skipped: " "$gpu_log"; then skipped=1; fi
rm -f "$gpu_log"

echo "==> icecache-bench transfer --gpu"
bench="$BUILD/tests/bench/icecache-bench"
for args in "--budget-tokens 2048" "--budget-tokens 2048 --zero-copy" \
            "--budget-tokens 256 --page-tokens 16" "--budget-tokens 256 --page-tokens 16 --zero-copy"; do
  echo "\$ icecache-bench transfer --gpu --kv-heads 8 --head-dim 128 --threads 1 --reps 50 $args"
  # shellcheck disable=SC2086
  timeout "$(left)" "$bench" transfer --gpu --kv-heads 8 --head-dim 128 --threads 1 --reps 50 $args ||
    status=1
done

if [ $skipped -eq 1 ]; then
  echo "==> NO CUDA DEVICE: the GPU tests skipped; nothing was checked on a GPU (exit 77)"
  exit 77
fi
if [ $status -eq 0 ]; then echo "==> tests/gpu/run.sh: all passed"; else echo "==> tests/gpu/run.sh: FAILED"; fi
exit $status
