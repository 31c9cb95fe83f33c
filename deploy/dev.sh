#!/usr/bin/env bash
# IceCache developer entry point.
#   deploy/dev.sh demo      install what is missing, build, run the model-scale demo
#                           (icecache-bench decode: 32 layers x 8 KV heads at 32768 tokens)
#   deploy/dev.sh test      what CI runs (.ci/run), the README's test command: install what
#                           is missing, the Release build, the clang-format-14 check, the
#                           TSan build (TSAN_TARGETS: the daemon, its tools, the
#                           concurrency unit tests and every integration test) and the
#                           ASan+UBSan build (every unit and integration test and the
#                           fuzz targets), both clang-14 with -Wthread-safety
#                           -Werror=thread-safety (the lock annotation check); then the
#                           suite (ctest) on the Release build (every test but the
#                           integration tests other than EndToEndTest, which the
#                           sanitizer sets run; beside the two sanitizer builds), the TSan set (beside the ASan+UBSan
#                           build), the ASan+UBSan set (unit, integration, fuzz corpus
#                           replays) and each fuzz target for FUZZ_SECONDS (default 10
#                           here). Each step prints its wall and CPU seconds
#   deploy/dev.sh build     install what is missing and build only
#   deploy/dev.sh format    fail on any clang-format-14 difference (fix: clang-format-14 -i FILE)
#   deploy/dev.sh sanitize asan|tsan
#                           clang-14 build with -Wthread-safety -Werror=thread-safety and
#                           ASan+UBSan (build-asan: the whole suite) or
#                           TSan (build-tsan: the concurrency-heavy unit tests and every
#                           integration test; TSAN_TARGETS, less TSAN_EXCLUDE)
#   deploy/dev.sh locks     only the lock annotation check: clang-14 -Wthread-safety
#                           -Werror=thread-safety -O0 build of the core and icecached
#                           (build-locks; a quick local check, no tests)
#   deploy/dev.sh fuzz      builds the libFuzzer targets (in build-asan) and runs each for
#                           FUZZ_SECONDS (default 20) over its seed corpus in tests/fuzz/corpus
#   deploy/dev.sh ci        install, format check, sanitize asan (the whole suite, benches
#                           and Python included), fuzz (FUZZ_SECONDS 15), sanitize tsan:
#                           the long form of `test`'s sanitizer stages, without the
#                           Release suite (docs/operations.md, "Checks in CI")
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
  python3 python3-grpcio python3-protobuf python3-numpy python3-pytest python3-torch python3-pip python3-setuptools python3-wheel python3-venv  # python/ client, its pytest suite, pip install ./python
  python3-yaml  # tests/deploy: the Kubernetes manifests are parsed
  lld-14  # the sanitizer trees link with lld (-fuse-ld=lld): a third of GNU ld's time
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

# Sets CHILD_CPU: the CPU seconds of every child this shell has waited for
# (`times`, which must run in this shell, not in a $(...) subshell).
children_cpu() {
  local t
  times > "$STEP_TIMES"
  t=$(tail -n 1 "$STEP_TIMES")
  CHILD_CPU=$(awk -v u="${t%% *}" -v s="${t##* }" 'function sec(x, m) { m = x; sub(/m.*/, "", m);
    sub(/^[0-9]+m/, "", x); sub(/s$/, "", x); return m * 60 + x }
    BEGIN { printf "%.0f", sec(u) + sec(s) }')
}
# Runs one step of `test` and prints its wall time and CPU seconds (user +
# sys of every process the step waited for; a daemon a test leaves behind is
# not counted). On a shared machine the CPU seconds are the figure that
# carries over (docs/operations.md, "The budget, measured").
step() {
  local name=$1 start=$SECONDS cpu0
  shift
  if [ -z "${STEP_TIMES:-}" ]; then
    STEP_TIMES=$(mktemp)
    trap 'rm -f "$STEP_TIMES"' EXIT
  fi
  children_cpu; cpu0=$CHILD_CPU
  "$@"
  children_cpu
  echo "==> step $name: $((SECONDS - start)) s wall, $((CHILD_CPU - cpu0)) CPU s"
}

