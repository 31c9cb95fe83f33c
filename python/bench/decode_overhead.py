#!/usr/bin/env python3
"""Python DecodeStep per layer message against the C++ client, same daemon,
same run, same KV, same queries, same selection parameters.

Both sides decode the llama3-8b-like synthetic sequence that
``icecache-bench-rpc`` uses (``icecache-kvgen`` writes the same KV and
queries for this script: same preset, seed, tokens, layers, steps), one
session each, budget and sink as icecache-bench-rpc. The Python client's
DecodeSteps go over its gRPC stream; the C++ client's over its stream (like
for like: the difference is the Python client's own overhead) and over its
shared-memory ring (its default, which the Python client does not have),
each round running C++ stream, Python, C++ ring so all see the same machine
load. The figures are medians over rounds of each side's per-layer p50.

    python3 python/bench/decode_overhead.py --build build   # --python-transport ring: Python over its ring
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import icecache  # noqa: E402
from icecache.daemon import Daemon  # noqa: E402


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--build", default="build", help="CMake build dir with the binaries")
    ap.add_argument("--socket", default="", help="use this running daemon instead of spawning one")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=64, help="decode steps per round and side")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--page-tokens", type=int, default=16)
    ap.add_argument("--selector", default="mdci")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--python-transport", choices=["stream", "ring"], default="stream",
                    help="the Python client's DecodeStep path: its gRPC stream or its "
                         "shared-memory ring (Client(decode_ring=True), its default)")
    ap.add_argument("--cpp-transport", choices=["stream", "ring", "both"], default="both",
                    help="the C++ client's DecodeStep path: its gRPC stream (like for like with "
                         "the Python client, which has no ring), its shared-memory ring (its "
                         "default), or both in every round")
    ap.add_argument("--json", default="", help="write the figures here")
    return ap.parse_args()


def cpp_round(a: argparse.Namespace, bench: str, socket: str, out: str, transport: str) -> float:
    cmd = [
        bench, "--socket", socket, "--sessions", "1", "--tokens", str(a.tokens),
        "--layers", str(a.layers), "--steps", str(a.steps), "--budget", str(a.budget),
        "--page-tokens", str(a.page_tokens), "--selector", a.selector, "--json", out,
        "--transport", transport,
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(out) as f:
        return float(json.load(f)["results"][0]["layer_ms_p50"])


def python_round(a: argparse.Namespace, client: icecache.Client, dump: dict) -> float:
    keys, values, queries = dump["keys"], dump["values"], dump["queries"]
    layers, kv_heads, tokens, head_dim = keys.shape
    spec = icecache.SessionSpec(
        layers=layers, kv_heads=kv_heads, q_heads=queries.shape[2], head_dim=head_dim,
        dtype=icecache.DType.FLOAT16, page_tokens=a.page_tokens,
        selector=icecache.Selector.parse(a.selector), layer_reuse=1, ttl_s=600,
    )
    session = client.create_session(spec)
    page_bytes = 2 * a.page_tokens * head_dim * 2
    out_bytes = kv_heads * (a.budget + 4 + a.page_tokens) * page_bytes
    opt = icecache.SelectOptions(budget_tokens=a.budget, sink_tokens=4)
    lat = []
    with client.create_shm_buffer(spec.chunk_bytes(tokens)) as kv_buf, \
            client.create_shm_buffer(out_bytes) as out:
        client.append_kv(session.id, keys, values, buffer=kv_buf)
        with client.decode_stream(session.id, out) as stream:
            stream.step(0, queries[0, 0], options=opt)  # warm-up: open the stream
            if (a.python_transport == 'ring') and stream.transport != "ring":
                raise SystemExit(f"the daemon refused the ring: {stream.ring_refused}")
            for step in range(a.steps):
                for layer in range(layers):
                    q = queries[step % queries.shape[0], layer]
                    t0 = time.perf_counter()
                    stream.step(layer, q, options=opt)
                    lat.append((time.perf_counter() - t0) * 1e3)
    client.drop_session(session.id)
    return float(np.median(lat))


def load_dump(a: argparse.Namespace, kvgen: str, tmp: str) -> dict:
    out = os.path.join(tmp, "dump")
    subprocess.run(
        [kvgen, "--preset", "llama3-8b-like", "--tokens", str(a.tokens), "--layers",
         str(a.layers), "--steps", str(a.steps), "--dtype", "float32", "--out", out],
        check=True, stdout=subprocess.DEVNULL,
    )
    return {
        "keys": np.load(os.path.join(out, "keys.npy")).astype(np.float16),
        "values": np.load(os.path.join(out, "values.npy")).astype(np.float16),
        "queries": np.ascontiguousarray(np.load(os.path.join(out, "queries.npy")), np.float32),
    }


def main() -> int:
    a = parse_args()
    build = Path(a.build)
    bench = str(build / "client" / "icecache-bench-rpc")
    kvgen = str(build / "common" / "icecache-kvgen")
    with tempfile.TemporaryDirectory() as tmp:
        dump = load_dump(a, kvgen, tmp)
        daemon = None if a.socket else Daemon(str(build / "server" / "icecached"))
        socket = a.socket or daemon.socket_path
        try:
            with icecache.Client(socket=socket, decode_ring=(a.python_transport == 'ring')) as client:
                transports = ["stream", "ring"] if a.cpp_transport == "both" else [a.cpp_transport]
                cpp = {t: [] for t in transports}
                py = []
                for r in range(a.rounds):
                    # The C++ sides around the Python one, so all see the same load.
                    for i, t in enumerate(transports):
                        if i == 1:
                            py.append(python_round(a, client, dump))
                        cpp[t].append(cpp_round(a, bench, socket, os.path.join(tmp, "cpp.json"), t))
                    if len(transports) == 1:
                        py.append(python_round(a, client, dump))
                    print(f"round {r + 1}: " + "  ".join(f"C++ {t} p50 {cpp[t][-1]:.3f} ms" for t in transports)
                          + f"  Python p50 {py[-1]:.3f} ms")
        finally:
            if daemon is not None:
                daemon.stop()
    p = statistics.median(py)
    print(
        f"\nDecodeStep per layer message ({a.tokens} tokens, {a.layers} layers, 8 KV heads, "
        f"32 q heads, 128 dims, fp16, {a.selector}, budget {a.budget}, {a.steps} steps x "
        f"{a.rounds} rounds)\n  Python client p50 {p:.3f} ms "
        f"({'ring' if (a.python_transport == 'ring') else 'gRPC stream'})"
    )
    report = {"python_p50_ms": py, "config": vars(a)}
    for t in transports:
        c = statistics.median(cpp[t])
        diff = statistics.median(b - x for x, b in zip(cpp[t], py))
        print(f"  C++ client p50    {c:.3f} ms ({t}): Python {(p - c) * 1e3:+.0f} us per layer "
              f"message (median of the per-round differences: {diff * 1e3:+.0f} us)")
        report[f"cpp_{t}_p50_ms"] = cpp[t]
        report[f"overhead_{t}_us"] = (p - c) * 1e3
        report[f"overhead_{t}_us_round_median"] = diff * 1e3
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
