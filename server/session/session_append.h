// Internal to icecache_session: the steps of one AppendKv, in order
// (docs/architecture.md, sessions):
//   CheckAppendInput  sizes and NaN/Inf, before any lock;
//   PlanAppend        first append: build every index aside; later appends:
//                     the worst-case page count per index;
//   (admission)       SessionManager::AdmitFrames reserves the frames;
//   ApplyToIndexes    later appends insert now that the frames are secured;
//                     first appends install the indexes built aside;
//   WriteRows         zeroed frames for the new pages, then K and V rows;
//   Publish           token count and the lock-free views.
// Nothing of the session changes before ApplyToIndexes, so every error of
// the earlier steps leaves it exactly as it was. The session's writer lock
// is held from PlanAppend to Publish.
#ifndef ICECACHE_SERVER_SESSION_SESSION_APPEND_H_
#define ICECACHE_SERVER_SESSION_SESSION_APPEND_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "server/index/selector.h"
#include "server/pool/page_pool.h"
#include "server/session/append_staging.h"
#include "server/session/session.h"

namespace icecache {

class DecodeLanes;

// The caller's bytes of one append of layers [first_layer, first_layer +
// num_layers), checked (layout in session_manager.h).
struct AppendInput {
  int64_t n = 0;
  int first_layer = 0;
  int num_layers = 0;
  absl::Span<const uint8_t> bytes;
  int kv_heads = 0;
  uint64_t row_bytes = 0;  // head_dim x dtype size
  uint64_t half = 0;       // bytes of the keys (the values follow)

  int end_layer() const { return first_layer + num_layers; }
  // `layer` is the model's layer number, in [first_layer, end_layer()).
  const uint8_t* key_row(int layer, int head, int64_t t) const {
    const uint64_t l = static_cast<uint64_t>(layer - first_layer);
    return bytes.data() + ((l * kv_heads + head) * n + t) * row_bytes;
  }
  const uint8_t* value_row(int layer, int head, int64_t t) const {
    return key_row(layer, head, t) + half;
  }
};

// InvalidArgument for n outside 1..max_append_tokens, a layer range that is
// not whole layer groups of the model, a byte count that is not
// AppendBytes(c, n, range), or a NaN/Inf key (naming layer, kv head, token).
// `values_clean`: the caller has already found every element clean
// (AppendBytesClean over all of `bytes`, e.g. block by block while copying
// them), so the scan is skipped; every other check stays.
absl::StatusOr<AppendInput> CheckAppendInput(const SessionConfig& c, int64_t max_append_tokens,
                                             int64_t n, LayerRange range,
                                             absl::Span<const uint8_t> bytes,
                                             bool values_clean = false);

// Whether `len` bytes at `p`, which lie `at` bytes into an append region
// whose first `half` bytes are keys, hold no element CheckAppendInput would
// refuse (NaN/Inf; keys of magnitude 2^59 or more). `at` and `len` are
// multiples of the element size. For a check of each block while it is
// copied and in cache; CheckAppendInput's own scan then names the element.
bool AppendBytesClean(DType dtype, uint64_t half, uint64_t at, const uint8_t* p, uint64_t len);

// The config of the session's selectors (every (layer group, KV head) index
// has the same): what appends build and a warm restart recreates.
SelectorConfig SelectorConfigOf(const Session& s);

// FailedPrecondition unless `in` is the next piece of the session's chunk:
// a new chunk starts at layer 0 and takes any n; a pending one continues at
// next_layer with the same n.
absl::Status CheckChunkOrder(const Session& s, const AppendInput& in)
    ABSL_SHARED_LOCKS_REQUIRED(s.mu);

// What an append will do to the (layer group, KV head) indexes of its layer
// range: plan index i is the session's index base + i.
struct AppendPlan {
  int64_t n = 0;       // tokens appended
  bool first = false;  // the groups were empty: indexes are built, not inserted into
  int base = 0;
  int num_indices = 0;
  int threads = 1;                                 // for the parallel steps
  std::vector<std::unique_ptr<Selector>> built;    // first append: the new indexes
  std::vector<std::vector<Placement>> placements;  // [i][token]
  std::vector<uint32_t> pages_before;              // [i]
  std::vector<uint64_t> max_new_pages;             // [i]: more is an index bug
  uint64_t reserve = 0;                            // frames to admit, all layers
  // Later appends run on threads: when set, their inserts and row writes run
  // on the decode lanes (a decode token's 256 inserts start within
  // microseconds instead of waking oneTBB's sleeping workers), else on
  // ParallelFor. Set by the caller after PlanAppend; null for first appends.
  DecodeLanes* lanes = nullptr;
};

// Slots [begin, end) of page `page` that an append leaves unwritten.
struct SlotRun {
  uint32_t page;
  uint32_t begin;
  uint32_t end;
};

// The runs of slots of the pages opened by an append (ids [pages_before,
// pages_now)) that none of `placements` names, page by page, ascending. A
// new frame holds its former owner's bytes until these are zeroed.
std::vector<SlotRun> UnwrittenSlots(const std::vector<Placement>& placements, uint32_t pages_before,
                                    uint32_t pages_now, int page_tokens);

// First append of the groups: builds their indexes aside (InvalidArgument or
// Internal from the index; the session is untouched), counting trees_built.
// Later appends: the worst case. Needs only the shared lock (appends are
// serialised by append_mu), so selects of other groups go on meanwhile.
// Builds run on `build_threads`; decode inserts large enough to gain from
// threads run on `decode_threads` (0: the process's shared oneTBB pool).
// `scratch` (may be null) lends the builds their fp32 keys.
absl::StatusOr<AppendPlan> PlanAppend(const Session& s, const AppendInput& in, int build_threads,
                                      int decode_threads, StagingCache* scratch)
    ABSL_SHARED_LOCKS_REQUIRED(s.mu);

// Later appends: inserts into every index. An index failure marks the session
// broken (Internal; FailedPrecondition afterwards). First appends: installs
// the indexes built aside.
absl::Status ApplyToIndexes(Session& s, const AppendInput& in, AppendPlan& plan)
    ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu);

