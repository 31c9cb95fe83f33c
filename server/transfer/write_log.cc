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

uint64_t WriteLog::Claim(uint64_t writer, uint64_t offset, uint64_t bytes, uint64_t* other_offset,
                         uint64_t* other_bytes) {
  absl::MutexLock l(&mu_);
  for (const InFlight& c : claims_) {
    if (c.range.writer != writer && RangesOverlap(c.range.offset, c.range.bytes, offset, bytes)) {
      *other_offset = c.range.offset;
      *other_bytes = c.range.bytes;
      return 0;
    }
  }
  const uint64_t id = next_claim_++;
  claims_.push_back(InFlight{id, Entry{writer, offset, bytes}});
  return id;
}

void WriteLog::Release(uint64_t id) {
  if (id == 0) return;
  absl::MutexLock l(&mu_);
  for (size_t i = 0; i < claims_.size(); ++i) {
    if (claims_[i].id == id) {
      claims_[i] = claims_.back();
      claims_.pop_back();
      return;
    }
  }
}

size_t WriteLog::claims_in_flight() const {
  absl::MutexLock l(&mu_);
  return claims_.size();
}

}  // namespace icecache
