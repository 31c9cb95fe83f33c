// In-place token writes (kv.proto DecodeStepRequest.in_place): what a
// session's token-granular writes left in its clients' buffers, and how the
// next write of the same layer into the same place reuses it.
//
// Consecutive decode steps select mostly the same tokens (a head's query
// moves little from one token to the next: 75-77% of the rows at 32768
// tokens on the generator's llama3-8b-like shape,
// docs/bench/inplace14_gather.md). A client
// that keeps each layer's region of its buffer between steps (a GPU-side
// working set, or a host buffer per layer) can ask the daemon to write only
// the rows that changed: the tokens selected now and not last time go into
// the slots of the tokens that left; the others stay where they are. The
// answer's layout lists the positions in slot order, as always for token
// granularity, so the client's attention reads the rows as they now lie.
//
// ResidentRows keeps, per layer of a session, the record of the last token
// write: the buffer, its offset, how many layers it covered, each KV head's
// block offset and the position in each of its slots. A record is dropped
// before any write that may overlap its bytes (by the session's own token
// or page writes) and written again once a token write has succeeded, so a
// failed or partial write never leaves a record behind. A write that finds
// no matching record (first step, another offset, a head whose block moved)
// writes in full. What the daemon cannot see is the client's own use of its
// buffer: in_place is the client's statement that the region is as the
// daemon left it.
//
// Thread safety: ResidentRows is thread-safe; its mutex is a leaf.
#ifndef ICECACHE_SERVER_SESSION_RESIDENT_ROWS_H_
#define ICECACHE_SERVER_SESSION_RESIDENT_ROWS_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"

namespace icecache {

// One token write's place and contents.
struct ResidentRegion {
  std::string buffer_id;
  uint64_t offset = 0;  // the write's first byte (FetchRequest::offset)
  uint64_t bytes = 0;   // bytes it covers from offset (every layer)
  int num_layers = 1;
  // The buffer's write-log stamp of this write (write_log.h): a write by
  // anyone else over these bytes after it voids the record.
  uint64_t stamp = 0;
  std::vector<uint64_t> head_offsets;       // per KV head: its block's offset (first layer)
  std::vector<std::vector<int32_t>> slots;  // per KV head: the position in each slot
};

class ResidentRows {
 public:
  explicit ResidentRows(int layers);

  // Before a write of `bytes` from `offset` of `buffer_id` for layers
  // [layer, layer + num_layers): drops every record whose bytes it may
  // overlap, and returns `layer`'s record if it is for exactly this place
  // (same buffer, offset and layer count), else nullopt.
  std::optional<ResidentRegion> TakeForWrite(int layer, std::string_view buffer_id, uint64_t offset,
                                             uint64_t bytes, int num_layers);
  // Drops every record overlapping [offset, offset + bytes) of `buffer_id`
  // (a page write there).
  void Overwritten(std::string_view buffer_id, uint64_t offset, uint64_t bytes);
  // After a token write of `layer` succeeded: its record.
  void Put(int layer, ResidentRegion region);

  int layers() const { return layers_; }

 private:
  void DropOverlapping(std::string_view buffer_id, uint64_t offset, uint64_t bytes)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const int layers_;
  absl::Mutex mu_;
  std::vector<std::optional<ResidentRegion>> by_layer_ ABSL_GUARDED_BY(mu_);  // [layers_]
};

// How one KV head's block is rewritten in place: `slots` (the positions,
// slot by slot, after the write) and which of the selected tokens are copied
// where (copy_index[i], an index into `selected`, goes to slot
// copy_slot[i]; in increasing slot order). A token selected before keeps
// its slot if that slot is still inside the block (< selected.size());
// every other selected token takes a free slot, lowest first, in selection
// order. `previous`: the positions in the block's slots now (distinct, as a
// write leaves them); a position listed twice in `selected` keeps one slot
// and is copied into another.
struct InPlacePlan {
  std::vector<int32_t> slots;
  std::vector<uint32_t> copy_index;
  std::vector<uint32_t> copy_slot;
};
InPlacePlan PlanInPlace(absl::Span<const int32_t> previous, absl::Span<const int32_t> selected);

}  // namespace icecache

#endif  // ICECACHE_SERVER_SESSION_RESIDENT_ROWS_H_