# Every target is a unity build (ICECACHE_UNITY_BUILD: sources compiled in
# batches, the shared headers parsed once per batch; the CI trees are built
# once from scratch, without ccache).
# Test code (tests/, not the code under test) is built at -O1 in Release
# (ICECACHE_TEST_CODE_OPTIONS): it runs little, and -O3 costs a third more
# to compile; the headers every test includes are precompiled once
# (ICECACHE_TEST_PCH; ccache, which CI does not use, compiles a source that
# uses it without caching it unless its sloppiness allows pch_defines and
# time_macros).
# The tools' command-line parsing (ICECACHE_TOOL_MAIN_OPTIONS: the mains and
# the benches' flag sources, CLI11) at -O1, and every binary linked by lld
# (a third of GNU ld's CPU time). INTEGRATION_TESTS, when set, chooses which
# integration tests the tree builds (ICECACHE_INTEGRATION_TESTS: all, or e2e
# in `test`'s Release tree); unset, the tree keeps what it was configured
# with (all in a new tree).
build() {
  find_nvcc
  echo "==> configuring ($BUILD_TYPE) in $BUILD_DIR"
  cmake -S "$ROOT" -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE="$BUILD_TYPE" \
    -DICECACHE_BUILD_TESTS=ON -DICECACHE_BUILD_BENCH=ON -DICECACHE_TEST_CODE_OPTIONS=-O1 \
    -DICECACHE_TEST_PCH=ON -DICECACHE_UNITY_BUILD=ON -DICECACHE_TOOL_MAIN_OPTIONS=-O1 \
    -DCMAKE_EXE_LINKER_FLAGS=-fuse-ld=lld -DCMAKE_SHARED_LINKER_FLAGS=-fuse-ld=lld \
    ${INTEGRATION_TESTS:+-DICECACHE_INTEGRATION_TESTS=$INTEGRATION_TESTS} \
    ${CMAKE_ARGS:-}
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

# Runs a suite with TMPDIR (and gtest's TEST_TMPDIR) pointing at a fresh
# 0755 directory of its own (0755: tests run a second tenant under another
# uid, which must reach sockets and staged binaries there), and fails it if
# a test leaves anything there: a test removes what it makes
# (tests/support/temp_path.h). pytest's own tmp_path directories
# (pytest-of-<user>, which pytest keeps for the last three runs) are
# exempt. The directory is removed either way.
with_private_tmp() {
  local tmp rc=0 left
  tmp=$(mktemp -d "${TMPDIR:-/tmp}/icecache-tests.XXXXXX")
  chmod 0755 "$tmp"
  TMPDIR=$tmp TEST_TMPDIR=$tmp "$@" || rc=$?
  left=$(find "$tmp" -mindepth 1 -maxdepth 1 ! -name 'pytest-of-*' -printf '  %f\n')
  if [ -n "$left" ]; then
    echo "==> FAILED: the tests left these in their TMPDIR ($tmp), each a test that does not clean up:"
    echo "$left"
    rc=1
  fi
  rm -rf "$tmp"
  return $rc
}

run_tests() {
  echo "==> running the test suite"
  (cd "$BUILD_DIR" && with_private_tmp ctest --output-on-failure -j "$JOBS" --timeout 900)
}

# `test` runs two suites in the background while the next build runs: the
# Release suite beside the two sanitizer builds, the TSan set beside the
# ASan+UBSan build. Both wait on daemons and sockets most of the time (the
# Release suite about a quarter of 2 cores, the TSan set under half), the
# builds use both. A suite's output is printed when it is waited for; a
# failure fails `test` there.
declare -A BG_PID BG_LOG
start_background() {
  local name=$1
  shift
  BG_LOG[$name]=$(mktemp)
  "$@" > "${BG_LOG[$name]}" 2>&1 &
  BG_PID[$name]=$!
  echo "==> $name runs in the background (pid ${BG_PID[$name]})"
}
finish_background() {
  local rc=0
  wait "${BG_PID[$1]}" || rc=$?
  cat "${BG_LOG[$1]}"
  rm -f "${BG_LOG[$1]}"
  return $rc
}

# The lock annotations (ABSL_GUARDED_BY, ...) are checked by clang only: build
# the core libraries and icecached with clang-14 -Wthread-safety
# -Werror=thread-safety at -O0 (a few minutes; no tests run there). Not in
# `test`: its TSan build compiles the same targets with the same flags.
check_locks() {
  local dir="$ROOT/build-locks"
  echo "==> clang-14 -Wthread-safety -Werror=thread-safety: core libraries and icecached"
  mkdir -p "$dir"
  CC=clang-14 CXX=clang++-14 cmake -S "$ROOT" -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Locks \
    -DCMAKE_CXX_FLAGS_LOCKS="-O0" -DCMAKE_C_FLAGS_LOCKS="-O0" -DICECACHE_THREAD_SAFETY=ON \
    -DICECACHE_BUILD_TESTS=OFF -DICECACHE_BUILD_BENCH=OFF -DICECACHE_ENABLE_CUDA=OFF \
    ${CMAKE_ARGS:-} > "$dir/configure.log" 2>&1 || { cat "$dir/configure.log"; return 1; }
  cmake --build "$dir" -j "$JOBS" --target icecached
}

# What the TSan run builds and runs (docs/operations.md, "Checks in CI"):
# the concurrency-heavy code (daemon, session manager, call limiter in
# rpc_base_test, buffer registry, parallel index build, page pool, quality
# sampler, prefetcher, decode ring) and every integration test, which drive
# the TSan-built daemon from many threads and processes. The rest of the unit
# tests are single-threaded and run under ASan+UBSan only.
TSAN_TARGETS=(icecached icecachectl icecache_tenant_probe
  integration_e2e_test integration_tenancy_test integration_lifecycle_test integration_ctl_test
  integration_bad_input_test integration_tls_test integration_first_run_test
  integration_fault_test integration_security_test integration_checksum_test
  integration_warm_restart_test integration_decode_ring_test integration_device_api_test
  session_manager_test session_kv_test session_prefetch_test decode_lanes_test rpc_base_test
  rpc_daemon_test
  rpc_decode_test rpc_decode_ring_test
  buffer_registry_test index_parallel_build_test page_pool_test quality_sampler_test)
# Left out of every TSan run, by ctest name: load_short and the two
# MessageLimitTest cases that bound the daemon's RSS growth, which TSan's
# shadow memory and allocator raise past their limits (all three run under
# Release and ASan). LengthsThatLie... grew the TSan daemon's peak RSS by
# 24.3 MiB against its 24 MiB bound once in a fresh-clone run (20:59 UTC
# 2026-12-01); it passed in every earlier TSan run.
TSAN_EXCLUDE='_NOT_BUILT|^load_short$|MessageLimitTest.OversizedMessagesCostAtMostTheTransportQuota|MessageLimitTest.LengthsThatLieAreRefusedWithoutAllocatingWhatTheyClaim'

# Left out of `test`'s ASan+UBSan set (asan ci), by ctest name: the
# statistical quality tests (mdci's mass against exact selection, the width
# calibrator and the calibrated rest on generated heads, the generator
# families' properties). They assert figures, not memory safety, and spend
# their time building and searching indexes (under ASan a fifth of the set's
# time); the code they drive runs under ASan in the functional tests. The
# Release suite and `deploy/dev.sh ci` (asan full) run them. A gtest filter
# (GTEST_FILTER): the asan ci tree registers each unit test binary as one
# ctest test (ICECACHE_TEST_PER_BINARY).
ASAN_CI_EXCLUDE='-MdciQualityTest.*:CalibratedRestTest.*:SyntheticFamiliesTest.*:WidthCalibratorTest.CalibratedSelectionReachesTheTargetWhereTheTreeMisses:WidthCalibratorTest.RealMdciReachesTheTargetOnSampledSteps'

# A clang-14 tree for one sanitizer set, every file also checked with
# -Wthread-safety -Werror=thread-safety (the lock annotations: the same check
# as check_locks, on every target). $1: asan|tsan; $2: full (default) or ci.
#   asan full: ASan+UBSan (and the fuzz targets' coverage), every target
#         (benches included: their smoke tests run too); build-asan.
#   asan ci: the same tree without the benches, building only icecache_tests
#         (everything the unit and integration labels run) and the fuzz
#         targets; each unit test binary is one ctest test
#         (ICECACHE_TEST_PER_BINARY: under ASan a process start costs about
#         as much as a typical unit case).
#   tsan: TSan, TSAN_TARGETS only (the others are not built: ctest's
#         *_NOT_BUILT placeholders are skipped); build-tsan. Debian's Abseil
#         is not instrumented: libicecache_tsan_absl.so (common/tsan) is
#         LD_PRELOADed so TSan sees absl::Mutex; deploy/tsan.supp holds the
#         few uninstrumented-library suppressions, each commented.
# The code under test at -O1 with line tables only (-gline-tables-only:
# file:line in reports, a fraction of full debug info's build cost); the
# tests' own code at -O0 (ICECACHE_TEST_CODE_OPTIONS: 2 to 3 times cheaper to
# compile instrumented, and it runs little) with one precompiled header
# (ICECACHE_TEST_PCH), and so are the generated protobuf/gRPC code
# (ICECACHE_GENERATED_CODE_OPTIONS) and the tools' mains
# (ICECACHE_TOOL_MAIN_OPTIONS: CLI11 parsing); every target a unity build
# (ICECACHE_UNITY_BUILD, as in `build`); linked by lld.
sanitize_build() {
  local kind=$1 set=${2:-full} san extra=() targets=()
  case "$kind" in
    asan) san="address,undefined"
      extra=(-DICECACHE_BUILD_FUZZ=ON -DICECACHE_BUILD_BENCH=ON -DICECACHE_TEST_PER_BINARY=OFF)
      if [ "$set" = ci ]; then
        extra=(-DICECACHE_BUILD_FUZZ=ON -DICECACHE_BUILD_BENCH=OFF -DICECACHE_TEST_PER_BINARY=ON)
        targets=(icecache_tests icecache_fuzzers)
      fi ;;
    tsan) san="thread"; targets=("${TSAN_TARGETS[@]}" icecache_tsan_absl)
      extra=(-DICECACHE_BUILD_BENCH=OFF) ;;
    *) echo "usage: deploy/dev.sh sanitize asan|tsan" >&2; exit 2 ;;
  esac
  local dir="$ROOT/build-$kind"
  echo "==> configuring clang-14 $kind ($san, $set) in $dir"
  mkdir -p "$dir"
  CC=clang-14 CXX=clang++-14 cmake -S "$ROOT" -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Sanitize \
    -DCMAKE_CXX_FLAGS_SANITIZE="-O1 -g1" -DCMAKE_C_FLAGS_SANITIZE="-O1 -g1" \
    -DICECACHE_TEST_CODE_OPTIONS=-O0 -DICECACHE_TEST_PCH=ON -DICECACHE_UNITY_BUILD=ON \
    -DICECACHE_GENERATED_CODE_OPTIONS=-O0 -DICECACHE_TOOL_MAIN_OPTIONS=-O0 \
    -DCMAKE_EXE_LINKER_FLAGS=-fuse-ld=lld -DCMAKE_SHARED_LINKER_FLAGS=-fuse-ld=lld \
    -DICECACHE_BUILD_TESTS=ON -DICECACHE_THREAD_SAFETY=ON \
    -DICECACHE_ENABLE_CUDA=OFF -DICECACHE_SANITIZE="$san" "${extra[@]}" ${CMAKE_ARGS:-} \
    > "$dir/configure.log" 2>&1 || { cat "$dir/configure.log"; return 1; }
  if [ ${#targets[@]} -gt 0 ]; then
    cmake --build "$dir" -j "$JOBS" --target "${targets[@]}"
  else
    cmake --build "$dir" -j "$JOBS"
  fi
}

# The tests of a sanitizer tree; any report fails the test that caused it.
#   asan full: the whole suite (every label: unit, integration, fuzz corpus
#         replays, load, bench smoke, python), leaks checked.
#   asan ci: the unit, integration and fuzz labels (what icecache_tests and
#         the fuzz targets build): the Python and bench suites run on the
#         Release build.
#   tsan: unit and integration tests of what was built (TSAN_TARGETS), never
#         TSAN_EXCLUDE.
# ICECACHE_TEST_TIME_SCALE tells the few tests that wait on wall-clock
# deadlines how much slower this build runs (tests/support/time_scale.h).
sanitize_test() {
  local kind=$1 set=${2:-full} dir="$ROOT/build-$1" args=() env=()
  case "$kind" in
    # quarantine_size_mb=16 (default 256): freed memory stays resident while
    # quarantined, and the tests that bound the daemon's memory
    # (security_test's transport quota, load_short) measure RSS; a
    # use-after-free of anything among the last 16 MB freed is still caught.
    asan) env=(ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:detect_stack_use_after_return=0:quarantine_size_mb=16
        "LSAN_OPTIONS=suppressions=$ROOT/deploy/lsan.supp:print_suppressions=0"
        UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 ICECACHE_TEST_TIME_SCALE=3)
      if [ "$set" = ci ]; then args=(-L 'unit|integration|fuzz'); env+=("GTEST_FILTER=$ASAN_CI_EXCLUDE"); fi ;;
    tsan) env=("TSAN_OPTIONS=halt_on_error=1 second_deadlock_stack=1 suppressions=$ROOT/deploy/tsan.supp"
        "LD_PRELOAD=$dir/common/libicecache_tsan_absl.so" ICECACHE_TEST_TIME_SCALE=10)
      args=(-L 'unit|integration' -E "$TSAN_EXCLUDE") ;;
  esac
  echo "==> tests under $kind"
  (cd "$dir" && with_private_tmp env "${env[@]}" ctest --output-on-failure -j "$JOBS" --timeout 900 "${args[@]}")
}

