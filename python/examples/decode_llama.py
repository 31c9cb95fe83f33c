#!/usr/bin/env python3
"""Decode with the KV in IceCache: a small Llama against full attention.

Model mode (default): a small Llama-architecture model (tiny_llama.py:
plain PyTorch, seeded random weights with planted attention structure, no
downloads) reads a prompt of --context tokens, then decodes --steps tokens
twice over: once with the full KV in process (the reference) and once per
IceCache policy, with the prompt's KV in an icecached session and each
layer's attention computed by icecache.torch.OffloadedKV over the pages
DecodeStep selected plus the tokens decoded since (kept in process).
Policy runs are teacher-forced with the reference's tokens, so every step
compares like with like. Per policy it prints:

  ms/token       median wall time of one decoded token (all layers, with
                 the DecodeStep round trips), on this machine
  logits err     ||logits - logits_full|| / ||logits_full||, mean and max
  greedy agree   fraction of steps whose argmax token equals the reference's
  attn err       relative error of each layer's attention output against
                 exact attention over the same context (mean)

KV-dump mode (--kv-dump DIR, e.g. from icecache-kvgen or a real model: a
directory with keys.npy, values.npy [layers, kv_heads, tokens, head_dim]
and queries.npy [steps, layers, q_heads, head_dim]): there are no weights,
so it prints the attention-output error per policy over the dump's queries.

    python3 python/examples/decode_llama.py                       # smoke: 2048 tokens, 8 steps
    python3 python/examples/decode_llama.py --context 16384 --steps 64   # the README figures
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import icecache  # noqa: E402
from icecache.daemon import Daemon  # noqa: E402
from icecache.torch import OffloadedKV, full_attention  # noqa: E402
from tiny_llama import TinyConfig, TinyLlama  # noqa: E402

POLICIES = {
    "mdci": dict(selector="mdci", layer_reuse=1),
    "mdci-r2": dict(selector="mdci", layer_reuse=2),
    "quest": dict(selector="quest", layer_reuse=1),
    "streaming": dict(selector="streaming", layer_reuse=1),
    "exact": dict(selector="exact", layer_reuse=1),
    "exact-mdci": dict(selector="exact-mdci", layer_reuse=1),
}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    a = ap.add_argument
    a("--context", type=int, default=2048, help="prompt tokens [2048]")
    a("--steps", type=int, default=8, help="decoded tokens [8]")
    a("--policies", default="mdci,mdci-r2,quest,streaming",
      help=f"comma list of {','.join(POLICIES)} [mdci,mdci-r2,quest,streaming]")
    a("--budget", type=int, default=256, help="selected tokens per KV head and layer [256]")
    a("--sink", type=int, default=4, help="sink tokens always selected [4]")
    a("--page-tokens", type=int, default=16, help="tokens per page [16]")
    a("--flush-tokens", type=int, default=64, help="decoded tokens kept in process before appending [64]")
    a("--dtype", default="float16", choices=list(DTYPES), help="KV dtype [float16]")
    a("--layers", type=int, default=4, help="model layers [4]")
    a("--seed", type=int, default=7, help="prompt seed [7]")
    a("--threads", type=int, default=2, help="torch threads [2]")
    a("--socket", default="", help="a running icecached (else one is spawned)")
    a("--icecached", default="", help="icecached binary to spawn [$ICECACHE_ICECACHED, build/server/icecached]")
    a("--kv-dump", default="", help="KV-dump mode: directory with keys/values/queries .npy")
    a("--max-dump-tokens", type=int, default=0, help="truncate the dump's context (0 = all)")
    a("--json", default="", help="also write the table as JSON here")
    return ap.parse_args()


def find_binary(arg: str) -> Optional[str]:
    for c in (arg, os.environ.get("ICECACHE_ICECACHED", ""), str(HERE.parents[1] / "build/server/icecached")):
        if c and os.access(c, os.X_OK):
            return c
    return None


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


# -- model mode -------------------------------------------------------------------


class Reference:
    """Full-KV decode, the tokens and logits every policy is compared with."""

    def __init__(self, model: TinyLlama, keys: torch.Tensor, values: torch.Tensor, dtype: torch.dtype):
        self.model, self.dtype = model, dtype
        self.keys = [keys[l].float() for l in range(keys.shape[0])]
        self.values = [values[l].float() for l in range(values.shape[0])]

    def step(self, token: int, pos: int):
        m = self.model
        x = m.embed[torch.tensor([token])]
        for layer in range(m.cfg.layers):
            q, k, v = m.qkv(layer, x, torch.tensor([pos]))
            self.keys[layer] = torch.cat([self.keys[layer], k.to(self.dtype).float()], dim=1)
            self.values[layer] = torch.cat([self.values[layer], v.to(self.dtype).float()], dim=1)
            o = full_attention(q[:, 0], self.keys[layer], self.values[layer])
            x = m.finish_layer(layer, x, o.reshape(1, -1))
        return m.logits(x)[0]


def run_reference(model, keys, values, x_last, args, dtype):
    ref = Reference(model, keys, values, dtype)
    tokens = [int(model.logits(x_last[None])[0].argmax())]
    logits, times = [], []
    for i in range(args.steps):
        t0 = time.perf_counter()
        lg = ref.step(tokens[-1], args.context + i)
        times.append(time.perf_counter() - t0)
        logits.append(lg)
        tokens.append(int(lg.argmax()))
    return tokens, logits, times


def run_policy(name, client, model, keys, values, args, dtype, tokens, ref_logits):
    m, cfg = model, model.cfg
    kv = OffloadedKV(
        client, layers=cfg.layers, kv_heads=cfg.kv_heads, q_heads=cfg.q_heads,
        head_dim=cfg.head_dim, dtype=dtype, budget_tokens=args.budget, sink_tokens=args.sink,
        page_tokens=args.page_tokens, flush_tokens=args.flush_tokens, **POLICIES[name],
    )
    exact = Reference(m, keys, values, dtype)  # exact attention over the same context
    with kv:
        kv.prefill(keys, values)
        times, lerr, agree, aerr = [], [], [], []
        for i in range(args.steps):
            pos = args.context + i
            x = m.embed[torch.tensor([tokens[i]])]
            spent = 0.0
            t0 = time.perf_counter()
            for layer in range(cfg.layers):
                q, k, v = m.qkv(layer, x, torch.tensor([pos]))
                kv.append(layer, k[:, 0], v[:, 0])
                o = kv.attend(layer, q[:, 0])
                t1 = time.perf_counter()
                exact.keys[layer] = torch.cat([exact.keys[layer], k.to(dtype).float()], dim=1)
                exact.values[layer] = torch.cat([exact.values[layer], v.to(dtype).float()], dim=1)
                aerr.append(rel(o, full_attention(q[:, 0], exact.keys[layer], exact.values[layer])))
                spent += time.perf_counter() - t1
                x = m.finish_layer(layer, x, o.reshape(1, -1))
            lg = m.logits(x)[0]
            times.append(time.perf_counter() - t0 - spent)
            lerr.append(rel(lg, ref_logits[i]))
            agree.append(int(lg.argmax()) == tokens[i + 1])
    return dict(
        policy=name, ms_per_token=1e3 * statistics.median(times), logits_err_mean=float(np.mean(lerr)),
        logits_err_max=float(np.max(lerr)), greedy_agree=float(np.mean(agree)), attn_err_mean=float(np.mean(aerr)),
    )


def model_mode(args, client) -> List[Dict]:
    dtype = DTYPES[args.dtype]
    model = TinyLlama(TinyConfig(layers=args.layers))
    prompt = model.make_prompt(args.context, args.seed)
    t0 = time.perf_counter()
    with torch.no_grad():
        keys, values, x_last = model.prefill(prompt, dtype)
    print(f"prefill: {args.context} tokens, {args.layers} layers in {time.perf_counter() - t0:.1f} s (full attention, in process)")
    with torch.no_grad():
        tokens, ref_logits, ref_times = run_reference(model, keys, values, x_last, args, dtype)
        rows = [dict(policy="full KV", ms_per_token=1e3 * statistics.median(ref_times), logits_err_mean=0.0,
                     logits_err_max=0.0, greedy_agree=1.0, attn_err_mean=0.0)]
        for name in args.policies.split(","):
            rows.append(run_policy(name, client, model, keys, values, args, dtype, tokens, ref_logits))
            print(f"  {name} done", flush=True)
    cfg = model.cfg
    print(f"\nmodel: tiny Llama, {cfg.layers} layers, {cfg.q_heads} q heads / {cfg.kv_heads} KV heads x {cfg.head_dim}, "
          f"{args.dtype} KV; context {args.context}, {args.steps} decoded tokens (teacher-forced); "
          f"budget {args.budget} tokens + {args.sink} sink, page {args.page_tokens}")
    print(f"{'policy':<12} {'ms/token':>9} {'logits err mean':>16} {'max':>8} {'greedy agree':>13} {'attn err mean':>14}")
    for r in rows:
        print(f"{r['policy']:<12} {r['ms_per_token']:>9.2f} {r['logits_err_mean']:>16.4f} {r['logits_err_max']:>8.4f} "
              f"{r['greedy_agree']:>13.3f} {r['attn_err_mean']:>14.4f}")
    return rows


# -- KV-dump mode -----------------------------------------------------------------


def dump_mode(args, client) -> List[Dict]:
    d = Path(args.kv_dump)
    keys = torch.from_numpy(np.load(d / "keys.npy").astype(np.float16))
    values = torch.from_numpy(np.load(d / "values.npy").astype(np.float16))
    queries = torch.from_numpy(np.load(d / "queries.npy").astype(np.float32))
    if args.max_dump_tokens:
        keys, values = keys[:, :, : args.max_dump_tokens].contiguous(), values[:, :, : args.max_dump_tokens].contiguous()
    layers, kv_heads, tokens, head_dim = keys.shape
    steps, _, q_heads, _ = queries.shape
    rows = []
    for name in args.policies.split(","):
        kv = OffloadedKV(client, layers=layers, kv_heads=kv_heads, q_heads=q_heads, head_dim=head_dim,
                         dtype=torch.float16, budget_tokens=args.budget, sink_tokens=args.sink,
                         page_tokens=args.page_tokens, **POLICIES[name])
        errs, times = [], []
        with kv:
            kv.prefill(keys, values)
            for s in range(steps):
                for layer in range(layers):
                    q = queries[s, layer]
                    t0 = time.perf_counter()
                    o = kv.attend(layer, q)
                    times.append(time.perf_counter() - t0)
                    errs.append(rel(o, full_attention(q, keys[layer].float(), values[layer].float())))
        rows.append(dict(policy=name, ms_per_layer=1e3 * statistics.median(times),
                         attn_err_mean=float(np.mean(errs)), attn_err_max=float(np.max(errs))))
    print(f"\nKV dump {d}: {layers} layers, {kv_heads} KV heads, {q_heads} q heads x {head_dim}, {tokens} tokens, "
          f"{steps} steps; budget {args.budget} + {args.sink} sink")
    print(f"{'policy':<12} {'ms/layer':>9} {'attn err mean':>14} {'max':>8}")
    for r in rows:
        print(f"{r['policy']:<12} {r['ms_per_layer']:>9.2f} {r['attn_err_mean']:>14.4f} {r['attn_err_max']:>8.4f}")
    return rows


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    unknown = [p for p in args.policies.split(",") if p not in POLICIES]
    if unknown:
        sys.exit(f"decode_llama: unknown policy {unknown}; known: {', '.join(POLICIES)}")
    daemon = None
    if not args.socket:
        binary = find_binary(args.icecached)
        if binary is None:
            sys.exit("decode_llama: no icecached: pass --socket, --icecached, or set ICECACHE_ICECACHED")
        daemon = Daemon(binary)
    try:
        with icecache.Client(socket=args.socket or daemon.socket_path) as client:
            rows = dump_mode(args, client) if args.kv_dump else model_mode(args, client)
    finally:
        if daemon is not None:
            daemon.stop()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
