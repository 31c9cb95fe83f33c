"""icecache.torch: decode attention over fetched pages against full
attention computed independently."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import icecache  # noqa: E402
from icecache.torch import OffloadedKV, full_attention  # noqa: E402

L, H, Q, D = 2, 2, 8, 32  # GQA 4:1


def reference(q, keys, values, positions=None):
    """Softmax attention written out per query head, optionally restricted
    to the given token positions of each KV head."""
    out = torch.empty(Q, D)
    for h in range(Q):
        kh = h // (Q // H)
        k, v = keys[kh].double(), values[kh].double()
        if positions is not None:
            k, v = k[positions[kh]], v[positions[kh]]
        w = torch.softmax(k @ q[h].double() / math.sqrt(D), dim=0)
        out[h] = (w[:, None] * v).sum(0).float()
    return out


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("selector", ["mdci", "quest", "streaming", "exact"])
def test_full_budget_equals_full_attention(client, dtype, selector):
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}[dtype]
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(L, H, 200, D, generator=g).to(dtype)
    values = torch.randn(L, H, 200, D, generator=g).to(dtype)
    with OffloadedKV(client, layers=L, kv_heads=H, q_heads=Q, head_dim=D, dtype=dtype,
                     selector=selector, budget_tokens=4096, flush_tokens=5) as kv:
        kv.prefill(keys, values)
        for step in range(12):  # crosses two flushes
            nk = torch.randn(L, H, 1, D, generator=g).to(dtype)
            nv = torch.randn(L, H, 1, D, generator=g).to(dtype)
            keys, values = torch.cat([keys, nk], 2), torch.cat([values, nv], 2)
            for layer in range(L):
                kv.append(layer, nk[layer, :, 0], nv[layer, :, 0])
                q = torch.randn(Q, D, generator=g).to(dtype)
                out = kv.attend(layer, q)
                assert out.dtype == dtype and out.shape == (Q, D)
                ref = reference(q.float(), keys[layer].float(), values[layer].float())
                assert rel(out, ref) < tol
        assert kv.daemon_tokens == 210 and kv.tokens == 212


def test_sparse_budget_is_attention_over_exactly_the_selected_tokens(client):
    """With a small budget the output must be softmax attention restricted
    to the fetched tokens (positions from the daemon) plus the tail."""
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(L, H, 400, D, generator=g).half()
    values = torch.randn(L, H, 400, D, generator=g).half()
    with OffloadedKV(client, layers=L, kv_heads=H, q_heads=Q, head_dim=D, dtype=torch.float16,
                     selector="mdci", budget_tokens=48, flush_tokens=64) as kv:
        kv.options.want_positions = True
        kv.prefill(keys, values)
        nk = torch.randn(L, H, 1, D, generator=g).half()
        nv = torch.randn(L, H, 1, D, generator=g).half()
        allk, allv = torch.cat([keys, nk], 2), torch.cat([values, nv], 2)
        for layer in range(L):
            kv.append(layer, nk[layer, :, 0], nv[layer, :, 0])
            q = torch.randn(Q, D, generator=g).half()
            out = kv.attend(layer, q)
            heads = kv.last_step.layout.heads
            chosen = [sorted(list(h.positions)) + [400] for h in heads]  # + the tail token
            assert all(48 <= len(c) - 1 < 400 for c in chosen)
            ref = reference(q.float(), allk[layer].float(), allv[layer].float(), chosen)
            assert rel(out, ref) < 2e-3
            full = full_attention(q.float(), allk[layer].float(), allv[layer].float())
            assert rel(out, full) > 1e-3  # it is sparse: not the full answer


def rope(x, positions):
    """Hugging Face rotate_half RoPE; positions broadcast over heads."""
    inv = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = positions.double()[..., None] * inv
    cos = torch.cat([ang.cos(), ang.cos()], -1).float()
    sin = torch.cat([ang.sin(), ang.sin()], -1).float()
    rot = torch.cat([-x[..., D // 2 :], x[..., : D // 2]], -1)
    return x * cos + rot * sin


def test_rope_hook_gets_the_fetched_positions(client):
    g = torch.Generator().manual_seed(2)
    keys = torch.randn(L, H, 150, D, generator=g)  # stored before RoPE
    values = torch.randn(L, H, 150, D, generator=g)
    with OffloadedKV(client, layers=L, kv_heads=H, q_heads=Q, head_dim=D, dtype=torch.float32,
                     selector="exact", budget_tokens=1024, rope=rope, flush_tokens=2) as kv:
        kv.prefill(keys, values)
        for step in range(3):
            nk = torch.randn(L, H, 1, D, generator=g)
            nv = torch.randn(L, H, 1, D, generator=g)
            keys, values = torch.cat([keys, nk], 2), torch.cat([values, nv], 2)
            for layer in range(L):
                kv.append(layer, nk[layer, :, 0], nv[layer, :, 0])
                q = torch.randn(Q, D, generator=g)
                out = kv.attend(layer, q)
                n = keys.shape[2]
                rotated = rope(keys[layer], torch.arange(n).expand(H, n))
                assert rel(out, reference(q, rotated, values[layer])) < 1e-5


def append_token_to_both(a, b, layers, g):
    """One decoded token's K/V per layer, the same for both sequences."""
    for layer in range(layers):
        k = torch.randn(H, D, generator=g).half()
        v = torch.randn(H, D, generator=g).half()
        a.append(layer, k, v)
        b.append(layer, k, v)


