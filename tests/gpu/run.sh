#!/usr/bin/env bash
# The GPU check (issue 10; docs/architecture.md §6.2-6.3). Run it once on a
# machine with an NVIDIA GPU, in one call:
#   tests/gpu/run.sh [--prebuilt DIR] [OUTPUT_FILE]
# Without --prebuilt it builds the CUDA variant in build-gpu (only the targets
# it needs; the machine needs the CUDA toolkit and this project's build
# dependencies). With --prebuilt DIR it runs the programs of a bundle made by
# tests/gpu/bundle.sh on a build machine (DIR holds its wrappers), so a GPU
# machine with the driver alone will do. It runs
#   1. the transfer unit tests (recording fake of the CUDA runtime, CPU
#      reference of the scatter kernel's index math),
#   2. the GPU test: a real icecached and gpu_kv_client, two processes on one
#      GPU; the client registers a paged KV cache and a plain device buffer by
#      CUDA IPC and checks every byte pushed (scatter into blocks with CUDA
#      IPC events, plain fetch, layer-group prefetch to the device),
#   3. the Python client on the GPU (python/tests/test_gpu.py: torch CUDA
#      tensors by CUDA IPC, every byte checked) where python3 has torch with
#      CUDA, grpcio and protobuf,
#   4. icecache-bench transfer --gpu: push + scatter vs a pinned cudaMemcpy of
#      the same bytes (staged, zero-copy and direct side by side), 8 KV heads
#      x 2048 and x 256 tokens (the per-layer latency), and the CPU gather,
# all under a budget of 8 minutes, and prints the figures. With OUTPUT_FILE
# (e.g. docs/bench/gpu_run.txt) everything printed is also written there.
# Exit: 0 all passed; 1 a step failed; 77 no CUDA device (the GPU tests
# skipped: nothing was checked on a GPU); 2 no nvcc (and no --prebuilt).
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
PREBUILT=""
if [ "${1:-}" = "--prebuilt" ]; then
  PREBUILT=$(cd "${2:?--prebuilt needs a bundle directory}" && pwd) || exit 1
  shift 2
fi
OUT=${1:-}
if [ -n "$OUT" ]; then exec > >(tee "$OUT") 2>&1; fi
BUILD=${BUILD_DIR:-$ROOT/build-gpu}
JOBS=${JOBS:-$(nproc)}
DEADLINE=$((SECONDS + 480))
left() { local l=$((DEADLINE - SECONDS)); [ $l -gt 0 ] && echo $l || echo 1; }

if [ -n "$PREBUILT" ]; then
  echo "==> tests/gpu/run.sh on $(hostname), $(date -u +%FT%TZ)"
else
  echo "==> tests/gpu/run.sh at $(git rev-parse --short HEAD 2>/dev/null || echo '?') on $(hostname), $(date -u +%FT%TZ)"
fi
if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH=/usr/local/cuda/bin:$PATH
fi
nvidia-smi --query-gpu=name,uuid,driver_version,memory.total --format=csv,noheader 2>/dev/null ||
  echo "(nvidia-smi: no GPU visible)"

if [ -n "$PREBUILT" ]; then
  echo "==> the prebuilt bundle $PREBUILT (commit $(cat "$PREBUILT/COMMIT" 2>/dev/null || echo '?');" \
    "needs $(cat "$PREBUILT/NEEDS" 2>/dev/null || echo '?'))"
  ldd --version 2>/dev/null | head -n 1
  BIN_DAEMON=$PREBUILT/icecached
  BIN_CLIENT=$PREBUILT/gpu_kv_client
  BIN_GPU_TEST=$PREBUILT/gpu_push_test
  BIN_BENCH=$PREBUILT/icecache-bench
  UNIT_DIR=$PREBUILT
else
  if ! command -v nvcc >/dev/null; then
    echo "no nvcc (CUDA toolkit) on PATH or in /usr/local/cuda/bin: cannot build the CUDA variant" >&2
    exit 2
  fi
  nvcc --version | tail -n 1
  echo "==> building the CUDA variant in $BUILD"
  cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DICECACHE_ENABLE_CUDA=ON \
    -DICECACHE_BUILD_TESTS=ON -DICECACHE_BUILD_BENCH=ON ${CMAKE_ARGS:-} >"$BUILD.configure.log" 2>&1 ||
    { cat "$BUILD.configure.log"; exit 1; }
  timeout "$(left)" cmake --build "$BUILD" -j "$JOBS" --target icecached gpu_kv_client gpu_push_test \
    icecache-bench device_push_test paged_kv_layout_test cuda_runtime_test || exit 1
  BIN_DAEMON=$BUILD/server/icecached
  BIN_CLIENT=$BUILD/tests/gpu/gpu_kv_client
  BIN_GPU_TEST=$BUILD/tests/gpu/gpu_push_test
  BIN_BENCH=$BUILD/tests/bench/icecache-bench
  UNIT_DIR=$BUILD/tests/unit/transfer
fi

status=0
echo "==> transfer unit tests (recording fake, scatter index math)"
for t in device_push_test paged_kv_layout_test cuda_runtime_test; do
  timeout "$(left)" "$UNIT_DIR/$t" --gtest_brief=1 || status=1
done

echo "==> GPU test: icecached + gpu_kv_client on one GPU"
gpu_log=$(mktemp)
ICECACHE_TEST_ICECACHED=$BIN_DAEMON ICECACHE_GPU_CLIENT=$BIN_CLIENT \
  timeout "$(left)" "$BIN_GPU_TEST" 2>&1 | tee "$gpu_log" || status=1
skipped=0
if grep -q "skipped: " "$gpu_log"; then skipped=1; fi
rm -f "$gpu_log"

echo "==> the Python client on the GPU (python/tests/test_gpu.py)"
if python3 -c "import torch, grpc, google.protobuf, numpy, pytest" 2>/dev/null; then
  ICECACHE_ICECACHED=$BIN_DAEMON PYTHONDONTWRITEBYTECODE=1 timeout "$(left)" \
    python3 -m pytest -q -rs -p no:cacheprovider python/tests/test_gpu.py || status=1
else
  echo "(skipped: python3 here lacks torch, grpcio, protobuf, numpy or pytest)"
fi

echo "==> icecache-bench transfer --gpu (staged, zero-copy, direct; side by side)"
for args in "--budget-tokens 2048" "--budget-tokens 256 --page-tokens 16"; do
  echo "\$ icecache-bench transfer --gpu --gpu-only --kv-heads 8 --head-dim 128 --reps 50 $args"
  # shellcheck disable=SC2086
  timeout "$(left)" "$BIN_BENCH" transfer --gpu --gpu-only --kv-heads 8 --head-dim 128 --reps 50 $args ||
    status=1
done
echo "\$ icecache-bench transfer --kv-heads 8 --head-dim 128 --reps 30 (the CPU gather)"
timeout "$(left)" "$BIN_BENCH" transfer --kv-heads 8 --head-dim 128 --reps 30 || status=1

if [ $skipped -eq 1 ]; then
  echo "==> NO CUDA DEVICE: the GPU tests skipped; nothing was checked on a GPU (exit 77)"
  exit 77
fi
if [ $status -eq 0 ]; then echo "==> tests/gpu/run.sh: all passed"; else echo "==> tests/gpu/run.sh: FAILED"; fi
exit $status
