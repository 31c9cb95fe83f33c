"""Paged KV caches, block ids, events and layer-group prefetch through the
Python client against a real daemon. What needs no GPU: the daemon's precise
answers to a paged KV registration without a device and to bad layouts, the
client's own checks of block ids and events, device fields on a HOST_SHM
buffer (nothing written), and prefetch into shared memory (every byte
checked). The device path itself: tests/gpu."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import small_spec
from test_kv import check_fetched, kv_arrays

import icecache


def paged_cache(size: int) -> dict:
    kv = icecache.PagedKvCache(
        format=icecache.PagedKvFormat.VLLM_FLASH, num_layers=2, num_blocks=16, block_tokens=16,
        kv_heads=2, head_dim=64, dtype=icecache.DType.FLOAT16,
    )
    return dict(handle=b"h" * 64, size=size, device_uuid=b"u" * 16, paged_kv=kv)


def test_paged_kv_registration_without_a_device(client):
    size = 2 * 2 * 16 * 16 * 2 * 64 * 2
    try:
        client.register_cuda_ipc(**paged_cache(size))
    except (icecache.NotFoundError, icecache.InternalError) as e:
        pytest.skip(f"a CUDA device is present ({e}); tests/gpu checks the registration")
    except icecache.FailedPreconditionError as e:
        assert "no CUDA device" in str(e)
    else:
        pytest.fail("a paged KV registration without a device was accepted")


def test_torch_ipc_handles_of_either_form_give_the_cuda_handle():
    from icecache.buffers import ipc_mem_handle

    raw = bytes(range(64))
    assert ipc_mem_handle(raw) == raw  # torch 1.x
    assert ipc_mem_handle(b"\x02c" + raw) == raw  # torch 2.x: version 2, a cudaMalloc block
    with pytest.raises(icecache.FailedPreconditionError, match="expandable_segments"):
        ipc_mem_handle(b"\x02e" + raw[:40])
    with pytest.raises(icecache.InvalidArgumentError, match="65 bytes"):
        ipc_mem_handle(b"\x07" + raw)


def test_bad_paged_kv_layouts_name_the_field(client):
    with pytest.raises(icecache.OutOfRangeError, match="paged_kv"):
        client.register_cuda_ipc(**paged_cache(4096))
    bad = paged_cache(1 << 20)
    bad["paged_kv"].block_tokens = 0
    with pytest.raises(icecache.InvalidArgumentError, match="block_tokens"):
        client.register_cuda_ipc(**bad)
    bad = paged_cache(1 << 20)
    bad["handle"] = b"short"
    with pytest.raises(icecache.InvalidArgumentError, match="64 bytes"):
        client.register_cuda_ipc(**bad)


@pytest.fixture
def grouped(client):
    spec = small_spec(layers=4, layer_reuse=4, selector=icecache.Selector.EXACT)
    s = client.create_session(spec)
    keys, values = kv_arrays(spec, 300, seed=5)
    client.append_kv(s.id, keys, values)
    yield s.id, keys, values
    client.drop_session(s.id)


def test_bad_block_ids_and_events_are_refused_naming_them(client, grouped):
    sid, _, _ = grouped
    q = np.ones((4, 32), np.float32)
    with client.create_shm_buffer(1 << 20) as buf, client.decode_stream(sid, buf) as stream:
        with pytest.raises(icecache.InvalidArgumentError, match="block 3 is listed twice"):
            stream.step(0, q, device=icecache.DeviceWrite(block_ids=[3, 7, 3]))
        with pytest.raises(icecache.InvalidArgumentError, match="wait_event"):
            stream.step(0, q, device=icecache.DeviceWrite(block_ids=[1], wait_event=b"short"))
        with pytest.raises(icecache.InvalidArgumentError, match="done_event"):
            client.fetch_pages(sid, 0, [[0], [0]], buf, device=icecache.DeviceWrite(done_event=b"e" * 63))


def test_device_fields_on_a_shm_buffer_write_nothing(client, grouped):
    sid, _, _ = grouped
    q = np.ones((4, 32), np.float32)
    with client.create_shm_buffer(1 << 20) as buf, client.decode_stream(sid, buf) as stream:
        mem = buf.view(0, 1 << 20)
        mem[:] = 0x5A
        with pytest.raises(icecache.InvalidArgumentError, match="CUDA_IPC"):
            stream.step(0, q, device=icecache.DeviceWrite(block_ids=list(range(8))))
        with pytest.raises(icecache.InvalidArgumentError, match="CUDA_IPC"):
            client.fetch_pages(sid, 0, [[0], [0]], buf, device=icecache.DeviceWrite(wait_event=b"w" * 64))
        assert (mem == 0x5A).all()


def test_prefetched_layers_land_where_the_group_fetch_puts_them(client, grouped):
    sid, keys, values = grouped
    opt = icecache.SelectOptions(budget_tokens=48, want_positions=True)
    reuse = icecache.SelectOptions(budget_tokens=48, want_positions=True, reuse_group_selection=True)
    rng = np.random.default_rng(3)
    with client.create_shm_buffer(1 << 20) as buf, client.decode_stream(sid, buf) as stream:
        first = stream.step(0, rng.standard_normal((4, 32)).astype(np.float32), options=opt,
                            prefetch_group=True)
        assert first.prefetching == 3
        check_fetched(buf, first.layout, keys, values)
        stride = first.layout.layer_stride_bytes
        for layer in range(1, 4):
            r = stream.step(layer, None, offset=layer * stride, options=reuse)
            assert r.reused and r.layout.first_layer == layer and r.layout.offset == layer * stride
            # Every byte, whoever wrote it (the prefetch, or the call that came first).
            check_fetched(buf, r.layout, keys, values)
            assert isinstance(r.prefetched, bool)


def test_batched_steps_prefetch_each_session(client, grouped):
    sid, keys, values = grouped
    spec = small_spec(layers=4, layer_reuse=4, selector=icecache.Selector.EXACT)
    other = client.create_session(spec)
    okeys, ovalues = kv_arrays(spec, 300, seed=9)
    client.append_kv(other.id, okeys, ovalues)
    opt = icecache.SelectOptions(budget_tokens=32, want_positions=True)
    q = np.random.default_rng(4).standard_normal((4, 32)).astype(np.float32)
    try:
        with client.create_shm_buffer(1 << 20) as buf, client.batch_decode_stream(buf) as stream:
            entries = [icecache.BatchEntry(sid, q, offset=0, prefetch_group=True),
                       icecache.BatchEntry(other.id, q, offset=1 << 19, prefetch_group=True)]
            results = stream.step(0, entries, options=opt)
            assert [r.error for r in results] == [None, None]
            assert [r.result.prefetching for r in results] == [3, 3]
            for r, (k, v) in zip(results, [(keys, values), (okeys, ovalues)]):
                check_fetched(buf, r.result.layout, k, v)
    finally:
        client.drop_session(other.id)
