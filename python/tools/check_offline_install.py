#!/usr/bin/env python3
"""Checks the README's offline install of the Python client, as a user runs
it on Debian 12: a venv that sees the system packages, then
`pip install --no-index --no-build-isolation` of a copy of python/ (a copy:
pip builds in the source directory, and the check writes nothing into the
repository). Then, from outside any source tree, the venv imports icecache,
icecache.v1 and icecache.torch from its own site-packages, with the typing
marker. Everything happens in one temporary directory, removed at the end.

Run it with the interpreter the install instructions name (Debian's
/usr/bin/python3): a pyenv or other python3 lacks python3-wheel, and pip then
fails with "invalid command 'bdist_wheel'".

Usage: check_offline_install.py [PYTHON_DIR]   (default: this file's ../)
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

PROBE = """
import os, sys
import icecache, icecache.v1, icecache.torch
from icecache.v1 import kv_pb2_grpc
site = os.path.realpath(sys.argv[1])
for m in (icecache, icecache.v1, icecache.torch, kv_pb2_grpc):
    where = os.path.realpath(m.__file__)
    if not where.startswith(site + os.sep):
        sys.exit(f"{m.__name__} imported from {where}, not from the venv's {site}")
if not os.path.exists(os.path.join(os.path.dirname(icecache.__file__), "py.typed")):
    sys.exit("py.typed is missing from the installed package")
print("installed:", os.path.dirname(icecache.__file__))
"""


def run(cmd: list[str], cwd: str) -> None:
    r = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        sys.stdout.write(r.stdout)
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}")


def main() -> None:
    src = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..")
    src = os.path.realpath(src)
    work = tempfile.mkdtemp(prefix="icecache-pip-")
    try:
        copy = os.path.join(work, "python")
        shutil.copytree(src, copy, ignore=shutil.ignore_patterns(
            "build", "*.egg-info", "__pycache__", ".pytest_cache"))
        venv = os.path.join(work, "venv")
        run([sys.executable, "-m", "venv", "--system-site-packages", venv], work)
        py = os.path.join(venv, "bin", "python")
        install = [py, "-m", "pip", "install", "--no-index", "--no-build-isolation",
                    "--disable-pip-version-check", "--quiet", copy]
        run(install, work)
        site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              stdout=subprocess.PIPE, text=True, check=True).stdout.strip()
        run([py, "-c", PROBE, site], work)
        print(f"offline install of {src} into a venv of {sys.executable}: ok")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
