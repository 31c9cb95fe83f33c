#include "server/session/resident_rows.h"

#include <algorithm>
#include <utility>

#include "server/transfer/write_log.h"

namespace icecache {

ResidentRows::ResidentRows(int layers)
    : layers_(std::max(layers, 0)), by_layer_(static_cast<size_t>(layers_)) {}

void ResidentRows::DropOverlapping(std::string_view buffer_id, uint64_t offset, uint64_t bytes) {
  for (std::optional<ResidentRegion>& r : by_layer_) {
    if (r.has_value() && r->buffer_id == buffer_id &&
        RangesOverlap(r->offset, r->bytes, offset, bytes)) {
      r.reset();
    }
  }
}

std::optional<ResidentRegion> ResidentRows::TakeForWrite(int layer, std::string_view buffer_id,
                                                         uint64_t offset, uint64_t bytes,
                                                         int num_layers) {
  absl::MutexLock l(&mu_);
  std::optional<ResidentRegion> mine;
  if (layer >= 0 && layer < layers()) {
    std::optional<ResidentRegion>& r = by_layer_[layer];
    if (r.has_value() && r->buffer_id == buffer_id && r->offset == offset &&
        r->num_layers == num_layers) {
      mine = std::move(r);
    }
    r.reset();
  }
  DropOverlapping(buffer_id, offset, bytes);
  return mine;
}

void ResidentRows::Overwritten(std::string_view buffer_id, uint64_t offset, uint64_t bytes) {
  absl::MutexLock l(&mu_);
  DropOverlapping(buffer_id, offset, bytes);
}

void ResidentRows::Put(int layer, ResidentRegion region) {
  absl::MutexLock l(&mu_);
  if (layer < 0 || layer >= layers()) return;
  // A write of another layer since may have covered these bytes; its own
  // TakeForWrite dropped this layer's older record, and this one is newer.
  DropOverlapping(region.buffer_id, region.offset, region.bytes);
  by_layer_[layer] = std::move(region);
}

InPlacePlan PlanInPlace(absl::Span<const int32_t> previous, absl::Span<const int32_t> selected) {
  const size_t n = selected.size();
  InPlacePlan plan;
  plan.slots.assign(n, -1);
  // Position -> slot of the previous write, in an open-addressing table of
  // at least four times its size (a sort of both lists cost more than the
  // copies it saved): positions and slots in two 32-bit arrays, so a probe
  // reads 4-byte keys from a table of a few KiB, and short probe runs. An
  // entry found is consumed (its slot marked, its key kept so probing goes
  // on past it), so a position listed twice is kept once. 0.7x the time of
  // one table of 8-byte entries at twice the size, the same plan.
  constexpr uint32_t kEmpty = ~uint32_t{0};
  constexpr uint32_t kTaken = kEmpty - 1;
  thread_local std::vector<uint32_t> keys, vals;  // position, slot (or kEmpty / kTaken)
  thread_local std::vector<uint32_t> pending;
  int bits = 4;
  while ((size_t{1} << bits) < 4 * previous.size()) ++bits;
  const uint32_t mask = (uint32_t{1} << bits) - 1;
  vals.assign(size_t{1} << bits, kEmpty);
  keys.resize(size_t{1} << bits);
  const auto home = [bits](int32_t pos) {
    return static_cast<uint32_t>((static_cast<uint32_t>(pos) * 2654435761u) >> (32 - bits));
  };
  for (size_t s = 0; s < previous.size(); ++s) {
    uint32_t i = home(previous[s]);
    while (vals[i] != kEmpty) i = (i + 1) & mask;
    keys[i] = static_cast<uint32_t>(previous[s]);
    vals[i] = static_cast<uint32_t>(s);
  }
  pending.clear();
  for (size_t k = 0; k < n; ++k) {
    const int32_t pos = selected[k];
    const uint32_t key = static_cast<uint32_t>(pos);
    uint32_t i = home(pos);
    while (vals[i] != kEmpty && (vals[i] == kTaken || keys[i] != key)) i = (i + 1) & mask;
    const uint32_t found = vals[i];         // kEmpty: not there
    if (found != kEmpty) vals[i] = kTaken;  // consumed, inside the block or past it
    if (found < n) {
      plan.slots[found] = pos;
    } else {
      pending.push_back(static_cast<uint32_t>(k));
    }
  }
  // The others, in selection order, into the free slots, lowest first
  // (there are as many free slots as tokens pending).
  size_t next = 0;
  plan.copy_index.reserve(pending.size());
  plan.copy_slot.reserve(pending.size());
  for (size_t slot = 0; slot < n && next < pending.size(); ++slot) {
    if (plan.slots[slot] != -1) continue;
    plan.slots[slot] = selected[pending[next]];
    plan.copy_index.push_back(pending[next]);
    plan.copy_slot.push_back(static_cast<uint32_t>(slot));
    ++next;
  }
  return plan;
}

}  // namespace icecache
