#include "server/transfer/host_pinner.h"

#include <algorithm>
#include <utility>

namespace icecache {

std::unique_ptr<HostPinner> HostPinner::Start(CudaRuntime* cuda, uint8_t* base, uint64_t bytes,
                                              uint64_t chunk_bytes,
                                              std::function<void(const absl::Status&)> on_done) {
  std::unique_ptr<HostPinner> p(new HostPinner(
      cuda, base, bytes, chunk_bytes == 0 ? kDefaultChunkBytes : chunk_bytes, std::move(on_done)));
  p->thread_ = std::thread([raw = p.get()] { raw->Run(); });
  return p;
}

HostPinner::HostPinner(CudaRuntime* cuda, uint8_t* base, uint64_t bytes, uint64_t chunk_bytes,
                       std::function<void(const absl::Status&)> on_done)
    : cuda_(cuda),
      base_(base),
      bytes_(bytes),
      chunk_bytes_(chunk_bytes),
      on_done_(std::move(on_done)) {}

HostPinner::~HostPinner() {
  if (thread_.joinable()) thread_.join();
  absl::MutexLock l(&mu_);
  for (uint8_t* c : chunks_) cuda_->HostUnregister(c).IgnoreError();
}

void HostPinner::Run() {
  absl::Status status;
  if (cuda_ == nullptr) {
    status = absl::FailedPreconditionError("no CUDA device (no CUDA runtime configured)");
  } else if (!cuda_->available()) {
    status = absl::FailedPreconditionError(cuda_->unavailable_reason());
  } else {
    for (uint64_t off = 0; off < bytes_; off += chunk_bytes_) {
      const uint64_t n = std::min(chunk_bytes_, bytes_ - off);
      status = cuda_->HostRegister(base_ + off, n);
      if (!status.ok()) break;
      absl::MutexLock l(&mu_);
      chunks_.push_back(base_ + off);
      pinned_bytes_ += n;
    }
  }
  {
    absl::MutexLock l(&mu_);
    status_ = status;
    done_ = true;
  }
  if (on_done_) on_done_(status);
}

bool HostPinner::done() const {
  absl::MutexLock l(&mu_);
  return done_;
}

absl::Status HostPinner::Wait() const {
  absl::MutexLock l(&mu_);
  mu_.Await(absl::Condition(&done_));
  return status_;
}

uint64_t HostPinner::pinned_bytes() const {
  absl::MutexLock l(&mu_);
  return pinned_bytes_;
}

}  // namespace icecache
