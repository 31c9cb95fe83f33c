"""The device path from Python, as an engine would use it: torch CUDA tensors
registered by CUDA IPC (CudaBuffer), a vLLM-layout paged KV cache filled by
DecodeStep with block ids and CUDA IPC events (torch.cuda.Event), a plain
CUDA tensor filled by FetchPages, and a layer-group prefetch pushed in the
background. Every byte is checked against what was appended. Needs torch
with a CUDA device; skipped otherwise (tests/gpu/run.sh runs it on a GPU
machine)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import small_spec
from test_kv import kv_arrays

import icecache

try:
    import torch
except ImportError:  # pragma: no cover - Debian's python3-torch is a test dependency
    torch = None

if torch is None:
    _WHY = "skipped: torch is not installed"
elif not torch.cuda.is_available():
    _WHY = (f"skipped: no CUDA device for torch {torch.__version__} (CUDA build: "
            f"{torch.version.cuda or 'none'}); tests/gpu/run.sh runs this on a GPU machine")
else:
    _WHY = ""
pytestmark = pytest.mark.skipif(bool(_WHY), reason=_WHY)

LAYERS, KV_HEADS, Q_HEADS, HEAD_DIM, PAGE, BLOCKS, TOKENS = 4, 2, 4, 64, 16, 64, 300
SENTINEL = -1  # 0xFFFF in every element nothing was written to


@pytest.fixture
def session(client):
    spec = small_spec(layers=LAYERS, kv_heads=KV_HEADS, q_heads=Q_HEADS, head_dim=HEAD_DIM,
                      page_tokens=PAGE, selector=icecache.Selector.EXACT, layer_reuse=2)
    s = client.create_session(spec)
    keys, values = kv_arrays(spec, TOKENS, seed=21)  # float16 [layers, kv_heads, tokens, dim]
    client.append_kv(s.id, keys, values)
    yield s.id, keys.view(np.int16), values.view(np.int16)
    client.drop_session(s.id)


def paged_cache():
    """A vLLM FlashAttention cache, all layers in one tensor
    [layers, 2, blocks, block_tokens, kv_heads, head_dim], carved from the
    middle of a larger allocation so that its IPC base offset is not 0."""
    per_layer = 2 * BLOCKS * PAGE * KV_HEADS * HEAD_DIM
    backing = torch.full((4096 + LAYERS * per_layer,), SENTINEL, dtype=torch.int16, device="cuda")
    cache = backing[4096:].view(LAYERS, 2, BLOCKS, PAGE, KV_HEADS, HEAD_DIM)
    kv = icecache.PagedKvCache(format=icecache.PagedKvFormat.VLLM_FLASH, num_layers=LAYERS,
                               num_blocks=BLOCKS, block_tokens=PAGE, kv_heads=KV_HEADS,
                               head_dim=HEAD_DIM, dtype=icecache.DType.FLOAT16)
    return backing, cache, kv


def expect_scatter(want, layout, blocks, keys, values):
    """What the scatter of ``layout`` into ``blocks`` writes, applied to
    ``want`` (numpy, the cache's shape)."""
    for j in range(layout.num_layers):
        layer = layout.first_layer + j
        for h in layout.heads:
            pos = np.asarray(h.positions)
            at = 0
            for i, block in enumerate(blocks):
                fill = h.fills[i] if i < len(h.fills) else 0
                rows = pos[at:at + fill]
                at += fill
                for kv, src in ((0, keys), (1, values)):
                    want[layer, kv, block, :, h.kv_head] = 0
                    want[layer, kv, block, :fill, h.kv_head] = src[layer, h.kv_head, rows]


def ipc_event():
    e = torch.cuda.Event(interprocess=True)
    return e, bytes(e.ipc_handle())


def queries(seed):
    return np.random.default_rng(seed).standard_normal((Q_HEADS, HEAD_DIM)).astype(np.float32)


def test_decode_step_scatters_into_a_paged_cache_ordered_by_events(client, session):
    sid, keys, values = session
    backing, cache, kv = paged_cache()
    stream = torch.cuda.Stream()
    before, before_handle = ipc_event()
    done, done_handle = ipc_event()
    with client.cuda_buffer(cache, paged_kv=kv) as buf, client.decode_stream(sid, buf) as ds:
        assert buf.base_offset >= 4096 * 2
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            cache[0].fill_(SENTINEL)  # queued work the daemon's write must follow
            before.record(stream)
        blocks = [40, 3, 17, 9, 60, 22, 31, 5]
        opt = icecache.SelectOptions(budget_tokens=64, want_positions=True)
        r = ds.step(0, queries(1), options=opt, num_layers=2,
                    device=icecache.DeviceWrite(block_ids=blocks, wait_event=before_handle,
                                                done_event=done_handle))
        stream.wait_event(done)
        stream.synchronize()
        want = np.full(cache.shape, SENTINEL, np.int16)
        expect_scatter(want, r.layout, blocks, keys, values)
        got = cache.cpu().numpy()
        bad = np.argwhere(got != want)
        assert bad.size == 0, f"{len(bad)} elements differ, first at {tuple(bad[0])}"
        assert (backing[:4096] == SENTINEL).all().item(), "bytes before the tensor were written"


def test_fetch_pages_into_a_plain_cuda_tensor(client, session):
    sid, keys, values = session
    backing = torch.full((1 << 21,), SENTINEL, dtype=torch.int16, device="cuda")
    target = backing[1000:]
    pages = [[0, 5, 18], [2, 3]]
    with client.cuda_buffer(target) as buf:
        layout = client.fetch_pages(sid, 1, pages, buf, offset=512, want_positions=True)
        torch.cuda.synchronize()
        assert layout.offset == 512  # relative to the tensor, as given
        host = target.cpu().numpy()
        assert (host[:256] == SENTINEL).all(), "bytes before the offset were written"
        for h in layout.heads:
            pos = np.asarray(h.positions)
            at = 0
            for slot, fill in zip(h.slots, h.fills):
                start = (layout.offset + slot * layout.page_bytes) // 2
                page = host[start:start + 2 * PAGE * HEAD_DIM].reshape(2, PAGE, HEAD_DIM)
                rows = pos[at:at + fill]
                at += fill
                np.testing.assert_array_equal(page[0, :fill], keys[1, h.kv_head, rows])
                np.testing.assert_array_equal(page[1, :fill], values[1, h.kv_head, rows])
                assert not page[:, fill:].any()
        assert (backing[:1000] == SENTINEL).all().item()


def test_layer_group_prefetch_lands_in_the_same_blocks(client, session):
    sid, keys, values = session
    _, cache, kv = paged_cache()
    done, done_handle = ipc_event()
    blocks = [1, 2, 7, 11, 13, 50, 51, 63]
    opt = icecache.SelectOptions(budget_tokens=64, want_positions=True)
    reuse = icecache.SelectOptions(budget_tokens=64, want_positions=True, reuse_group_selection=True)
    torch.cuda.synchronize()
    with client.cuda_buffer(cache, paged_kv=kv) as buf, client.decode_stream(sid, buf) as ds:
        two = ds.step(2, queries(2), options=opt, prefetch_group=True,
                      device=icecache.DeviceWrite(block_ids=blocks))
        assert two.prefetching == 1
        three = ds.step(3, None, options=reuse,
                        device=icecache.DeviceWrite(block_ids=blocks, done_event=done_handle))
        torch.cuda.current_stream().wait_event(done)
        torch.cuda.synchronize()
        want = np.full(cache.shape, SENTINEL, np.int16)
        expect_scatter(want, two.layout, blocks, keys, values)
        expect_scatter(want, three.layout, blocks, keys, values)
        np.testing.assert_array_equal(cache.cpu().numpy(), want)
