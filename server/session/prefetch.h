// Layer-group prefetch, IceCache(r) (docs/architecture.md §5.2). With
// layer_reuse g > 1 the first layer's DecodeStep may ask for the group's
// later layers to be written in the background, at the places a fetch of
// the whole group would put them (layer j at offset + j x layer_stride; a
// paged KV cache: the same block ids in each layer's tensor). The client's
// DecodeStep for such a layer (reuse_group_selection, same buffer and
// offset or block ids) then waits only for that layer's completion flag.
//
// GroupPrefetch is the record of one such request: what is written where,
// and one state per layer. A layer moves kQueued -> kWriting -> kDone /
// kFailed on the prefetch worker, or kQueued -> kClaimed when the client's
// call for it arrives first (the call then writes it itself, as without
// prefetch), or kQueued -> kCancelled. A layer's bytes are reported written
// only once its write returned OK (kDone): a caller never gets a layout
// whose bytes are still being copied.
//
// Prefetcher runs the jobs on its own threads from a bounded queue; Post
// refuses (false) when `max_jobs` are queued, and the request then simply
// goes without prefetch.
//
// Thread safety: GroupPrefetch and Prefetcher are thread-safe. Their mutexes
// are leaves: no other lock is taken while holding one, and no caller holds
// a session lock while it waits in Take or Cancel (the writer of a layer
// may need the session's reader lock to finish it).
#ifndef ICECACHE_SERVER_SESSION_PREFETCH_H_
#define ICECACHE_SERVER_SESSION_PREFETCH_H_

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "server/session/session_types.h"
#include "server/transfer/gather.h"

namespace icecache {

class GroupPrefetch {
 public:
  enum class State { kQueued, kWriting, kDone, kFailed, kClaimed, kCancelled };

  // `request`: the fetch of the group's first layer as the step made it
  // (pages or tokens, buffer, offset, device); `layer_stride`: its layout's
  // layer_stride_bytes. Layers [first, first + count) are prefetched, layer
  // first + i at request.offset + (first + i - request.layer) x layer_stride.
  GroupPrefetch(int group, uint64_t generation, int64_t tokens, const FetchRequest& request,
                uint64_t layer_stride, int first, int count);

  const int group;
  const uint64_t generation;  // of the group's selection (Session::GroupSelection)
  const int64_t tokens;       // group tokens when it was made
  const int first_layer;
  const int num_layers;

  // The one-layer fetch that writes `layer` (positions always asked: the
  // consumer drops them when its call did not ask).
  FetchRequest RequestFor(int layer) const;
  // True when a call writing `layer` to this buffer at this offset (or these
  // block ids, with num_layers 1) is the one this record prefetches.
  bool Matches(int layer, const std::string& buffer_id, uint64_t offset,
               const std::vector<uint32_t>& block_ids) const;

  // Consumer. Waits while `layer` is being written, then: its layout when
  // it was written (kDone), or nullopt when it was not (claimed now if
  // still queued, so the worker skips it; the caller writes it itself).
  std::optional<FetchLayout> Take(int layer) ABSL_LOCKS_EXCLUDED(mu_);
  // Worker. BeginLayer: kQueued -> kWriting (false: skip this layer: claimed
  // or cancelled). EndLayer: the write's outcome.
  bool BeginLayer(int layer) ABSL_LOCKS_EXCLUDED(mu_);
  void EndLayer(int layer, absl::StatusOr<FetchLayout> written) ABSL_LOCKS_EXCLUDED(mu_);
  // No layer starts after this; waits for a layer being written to finish.
  void Cancel() ABSL_LOCKS_EXCLUDED(mu_);
  bool cancelled() const ABSL_LOCKS_EXCLUDED(mu_);
  State state(int layer) const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  bool NotWriting() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool LayerNotWriting(int i) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  struct LayerWait;

  const FetchRequest request_;  // the first layer's fetch
  const uint64_t layer_stride_;
  mutable absl::Mutex mu_;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<State> states_ ABSL_GUARDED_BY(mu_);         // [layer - first_layer]
  std::vector<FetchLayout> layouts_ ABSL_GUARDED_BY(mu_);  // kDone
};

// The counters behind PrefetchStats (session_types.h).
struct PrefetchCounters {
  std::atomic<uint64_t> started{0}, refused{0}, written{0}, used{0}, claimed{0}, discarded{0};
};

class Prefetcher {
 public:
  // threads >= 1, max_jobs >= 1 (InvalidArgument otherwise).
  static absl::StatusOr<std::unique_ptr<Prefetcher>> Create(int threads, int max_jobs);
  // Stops the threads after the jobs running now; queued jobs are dropped
  // without running (their layers stay kQueued: callers claim them).
  ~Prefetcher();
  Prefetcher(const Prefetcher&) = delete;
  Prefetcher& operator=(const Prefetcher&) = delete;

  // Queues `job`; false (not queued) when max_jobs are waiting.
  bool Post(std::function<void()> job) ABSL_LOCKS_EXCLUDED(mu_);
  // Jobs queued or running.
  int pending() const ABSL_LOCKS_EXCLUDED(mu_);
  // Waits until no job is queued or running (tests, benchmarks).
  void WaitIdle() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  Prefetcher(int max_jobs);
  void Loop() ABSL_LOCKS_EXCLUDED(mu_);
  bool HasWork() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool Idle() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const int max_jobs_;
  mutable absl::Mutex mu_;
  std::deque<std::function<void()>> queue_ ABSL_GUARDED_BY(mu_);
  int running_ ABSL_GUARDED_BY(mu_) = 0;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace icecache

#endif  // ICECACHE_SERVER_SESSION_PREFETCH_H_