def test_layer_reuse_prefetches_the_later_layers_and_attends_the_same(client):
    """IceCache(r): with layer_reuse 2 the daemon writes layer 1 in the
    background after layer 0's selection (into its own region) and layer 1's
    attend only waits for it; the outputs equal a twin's without prefetch.

    A later layer's call that comes before the daemon's worker has started
    on it takes the write over itself (prefetched False, the same bytes):
    on a loaded machine that can happen to any call. So every call checks
    the outputs and the reuse, and the last step gives the worker a second
    before its later layers' calls and checks that they found them written."""
    g = torch.Generator().manual_seed(5)
    keys = torch.randn(4, H, 256, D, generator=g).half()
    values = torch.randn(4, H, 256, D, generator=g).half()
    common = dict(layers=4, kv_heads=H, q_heads=Q, head_dim=D, selector="exact", layer_reuse=2,
                  budget_tokens=32)
    with OffloadedKV(client, **common) as pf, OffloadedKV(client, prefetch=False, **common) as twin:
        assert pf.prefetch and not twin.prefetch
        assert pf.buffer.size >= 2 * twin.buffer.size
        pf.prefill(keys, values)
        twin.prefill(keys, values)
        for step in range(3):
            append_token_to_both(pf, twin, 4, g)
            for layer in range(4):
                q = torch.randn(Q, D, generator=g).half()
                if step == 2 and layer % 2 == 1:
                    time.sleep(1.0)  # the worker's write is done before the call
                a = pf.attend(layer, q)
                if layer % 2 == 0:
                    assert pf.last_step.prefetching == 1, (step, layer)
                else:
                    assert pf.last_step.reused, (step, layer)
                    if step == 2:
                        assert pf.last_step.prefetched, (step, layer)
                b = twin.attend(layer, q)
                assert torch.equal(a, b), (step, layer)
                assert not twin.last_step.prefetched and twin.last_step.prefetching == 0
    sessions = len(client.list_sessions())
    with pytest.raises(icecache.InvalidArgumentError, match="layer_reuse > 1"):
        OffloadedKV(client, layers=2, kv_heads=H, q_heads=Q, head_dim=D, prefetch=True)
    assert len(client.list_sessions()) == sessions  # refused before any session was made


@pytest.mark.parametrize("reuse", [1, 2])
def test_in_place_copies_only_new_rows_and_attends_the_same(client, reuse):
    """in_place: each layer keeps its own region between steps; from the
    second step on most rows stay where they were, and the outputs equal a
    twin's that gets every row copied (the same tokens, in other slots)."""
    g = torch.Generator().manual_seed(11)
    keys = torch.randn(4, H, 512, D, generator=g).half()
    values = torch.randn(4, H, 512, D, generator=g).half()
    common = dict(layers=4, kv_heads=H, q_heads=Q, head_dim=D, selector="exact", layer_reuse=reuse,
                  budget_tokens=64, recent_tokens=16)
    with OffloadedKV(client, in_place=True, **common) as ip, OffloadedKV(client, **common) as twin:
        assert ip.buffer.size >= 4 * ip._region_bytes  # a region per layer
        ip.prefill(keys, values)
        twin.prefill(keys, values)
        q0 = torch.randn(4, Q, D, generator=g).half()
        kept = 0
        for step in range(4):
            append_token_to_both(ip, twin, 4, g)
            for layer in range(4):
                # queries that move a little from step to step, as a decode's do
                q = (q0[layer].float() + 0.05 * torch.randn(Q, D, generator=g)).half()
                if reuse == 2 and step == 3 and layer == 3:
                    time.sleep(1.0)  # the worker's write of the last layer is done before the call
                a, b = ip.attend(layer, q), twin.attend(layer, q)
                assert rel(a, b) < 1e-3, (step, layer)
                if step > 0:
                    kept += ip.last_step.layout.rows_kept
                assert twin.last_step.layout.rows_kept == 0
        assert kept > 0
        if reuse == 2:
            assert ip.prefetch and ip.last_step.prefetched


def test_in_place_needs_a_host_buffer(client):
    class FakeCuda(icecache.CudaBuffer):  # only its type matters: refused before any use
        def __init__(self):
            pass

    with pytest.raises(icecache.InvalidArgumentError, match="host ShmBuffer"):
        OffloadedKV(client, layers=2, kv_heads=H, q_heads=Q, head_dim=D, in_place=True, buffer=FakeCuda())


def test_layer_reuse_and_bad_shapes(client):
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(L, H, 64, D, generator=g).half()
    with OffloadedKV(client, layers=L, kv_heads=H, q_heads=Q, head_dim=D, selector="mdci",
                     layer_reuse=2, budget_tokens=16) as kv:
        kv.prefill(keys, keys)
        kv.attend(0, torch.randn(Q, D).half())
        kv.attend(1, torch.randn(Q, D).half())
        assert kv.last_step.reused
        with pytest.raises(icecache.InvalidArgumentError) as e:
            kv.attend(0, torch.randn(Q - 1, D).half())
        assert "q_heads=8" in e.value.message
        with pytest.raises(icecache.InvalidArgumentError):
            kv.append(0, torch.randn(H, D + 1), torch.randn(H, D + 1))
