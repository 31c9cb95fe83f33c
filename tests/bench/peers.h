// Token-level ANN peers for the selection benchmark: FAISS IndexFlatIP,
// IndexHNSWFlat, IndexIVFFlat, IndexIVFPQ (all METRIC_INNER_PRODUCT) and
// hnswlib (InnerProductSpace). One object indexes the keys of one (layer
// group, KV head). FAISS and hnswlib throw; every call here catches and turns
// that into a status, so nothing is thrown out of this module.
//
// Thread safety: Search() is const and safe to run concurrently with other
// Search() calls on different objects; FAISS's global statistics (used for
// the distance count) make concurrent searches of FAISS peers miscount, so the
// driver times and counts queries on one thread. Build()/Add() need exclusive
// access.
#ifndef ICECACHE_TESTS_BENCH_PEERS_H_
#define ICECACHE_TESTS_BENCH_PEERS_H_

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace icecache::bench {

enum class PeerKind { kFaissFlat, kFaissHnsw, kFaissIvf, kFaissIvfPq, kHnswlib };

// Report names: "faiss-flat", "faiss-hnsw", "faiss-ivf", "faiss-ivfpq", "hnswlib".
std::string_view PeerName(PeerKind kind);

struct PeerParams {
  int hnsw_m = 32;                 // graph degree (FAISS HNSW and hnswlib)
  int hnsw_ef_construction = 128;  // build-time beam
  int ivf_nlist = 0;               // 0: round(sqrt(prefill tokens))
  int pq_m = 16;                   // IVFPQ sub-quantizers (must divide head_dim)
  int pq_nbits = 8;                // bits per sub-quantizer code
};

class TokenIndex {
 public:
  virtual ~TokenIndex() = default;

  // `capacity` bounds the total tokens ever added (hnswlib preallocates).
  // InvalidArgument for dim < 1, capacity < 1, or parameters that do not fit
  // (pq_m not dividing dim, hnsw_m < 2, ...).
  static absl::StatusOr<std::unique_ptr<TokenIndex>> Create(PeerKind kind, int dim,
                                                            int64_t capacity,
                                                            const PeerParams& params);

  virtual PeerKind kind() const = 0;
  // Trains (IVF) on and adds the first `n` keys (fp32, n x dim). Ids are
  // positions 0..n-1. FailedPrecondition on a non-empty index; InvalidArgument
  // for n < 1 or too few keys to train; Internal when the library fails.
  virtual absl::Status Build(const float* keys, int64_t n) = 0;
  // Appends `n` keys with the next positions. ResourceExhausted past capacity.
  virtual absl::Status Add(const float* keys, int64_t n) = 0;

  // The search knob swept by the driver ("efSearch", "nprobe", or "" for
  // none) and the values worth sweeping for the current size.
  virtual std::string_view knob_name() const = 0;
  virtual std::vector<int> KnobValues() const = 0;

  // Inner-product top-`k` of one query (fp32, dim) with `knob` (ignored when
  // there is none). `ids` receives positions in descending score (fewer than
  // k when the index returns fewer); `*touched` is increased by the distance
  // computations made (IVF: centroids scanned plus codes scanned).
  virtual absl::Status Search(const float* query, int k, int knob, std::vector<int64_t>* ids,
                              uint64_t* touched) const = 0;

  virtual int64_t size() const = 0;
  // Bytes held by the index including its own copy or codes of the keys.
  virtual size_t index_bytes() const = 0;
};

}  // namespace icecache::bench

#endif  // ICECACHE_TESTS_BENCH_PEERS_H_
