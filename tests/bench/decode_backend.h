// The daemon `icecache-bench decode` drives, behind one interface with two
// implementations (docs/architecture.md §10):
//  - socket: an icecache::Client over the Unix socket to an icecached this
//    benchmark spawned (--spawn) or a running one (--socket);
//  - in-process: a SessionManager with its own pool and buffer registry in
//    this process: the same core calls the daemon's handlers make, without
//    gRPC.
// Both read appends from, and gather pages into, shared-memory files the
// benchmark maps (the staging and output buffers), so the bytes travel the
// same way. The types here are the benchmark's own (the client's and the
// core's views of a fetch layout share a name and cannot meet in one file).
//
// Thread safety: one thread drives a backend at a time.
#ifndef ICECACHE_TESTS_BENCH_DECODE_BACKEND_H_
#define ICECACHE_TESTS_BENCH_DECODE_BACKEND_H_

#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "tests/bench/process_cpu.h"

namespace icecache::bench {

// A session as the benchmark creates it: float16, the model's shape.
struct DecodeSessionSpec {
  int layers = 0, kv_heads = 0, q_heads = 0, head_dim = 0;
  int page_tokens = 16;
  std::string selector = "mdci";  // any name the daemon knows
  int layer_reuse = 1;
  // MdciParams::sketch_scoring (in-process only: the session API does not
  // carry it; the socket backend refuses it).
  bool mdci_sketch = false;
  // MdciParams::pq_factor (> 0: the product-quantised scan, with the
  // calibrator's method duel against the tree; 0: the tree).
  float mdci_pq = 0.0f;
  // MdciParams::carry_keep_factor (the carried selects' kept candidates;
  // < 0: the daemon's default).
  float mdci_carry_keep = -1.0f;
};

struct DecodeSelect {
  int budget_tokens = 256;
  int sink_tokens = 4;
  int recent_tokens = 64;
  bool reuse_group_selection = false;
  // On a group's first layer: the daemon writes the group's later layers in
  // the background (IceCache(r) prefetch; kv.proto prefetch_group).
  bool prefetch_group = false;
  // The layer's region holds the previous step's rows (kv.proto in_place).
  bool in_place = false;
};

// One KV head of a step: the pages selected and where they landed (the K
// block of page i of the step's first layer at k_offsets[i]; its V block
// page_tokens x head_dim elements later).
struct StepHead {
  std::vector<uint32_t> pages, fills;
  std::vector<int32_t> positions;  // sum(fills), slot by slot (the layout's order)
  std::vector<uint64_t> k_offsets;
};
struct StepOutcome {
  std::vector<StepHead> heads;
  bool reused = false;
  uint64_t layer_stride = 0;  // bytes of one layer's pages (the next layer's offset)
  int prefetching = 0;        // later layers the daemon is writing in the background
  bool prefetched = false;    // this layer was written by a prefetch before the call
  // DecodeStep only: the daemon's (or the core's) own wall time in the call,
  // selecting and gathering (kv.proto DecodeStepResponse.select_ns/gather_ns).
  double select_ms = 0, gather_ms = 0;
  double step_ms = 0;  // the whole call inside the session manager (step_ns)
  // Token granularity: rows copied, and rows left in place (in_place).
  uint64_t rows_copied = 0, rows_kept = 0;
};

// A session's online quality monitor (GetSession's quality), summed: what
// the self-calibrating width settled on per (layer group, KV head) and what
// the background references cost beside the selections.
struct MonitorSummary {
  bool monitored = false;
  int64_t samples = 0, dropped = 0;
  double selection_ms = 0;            // the session's selections, per head summed (wall)
  double reference_cpu_ms = 0;        // the sampler's reference scans (thread CPU)
  std::vector<double> widths;         // per (group, head): the width multiplier now
  std::vector<int64_t> head_samples;  // per (group, head): samples measured
  int exact_heads = 0;                // heads selecting exactly now (exact fallback)
  int64_t exact_selections = 0;
  double mean_mass_ratio = 0;  // over every sample
  int seeded_heads = 0;        // started from an earlier session's widths (calibration memory)
  int pooled_heads = 0;        // started from the session's pooled width (no sample of their own)
  double pool_width = 0;       // the session's pooled width at the end (0: no pool)
  // The candidate carry-over: heads carrying now (carry_steps > 0), heads it
  // was stopped on at least once, the selections that reused a fresh one's
  // candidates, and whether the session's pooled judgement has it stopped.
  // Whether the carry runs moves the select time by a third between runs.
  int carrying_heads = 0, carry_stopped_heads = 0;
  int64_t carried_selections = 0;
  bool carry_stopped = false;
  int carry_pool_steps = 0;  // the carry length the pooled judgement allows (0: none yet)
  int64_t carry_shortened = 0;
};

struct BatchItem {
  std::string session_id;
  absl::Span<const float> queries;
  uint64_t out_offset = 0;
};

class DecodeBackend {
 public:
  virtual ~DecodeBackend() = default;
  virtual const char* name() const = 0;  // "socket" or "in-process"

