"""Append (numpy and torch, shm and inline), select, fetch: every fetched
byte checked against what was appended; bad inputs rejected precisely with
nothing stored."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import small_spec

import icecache

torch = pytest.importorskip("torch")


def kv_arrays(spec, n, seed=0, kind="numpy"):
    rng = np.random.default_rng(seed)
    shape = (spec.layers, spec.kv_heads, n, spec.head_dim)
    k = rng.standard_normal(shape).astype(np.float32)
    v = rng.standard_normal(shape).astype(np.float32)
    dt = icecache.DType(spec.dtype)
    if kind == "torch":
        tdt = {icecache.DType.FLOAT16: torch.float16, icecache.DType.BFLOAT16: torch.bfloat16,
               icecache.DType.FLOAT32: torch.float32}[dt]
        return torch.from_numpy(k).to(tdt), torch.from_numpy(v).to(tdt)
    return k.astype(dt.numpy_storage), v.astype(dt.numpy_storage)


def as_storage(a):
    """numpy array of the element bits (bf16 as int16) for byte comparison."""
    if isinstance(a, torch.Tensor):
        if a.dtype is torch.bfloat16:
            a = a.view(torch.int16)
        return a.numpy()
    return a


def check_fetched(buf, layout, keys, values, layer_index=0):
    """Every valid row of every fetched page equals the appended K/V at its
    position; rows past the fill are zero."""
    dt = icecache.DType(layout.dtype)
    p, d = layout.page_tokens, layout.head_dim
    k_all, v_all = as_storage(keys), as_storage(values)
    base = layout.offset + layer_index * layout.layer_stride_bytes
    blocks = buf.view(base, (layout.slots, 2, p, d), dt)
    for h in layout.heads:
        pos = np.asarray(h.positions)
        start = 0
        for slot, fill in zip(h.slots, h.fills):
            rows = pos[start : start + fill]
            start += fill
            layer = layout.first_layer + layer_index
            assert np.array_equal(blocks[slot, 0, :fill], k_all[layer, h.kv_head, rows])
            assert np.array_equal(blocks[slot, 1, :fill], v_all[layer, h.kv_head, rows])
            assert not blocks[slot, :, fill:].any()
        assert start == len(pos)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", list(icecache.DType), ids=lambda d: d.name.lower())
def test_append_select_fetch_byte_identical(client, kind, dtype):
    if kind == "numpy" and dtype is icecache.DType.BFLOAT16:
        pytest.skip("numpy has no bfloat16; torch covers it")
    spec = small_spec(dtype=dtype, selector=icecache.Selector.EXACT)
    s = client.create_session(spec)
    keys, values = kv_arrays(spec, 300, kind=kind)
    with client.create_shm_buffer(spec.chunk_bytes(100)) as staging, client.create_shm_buffer(1 << 20) as out:
        # 300 tokens through a 100-token staging buffer: three appends
        assert client.append_kv(s.id, keys, values, buffer=staging) == 300
        q = np.random.default_rng(1).standard_normal((4, 32)).astype(np.float32)
        sel = client.select_pages(s.id, 1, q, icecache.SelectOptions(budget_tokens=64, want_positions=True))
        assert len(sel) == 2 and not sel.reused
        layout = client.fetch_pages(s.id, 1, sel, out, offset=4096, want_positions=True)
        assert layout.offset == 4096 and layout.first_layer == 1
        check_fetched(out, layout, keys, values)
    client.drop_session(s.id)


@pytest.mark.parametrize("selector", [icecache.Selector.EXACT, icecache.Selector.MDCI])
def test_token_granularity_select_fetch_and_decode(client, selector):
    spec = small_spec(selector=selector)
    s = client.create_session(spec)
    keys, values = kv_arrays(spec, 300, seed=7)
    client.append_kv(s.id, keys, values)
    q = np.random.default_rng(2).standard_normal((4, 32)).astype(np.float32)
    opts = icecache.SelectOptions(budget_tokens=40, sink_tokens=4, granularity="token")
    with client.create_shm_buffer(1 << 20) as out:
        sel = client.select_pages(s.id, 0, q, opts)
        for h in sel:
            assert list(h.pages) == [] and list(h.fills) == [16, 16, 8]
            assert len(h.positions) == 40 and list(h.positions[:4]) == [0, 1, 2, 3]
        layout = client.fetch_pages(s.id, 0, sel, out, 0, want_positions=True)
        check_fetched(out, layout, keys, values)
        layout = client.fetch_tokens(s.id, 1, [[299, 5, 5], [0]], out, 0, want_positions=True)
        check_fetched(out, layout, keys, values)
        with client.decode_stream(s.id, out) as stream:
            step = stream.step(1, q, options=icecache.SelectOptions(
                budget_tokens=40, sink_tokens=4, granularity="token", want_positions=True))
            check_fetched(out, step.layout, keys, values)
            assert [list(h.positions) for h in step.layout.heads] == [list(h.positions) for h in step.heads]
        with pytest.raises(ValueError, match="granularity"):
            client.select_pages(s.id, 0, q, icecache.SelectOptions(granularity="row"))
    client.drop_session(s.id)


def test_decode_keys_are_counted_per_session(client):
    spec = small_spec(selector=icecache.Selector.MDCI)
    s = client.create_session(spec)
    keys, values = kv_arrays(spec, 300, seed=7)
    client.append_kv(s.id, keys, values)
    info = client.get_session(s.id)
    assert (info.decode_keys, info.decode_keys_unrouted) == (0, 0)  # built, not inserted
    for t in range(5):
        k, v = kv_arrays(spec, 1, seed=100 + t)
        client.append_kv(s.id, k, v)
    info = client.get_session(s.id)
    assert info.decode_keys == 5 * spec.layers * spec.kv_heads  # one tree per (layer, head)
    assert 0 <= info.decode_keys_unrouted <= info.decode_keys
    client.drop_session(s.id)


def test_inline_append_equals_shm_append(client):
    spec = small_spec()
    keys, values = kv_arrays(spec, 40, seed=3)
    a = client.create_session(spec)
    b = client.create_session(spec)
    with client.create_shm_buffer(1 << 20) as buf, client.create_shm_buffer(1 << 20) as out:
        client.append_kv(a.id, keys, values, buffer=buf)
        client.append_kv(b.id, keys, values)  # inline
        pages = [list(range(3)), list(range(3))]
        la = client.fetch_pages(a.id, 0, pages, out, 0, want_positions=True)
        first = out.view(0, la.total_bytes).copy()
        lb = client.fetch_pages(b.id, 0, pages, out, 0, want_positions=True)
        assert np.array_equal(first, out.view(0, lb.total_bytes))
        check_fetched(out, lb, keys, values)
    client.drop_session(a.id)
    client.drop_session(b.id)


def test_zero_copy_chunk_views(client):
    spec = small_spec()
    s = client.create_session(spec)
    keys, values = kv_arrays(spec, 32, seed=5)
    with client.create_shm_buffer(spec.chunk_bytes(32)) as buf, client.create_shm_buffer(1 << 20) as out:
        kview, vview = icecache.kv_chunk_views(buf, 0, spec, 32)
        kview[...] = keys  # the engine writes straight into shared memory
        vview[...] = values
        del kview, vview
        assert client.append_kv_region(s.id, buf, 0, spec.chunk_bytes(32), 32) == 32
        layout = client.fetch_pages(s.id, 0, [[0, 1], [1]], out, 0, want_positions=True)
        check_fetched(out, layout, keys, values)
    client.drop_session(s.id)


def test_layer_group_fetch(client):
    spec = small_spec(layers=4, layer_reuse=2)
    s = client.create_session(spec)
    keys, values = kv_arrays(spec, 64, seed=9)
    with client.create_shm_buffer(1 << 20) as out:
        client.append_kv(s.id, keys, values)
        q = np.ones((4, 32), np.float32)
        sel = client.select_pages(s.id, 2, q)
        again = client.select_pages(s.id, 3, None, icecache.SelectOptions(reuse_group_selection=True))
        assert again.reused and [h.pages for h in again] == [h.pages for h in sel]
        layout = client.fetch_pages(s.id, 2, sel, out, 0, want_positions=True, num_layers=2)
        assert layout.num_layers == 2
        check_fetched(out, layout, keys, values, 0)
        check_fetched(out, layout, keys, values, 1)
    client.drop_session(s.id)


# -- bad inputs ---------------------------------------------------------------------


@pytest.fixture
def filled(client):
    spec = small_spec()
    s = client.create_session(spec)
    keys, values = kv_arrays(spec, 64)
    client.append_kv(s.id, keys, values)
    yield s.id, spec
    client.drop_session(s.id)


def test_wrong_shape_names_the_array_and_the_session(client, filled):
    sid, spec = filled
    keys, values = kv_arrays(spec, 8)
    with pytest.raises(icecache.InvalidArgumentError) as e:
        client.append_kv(sid, keys[:, :1], values[:, :1])
    assert "keys" in e.value.message and sid in e.value.message and "kv_heads=2" in e.value.message
    with pytest.raises(icecache.InvalidArgumentError):
        client.append_kv(sid, keys, values[:, :, :4])
    assert client.get_session(sid).tokens == 64


def test_wrong_dtype_is_refused_not_converted(client, filled):
    sid, spec = filled
    keys, values = kv_arrays(spec, 8)
    with pytest.raises(icecache.InvalidArgumentError) as e:
        client.append_kv(sid, keys.astype(np.float32), values.astype(np.float32))
    assert "float32" in e.value.message and "float16" in e.value.message
    with pytest.raises(icecache.InvalidArgumentError):
        client.append_kv(sid, keys.astype(np.int16), values.astype(np.int16))
    with pytest.raises(icecache.InvalidArgumentError) as e:
        client.select_pages(sid, 0, np.ones((4, 32), np.int32))
    assert "int32" in e.value.message
    assert client.get_session(sid).tokens == 64


def test_nan_keys_are_refused_by_the_daemon_and_nothing_is_stored(client, filled):
    sid, spec = filled
    keys, values = kv_arrays(spec, 16)
    keys[1, 0, 5, 3] = np.nan
    with client.create_shm_buffer(1 << 20) as buf:
        with pytest.raises(icecache.InvalidArgumentError):
            client.append_kv(sid, keys, values, buffer=buf)
    keys[1, 0, 5, 3] = np.inf
    with pytest.raises(icecache.InvalidArgumentError):
        client.append_kv(sid, keys, values)
    assert client.get_session(sid).tokens == 64


def test_bad_queries(client, filled):
    sid, spec = filled
    with pytest.raises(icecache.InvalidArgumentError):
        client.select_pages(sid, 0, np.ones((3, 32), np.float32))  # q_heads is 4
    q = np.ones((4, 32), np.float32)
    q[0, 0] = np.nan
    with pytest.raises(icecache.InvalidArgumentError):
        client.select_pages(sid, 0, q)
    with pytest.raises(icecache.InvalidArgumentError) as e:
        client.select_pages(sid, 7, np.ones((4, 32), np.float32))
    assert "7" in e.value.message
    with pytest.raises(icecache.InvalidArgumentError):
        client.select_pages(sid, 0, [[1.0] * 32] * 4)  # a list, not an array


def test_bad_fetches(client, filled):
    sid, spec = filled
    with client.create_shm_buffer(4096) as small:
        with pytest.raises(icecache.InvalidArgumentError):
            client.fetch_pages(sid, 0, [[999], [0]], small)  # page id out of range
        with pytest.raises(icecache.OutOfRangeError):
            client.fetch_pages(sid, 0, [[0, 1, 2, 3], [0, 1, 2, 3]], small)  # 8 blocks > 4096 bytes
        with pytest.raises(icecache.NotFoundError):
            client.fetch_pages(sid, 0, [[0], [0]], "no-such-buffer")


def test_streaming_prefill_by_layer_ranges(client):
    spec = small_spec(layers=4, layer_reuse=2)
    s = client.create_session(spec)
    keys, values = kv_arrays(spec, 80, seed=13)
    with client.create_shm_buffer(1 << 20) as buf, client.create_shm_buffer(1 << 20) as out:
        assert client.append_kv_layers(s.id, 0, keys[0:2], values[0:2], buf) == 0
        info = client.get_session(s.id)
        assert info.next_layer == 2 and info.trees_built < info.trees_total
        # the first layer group already answers
        layout = client.fetch_pages(s.id, 0, [[0], [1]], out, want_positions=True)
        check_fetched(out, layout, keys, values)
        with pytest.raises(icecache.FailedPreconditionError):
            client.append_kv_layers(s.id, 0, keys[0:2], values[0:2], buf)  # out of order
        with pytest.raises(icecache.InvalidArgumentError):
            client.append_kv_layers(s.id, 2, keys[2:3], values[2:3], buf)  # half a layer group
        assert client.append_kv_layers(s.id, 2, keys[2:4], values[2:4], buf) == 80
        layout = client.fetch_pages(s.id, 3, [[0, 4], [2]], out, want_positions=True)
        check_fetched(out, layout, keys, values)
    client.drop_session(s.id)
