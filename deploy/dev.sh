#!/usr/bin/env bash
# IceCache developer entry point.
#   deploy/dev.sh demo      install what is missing, build, run the demo
#   deploy/dev.sh test      install what is missing, build, check formatting, check the lock
#                           annotations (clang-14 -Wthread-safety build of the core and
#                           icecached), run the whole test suite (ctest); what CI runs
#   deploy/dev.sh build     install what is missing and build only
#   deploy/dev.sh format    fail on any clang-format-14 difference (fix: clang-format-14 -i FILE)
#   deploy/dev.sh sanitize asan|tsan
#                           clang-14 build with -Wthread-safety -Werror=thread-safety and
#                           ASan+UBSan (build-asan) or TSan (build-tsan); runs the unit and
#                           integration tests there
#   deploy/dev.sh fuzz      builds the libFuzzer targets (in build-asan) and runs each for
#                           FUZZ_SECONDS (default 20) over its seed corpus in tests/fuzz/corpus
#   deploy/dev.sh ci        what CI runs (.ci/run): test, sanitize asan, fuzz, sanitize tsan
# Environment: BUILD_DIR (default build), BUILD_TYPE (default Release), JOBS, FUZZ_SECONDS.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BUILD_DIR=${BUILD_DIR:-$ROOT/build}
BUILD_TYPE=${BUILD_TYPE:-Release}
JOBS=${JOBS:-$(nproc)}

PACKAGES=(build-essential cmake ninja-build pkg-config git
  libabsl-dev libtbb-dev libgtest-dev libgmock-dev libbenchmark-dev
  libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc
  libfaiss-dev libhnswlib-dev libcpp-httplib-dev libssl-dev
  libcli11-dev nlohmann-json3-dev  # every command line (CLI11), all JSON (nlohmann)
  openssl  # the TLS tests make their own throwaway certificates
  clang-14 clang-format-14 libclang-rt-14-dev  # format check, lock annotations, sanitizers, fuzzing
  python3 python3-grpcio python3-protobuf python3-numpy python3-pytest python3-torch python3-pip python3-setuptools python3-venv  # python/ client, its pytest suite, pip install ./python
  python3-yaml  # tests/deploy: the Kubernetes manifests are parsed
  libxxhash-dev  # page checksums (XXH3, compiled in with XXH_INLINE_ALL: no run-time package)
  # one line per addition, above this one, so merges stay clean
)

