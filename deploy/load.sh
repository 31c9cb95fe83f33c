#!/usr/bin/env bash
# The long bounded-load run (docs/bench/load.md): icecache-load against a
# daemon it starts, many tenants (own uid each when root), sessions and
# decode streams, byte checks on every fetch, memory back to baseline after.
#   deploy/load.sh [SECONDS]      default 300; figures to docs/bench/load_<S>s.{txt,json}
# Environment: BUILD_DIR (default build), TENANTS (8), WORKERS (2), SESSIONS (4).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
SECS=${1:-300}
cmake --build "$BUILD_DIR" --target icecache-load icecached
out=docs/bench/load_${SECS}s
"$BUILD_DIR/tests/load/icecache-load" --spawn "$BUILD_DIR/server/icecached" --seconds "$SECS" \
  --tenants "${TENANTS:-8}" --workers "${WORKERS:-2}" --sessions "${SESSIONS:-4}" \
  --json "$out.json" | tee "$out.txt"
