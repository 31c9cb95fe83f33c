#!/usr/bin/env python3
"""Generates the Python stubs of proto/icecache/v1 into python/icecache/v1.

    python/tools/gen_stubs.py           regenerate (run after editing proto/)
    python/tools/gen_stubs.py --check   exit 1 when the committed stubs differ
                                        from what protoc makes of proto/ now

Uses Debian's protoc (protobuf-compiler) and grpc_python_plugin
(protobuf-compiler-grpc), whose output matches Debian's python3-protobuf
(3.21) and python3-grpcio (1.51). Why the stubs are committed: see
python/README.md ("Generated stubs").
"""

from __future__ import annotations

import argparse
import difflib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "python" / "icecache" / "v1"


def generate(dest: Path, protoc: str, plugin: str) -> list[Path]:
    protos = sorted((PROTO_DIR / "icecache" / "v1").glob("*.proto"))
    if not protos:
        sys.exit(f"gen_stubs: no .proto files under {PROTO_DIR}/icecache/v1")
    cmd = [
        protoc,
        f"-I{PROTO_DIR}",
        f"--python_out={dest}",
        f"--grpc_python_out={dest}",
        f"--plugin=protoc-gen-grpc_python={plugin}",
        *[str(p) for p in protos],
    ]
    subprocess.run(cmd, check=True)
    return sorted((dest / "icecache" / "v1").glob("*.py"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare instead of writing")
    ap.add_argument("--protoc", default=shutil.which("protoc") or "/usr/bin/protoc")
    ap.add_argument(
        "--plugin", default=shutil.which("grpc_python_plugin") or "/usr/bin/grpc_python_plugin"
    )
    args = ap.parse_args()
    for tool in (args.protoc, args.plugin):
        if not os.access(tool, os.X_OK):
            sys.exit(
                f"gen_stubs: {tool} not found; install protobuf-compiler and protobuf-compiler-grpc"
            )
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p.read_text() for p in generate(Path(tmp), args.protoc, args.plugin)}
    committed = {p.name: p.read_text() for p in OUT_DIR.glob("*_pb2*.py")}
    if not args.check:
        for name in committed.keys() - fresh.keys():
            (OUT_DIR / name).unlink()
        for name, text in fresh.items():
            (OUT_DIR / name).write_text(text)
        print(f"gen_stubs: wrote {len(fresh)} files to {OUT_DIR}")
        return 0
    bad = 0
    for name in sorted(fresh.keys() | committed.keys()):
        if fresh.get(name) == committed.get(name):
            continue
        bad += 1
        if name not in committed:
            print(f"missing: python/icecache/v1/{name}")
        elif name not in fresh:
            print(f"stale (no such proto any more): python/icecache/v1/{name}")
        else:
            diff = difflib.unified_diff(
                committed[name].splitlines(), fresh[name].splitlines(), "committed", "generated",
                lineterm="", n=1,
            )
            print(f"differs: python/icecache/v1/{name}")
            print("\n".join(list(diff)[:20]))
    if bad:
        print(f"gen_stubs: {bad} stub file(s) do not match proto/; run python/tools/gen_stubs.py")
        return 1
    print(f"gen_stubs: {len(fresh)} stub files match proto/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
