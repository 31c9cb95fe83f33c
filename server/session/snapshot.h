// Warm-restart snapshot (docs/architecture.md §5): what a daemon that drains
// for an upgrade writes next to its file-backed arena, so that the next
// daemon re-owns the sessions' frames and rebuilds their indexes without the
// clients sending their prefill again.
//
// File format, version 1 (little endian):
//   "ICECSNAP"  u32 version  u32 0  u64 json_bytes  json  u64 blob_bytes  blob
//   u64 XXH3-64 of every byte before it
// The JSON holds the daemon's epoch and capacity and, per session, its id,
// tenant, epoch, config (by field name: fields a newer daemon added take
// their defaults), token counts and chunk sizes, plus where its arrays sit
// in the blob: per (layer, KV head) the frame offsets and checksums of its
// pages; per (layer group, KV head) the slot (page x page_tokens + slot) of
// every token in position order; and, when the drain wrote index images
// (index_image_file.h), per (layer group, KV head) where its image sits in
// "icecached-indexes" and its XXH3-64 ("image_offsets", "image_bytes",
// "image_hashes"; a snapshot without them restores by replay), and the
// quality monitor's state per (layer group, KV head): the self-calibrated
// width, exact fallback, sampling schedule and tallies ("quality",
// snapshot_quality.h; a snapshot without it recovers the session with its
// calibration starting fresh).
//
// Written to "<path>.tmp" (0600, O_EXCL, O_NOFOLLOW), fsync'ed and renamed,
// so a reader sees a whole snapshot or none. Pure functions; thread-safe.
#ifndef ICECACHE_SERVER_SESSION_SNAPSHOT_H_
#define ICECACHE_SERVER_SESSION_SNAPSHOT_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/session/index_image_file.h"
#include "server/session/session_quality.h"
#include "server/session/session_types.h"

namespace icecache {

inline constexpr uint32_t kSnapshotVersion = 1;

struct SessionImage {
  std::string id;
  std::string tenant;
  uint64_t epoch = 0;  // the epoch the session was created in (kept across restarts)
  SessionConfig config;
  absl::Time created;
  int64_t tokens = 0;
  int next_layer = 0;
  int64_t pending_tokens = 0;
  std::vector<int64_t> chunks;        // tokens of every complete chunk, in order
  std::vector<int64_t> group_tokens;  // [group]
  // [layer * kv_heads + head][page]
  std::vector<std::vector<uint64_t>> frame_offsets;
  std::vector<std::vector<uint64_t>> checksums;
  // [group * kv_heads + head][position] -> page * page_tokens + slot
  std::vector<std::vector<uint32_t>> slots;
  // [group * kv_heads + head]: its index image (bytes 0: none), or empty
  // when the snapshot lists no images.
  std::vector<IndexImageRef> index_images;
  // The quality monitor's state (monitored sessions): saved by the drain.
  // Absent from an older daemon's snapshot or one of another state format:
  // quality_missing says which, and the calibration starts fresh. A state
  // the reader could not read: quality_error says why, and the session is
  // dropped (as for any other field out of range).
  std::optional<SessionQualityState> quality;
  std::string quality_missing, quality_error;
};

struct SnapshotImage {
  uint64_t daemon_epoch = 0;
  uint64_t capacity_bytes = 0;
  absl::Time written;
  std::vector<SessionImage> sessions;
};

// Writes `image` to `path` atomically. Internal/PermissionDenied naming the
// path and the failing call.
absl::Status WriteSnapshotFile(const SnapshotImage& image, const std::string& path);

// NotFound (no file), DataLoss (truncated, bad magic or checksum),
// FailedPrecondition (another version), InvalidArgument (a field out of
// range). Array sizes are bounded by the file's size before any allocation.
absl::StatusOr<SnapshotImage> ReadSnapshotFile(const std::string& path);

}  // namespace icecache

#endif  // ICECACHE_SERVER_SESSION_SNAPSHOT_H_