sanitize() {
  find_nvcc
  step "$1 build" sanitize_build "$1"
  step "$1 tests" sanitize_test "$1"
}

# One libFuzzer target for $2 seconds over its seed corpus (new inputs go to
# a scratch dir); prints its summary, returns non-zero on a crash.
fuzz_one() {
  local bin=$1 seconds=$2 crashes=$3 name corpus work rc=0
  name=$(basename "$bin")
  corpus="$ROOT/tests/fuzz/corpus/${name#fuzz_}"
  work=$(mktemp -d)
  if ! (cd "$work" && TMPDIR=$work ASAN_OPTIONS=detect_leaks=1 "$bin" -max_total_time="$seconds" \
    -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$crashes/$name-" \
    "$work" "$corpus" > "$work/log" 2>&1); then
    tail -n 40 "$work/log"; echo "$name FAILED; input in $crashes" >&2; rc=1
  else
    echo "==> $name ${seconds}s: $(grep -E '^stat::number_of_executed_units' "$work/log" ||
      tail -n 1 "$work/log")"
  fi
  rm -rf "$work"
  return $rc
}

# Runs every libFuzzer target for FUZZ_SECONDS over its seed corpus, JOBS at
# a time. A crash fails the run and leaves its input in
# build-asan/fuzz-crashes/ (add it to tests/fuzz/corpus/<target> with the
# fix).
fuzz() {
  local dir="$ROOT/build-asan"
  if [ ! -d "$dir/tests/fuzz" ]; then find_nvcc; sanitize_build asan; fi
  cmake --build "$dir" -j "$JOBS" --target icecache_fuzzers
  local seconds=${FUZZ_SECONDS:-20} crashes="$dir/fuzz-crashes" failed=0 running=0
  mkdir -p "$crashes"
  echo "==> each fuzz target for ${seconds}s, $JOBS at a time (seeds: tests/fuzz/corpus)"
  for bin in "$dir"/tests/fuzz/fuzz_*; do
    [ -x "$bin" ] || continue
    if [ "$running" -ge "$JOBS" ]; then
      wait -n || failed=1
      running=$((running - 1))
    fi
    fuzz_one "$bin" "$seconds" "$crashes" &
    running=$((running + 1))
  done
  while [ "$running" -gt 0 ]; do
    wait -n || failed=1
    running=$((running - 1))
  done
  return $failed
}

