// One tenant's share of icecache-load (tests/load/load_main.cc): worker
// threads, each with its own sessions, decode streams and shm buffers on
// one Client, running mixed appends (inline and from a buffer), decode
// steps, explicit select + fetch and deliberately bad requests until a
// deadline. Every fetched page is checked byte for byte against what was
// appended (VerifyFetch); every bad request must get its precise code.
//
// Thread safety: RunTenant runs its threads itself and returns when all
// are done; the result is plain data.
#ifndef ICECACHE_TESTS_LOAD_LOAD_WORKER_H_
#define ICECACHE_TESTS_LOAD_LOAD_WORKER_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "common/json.h"

namespace icecache::load {

struct TenantOptions {
  std::string socket_path;
  int workers = 2;   // threads, one Client shared by them
  int sessions = 2;  // live sessions per worker (one stream each)
  int layers = 2;    // session shape: small preset, GQA 2:1
  int kv_heads = 2;
  int64_t tokens = 1024;  // per session, appended in `chunks` parts
  int chunks = 4;
  int bad_every = 16;   // one bad request per this many good ones
  absl::Time deadline;  // stop starting new work at this time
  uint64_t seed = 1;
};

// Counters and latencies of one tenant (or all, after Merge).
struct LoadResult {
  int64_t ops = 0;             // good requests answered OK
  int64_t errors = 0;          // good requests that failed (any code)
  int64_t wrong_bytes = 0;     // fetches whose bytes differed from the KV
  int64_t pages_checked = 0;   // page blocks compared byte for byte
  int64_t bad_requests = 0;    // bad requests sent
  int64_t bad_wrong_code = 0;  // ... answered with another code than expected (or OK)
  int64_t sessions_created = 0;
  std::vector<std::string> first_failures;  // up to 8 messages
  std::vector<double> decode_us;            // DecodeStep latencies
  std::vector<double> append_us;            // AppendKv latencies

  void Merge(const LoadResult& other);
  Json ToJson(bool with_samples) const;
  static LoadResult FromJson(const Json& j);
};

// Runs one tenant's workers until options.deadline; drops everything it
// created before returning.
LoadResult RunTenant(const TenantOptions& options);

}  // namespace icecache::load

#endif  // ICECACHE_TESTS_LOAD_LOAD_WORKER_H_
