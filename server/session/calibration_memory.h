// Where the width calibrators of ended sessions settled, for the next session
// of the same tenant and model to start from (docs/architecture.md §5.1,
// "Calibration memory").
//
// A self-calibrating head (WidthCalibrator) starts at the default width and
// measures its first warmup_samples selections against the exact reference:
// at 32 layers x 8 KV heads that is 4096 exact scans in a session's first
// tokens, throttled by the sampler's CPU budget, while the width climbs to
// what the model needs. An inference server runs many sessions of one model;
// what one session's heads learnt is the best first guess for the next. When
// a session ends (dropped, expired or evicted) the manager remembers, per
// (layer group, KV head), the width, descent ranking and exact fallback of
// every head that has taken a sample, fell back to exact selection, or was
// itself seeded (WidthCalibrator::SeedOf). At model scale this matters
// most: the sampler's CPU budget (a share of the selection time) is shared
// by every head, so at 8 layers x 8 KV heads a 48-token session measured
// 51 samples for 64 heads (2972 over budget), and a head of a 32-layer
// model gets fewer still; one session never finishes a 16-sample warm-up,
// a chain of sessions adds up what each learnt. A new session seeds its fresh
// calibrators from that at its first selection: it starts at the learnt width and takes only
// `seeded_warmup_samples` warm-up samples to confirm it; after that the
// calibrator runs as usual, so a seed that does not fit this session's data
// is corrected by its samples like any width.
//
// The key is what decides the width a head needs short of the data itself:
// the tenant, the model's shape (layers, KV and query heads, head dim,
// dtype), the selector and its mdci parameters, the page size, layer reuse,
// the target mass ratio and default budget, and the context length's
// nearest power of two at the session's first selection (a 4k context needs
// a narrower width than a 128k one; a session is remembered under the
// context it started decoding at, which is what the next one looks up). Two models of the same
// shape in one tenant share an entry; their samples correct the seed. Kept in memory only (not in
// the snapshot: a warm restart keeps each session's own calibrator state), at most `max_keys`
// entries, the least recently used dropped first.
//
// Thread safety: thread-safe (one mutex, never held while calling out).
#ifndef ICECACHE_SERVER_SESSION_CALIBRATION_MEMORY_H_
#define ICECACHE_SERVER_SESSION_CALIBRATION_MEMORY_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "server/index/width_calibrator.h"
#include "server/session/session_types.h"

namespace icecache {

class Session;

// The memory's key for a session of `tenant` with `config` at `tokens`
// context tokens (see above). Printable, for logs and tests.
std::string CalibrationKey(std::string_view tenant, const SessionConfig& config, int64_t tokens);

class CalibrationMemory {
 public:
  // `max_keys` >= 1 entries kept; `seeded_warmup_samples` >= 0 warm-up
  // samples a seeded head still takes.
  CalibrationMemory(int max_keys, int seeded_warmup_samples)
      : max_keys_(max_keys < 1 ? 1 : max_keys),
        seeded_warmup_(seeded_warmup_samples < 0 ? 0 : seeded_warmup_samples) {}

  // Remembers what `s`'s calibrated heads learnt (heads with at least
  // `min_samples` (>= 1) samples, in exact mode, or seeded) under `s`'s key at the
  // context of its first selection. Nothing when no head learnt anything. Replaces an
  // entry of the same key (the latest session is the best guess).
  void Remember(const Session& s, int64_t min_samples) ABSL_LOCKS_EXCLUDED(mu_);

  // Seeds `s`'s fresh calibrators from the entry of `s`'s key at `tokens`
  // (WidthCalibrator::Seed); heads already counting selections (a restored
  // session) and heads the entry knows nothing of start as usual. Returns
  // the heads seeded.
  int Seed(Session& s, int64_t tokens) ABSL_LOCKS_EXCLUDED(mu_);

  size_t size() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct Entry {
    std::vector<std::optional<CalibratorSeed>> heads;  // [group * kv_heads + head]
    uint64_t used = 0;                                 // recency (use_clock_)
  };
  const int max_keys_;
  const int seeded_warmup_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, Entry> entries_ ABSL_GUARDED_BY(mu_);
  uint64_t use_clock_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace icecache

#endif  // ICECACHE_SERVER_SESSION_CALIBRATION_MEMORY_H_