cmd=${1:-}
case "$cmd" in
  build) install_deps; build ;;
  format) check_format ;;
  test)
    # Builds first, so a compile or annotation error (-Werror=thread-safety
    # in both clang trees) fails CI early; the Release suite runs beside the
    # sanitizer builds and the TSan set beside the ASan+UBSan build, then the
    # ASan+UBSan set and fuzzing.
    # The budget per step: docs/operations.md, "The budget, measured".
    test_start=$SECONDS
    # The Release tree builds EndToEndTest only of the integration tests
    # (INTEGRATION_TESTS=e2e): both sanitizer trees build and run all of them.
    step install install_deps; INTEGRATION_TESTS=e2e step "release build" build
    step format check_format
    start_background "the Release suite" run_tests
    step "tsan build" sanitize_build tsan
    start_background "the TSan set" sanitize_test tsan
    step "asan build" sanitize_build asan ci
    step "release tests (after the builds)" finish_background "the Release suite"
    step "tsan tests (after the asan build)" finish_background "the TSan set"
    # Fuzzing (two targets at a time, FUZZ_SECONDS each) beside the ASan+UBSan
    # set, which leaves about a tenth of 2 cores idle while its daemons start.
    FUZZ_SECONDS=${FUZZ_SECONDS:-10}; start_background fuzzing fuzz
    step "asan tests" sanitize_test asan ci
    step "fuzz (beside the asan tests)" finish_background fuzzing
    echo "==> test: $((SECONDS - test_start)) s"
    ;;
  locks) check_locks ;;
  sanitize) install_deps; sanitize "${2:-}" ;;
  fuzz) install_deps; fuzz ;;
  ci)
    # The long form of `test`'s sanitizer stages, for a nightly or
    # pre-release run: ASan+UBSan of the whole suite (benches and their smoke
    # tests, the Python suite against the ASan daemon), longer fuzzing, the
    # same TSan set. No Release suite (`test` runs it).
    install_deps; check_format; find_nvcc
    local_start=$SECONDS
    step "asan build" sanitize_build asan; step "asan tests" sanitize_test asan
    FUZZ_SECONDS=${FUZZ_SECONDS:-15}; step fuzz fuzz
    step "tsan build" sanitize_build tsan; step "tsan tests" sanitize_test tsan
    echo "==> ci: $((SECONDS - local_start)) s after the format check"
    ;;
  demo)
    install_deps; build
    # The model-scale demo: the Llama-3.1-8B shape (32 layers x 8 KV heads, 32
    # query heads, head dim 128, fp16) at 32768 tokens from the synthetic
    # generator; icecached started on a private socket; per policy a prefill
    # (streamed by layer groups, trees built on every core) and decode steps
    # over DecodeStep, attention computed on the CPU from the fetched pages.
    # One table: TT2T, TPOT split, quality against full attention, the paper's
    # figures beside them. Extra arguments go to icecache-bench decode
    # (--help), e.g. `deploy/dev.sh demo --tokens 8k` for a quick look.
    # --daemon-prefault: the daemon's pool is sized to the KV and faulted in,
    # in huge pages, before the first policy (pool.prefault, as an operator
    # runs it on a VM; docs/operations.md "Memory the host backs lazily"), with
    # staging for three prefill chunks. The prefill is generated once and
    # streamed as a client holding its KV would, the next chunk sent while
    # the last one's trees build (--hold-prefill; 4 GiB in this process).
    # mdci-r4+pf+ip is IceCache(r) as an engine runs it: a selection serves a
    # group of 4 layers, the group's later layers are gathered in the
    # background while the first one's attention runs (prefetch_group), and
    # each group's rows stay in place between steps (in_place).
    echo "==> icecache-bench decode (icecached spawned, 32 layers x 8 KV heads, 32768 tokens)"
    exec "$BUILD_DIR/tests/bench/icecache-bench" decode --spawn "$BUILD_DIR/server/icecached" \
      --daemon-prefault --layers 32 --tokens 32768 --steps 6 \
      --policies full,exact-token,mdci,mdci-r4+pf+ip,quest,streaming,exact "${@:2}"
    ;;
  *)
    echo "usage: deploy/dev.sh demo|test|build|format|locks|sanitize asan|tsan|fuzz|ci" >&2
    exit 2
    ;;
esac
