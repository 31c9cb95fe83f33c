"""ShmBuffer lifecycle (including a client that dies holding one) and
CudaBuffer's behaviour without a GPU."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import FAST_REAPER, ROOT, eventually

import icecache


def test_shm_buffer_lifecycle(client):
    before = client.get_stats().buffers
    buf = client.create_shm_buffer(1 << 16)
    st = os.lstat(buf.path)
    assert buf.path.startswith(f"/dev/shm/icecache-{os.getpid()}-")
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == 1 << 16
    assert buf.registered and buf.buffer_id
    assert client.get_stats().buffers == before + 1
    v = buf.view(128, (4, 8), np.float32)
    v[...] = np.arange(32, dtype=np.float32).reshape(4, 8)
    assert np.array_equal(buf.view(128, 32, np.float32), np.arange(32, dtype=np.float32))
    with pytest.raises(icecache.OutOfRangeError):
        buf.view((1 << 16) - 8, 4, np.float32)
    del v
    buf.close()
    assert not os.path.exists(buf.path)
    assert client.get_stats().buffers == before
    buf.close()  # idempotent
    with pytest.raises(icecache.FailedPreconditionError):
        buf.view(0, 1)


def test_unregister_reports_the_daemon_answer(client):
    with client.create_shm_buffer(4096) as buf:
        buf.unregister()
        with pytest.raises(icecache.FailedPreconditionError):
            buf.unregister()
        with pytest.raises(icecache.NotFoundError):
            client.unregister_buffer(buf.buffer_id)


def test_views_alive_at_close_keep_memory_valid(client):
    buf = client.create_shm_buffer(4096)
    v = buf.view(0, 16, np.int32)
    v[:] = 7
    buf.close()  # unregistered and unlinked; the mapping lives with the view
    assert not os.path.exists(buf.path)
    assert int(v.sum()) == 7 * 16


def own_shm_files() -> set:
    """This process's buffer files: other tests running at the same time
    (ctest -j) create and remove their own files in /dev/shm."""
    prefix = f"icecache-{os.getpid()}-"
    return {f for f in os.listdir("/dev/shm") if f.startswith(prefix)}


def test_registration_failure_removes_the_file(make_daemon):
    d = make_daemon("limits { max_buffers_per_tenant: 1 }")
    with icecache.Client(socket=d.socket_path) as c:
        first = c.create_shm_buffer(4096)
        shm_before = own_shm_files()
        assert os.path.basename(first.path) in shm_before
        with pytest.raises(icecache.ResourceExhaustedError):
            c.create_shm_buffer(4096)
        assert own_shm_files() == shm_before
        first.close()


def test_a_buffer_larger_than_dev_shm_is_refused_at_creation(client):
    """The buffer's memory is taken when it is created: one that /dev/shm
    cannot hold is ResourceExhausted there (not a SIGBUS at the first write),
    and no file is left behind."""
    fs = os.statvfs("/dev/shm")
    too_big = fs.f_blocks * fs.f_frsize + (1 << 30)
    before = own_shm_files()
    with pytest.raises(icecache.ResourceExhaustedError, match="/dev/shm has no room"):
        client.create_shm_buffer(too_big)
    assert own_shm_files() == before
    with client.create_shm_buffer(1 << 20) as buf:  # memory taken and mapped: reads as zeros
        assert int(buf.view(0, 1 << 20).sum()) == 0


def test_client_killed_holding_a_buffer(make_daemon):
    """A child process registers a buffer and is SIGKILLed: the daemon drops
    the buffer after its idle TTL, and reclaim_orphaned_shm removes the file."""
    daemon = make_daemon(FAST_REAPER)
    client = icecache.Client(socket=daemon.socket_path)
    before = client.get_stats().buffers
    code = textwrap.dedent(
        f"""
        import sys, os, signal, time
        sys.path.insert(0, {str(ROOT / 'python')!r})
        import icecache
        c = icecache.Client(socket={daemon.socket_path!r})
        b = c.create_shm_buffer(1 << 20)
        print(b.path, b.buffer_id, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stderr
    path, buffer_id = child.stdout.split()
    assert os.path.exists(path)
    # (No count check here: with a 1 s idle TTL the buffer may already be gone
    # when the child's interpreter took long to exit on a loaded machine.)
    # Same uid, same tenant: its buffer id is usable here until the daemon drops it.
    assert eventually(lambda: client.get_stats().buffers == before)
    with pytest.raises(icecache.NotFoundError):
        client.unregister_buffer(buffer_id)
    assert path in icecache.reclaim_orphaned_shm()
    assert not os.path.exists(path)
    client.close()


def test_cuda_buffer_without_a_gpu_raises_a_clear_error(client):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device; see test_cuda_buffer_on_a_gpu")
    with pytest.raises(icecache.FailedPreconditionError) as e:
        client.cuda_buffer(torch.zeros(16))
    assert "CUDA device" in e.value.message and "create_shm_buffer" in e.value.message


def test_daemon_refuses_cuda_ipc_without_a_device(client):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(icecache.IceCacheError) as e:
        client.register_cuda_ipc(bytes(range(1, 65)), 1 << 20, bytes(range(16)))
    assert type(e.value) is icecache.FailedPreconditionError, e.value


def test_cuda_buffer_on_a_gpu(client):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine: the CudaBuffer GPU path needs one")
    t = torch.zeros(1 << 20, dtype=torch.uint8, device="cuda")
    try:
        buf = client.cuda_buffer(t)
    except icecache.FailedPreconditionError as e:
        pytest.skip(f"icecached has no CUDA support: {e.message}")
    with buf:
        assert buf.buffer_id and buf.size == 1 << 20
