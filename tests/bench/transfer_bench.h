// icecache-bench transfer (docs/architecture.md §10): the fetch's gather
// against a plain memcpy of the same bytes.
//
// CPU: for each page size and thread count, one layer of `kv_heads` heads x
// `budget_tokens` tokens (selected pages drawn at random from an arena much
// larger than the last-level cache) is gathered with GatherFrames into a
// /dev/shm mapping, against memcpy of the same byte count from one
// contiguous (also cold) source range into the same mapping. Medians of
// `reps` runs, GB/s and the ratio gather / memcpy, one table and JSON.
//
// --gpu: push + scatter (PushChannel, the daemon's path) into a vLLM-layout
// paged cache on the device, in each of --gpu-modes: "staged" (gather into
// pinned staging, one H2D copy, scatter kernel), "zero-copy" (gather into
// pinned staging, the kernel reads it over the bus), "direct" (the source
// arena pinned and mapped, the kernel reads the selected pages in place; no
// CPU gather), each against cudaMemcpyAsync of the same bytes from pinned
// memory into one contiguous device block, in the same run; without a CUDA
// device the GPU rows are reported as skipped with the reason. --gpu-only
// skips the CPU table.
#ifndef ICECACHE_TESTS_BENCH_TRANSFER_BENCH_H_
#define ICECACHE_TESTS_BENCH_TRANSFER_BENCH_H_

#include <CLI/CLI.hpp>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace icecache::bench {

struct TransferOptions {
  std::vector<int> page_tokens = {8, 16, 32, 64};
  std::vector<int> threads = {1, 2};
  int kv_heads = 8;
  int head_dim = 128;
  int budget_tokens = 2048;  // per KV head
  int reps = 30;
  uint64_t arena_bytes = uint64_t{1} << 30;
  bool gpu = false;
  bool gpu_only = false;
  std::vector<std::string> gpu_modes = {"staged", "zero-copy", "direct"};
  std::string json;  // path; empty = none
};

void AddTransferFlags(CLI::App* app, TransferOptions* options);
absl::Status RunTransferBench(const TransferOptions& options);

}  // namespace icecache::bench

#endif  // ICECACHE_TESTS_BENCH_TRANSFER_BENCH_H_