  // (Re)creates the staging buffer (appends are read from it) and the
  // output buffer (pages land there), each at least the given size.
  virtual absl::Status Reserve(size_t staging_bytes, size_t output_bytes) = 0;
  // Replaces a staging buffer larger than `bytes` by one of `bytes` (its
  // contents are lost): the companion's prefill-sized staging (512 MiB at
  // 4 layers x 32768 tokens) is not held through the measured prefill.
  virtual absl::Status ShrinkStaging(size_t bytes) = 0;
  virtual uint8_t* staging() = 0;
  virtual const uint8_t* output() const = 0;

  virtual absl::StatusOr<std::string> CreateSession(const DecodeSessionSpec& spec) = 0;
  // Appends `n` tokens of layers [first, first + count) (count 0: all, one
  // chunk) from the start of the staging buffer.
  virtual absl::Status Append(const std::string& id, int64_t n, int first, int count) = 0;
  // (trees built, trees in all) of the session's index.
  virtual absl::StatusOr<std::pair<int, int>> Trees(const std::string& id) = 0;
  // One layer: select and gather in one call (DecodeStep), positions asked.
  virtual absl::StatusOr<StepOutcome> DecodeStep(const std::string& id, int layer,
                                                 absl::Span<const float> queries,
                                                 uint64_t out_offset,
                                                 const DecodeSelect& select) = 0;
  // The same in two calls (SelectPages, then FetchPages of those pages),
  // with the time of each, to split a step's cost.
  virtual absl::StatusOr<StepOutcome> SelectThenFetch(const std::string& id, int layer,
                                                      absl::Span<const float> queries,
                                                      uint64_t out_offset,
                                                      const DecodeSelect& select, double* select_ms,
                                                      double* fetch_ms) = 0;
  // One layer for several sessions in one request; the first error of an
  // entry fails the call.
  virtual absl::Status DecodeBatch(int layer, absl::Span<const BatchItem> items,
                                   const DecodeSelect& select) = 0;
  virtual absl::Status Drop(const std::string& id) = 0;
  // The session's quality monitor (monitored false when it has none).
  virtual absl::StatusOr<MonitorSummary> Monitor(const std::string& id) = 0;
  // The CPU time (user + system, seconds) the daemon process has used so
  // far: where the time of a prefill or a step went (a slow run that used
  // more CPU did more work or ran slower per instruction; one that used less
  // waited). NaN where it cannot be read: a daemon this process did not
  // spawn, or the in-process backend (whose time is this process's own).
  // `system` is the kernel's part of it (page faults, system calls).
  virtual CpuTimes DaemonCpu() const {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    return {nan, nan};
  }
};

// Spawns `spawn_binary` (when not empty) with a pool of `capacity_bytes`, or
// connects to `socket` (empty: the default search order) and checks that a
// daemon answers.
// `spawn_config` is appended to the spawned daemon's config (textproto).
// `ring_spin`: the client's ClientOptions::decode_ring_spin (negative: its
// default).
absl::StatusOr<std::unique_ptr<DecodeBackend>> MakeSocketBackend(
    const std::string& spawn_binary, const std::string& socket, uint64_t capacity_bytes,
    const std::string& spawn_config = "", absl::Duration ring_spin = -absl::InfiniteDuration());
// `quality`: the online quality monitor and self-calibrating width on, as
// icecached's default config has them.
absl::StatusOr<std::unique_ptr<DecodeBackend>> MakeInProcessBackend(uint64_t capacity_bytes,
                                                                    bool quality = true);
// A second socket backend on the daemon of `socket_backend` (one that
// MakeSocketBackend made; it must outlive the twin), whose client keeps
// DecodeStep on the gRPC stream (ClientOptions.decode_ring off), while
// MakeSocketBackend's client uses the shared-memory ring.
absl::StatusOr<std::unique_ptr<DecodeBackend>> MakeStreamTwin(DecodeBackend& socket_backend);

}  // namespace icecache::bench

#endif  // ICECACHE_TESTS_BENCH_DECODE_BACKEND_H_