// Gives every new page a frame of `reserved` (one per layer of its group),
// returns the surplus to the pool, then writes the K and V rows and zeroes
// the new pages' slots no row lands in (UnwrittenSlots), in parallel over
// the indexes.
// Returns the number of pages opened over all layers.
absl::StatusOr<uint64_t> WriteRows(Session& s, const AppendInput& in, const AppendPlan& plan,
                                   FrameSet reserved) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu);

// Counts the tokens in (the groups of the range; the session once the last
// layer of the chunk is in) and refreshes the lock-free views.
AppendResult Publish(Session& s, const AppendInput& in, uint64_t new_pages, absl::Time now)
    ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu);

// Background builds (docs/architecture.md §5). The first append of a range
// of tree-layout groups (mdci, exact-mdci) returns before its trees are
// built: under the writer lock the chunk is accepted and the groups are
// marked building (AcceptPendingBuild), with their worst-case frames already
// admitted (PlanBackgroundBuild); the manager's builder thread then builds
// the trees with no session lock held, installs them and writes the rows
// (RunPendingBuild). Selects, fetches and appends of a building group wait
// for it; other groups serve meanwhile.
struct PendingBuild {
  std::shared_ptr<Session> session;
  StagingBuffer bytes;  // the caller's bytes, owned; `in` points into them
  AppendInput in;
  AppendPlan plan;
  FrameSet frames;  // admitted for plan.reserve; the surplus returns after the build
  // Summed over the job's tree builds (BuildAside: fp32 conversion + Build),
  // each on its own thread's clocks: CPU time and minor page faults
  // (getrusage RUSAGE_THREAD). The daemon logs them per tree (index_build).
  std::atomic<int64_t> tree_cpu_ns{0};
  std::atomic<int64_t> tree_minor_faults{0};
  absl::Duration trees_wall;  // the parallel tree builds' wall time (RunPendingBuild)
};

// The append's groups are empty and tree-layout: build in the background.
bool BuildsInBackground(const Session& s, const AppendInput& in) ABSL_SHARED_LOCKS_REQUIRED(s.mu);
// The plan of a background build: indices, worst-case pages per index (a
// bound on what a bulk build can open) and the frames to admit.
AppendPlan PlanBackgroundBuild(const Session& s, const AppendInput& in)
    ABSL_SHARED_LOCKS_REQUIRED(s.mu);
// Marks the groups building and moves the chunk on; the answer of the call.
AppendResult AcceptPendingBuild(Session& s, const AppendInput& in, absl::Time now)
    ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu);
// Builds, installs and writes (builder thread). An index failure marks the
// session broken (FailedPrecondition on its next call); the groups are
// cleared either way, so nobody waits forever.
void RunPendingBuild(PendingBuild& job, int build_threads, StagingCache* scratch, absl::Time now)
    ABSL_LOCKS_EXCLUDED(job.session->mu);
// Stores the session's lock-free views (tokens, next layer, pages, pool and
// index bytes, decode keys) from what it holds now (after an append, a
// build or a restore).
void StoreViews(Session& s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu);

}  // namespace icecache

#endif  // ICECACHE_SERVER_SESSION_SESSION_APPEND_H_
