#!/usr/bin/env python3
"""The Python client's cost of one DecodeStep answer's token positions:
varints (the repeated ``positions`` fields) against little-endian int32
bytes (``positions_le``, asked for with ``positions_as_bytes``, which
DecodeStream sets).

One answer as the daemon writes it for a token-granular layer message
(``--kv-heads`` heads x ``--tokens`` selected tokens, positions in the
selection and in the layout, want_positions), coded both ways by protobuf;
then, per form, the median over ``--repeats`` of timeit means of:

  parse      DecodeStepResponse.FromString
  layout     parse + StepResult(...).layout (the client's conversion)
  rope       layout + every head's positions as an int64 array, as
             icecache.torch's attention does for a rope callable

    python3 python/bench/positions_bench.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import timeit
from pathlib import Path

import numpy as np
from google.protobuf.internal import api_implementation

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from icecache.types import StepResult  # noqa: E402
from icecache.v1 import kv_pb2  # noqa: E402

TOKEN_SLOT_PAGE = 4294967295


def answer(kv_heads: int, tokens: int, page_tokens: int, context: int, as_bytes: bool,
           seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    resp = kv_pb2.DecodeStepResponse(layer=3, select_ns=1000, gather_ns=1000, step_ns=3000)
    resp.layout.buffer_id = "buf"
    resp.layout.page_tokens = page_tokens
    resp.layout.head_dim = 128
    slots = (tokens + page_tokens - 1) // page_tokens
    for h in range(kv_heads):
        pos = np.sort(rng.choice(context, tokens, replace=False)).astype("<i4")
        sel = resp.heads.add(kv_head=h, keys_touched=3000)
        lay = resp.layout.heads.add(
            kv_head=h, pages=[TOKEN_SLOT_PAGE] * slots, slots=range(h * slots, (h + 1) * slots),
            fills=[page_tokens] * (tokens // page_tokens) + ([tokens % page_tokens] if tokens % page_tokens else []),
            byte_offsets=[(h * slots + s) * 2 * page_tokens * 256 for s in range(slots)])
        for m in (sel, lay):
            if as_bytes:
                m.positions_le = pos.tobytes()
            else:
                m.positions.extend(pos.tolist())
    return resp.SerializeToString()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256, help="selected tokens per KV head")
    ap.add_argument("--page-tokens", type=int, default=16)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--number", type=int, default=500, help="calls per timeit measurement")
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()

    def parse(raw: bytes) -> None:
        kv_pb2.DecodeStepResponse.FromString(raw)

    def layout(raw: bytes) -> None:
        resp = kv_pb2.DecodeStepResponse.FromString(raw)
        StepResult(resp.layer, reused=resp.reused, raw=resp).layout

    def rope(raw: bytes) -> None:
        resp = kv_pb2.DecodeStepResponse.FromString(raw)
        for h in StepResult(resp.layer, reused=resp.reused, raw=resp).layout.heads:
            np.asarray(h.positions, dtype=np.int64)

    forms = {f: answer(a.kv_heads, a.tokens, a.page_tokens, a.context, f == "bytes", 7)
             for f in ("varints", "bytes")}
    # Both forms carry the same positions.
    got = {}
    for f, raw in forms.items():
        resp = kv_pb2.DecodeStepResponse.FromString(raw)
        got[f] = [np.asarray(h.positions).tolist()
                  for h in StepResult(resp.layer, raw=resp).layout.heads]
    assert got["varints"] == got["bytes"]

    print(f"one answer: {a.kv_heads} KV heads x {a.tokens} tokens (selection and layout), "
          f"protobuf {api_implementation.Type()}; "
          f"us per answer, median of {a.repeats} x {a.number} calls")
    print(f"{'step':<8}{'varints':>10}{'bytes':>10}{'ratio':>8}")
    for name, fn in (("parse", parse), ("layout", layout), ("rope", rope)):
        us = {}
        for f, raw in forms.items():
            runs = timeit.repeat(lambda: fn(raw), number=a.number, repeat=a.repeats)
            us[f] = statistics.median(runs) / a.number * 1e6
        print(f"{name:<8}{us['varints']:>10.1f}{us['bytes']:>10.1f}{us['varints'] / us['bytes']:>7.1f}x")
    print(f"bytes on the wire: varints {len(forms['varints'])}, bytes {len(forms['bytes'])}")


if __name__ == "__main__":
    main()
