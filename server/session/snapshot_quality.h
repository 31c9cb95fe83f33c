// Internal to icecache_session: the quality monitor's state in the warm
// restart snapshot (snapshot.h, docs/architecture.md §5), as the JSON object
// "quality" of a session:
//   {"format": 1, "samples_dropped", "samples_stale", "samples_reselected",
//    "calibration_cpu_ns", "selection_ns",
//    "heads": [{"samples", "sum_ratio", "sum_topk", "recent_ratio",
//               "last_ratio", "schedule": {...}, "calibrator": {...}}]}
// by field name, doubles written with enough digits to read back the same
// value (a restored width selects exactly as before). Another "format" is a
// state this daemon does not know: the session is recovered and its
// calibration starts fresh. Pure functions; thread-safe.
#ifndef ICECACHE_SERVER_SESSION_SNAPSHOT_QUALITY_H_
#define ICECACHE_SERVER_SESSION_SNAPSHOT_QUALITY_H_

#include <optional>
#include <string>

#include "common/json.h"
#include "server/session/session_quality.h"

namespace icecache {

inline constexpr int64_t kQualityStateFormat = 1;

Json QualityStateToJson(const SessionQualityState& q);

// What a session's "quality" object held.
struct QualityStateRead {
  std::optional<SessionQualityState> state;  // read (not yet range-checked)
  std::string missing;                       // no state: why (an older drain, another format)
  std::string error;                         // a field missing or of the wrong type: which
};
// `j`: the session's object; reads its "quality" member.
QualityStateRead QualityStateFromJson(const Json& session);

}  // namespace icecache

#endif  // ICECACHE_SERVER_SESSION_SNAPSHOT_QUALITY_H_
