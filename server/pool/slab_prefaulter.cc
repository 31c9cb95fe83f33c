#include "server/pool/slab_prefaulter.h"

namespace icecache {

SlabPrefaulter::SlabPrefaulter(PagePool* pool, uint64_t slabs, absl::Duration interval)
    : pool_(pool), slabs_(slabs), interval_(interval), thread_([this] { Loop(); }) {}

SlabPrefaulter::~SlabPrefaulter() {
  stop_.store(true);
  pool_->WakeCarveWaiters();
  thread_.join();
}

void SlabPrefaulter::Loop() {
  uint64_t seen = pool_->slabs_carved();
  while (!stop_.load()) {
    pool_->PrefaultAhead(slabs_);
    rounds_.fetch_add(1);
    // A carve during the PrefaultAhead above is seen here at once.
    seen = pool_->WaitForCarve(seen, &stop_, interval_);
  }
}

}  // namespace icecache
