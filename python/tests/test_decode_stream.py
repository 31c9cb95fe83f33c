"""The DecodeStep stream: results equal SelectPages + FetchPages, errors end
the stream with the daemon's status and the next step reopens it; both
stream transports, and the shared-memory ring (where an error ends only its
own step)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import small_spec
from test_kv import check_fetched, kv_arrays

import icecache


@pytest.fixture(params=["segregated", "iterator", "ring"])
def transport(request, monkeypatch):
    monkeypatch.setenv("ICECACHE_DECODE_TRANSPORT", request.param)
    return request.param


@pytest.fixture
def session(client):
    spec = small_spec(selector=icecache.Selector.EXACT)
    s = client.create_session(spec)
    keys, values = kv_arrays(spec, 200, seed=11)
    client.append_kv(s.id, keys, values)
    yield s.id, keys, values
    client.drop_session(s.id)


def test_steps_match_select_and_fetch(client, session, transport):
    sid, keys, values = session
    opt = icecache.SelectOptions(budget_tokens=48, want_positions=True)
    per_token = dataclasses.replace(opt, granularity="token")
    rng = np.random.default_rng(2)
    with client.create_shm_buffer(1 << 20) as buf, client.decode_stream(sid, buf) as stream:
        if transport == "iterator":
            assert stream.transport == "iterator"
        for step in range(3):
            for layer in range(2):
                q = rng.standard_normal((4, 32)).astype(np.float32)
                r = stream.step(layer, q, offset=8192, options=opt)
                if transport == "ring":  # the daemon accepted it (a local socket)
                    assert stream.transport == "ring", stream.ring_refused
                assert r.layer == layer and r.layout.offset == 8192
                check_fetched(buf, r.layout, keys, values)
                # The session sets no granularity: per token into a ShmBuffer.
                assert all(len(h.pages) == 0 for h in r.heads)
                assert all(p == icecache.TOKEN_SLOT_PAGE for h in r.layout.heads for p in h.pages)
                sel = client.select_pages(sid, layer, q, per_token)
                assert [list(h.positions) for h in r.heads] == [list(h.positions) for h in sel]
                # A step's positions come as bytes (positions_as_bytes), read as
                # int32 arrays; SelectPages' as varints: the same tokens.
                for h in list(r.heads) + list(r.layout.heads):
                    assert isinstance(h.positions, np.ndarray) and h.positions.dtype == np.int32
                    assert len(h.positions) > 0 and not h.positions.flags.writeable
                # A step's selection fetches again by FetchPages (its tokens).
                again = client.fetch_pages(sid, layer, r.heads, buf, 1 << 19, want_positions=True)
                assert [list(h.positions) for h in again.heads] == \
                    [list(h.positions) for h in r.layout.heads]
                check_fetched(buf, again, keys, values)


def test_in_place_steps_copy_only_the_new_rows(client, session, transport):
    """in_place: each layer keeps its own region; the rows of tokens selected
    again stay (rows_kept) and every row holds the token its layout names."""
    sid, keys, values = session
    opt = icecache.SelectOptions(budget_tokens=48, want_positions=True, granularity="token",
                                 sink_tokens=4, recent_tokens=8)
    rng = np.random.default_rng(5)
    base = [rng.standard_normal((4, 32)).astype(np.float32) for _ in range(2)]
    kept = 0
    with client.create_shm_buffer(1 << 20) as buf, client.decode_stream(sid, buf) as stream:
        for step in range(4):
            for layer in range(2):
                # A query that drifts a little per step, as a decode's does.
                q = base[layer] + 0.3 * rng.standard_normal((4, 32)).astype(np.float32)
                r = stream.step(layer, q, offset=layer * (1 << 19), options=opt, in_place=True)
                rows = sum(len(h.positions) for h in r.layout.heads)
                assert r.layout.rows_copied + r.layout.rows_kept == rows
                if step == 0:
                    assert r.layout.rows_kept == 0
                else:
                    assert r.layout.rows_kept >= 2 * 12  # the sink and recent tokens at least
                kept += r.layout.rows_kept
                check_fetched(buf, r.layout, keys, values)
                # The same tokens as the selection, in the slots' order.
                assert [sorted(h.positions) for h in r.layout.heads] == \
                    [sorted(h.positions) for h in r.heads]
    assert kept > 0


def test_fp16_and_bf16_queries(client, session):
    torch = pytest.importorskip("torch")
    sid, _, _ = session
    q = torch.randn(4, 32)
    with client.create_shm_buffer(1 << 20) as buf, client.decode_stream(sid, buf) as stream:
        opt = icecache.SelectOptions(budget_tokens=32)
        ref = [list(h.pages) for h in stream.step(0, q, options=opt).heads]
        for dt in (torch.float16, torch.bfloat16):
            got = [list(h.pages) for h in stream.step(0, q.to(dt), options=opt).heads]
            assert len(got) == len(ref)


def test_error_ends_the_stream_and_the_next_step_reopens(client, session, transport):
    sid, keys, values = session
    with client.create_shm_buffer(1 << 20) as buf, client.decode_stream(sid, buf) as stream:
        q = np.ones((4, 32), np.float32)
        stream.step(0, q)
        with pytest.raises(icecache.InvalidArgumentError) as e:
            stream.step(5, q)  # layer out of range
        assert "5" in e.value.message
        with pytest.raises(icecache.InvalidArgumentError):
            stream.step(0, np.ones((2, 32), np.float32))
        r = stream.step(1, q, options=icecache.SelectOptions(want_positions=True))  # a fresh stream
        check_fetched(buf, r.layout, keys, values)


def test_out_of_range_offset_and_unknown_session(client, session, transport):
    sid, _, _ = session
    with client.create_shm_buffer(4096) as buf:
        with client.decode_stream(sid, buf) as stream:
            with pytest.raises(icecache.OutOfRangeError):
                stream.step(0, np.ones((4, 32), np.float32), offset=4000)
        with client.decode_stream("no-such-session", buf) as stream:
            with pytest.raises(icecache.NotFoundError):
                stream.step(0, np.ones((4, 32), np.float32))


def test_client_decode_step_keeps_one_stream_per_session(client, session):
    sid, keys, values = session
    with client.create_shm_buffer(1 << 20) as a, client.create_shm_buffer(1 << 20) as b:
        q = np.ones((4, 32), np.float32)
        opt = icecache.SelectOptions(want_positions=True)
        r1 = client.decode_step(sid, 0, q, a, options=opt)
        r2 = client.decode_step(sid, 1, q, b, options=opt)  # same stream, another buffer
        assert r1.layout.buffer_id == a.buffer_id and r2.layout.buffer_id == b.buffer_id
        check_fetched(b, r2.layout, keys, values)
        client.close_decode_stream(sid)


def test_batched_step_answers_each_session_and_a_bad_entry_fails_alone(client, session, transport):
    sid, keys, values = session
    other = client.create_session(small_spec(selector=icecache.Selector.EXACT))
    k2, v2 = kv_arrays(small_spec(), 100, seed=12)
    client.append_kv(other.id, k2, v2)
    opt = icecache.SelectOptions(budget_tokens=32, want_positions=True)
    q = np.random.default_rng(4).standard_normal((4, 32)).astype(np.float32)
    with client.create_shm_buffer(1 << 20) as buf, client.batch_decode_stream(buf) as stream:
        entries = [
            icecache.BatchEntry(sid, q, offset=0),
            icecache.BatchEntry("no-such-session", q, offset=1 << 18),
            icecache.BatchEntry(other.id, q, offset=1 << 19),
        ]
        res = stream.step(1, entries, options=opt)
        assert [r.session_id for r in res] == [sid, "no-such-session", other.id]
        assert res[0].error is None and res[2].error is None
        assert isinstance(res[1].error, icecache.NotFoundError) and res[1].result is None
        check_fetched(buf, res[0].result.layout, keys, values)
        check_fetched(buf, res[2].result.layout, k2, v2)
        single = client.select_pages(sid, 1, q, dataclasses.replace(opt, granularity="token"))
        assert [list(h.positions) for h in res[0].result.heads] == [
            list(h.positions) for h in single
        ]
        res = stream.step(0, [icecache.BatchEntry(sid, q)], options=opt)  # the stream goes on
        assert res[0].error is None
    client.drop_session(other.id)
