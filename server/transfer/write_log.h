// What the daemon wrote into one registered buffer lately, and by whom
// (docs/architecture.md §6.5). In-place token writes (kv.proto
// DecodeStepRequest.in_place) keep a layer's rows in its region from one
// step to the next; the session's own record says what it left there, but
// another session writing into the same buffer (an engine that hands a
// batch slot's region to another sequence) would leave other rows in those
// slots. Every daemon write into a buffer is noted here first, with its
// writer, so a session can ask whether anyone else wrote over its region
// since its own write.
//
// A bounded ring of the last kCapacity notes: when the notes since a stamp
// no longer fit, WrittenSince answers true (the caller then writes in full),
// so it is never wrong in the unsafe direction.
//
// Writes in flight: a session's write claims its bytes for as long as it
// runs (Claim / Release), and a claim that overlaps another writer's claim
// in flight is refused. Handing a region from one session to the next is
// fine (the notes above tell the next one); two sessions writing the same
// bytes at once would leave the client a mix of both.
//
// Thread safety: thread-safe; the mutex is a leaf.
#ifndef ICECACHE_SERVER_TRANSFER_WRITE_LOG_H_
#define ICECACHE_SERVER_TRANSFER_WRITE_LOG_H_

#include <cstdint>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace icecache {

// [a, a + a_bytes) and [b, b + b_bytes) share a byte (overflow safe; an
// empty range overlaps nothing).
bool RangesOverlap(uint64_t a, uint64_t a_bytes, uint64_t b, uint64_t b_bytes);

class WriteLog {
 public:
  static constexpr size_t kCapacity = 1024;
  // Writer 0: a write of no session (the decode ring's responses).
  static constexpr uint64_t kNoWriter = 0;

  WriteLog();

  // Notes a write of [offset, offset + bytes) by `writer`, about to happen
  // (a write that fails midway has still changed bytes). Returns its stamp:
  // stamps increase by one per note, from 1.
  uint64_t Note(uint64_t writer, uint64_t offset, uint64_t bytes) ABSL_LOCKS_EXCLUDED(mu_);
  // True when a write by a writer other than `writer`, noted after `stamp`,
  // may overlap [offset, offset + bytes); also when the notes after `stamp`
  // are no longer all held, or `stamp` was never given.
  bool WrittenSince(uint64_t writer, uint64_t offset, uint64_t bytes, uint64_t stamp) const
      ABSL_LOCKS_EXCLUDED(mu_);
  // Claims [offset, offset + bytes) for a write by `writer` about to run.
  // Returns the claim's id (> 0), or 0 when a claim in flight of another
  // writer overlaps it (the first such one's range in *other_offset /
  // *other_bytes). An empty range claims no bytes and is never refused.
  uint64_t Claim(uint64_t writer, uint64_t offset, uint64_t bytes, uint64_t* other_offset,
                 uint64_t* other_bytes) ABSL_LOCKS_EXCLUDED(mu_);
  // Ends claim `id` (from Claim; 0 and unknown ids are ignored).
  void Release(uint64_t id) ABSL_LOCKS_EXCLUDED(mu_);
  size_t claims_in_flight() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct Entry {
    uint64_t writer = 0;
    uint64_t offset = 0;
    uint64_t bytes = 0;
  };
  struct InFlight {
    uint64_t id = 0;
    Entry range;
  };
  mutable absl::Mutex mu_;
  uint64_t next_ ABSL_GUARDED_BY(mu_) = 1;        // the next note's stamp
  std::vector<Entry> ring_ ABSL_GUARDED_BY(mu_);  // [kCapacity], stamp s at s % kCapacity
  uint64_t next_claim_ ABSL_GUARDED_BY(mu_) = 1;
  std::vector<InFlight> claims_ ABSL_GUARDED_BY(mu_);  // a few: the writes running now
};

}  // namespace icecache

#endif  // ICECACHE_SERVER_TRANSFER_WRITE_LOG_H_
