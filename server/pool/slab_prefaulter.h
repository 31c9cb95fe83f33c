// SlabPrefaulter: a thread that keeps the next slabs of a PagePool faulted
// in ahead of the allocations that carve them (docs/architecture.md §4).
//
// Why: carving a slab writes a free-list node into each of its frames, so the
// first allocation of a fresh slab takes the kernel's zeroing of 2 MiB (and,
// in a VM whose memory the host backs lazily, the host's faults too: 6 ms
// idle, 25-50 ms under load on the 2-core machine) on the decode append that
// needs it: that was the p99 of decode appends (docs/bench/build_append.md).
// A timer alone fell behind: mdci decode appends of 32 (layer, head) indexes
// carve a slab every ~45 steps. The thread wakes on every carve
// (PagePool::WaitForCarve) and every `interval`, and calls
// PrefaultAhead(slabs); the appends pay only a condition-variable signal per
// slab carved.
//
// Thread safety: construct and destroy from one thread; the pool must
// outlive the prefaulter. The destructor stops and joins the thread.
#ifndef ICECACHE_SERVER_POOL_SLAB_PREFAULTER_H_
#define ICECACHE_SERVER_POOL_SLAB_PREFAULTER_H_

#include <atomic>
#include <cstdint>
#include <thread>

#include "absl/time/time.h"
#include "server/pool/page_pool.h"

namespace icecache {

class SlabPrefaulter {
 public:
  // Starts the thread: PrefaultAhead(slabs) at once, then after every carve
  // and every `interval` (which also returns slabs that left the head of the
  // line, PrefaultAhead). slabs > 0, interval > 0.
  SlabPrefaulter(PagePool* pool, uint64_t slabs, absl::Duration interval);
  ~SlabPrefaulter();
  SlabPrefaulter(const SlabPrefaulter&) = delete;
  SlabPrefaulter& operator=(const SlabPrefaulter&) = delete;

  // PrefaultAhead calls made so far (tests, stats).
  uint64_t rounds() const { return rounds_.load(); }

 private:
  void Loop();

  PagePool* const pool_;
  const uint64_t slabs_;
  const absl::Duration interval_;
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> rounds_{0};
  std::thread thread_;  // last: started once the fields above are set
};

}  // namespace icecache

#endif  // ICECACHE_SERVER_POOL_SLAB_PREFAULTER_H_
