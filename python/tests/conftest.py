"""Fixtures: a real icecached on a private socket (no mocks).

The binary comes from $ICECACHE_ICECACHED (set by the ctest registration,
tests/python/CMakeLists.txt), else <repo>/build/server/icecached.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "python"))

import icecache  # noqa: E402
from icecache.daemon import Daemon  # noqa: E402

# Short leases for the reaper tests only (the daemon's minimum
# buffer_idle_ttl_ms is 1000): a shared daemon with them would drop the
# buffers of any test that stalls for a second on a loaded machine.
FAST_REAPER = "sessions { reaper_interval_ms: 100 buffer_idle_ttl_ms: 1000 }"


def icecached_path() -> str:
    path = os.environ.get("ICECACHE_ICECACHED") or str(ROOT / "build/server/icecached")
    if not os.access(path, os.X_OK):
        pytest.fail(
            f"icecached not found at {path}: build it (cmake --build build --target icecached) "
            "or set ICECACHE_ICECACHED"
        )
    return path


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    d = Daemon(icecached_path())
    yield d
    d.stop()


@pytest.fixture(scope="module")
def client(daemon: Daemon) -> Iterator[icecache.Client]:
    with icecache.Client(socket=daemon.socket_path) as c:
        yield c


@pytest.fixture
def make_daemon() -> Iterator[Callable[..., Daemon]]:
    """Starts extra daemons with their own config; stops them after the test."""
    started = []

    def start(config: str = "", admin: bool = True) -> Daemon:
        d = Daemon(icecached_path(), config=config, admin=admin)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


def eventually(done: Callable[[], bool], limit: float = 20.0) -> bool:
    """Polls ``done`` every 50 ms for up to ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if done():
            return True
        time.sleep(0.05)
    return done()


def small_spec(**kw) -> icecache.SessionSpec:
    base = dict(layers=2, kv_heads=2, q_heads=4, head_dim=32, dtype=icecache.DType.FLOAT16, page_tokens=16)
    base.update(kw)
    return icecache.SessionSpec(**base)
