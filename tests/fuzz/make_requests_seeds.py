#!/usr/bin/env python3
"""Writes the seed corpus of fuzz_requests (tests/fuzz/requests_fuzz.cc).

Each seed is a short, valid client session: create a session, register the
1 MiB shm buffer "buf", append KV (inline and from the buffer), select,
fetch, decode (one step and a batch), the session verbs, set a quota, drop,
unregister. The fuzzer mutates from there into every RPC's bad inputs. Ids
of one byte name the n-th session / buffer made so far ("\\0" = the first).
Messages are encoded by protoc from text (no Python protobuf needed).

Run from the repository root: python3 tests/fuzz/make_requests_seeds.py
"""
import os
import struct
import subprocess

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
OUT = os.path.join(ROOT, "tests", "fuzz", "corpus", "requests")
OPS = {"create": 0, "append": 1, "select": 2, "fetch": 3, "decode": 4, "verb": 5,
       "register": 6, "unregister": 7, "quota": 8}
PROTOS = {"CreateSessionRequest": "session", "AppendKvRequest": "kv",
          "SelectPagesRequest": "kv", "FetchPagesRequest": "kv", "DecodeStepRequest": "kv",
          "PinSessionRequest": "admin", "SetQuotaRequest": "admin",
          "RegisterBufferRequest": "buffer", "UnregisterBufferRequest": "buffer"}


def encode(message, text):
    proto = "icecache/v1/%s.proto" % PROTOS[message]
    return subprocess.run(["protoc", "-I", os.path.join(ROOT, "proto"),
                           "--encode=icecache.v1." + message, proto],
                          input=text.encode(), capture_output=True, check=True).stdout


def esc(data):
    return "".join("\\%03o" % b for b in data)


def rec(op, message, text, verb=None):
    data = encode(message, text)
    if verb is not None:
        data += bytes([verb])  # SessionVerb picks by the last byte
    return bytes([OPS[op]]) + struct.pack("<H", len(data)) + data


def seed(name, kind, dtype="DTYPE_FLOAT16", esize=2):
    layers, kv, q, dim, n = 2, 2, 4, 16, 64
    out = [rec("create", "CreateSessionRequest",
               "config { model { layers: %d kv_heads: %d q_heads: %d head_dim: %d dtype: %s } "
               "page_tokens: 16 selector { kind: %s } }" % (layers, kv, q, dim, dtype, kind))]
    out.append(rec("register", "RegisterBufferRequest",
                   'host_shm { path: "buf" size: 1048576 }'))
    count = 2 * layers * kv * n * dim
    one = struct.pack("<H", 0x3C00) if esize == 2 else struct.pack("<f", 1.0)
    out.append(rec("append", "AppendKvRequest", 'session_id: "\\000" num_tokens: %d inline_kv: "%s"'
                   % (n, esc(one * count))))
    out.append(rec("append", "AppendKvRequest",
                   'session_id: "\\000" num_tokens: %d region { buffer_id: "\\000" offset: 4096 }'
                   % n))
    queries = esc(struct.pack("<f", 0.5) * (q * dim))
    out.append(rec("select", "SelectPagesRequest",
                   'session_id: "\\000" layer: 1 queries: "%s" '
                   "params { budget_tokens: 32 want_positions: true }" % queries))
    out.append(rec("fetch", "FetchPagesRequest",
                   'session_id: "\\000" layer: 0 buffer_id: "\\000" offset: 8192 '
                   "want_positions: true num_layers: 1 "
                   "heads { kv_head: 0 pages: [0, 1] } heads { kv_head: 1 pages: [0, 1] }"))
    out.append(rec("decode", "DecodeStepRequest",
                   'session_id: "\\000" layer: 0 queries: "%s" buffer_id: "\\000" '
                   "params { budget_tokens: 48 }" % queries))
    out.append(rec("decode", "DecodeStepRequest",
                   'layer: 1 buffer_id: "\\000" params { budget_tokens: 16 } '
                   'batch { session_id: "\\000" queries: "%s" } '
                   'batch { session_id: "\\000" queries: "%s" offset: 65536 }'
                   % (queries, queries)))
    for verb in (0, 1, 3, 4, 5, 6):  # get, keepalive, pin, evict, list, stats (2 = drop: last)
        out.append(rec("verb", "PinSessionRequest", 'session_id: "\\000" pinned: true', verb))
    out.append(rec("quota", "SetQuotaRequest", 'tenant: "alpha" quota_bytes: 1048576'))
    out.append(rec("verb", "PinSessionRequest", 'session_id: "\\000"', 2))
    out.append(rec("unregister", "UnregisterBufferRequest", 'buffer_id: "\\000"'))
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(b"".join(out))


def main():
    os.makedirs(OUT, exist_ok=True)
    seed("exact_f16", "SELECTOR_KIND_EXACT")
    seed("mdci_f16", "SELECTOR_KIND_MDCI")
    seed("quest_f32", "SELECTOR_KIND_QUEST", "DTYPE_FLOAT32", 4)
    seed("streaming_f16", "SELECTOR_KIND_STREAMING")
    # A CUDA IPC registration (no device here: its form is checked first).
    with open(os.path.join(OUT, "cuda_ipc"), "wb") as f:
        f.write(rec("register", "RegisterBufferRequest",
                    'cuda_ipc { handle: "%s" size: 1048576 device_uuid: "%s" }'
                    % (esc(b"\1" * 64), esc(bytes(range(16))))))


if __name__ == "__main__":
    main()
