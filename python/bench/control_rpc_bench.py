#!/usr/bin/env python3
"""The daemon's CPU per control call: Health and GetSession of a model-sized
session, for one or more icecached binaries started in turn, rounds
alternating (A B A B ...), so a noisy machine moves every binary alike.

Per binary and round: a session of ``--layers`` x ``--kv-heads`` (the
Llama-3.1-8B shape by default) with ``--tokens`` tokens appended (its trees
built), then ``--calls`` GetSession and ``--calls`` Health calls; the
daemon's CPU (utime + stime of its /proc/PID/stat) and the wall time per
call. GetSession's answer holds every head's quality report, so it grows
with layers x KV heads; a benchmark or a progress bar that polls it pays
that on the daemon's cores.

    python3 python/bench/control_rpc_bench.py \\
        --icecached OLD_BINARY --icecached build/server/icecached
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from icecache import Client, SessionSpec  # noqa: E402
from icecache.daemon import Daemon  # noqa: E402


def daemon_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def per_call(pid: int, fn: Callable[[], object], calls: int) -> Dict[str, float]:
    cpu0, t0 = daemon_cpu_s(pid), time.perf_counter()
    for _ in range(calls):
        fn()
    return {"cpu_us": (daemon_cpu_s(pid) - cpu0) / calls * 1e6,
            "wall_us": (time.perf_counter() - t0) / calls * 1e6}


def one_round(binary: str, args: argparse.Namespace) -> Dict[str, Dict[str, float]]:
    with Daemon(binary) as d:
        c = Client(d.socket_path)
        spec = SessionSpec(layers=args.layers, kv_heads=args.kv_heads, q_heads=args.q_heads,
                           head_dim=args.head_dim)
        sid = c.create_session(spec).id
        rng = np.random.default_rng(1)
        k = rng.standard_normal((args.layers, args.kv_heads, args.tokens, args.head_dim),
                                dtype=np.float32).astype(np.float16)
        buf = c.create_shm_buffer(spec.chunk_bytes(args.tokens))
        c.append_kv(sid, k, k, buffer=buf)
        while True:  # the trees built, as a session being decoded
            info = c.get_session(sid)
            if info.trees_built >= info.trees_total:
                break
            time.sleep(0.05)
        pid = d.process.pid
        out = {"get_session": per_call(pid, lambda: c.get_session(sid), args.calls),
               "health": per_call(pid, c.health, args.calls)}
        c.close()
        return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--icecached", action="append", required=True,
                   help="an icecached binary (repeat to compare; rounds alternate)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--tokens", type=int, default=2048)
    args = p.parse_args()
    print(f"daemon CPU and wall per call, us ({args.calls} calls; a session of {args.layers} "
          f"layers x {args.kv_heads} KV heads, {args.tokens} tokens); load average "
          f"{os.getloadavg()[0]:.1f} at start")
    results: Dict[str, Dict[str, List[Dict[str, float]]]] = {}
    for r in range(args.rounds):
        for b in args.icecached:
            res = one_round(b, args)
            for call, v in res.items():
                results.setdefault(b, {}).setdefault(call, []).append(v)
                print(f"round {r + 1}  {call:<12} cpu {v['cpu_us']:7.0f}  wall {v['wall_us']:7.0f}"
                      f"  {b}")
    print("medians over the rounds:")
    for b, calls in results.items():
        for call, vs in calls.items():
            print(f"  {call:<12} cpu {statistics.median(v['cpu_us'] for v in vs):7.0f}  "
                  f"wall {statistics.median(v['wall_us'] for v in vs):7.0f}  {b}")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
