// A recording fake of CudaRuntime for tests without a GPU (issue 10 item 6;
// docs/architecture.md §6.3). "Device" memory is host memory: the client's
// allocations are added with AddPeerAllocation (what a client's cudaMalloc +
// cudaIpcGetMemHandle would export), events with AddPeerEvent. Every call is
// recorded in order; copies and kernel launches run at once on the CPU
// (LaunchScatter through ScatterOnHost, the kernel's index math) after
// checking that every byte they touch lies inside a known allocation: an
// access outside one fails the call with Internal "out of bounds" and is
// counted in violations(). FailNext(op, skip) makes the call of `op` after
// `skip` more successful ones fail with Internal "<op>: injected CUDA error".
//
// Thread safety: all methods are thread-safe.
#ifndef ICECACHE_TESTS_SUPPORT_RECORDING_CUDA_RUNTIME_H_
#define ICECACHE_TESTS_SUPPORT_RECORDING_CUDA_RUNTIME_H_

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "server/transfer/cuda_runtime.h"

namespace icecache::testing {

struct CudaCall {
  std::string op;  // "open_ipc", "close_ipc", "create_stream", "copy_h2d", "scatter", ...
  int device = -1;
  uint64_t bytes = 0;         // copies: bytes; scatter: tasks
  const void* ptr = nullptr;  // copy/scatter destination, opened/closed pointer
};

class RecordingCudaRuntime final : public CudaRuntime {
 public:
  // `devices` fake devices; device d has UUID bytes {d+1, 0, ...}.
  explicit RecordingCudaRuntime(int devices = 1);
  ~RecordingCudaRuntime() override;

  static CudaDeviceUuid UuidOf(int device);
  // The client's allocation of `size` zero bytes on `device`; returns its
  // handle (distinct per call) and, through `data`, its bytes.
  CudaIpcHandle AddPeerAllocation(int device, uint64_t size, uint8_t** data);
  CudaIpcHandle AddPeerEvent();

  std::vector<CudaCall> calls() const;
  std::vector<std::string> ops() const;  // calls()' op names, in order
  void ClearCalls();
  int violations() const;
  void FailNext(const std::string& op, int skip = 0);
  // (ptr, bytes) of every successful HostRegister, and HostUnregister's ptrs.
  std::vector<std::pair<void*, size_t>> registered() const;
  std::vector<void*> unregistered() const;
  // Live daemon-side resources (to check that everything is released).
  int open_handles() const;
  int live_streams() const;
  int live_allocations() const;  // pinned + device
  int live_events() const;

  bool available() const override { return true; }
  std::string unavailable_reason() const override { return ""; }
  int device_count() const override { return devices_; }
  absl::StatusOr<int> FindDevice(const CudaDeviceUuid& uuid) const override;
  absl::StatusOr<void*> OpenIpcHandle(int device, const CudaIpcHandle& handle) override;
  absl::Status CloseIpcHandle(int device, void* device_ptr) override;
  absl::Status CopyToDevice(int device, void* dst, const void* src, size_t n) override;
  absl::Status HostRegister(void* p, size_t n) override;
  absl::Status HostUnregister(void* p) override;
  absl::StatusOr<void*> CreateStream(int device) override;
  absl::Status DestroyStream(int device, void* stream) override;
  absl::StatusOr<void*> AllocPinned(size_t n) override;
  absl::Status FreePinned(void* p) override;
  absl::StatusOr<void*> DevicePointerOf(void* pinned) override;
  absl::StatusOr<void*> AllocDevice(int device, size_t n) override;
  absl::Status FreeDevice(int device, void* p) override;
  absl::Status CopyToDeviceAsync(int device, void* stream, void* dst, const void* src,
                                 size_t n) override;
  absl::Status LaunchScatter(int device, void* stream, const ScatterGeometry& geometry,
                             const ScatterTask* tasks, uint32_t num_tasks, const ScatterSource& src,
                             uint8_t* dst) override;
  absl::Status LaunchGatherFrames(int device, void* stream, const uint8_t* const* frames,
                                  uint32_t count, uint64_t frame_bytes, uint32_t word_bytes,
                                  uint8_t* dst) override;
  absl::StatusOr<void*> OpenIpcEvent(int device, const CudaIpcHandle& handle) override;
  absl::Status DestroyEvent(int device, void* event) override;
  absl::Status StreamWaitEvent(int device, void* stream, void* event) override;
  absl::Status RecordEvent(int device, void* stream, void* event) override;
  absl::Status SynchronizeStream(int device, void* stream) override;

 private:
  struct Region {
    uint8_t* base;
    uint64_t size;
  };
  // Records the call; Internal when FailNext(op) was armed.
  absl::Status RecordLocked(const std::string& op, int device, uint64_t bytes, const void* ptr);
  bool InsideLocked(const void* p, uint64_t n) const;
  // Inside an allocation, or inside host memory registered and not yet
  // unregistered (what the device may read in place).
  bool ReadableLocked(const void* p, uint64_t n) const;
  absl::Status CheckDeviceLocked(int device) const;

  const int devices_;
  mutable std::mutex mu_;
  std::vector<CudaCall> calls_;
  std::map<std::string, int> fail_next_;  // op -> successful calls left before failing
  std::vector<std::pair<void*, size_t>> registered_;
  std::vector<void*> unregistered_;
  int violations_ = 0;
  uint64_t next_handle_ = 1;
  std::map<std::string, std::unique_ptr<uint8_t[]>> peer_memory_;  // handle bytes -> memory
  std::map<std::string, uint64_t> peer_size_;
  std::set<std::string> peer_events_;
  std::map<const void*, Region> regions_;  // every allocation the fake knows
  std::set<void*> opened_;
  std::set<void*> streams_;
  std::map<void*, std::unique_ptr<uint8_t[]>> owned_;  // pinned + device
  std::set<void*> events_;
};

}  // namespace icecache::testing

#endif  // ICECACHE_TESTS_SUPPORT_RECORDING_CUDA_RUNTIME_H_
