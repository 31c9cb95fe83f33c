// One DecodeStep message, handled the same way whichever path brought it:
// the gRPC stream (services.cc) or a shared-memory ring (decode_ring.h).
// Validate, convert, one SessionManager call (DecodeStep, or DecodeBatch for
// a batched request), convert back (docs/architecture.md §7, §8.1).
//
// Also the small request checks the KvService handlers share.
//
// Thread safety: the functions are thread-safe; a DecodeCursor belongs to
// one stream or ring and is used by one thread at a time.
#ifndef ICECACHE_SERVER_RPC_DECODE_STEP_H_
#define ICECACHE_SERVER_RPC_DECODE_STEP_H_

#include <chrono>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/caller.h"
#include "icecache/v1/kv.pb.h"
#include "server/rpc/services.h"

namespace icecache::rpc {

// Seconds since t0 on the steady clock (the handlers' latency histograms).
inline double SecondsSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// InvalidArgument "<field> is required" / "... is longer than 256 bytes".
absl::Status RequireId(absl::string_view id, absl::string_view field);
// num_layers of a request: 0 means 1; InvalidArgument above 4096.
absl::StatusOr<int> LayerCount(uint32_t n);
// InvalidArgument above 2^20 (the core checks against the session's layers).
absl::StatusOr<int> LayerIndex(uint32_t layer);

// What carries over between the messages of one stream or ring.
struct DecodeCursor {
  std::string session_id;  // the last named (a ring starts with its own)
  std::string buffer_id;   // the last named
  int64_t index = 0;       // messages handled so far
};

// Handles one DecodeStep message into `resp` (cleared first). Updates the
// cursor with the names the request carries. Errors: those of
// SessionManager::DecodeStep / DecodeBatch and of the conversions, and
// InvalidArgument naming the message index when no session or buffer has
// been named yet. A batched request answers every entry in `resp`, each with
// its own code; only errors of the request itself are returned.
absl::Status HandleDecodeMessage(const ServiceDeps& deps, const Caller& caller,
                                 const v1::DecodeStepRequest& req, DecodeCursor* cursor,
                                 v1::DecodeStepResponse* resp);

}  // namespace icecache::rpc

#endif  // ICECACHE_SERVER_RPC_DECODE_STEP_H_