install_deps() {
  local missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then return 0; fi
  echo "==> installing: ${missing[*]}"
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# The CUDA variant (cuda_runtime_cuda.cc and the scatter kernel, nvcc) is built
# wherever nvcc is: on PATH, or /usr/local/cuda/bin (NVIDIA's toolkit, not a
# Debian package here: nvidia-cuda-toolkit lives in non-free, which our apt
# sources do not carry). Without nvcc CMake builds cuda_runtime_none.cc.
find_nvcc() {
  if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
    export PATH=/usr/local/cuda/bin:$PATH
  fi
  if command -v nvcc >/dev/null 2>&1; then
    echo "==> CUDA variant: $(nvcc --version | tail -n 1)"
  else
    echo "==> no nvcc: building without CUDA (GPU tests will skip)"
  fi
}

build() {
  find_nvcc
  echo "==> configuring ($BUILD_TYPE) in $BUILD_DIR"
  cmake -S "$ROOT" -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE="$BUILD_TYPE" \
    -DICECACHE_BUILD_TESTS=ON -DICECACHE_BUILD_BENCH=ON ${CMAKE_ARGS:-}
  echo "==> building with $JOBS jobs"
  cmake --build "$BUILD_DIR" -j "$JOBS"
}

check_format() {
  echo "==> clang-format-14: every tracked .cc/.h must be formatted"
  if ! git -C "$ROOT" ls-files -z '*.cc' '*.h' | (cd "$ROOT" && xargs -0 clang-format-14 --dry-run --Werror); then
    echo "formatting differs (above); fix with: clang-format-14 -i FILE" >&2
    return 1
  fi
}

run_tests() {
  echo "==> running the test suite"
  (cd "$BUILD_DIR" && ctest --output-on-failure -j "$JOBS" --timeout 900)
}

# A clang-14 tree for one sanitizer set; every file is also checked with
# -Wthread-safety -Werror=thread-safety (the lock annotations). $1: asan|tsan.
# The lock annotations (ABSL_GUARDED_BY, ...) are checked by clang only: build
# the core libraries and icecached with clang-14 -Wthread-safety
# -Werror=thread-safety at -O0 (a few minutes; no tests run there).
check_locks() {
  local dir="$ROOT/build-locks"
  echo "==> clang-14 -Wthread-safety -Werror=thread-safety: core libraries and icecached"
  CC=clang-14 CXX=clang++-14 cmake -S "$ROOT" -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Locks \
    -DCMAKE_CXX_FLAGS_LOCKS="-O0" -DCMAKE_C_FLAGS_LOCKS="-O0" -DICECACHE_THREAD_SAFETY=ON \
    -DICECACHE_BUILD_TESTS=OFF -DICECACHE_BUILD_BENCH=OFF -DICECACHE_ENABLE_CUDA=OFF \
    ${CMAKE_ARGS:-} > "$dir.configure.log" 2>&1 || { cat "$dir.configure.log"; return 1; }
  cmake --build "$dir" -j "$JOBS" --target icecached
}

sanitize() {
  local kind=$1 san extra=()
  case "$kind" in
    asan) san="address,undefined"; extra=(-DICECACHE_BUILD_FUZZ=ON) ;;
    tsan) san="thread" ;;
    *) echo "usage: deploy/dev.sh sanitize asan|tsan" >&2; exit 2 ;;
  esac
  local dir="$ROOT/build-$kind"
  find_nvcc
  echo "==> configuring clang-14 $kind ($san) in $dir"
  CC=clang-14 CXX=clang++-14 cmake -S "$ROOT" -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Sanitize \
    -DCMAKE_CXX_FLAGS_SANITIZE="-O1 -g1" -DCMAKE_C_FLAGS_SANITIZE="-O1 -g1" \
    -DICECACHE_BUILD_TESTS=ON -DICECACHE_BUILD_BENCH=OFF -DICECACHE_THREAD_SAFETY=ON \
    -DICECACHE_SANITIZE="$san" "${extra[@]}" ${CMAKE_ARGS:-}
  cmake --build "$dir" -j "$JOBS"
  echo "==> unit and integration tests under $san"
  (cd "$dir" && \
    ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 suppressions=$ROOT/deploy/tsan.supp" \
    ctest --output-on-failure -j "$JOBS" --timeout 900 -L 'unit|integration')
}

fuzz() {
  local dir="$ROOT/build-asan"
  if [ ! -d "$dir/tests/fuzz" ]; then sanitize asan; fi
  cmake --build "$dir" -j "$JOBS" --target icecache_fuzzers
  local seconds=${FUZZ_SECONDS:-20}
  for bin in "$dir"/tests/fuzz/fuzz_*; do
    [ -x "$bin" ] || continue
    local name; name=$(basename "$bin")
    local corpus="$ROOT/tests/fuzz/corpus/${name#fuzz_}"
    local work; work=$(mktemp -d)
    echo "==> $name for ${seconds}s (seeds: $corpus)"
    # New inputs go to a scratch dir; a crash leaves crash-* there and fails the run.
    (cd "$work" && ASAN_OPTIONS=detect_leaks=1 "$bin" -max_total_time="$seconds" \
      -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 "$work" "$corpus" 2>&1 | tail -n 12)
    rm -rf "$work"
  done
}

cmd=${1:-}
case "$cmd" in
  build) install_deps; build ;;
  format) check_format ;;
  test)
    install_deps; build; check_format; check_locks; run_tests
    ;;
  sanitize) install_deps; sanitize "${2:-}" ;;
  fuzz) install_deps; fuzz ;;
  ci)
    install_deps; build; check_format; run_tests
    sanitize asan
    fuzz
    sanitize tsan
    ;;
  demo)
    install_deps; build
    # 1. The service end to end: start icecached on a private socket, prefill a
    #    synthetic llama3-8b-like sequence, run a decode loop over DecodeStep,
    #    check every fetched page byte for byte, print latency and mass recall.
    echo "==> icecache-demo (daemon + client, decode loop)"
    "$BUILD_DIR/client/icecache-demo" --spawn "${@:2}"
    # 2. The index on its own: selection quality and speed against exact attention.
    echo "==> icecache-bench select (16k tokens, in-process selectors)"
    exec "$BUILD_DIR/tests/bench/icecache-bench" select --synthetic llama3-8b-like --tokens 16384 \
      --heads 4 --steps 16 --selectors mdci,exact,exact-mdci,exact-token,quest,streaming
    ;;
  *)
    echo "usage: deploy/dev.sh demo|test|build|format|sanitize asan|tsan|fuzz|ci" >&2
    exit 2
    ;;
esac
