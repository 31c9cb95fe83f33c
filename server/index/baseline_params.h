// Parameters of the baseline selectors reproduced from the literature
// (docs/architecture.md §3.9): PQCache, SnapKV, MagicPIG and the published
// M-DCI query. Defaults follow each paper's public code; the selector files
// cite the source of each default.
#ifndef ICECACHE_SERVER_INDEX_BASELINE_PARAMS_H_
#define ICECACHE_SERVER_INDEX_BASELINE_PARAMS_H_

#include <cstdint>

#include "absl/status/status.h"

namespace icecache {

struct BaselineParams {
  // --- pqcache (Zhang et al., SIGMOD 2025, github.com/HugoZHL/PQCache) ---
  int pq_subspaces = 2;      // m: head_dim is split into m sub-vectors; divides head_dim
  int pq_bits = 6;           // b: 2^b centroids per sub-space, 1..8
  int pq_kmeans_iters = 10;  // Lloyd iterations on the prefill keys, >= 1
  // The top F x budget tokens by PQ score are rescored exactly (F >= 1;
  // 1 = the paper's pure PQ top-k, the exact scores only order the pages).
  float pq_rescore_factor = 2.0f;
  // --- snapkv (Li et al., 2024, github.com/FasterDecoding/SnapKV) ---
  int snapkv_window = 32;        // observation window: the last tokens of the prefill, kept
  int snapkv_kernel = 7;         // pooling kernel over positions, odd, 1..255
  bool snapkv_avg_pool = false;  // false: max pooling (the paper's LongBench setting)
  // --- magicpig (Chen et al., ICLR 2025, github.com/Infini-AI-Lab/MagicPIG) ---
  int magicpig_bits = 10;           // K: SimHash bits per table, 1..16
  int magicpig_tables = 150;        // L: hash tables, 1..1024
  int magicpig_min_collisions = 2;  // a key is sampled when it collides in >= this many tables
  // --- mdci-published (the ICE paper's multi-level prioritized DCI query,
  // IceFormer's MDCI: github.com/yuzhenmao/IceFormer, MDCI/src/dci.c) ---
  int dci_num_composite = 2;   // m
  int dci_num_simple = 7;      // L
  int dci_num_levels = 3;      // levels of keys, 1..16
  int dci_field_of_view = 10;  // nodes expanded per level, >= 1
  // The descent expands nodes holding factor x budget keys per query, >= 1.
  float dci_candidate_factor = 4.0f;
  uint64_t seed = 1234;
};

// InvalidArgument naming the field ("SelectorConfig.baseline.pq_bits") and
// the value sent, for the fields `kind_name` uses ("pqcache", "snapkv",
// "magicpig", "mdci-published"; any other name checks nothing).
absl::Status ValidateBaselineParams(const BaselineParams& p, const char* kind_name, int head_dim);

}  // namespace icecache

#endif  // ICECACHE_SERVER_INDEX_BASELINE_PARAMS_H_
