#!/usr/bin/env bash
# Packs the CUDA build's GPU-check programs with the shared libraries they
# need, for a GPU machine that has the NVIDIA driver but not this project's
# build dependencies (gRPC, Abseil, oneTBB, ...):
#   tests/gpu/bundle.sh [BUILD_DIR] [OUT_DIR]   (defaults: build, .gpubundle)
# writes OUT_DIR/icecache-gpu.tar.xz holding icecache-gpu/{bin,lib}: the
# programs, every library ldd names except the C and C++ runtimes (libc, libm,
# libstdc++, libgcc_s, ...: the machine's own, which are newer), and one
# wrapper per program beside bin/ that runs it with lib/ on the library path.
# There: tar -xJf icecache-gpu.tar.xz && tests/gpu/run.sh --prebuilt icecache-gpu
# The build must have been configured with ICECACHE_ENABLE_CUDA=ON.
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD=${1:-build}
OUT=${2:-.gpubundle}
PROGRAMS=(server/icecached tests/gpu/gpu_kv_client tests/gpu/gpu_push_test
          tests/bench/icecache-bench tests/unit/transfer/device_push_test
          tests/unit/transfer/paged_kv_layout_test tests/unit/transfer/cuda_runtime_test)

if ! grep -q '^ICECACHE_ENABLE_CUDA:BOOL=ON' "$BUILD/CMakeCache.txt" 2>/dev/null; then
  echo "bundle.sh: $BUILD is not a CUDA build (configure with -DICECACHE_ENABLE_CUDA=ON)" >&2
  exit 1
fi
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root=$stage/icecache-gpu
mkdir -p "$root/bin" "$root/lib"
for p in "${PROGRAMS[@]}"; do
  [ -x "$BUILD/$p" ] || { echo "bundle.sh: $BUILD/$p is not built" >&2; exit 1; }
  cp "$BUILD/$p" "$root/bin/"
  strip --strip-debug "$root/bin/$(basename "$p")"
  name=$(basename "$p")
  cat >"$root/$name" <<EOF
#!/bin/sh
# Runs bin/$name with the bundle's libraries (tests/gpu/bundle.sh).
d=\$(cd "\$(dirname "\$0")" && pwd)
LD_LIBRARY_PATH="\$d/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "\$d/bin/$name" "\$@"
EOF
  chmod +x "$root/$name"
done
# The machine's own C and C++ runtimes are used (newer than these builds need).
skip='/(libc|libm|libdl|libpthread|librt|libresolv|libstdc\+\+|libgcc_s|ld-linux[-a-z0-9_]*)\.so'
for p in "${PROGRAMS[@]}"; do ldd "$BUILD/$p"; done | awk '/=>/ && $3 ~ /^\// {print $3}' |
  sort -u | grep -v -E "$skip" | while read -r lib; do cp -L "$lib" "$root/lib/"; done
# The newest glibc / libstdc++ symbol versions anything in the bundle needs.
need=$(for f in "$root"/bin/* "$root"/lib/*; do objdump -T "$f" 2>/dev/null; done |
  grep -o -E 'GLIBC_2\.[0-9]+|GLIBCXX_3\.4\.[0-9]+' | sort -u |
  awk -F'[._]' '/GLIBCXX/ {if ($4 > x) x = $4; next} {if ($3 > g) g = $3} END {print "GLIBC_2." g " GLIBCXX_3.4." x}')
echo "$need" >"$root/NEEDS"
git rev-parse --short HEAD >"$root/COMMIT" 2>/dev/null || true
mkdir -p "$OUT"
tar -C "$stage" -cJf "$OUT/icecache-gpu.tar.xz" icecache-gpu
echo "bundle.sh: $OUT/icecache-gpu.tar.xz ($(du -h "$OUT/icecache-gpu.tar.xz" | cut -f1));" \
  "$(ls "$root/lib" | wc -l) libraries; needs $need"
