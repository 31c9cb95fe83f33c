// Pins a large host region (the page pool's arena) for fast DMA with
// cudaHostRegister, in chunks of at most `chunk_bytes` (64 GiB by default),
// on a background thread so daemon start-up does not stall (docs/architecture.md §4).
// Without a CUDA device the pinner finishes at once with FailedPrecondition
// "no CUDA device ..." and the daemon simply runs unpinned.
//
// Ownership: the region and the runtime are not owned and must outlive the
// pinner. Destruction waits for the background thread, then unregisters
// every chunk it registered. Thread safety: all methods are thread-safe.
#ifndef ICECACHE_SERVER_TRANSFER_HOST_PINNER_H_
#define ICECACHE_SERVER_TRANSFER_HOST_PINNER_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "server/transfer/cuda_runtime.h"

namespace icecache {

class HostPinner {
 public:
  static constexpr uint64_t kDefaultChunkBytes = uint64_t{64} << 30;

  // Starts pinning [base, base + bytes). chunk_bytes 0 means the default.
  // `on_done` (optional) runs on the pinner's thread once it finished, with
  // what Wait() returns.
  static std::unique_ptr<HostPinner> Start(
      CudaRuntime* cuda, uint8_t* base, uint64_t bytes, uint64_t chunk_bytes = 0,
      std::function<void(const absl::Status&)> on_done = nullptr);
  ~HostPinner();
  HostPinner(const HostPinner&) = delete;
  HostPinner& operator=(const HostPinner&) = delete;

  bool done() const;
  // Blocks until pinning finished; OK when the whole region is pinned, else
  // the first error (FailedPrecondition without a device, Internal for CUDA
  // errors). Chunks pinned before an error stay pinned until destruction.
  absl::Status Wait() const;
  uint64_t pinned_bytes() const;

 private:
  HostPinner(CudaRuntime* cuda, uint8_t* base, uint64_t bytes, uint64_t chunk_bytes,
             std::function<void(const absl::Status&)> on_done);
  void Run();

  CudaRuntime* const cuda_;
  uint8_t* const base_;
  const uint64_t bytes_;
  const uint64_t chunk_bytes_;
  const std::function<void(const absl::Status&)> on_done_;
  mutable absl::Mutex mu_;
  bool done_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status status_ ABSL_GUARDED_BY(mu_);
  std::vector<uint8_t*> chunks_ ABSL_GUARDED_BY(mu_);
  uint64_t pinned_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  std::thread thread_;
};

}  // namespace icecache

#endif  // ICECACHE_SERVER_TRANSFER_HOST_PINNER_H_
