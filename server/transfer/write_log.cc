#include "server/transfer/write_log.h"

namespace icecache {

bool RangesOverlap(uint64_t a, uint64_t a_bytes, uint64_t b, uint64_t b_bytes) {
  if (a_bytes == 0 || b_bytes == 0) return false;
  return a < b ? b - a < a_bytes : a - b < b_bytes;
}

WriteLog::WriteLog() : ring_(kCapacity) {}

uint64_t WriteLog::Note(uint64_t writer, uint64_t offset, uint64_t bytes) {
  absl::MutexLock l(&mu_);
  const uint64_t stamp = next_++;
  ring_[stamp % kCapacity] = Entry{writer, offset, bytes};
  return stamp;
}

bool WriteLog::WrittenSince(uint64_t writer, uint64_t offset, uint64_t bytes,
                            uint64_t stamp) const {
  absl::MutexLock l(&mu_);
  if (stamp == 0 || stamp >= next_) return true;  // not a stamp of this log
  // Notes stamp + 1 .. next_ - 1 must all still be in the ring.
  if (next_ - 1 - stamp >= kCapacity) return true;
  for (uint64_t s = stamp + 1; s < next_; ++s) {
    const Entry& e = ring_[s % kCapacity];
    if (e.writer != writer && RangesOverlap(e.offset, e.bytes, offset, bytes)) return true;
  }
  return false;
}

}  // namespace icecache
