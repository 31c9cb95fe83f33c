// What icecache-demo and icecache-bench-rpc share to drive a daemon: the
// synthetic model they prefill and decode (its KV, fp16 copy and session
// spec), the daemon they spawn or connect to, the size of a DecodeStep
// output buffer, and percentiles of their latencies.
//
// Values only; not thread-safe to mutate, const members may be read
// concurrently.
#ifndef ICECACHE_CLIENT_TOOL_SESSION_H_
#define ICECACHE_CLIENT_TOOL_SESSION_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "client/client.h"
#include "client/daemon_process.h"
#include "client/kv_check.h"
#include "common/kv_dump.h"

namespace icecache {

struct SyntheticModelOptions {
  std::string preset = "llama3-8b-like";  // common/synthetic.h
  int layers = 2;
  int64_t tokens = 4096;
  int steps = 8;                  // decode steps of queries generated
  std::optional<uint64_t> seed;   // unset: the preset's
  int page_tokens = 16;           // of the session
  std::string selector = "mdci";  // of the session (ParseSelectorType)
  absl::Duration ttl = absl::Seconds(600);
};

// A generated model and the float16 session that holds it.
struct SyntheticModel {
  KvDump dump;       // keys and values rounded to fp16 values (HostKv::FromDump), queries
  HostKv kv;         // the fp16 copy: what AppendKv sends and the daemon holds
  SessionSpec spec;  // float16, one tree per layer (layer_reuse 1)

  // The q_heads x head_dim queries of `layer` at decode step `step` (steps
  // past the dump's wrap around).
  absl::Span<const float> Queries(int step, int layer) const;
  // Bytes of a DecodeStep output buffer for one layer: every KV head's
  // budget plus sink tokens, rounded up by a page, K and V blocks.
  size_t FetchBytes(int budget_tokens, int sink_tokens) const;
};

// InvalidArgument for an unknown preset or selector, or a generator setting
// out of range.
absl::StatusOr<SyntheticModel> MakeSyntheticModel(const SyntheticModelOptions& options);

// A daemon the tool started (or none) and a client connected to it.
// Members are destroyed client first, then the daemon (which stops it).
struct DaemonConnection {
  std::unique_ptr<DaemonProcess> daemon;  // null when connecting to a running daemon
  std::unique_ptr<Client> client;
};

// With a non-empty `spawn_binary`, starts that icecached on a temporary
// socket and connects to it; otherwise connects with `options` as given
// (socket_path empty: $ICECACHE_SOCKET, else the default search order) and
// checks that a daemon answers there (UNAVAILABLE naming the target if not).
// Errors of DaemonProcess::Start or Client::Create.
absl::StatusOr<DaemonConnection> SpawnOrConnect(const std::string& spawn_binary,
                                                ClientOptions options);

// The p-quantile (p in [0, 1], nearest rank) of `v`; 0 for an empty `v`.
double Percentile(std::vector<double> v, double p);

}  // namespace icecache

#endif  // ICECACHE_CLIENT_TOOL_SESSION_H_
