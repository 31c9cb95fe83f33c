// `icecache-bench decode`: the end-to-end decode benchmark (docs/architecture.md
// §10). A model of the Llama-3.1-8B shape from the synthetic generator is
// prefilled into a daemon (over the socket, or the core in-process) once per
// policy; then every decode step appends the new token, selects and gathers
// each layer's pages, and computes attention on the CPU from the fetched
// pages (fp32 accumulation: the stand-in for the GPU). Figures per policy:
// TT2T (prefill: KV ingest + index builds, then the first decode step) and
// TPOT split into append, select, gather, RPC and attention; quality per
// layer (attention-mass recall and output error against full attention).
//
// The split of a step: select and gather are timed on an in-process
// companion session holding the first `reference_layers` layers of the same
// model, driven in the same step loop as the measured session (same data,
// queries and token count, interleaved); RPC is what the measured DecodeStep
// calls took beyond them. The per-message RPC cost is the median of paired
// differences (socket DecodeStep - in-process DecodeStep, same layer, same
// step).
#ifndef ICECACHE_TESTS_BENCH_DECODE_BENCH_H_
#define ICECACHE_TESTS_BENCH_DECODE_BENCH_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/json.h"
#include "server/index/selector.h"

namespace icecache::bench {

// A policy by name: "full" (attention over every token, no offload),
// "exact-token" (the oracle: the best budget tokens by true attention), or a
// selector the daemon knows ("mdci", "exact", "quest", "streaming", ...),
// optionally with layer reuse "-r<k>" ("mdci-r4": one selection per group of
// 4 layers, IceCache(r)) and then "+pf" ("mdci-r4+pf": the daemon writes
// each group's later layers in the background after its first layer's
// selection; docs/architecture.md §5.2) and/or "+ip" ("mdci-r4+ip": only
// the rows that changed since the previous step are written, into a region
// per layer; kv.proto DecodeStepRequest.in_place).
struct DecodePolicy {
  enum class Kind { kFull, kExactToken, kSelector };
  Kind kind = Kind::kSelector;
  std::string name;      // as given
  std::string selector;  // kSelector
  int layer_reuse = 1;
  bool prefetch = false;  // "+pf"
  // "+ip" (before or after "+pf"): in-place writes (kv.proto
  // DecodeStepRequest.in_place), each layer with its own region of the
  // output buffer kept between steps.
  bool in_place = false;
};
// InvalidArgument naming the policy for a malformed one ("mdci-r0").
absl::StatusOr<DecodePolicy> ParseDecodePolicy(const std::string& name);

struct DecodeBenchOptions {
  std::string mode = "socket";  // "socket" or "in-process"
  std::string spawn;            // icecached to start (socket mode)
  std::string socket;           // a running daemon (socket mode, no spawn)
  std::string daemon_config;    // --spawn: textproto appended to its config
  int ring_spin_us = -1;        // the client's decode_ring_spin; -1: its default
  std::string preset = "llama3-8b-like";
  uint64_t seed = 42;
  int layers = 32;  // the model's; per-token figures are scaled to it
  std::vector<int64_t> contexts = {32768};
  int steps = 8;  // decode steps per policy (the first is part of TT2T)
  std::vector<int> batch = {1};
  std::string batch_policy = "mdci";
  int batch_layers = 4;
  std::vector<std::string> policies = {"full",    "exact-token", "mdci",      "mdci-r2",
                                       "mdci-r4", "quest",       "streaming", "exact"};
  int budget = 256;  // the daemon's default session budget (sessions.default_budget_tokens)
  int sink_tokens = 4;
  int recent_tokens = 64;
  int page_tokens = 16;
  int reference_layers = 4;  // of the in-process companion (a multiple of every -r<k>)
  // Layers whose quality is measured (DecodeModel quality_layers, evenly
  // spaced): the process keeps their KV (128 MiB per layer at 32768 tokens);
  // every other layer's KV is generated when it is streamed, then dropped.
  int quality_layers = 4;
  // --spawn: the daemon faults its pool in at start (pool.prefault), and the
  // pool is sized to the KV it will hold (plus slack) instead of 1.5x.
  bool daemon_prefault = false;
  // The in-process companion runs the online quality monitor (mdci at its
  // own self-calibrated width). Off (default): mdci's fixed width, as before
  // branch sel8. The main table's split comes from the measured backend's
  // own times (DecodeStep select_ns / gather_ns) either way; --mode
  // in-process runs the monitor as icecached does.
  bool companion_quality = false;
  // "+ip" policies write in place on odd steps only and whole on even ones,
  // into the same regions: the two gathers measured interleaved.
  bool in_place_ab = false;
  // "+pf" policies prefetch on odd steps only and not on even ones: on and
  // off measured interleaved on one session. Off (default): every step, as
  // an engine would run IceCache(r).
  bool prefetch_ab = false;
  // mdci sessions rank candidate pages from the int8 sketch
  // (MdciParams::sketch_scoring); --mode in-process only.
  bool mdci_sketch = false;
  // mdci sessions' MdciParams::pq_factor (0: the tree only).
  float mdci_pq = MdciParams::kDefaultPqFactor;  // the daemon's default
  // mdci sessions' MdciParams::carry_keep_factor (0: carry every candidate;
  // < 0: the daemon's default).
  float mdci_carry_keep = -1.0f;
  // KV bytes (GiB) the run may hold at once: the daemon's, this process's
  // companion and quality layers. Above it a context runs with fewer layers
  // (its per-token figures scaled to `layers` and marked "scaled").
  double memory_gib = 12.0;
  // "on": generate each context's prefill once, hold it (fp16, 4 GiB at 32
  // layers x 32768 tokens) and stream it as a client holding its KV would,
  // the next chunk sent while the last one's trees build (TT2T then counts
  // the copies into the staging buffer, and no generation); every policy
  // reuses it. "off": generate each chunk before it is sent, untimed, and
  // wait for its trees before the next (no overlap: an upper bound). "auto"
  // (default): "on" where the daemon's KV and the held copy fit memory_gib.
  std::string hold_prefill = "auto";
  std::string json, plot;
  bool progress = true;
  // Only the per-message RPC cost, ring and stream against in-process
  // (decode_rpc_overhead.h); contexts[0] tokens, the selector policies.
  bool rpc_overhead = false;
};

// Runs every context and policy; prints the tables to stdout, writes --json
// (atomically, only on success) and --plot. Errors of the backend, the
// generator or the output files.
absl::Status RunDecodeBench(const DecodeBenchOptions& options);

// --ring-spin-us as a duration (negative: the client's default).
inline absl::Duration RingSpin(const DecodeBenchOptions& o) {
  return o.ring_spin_us < 0 ? -absl::InfiniteDuration() : absl::Microseconds(o.ring_spin_us);
}

}  // namespace icecache::bench

#endif  // ICECACHE_TESTS_BENCH_DECODE_BENCH_H_
