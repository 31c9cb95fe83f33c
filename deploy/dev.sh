#!/usr/bin/env bash
# IceCache developer entry point.
#   deploy/dev.sh demo   install what is missing, build, run the demo
#   deploy/dev.sh test   install what is missing, build, run the whole test suite (ctest)
#   deploy/dev.sh build  install what is missing and build only
# Environment: BUILD_DIR (default build), BUILD_TYPE (default Release), JOBS.
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
  openssl)  # openssl: the TLS tests make their own throwaway certificates

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

build() {
  echo "==> configuring ($BUILD_TYPE) in $BUILD_DIR"
  cmake -S "$ROOT" -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE="$BUILD_TYPE" \
    -DICECACHE_BUILD_TESTS=ON -DICECACHE_BUILD_BENCH=ON ${CMAKE_ARGS:-}
  echo "==> building with $JOBS jobs"
  cmake --build "$BUILD_DIR" -j "$JOBS"
}

cmd=${1:-}
case "$cmd" in
  build) install_deps; build ;;
  test)
    install_deps; build
    echo "==> running the test suite"
    cd "$BUILD_DIR" && ctest --output-on-failure -j "$JOBS" --timeout 900
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
    echo "usage: deploy/dev.sh demo|test|build" >&2
    exit 2
    ;;
esac
