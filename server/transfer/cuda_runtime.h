// The one wrapper around the CUDA runtime used by the daemon (STYLE.md 5).
// This header includes no CUDA header. The implementation is
// cuda_runtime_cuda.cc (library icecache_cuda, linked with CUDA::cudart) when
// the build has ICECACHE_ENABLE_CUDA, else cuda_runtime_none.cc, whose
// runtime always reports "no CUDA device". Without a driver or device (this
// build machine) the CUDA implementation also reports "no CUDA device".
//
// Every CUDA error comes back as a status whose message names the call and
// the CUDA error string. Thread safety: all methods are thread-safe (the
// CUDA runtime is); handles returned are owned by the caller, who must Close
// them through the same runtime.
#ifndef ICECACHE_SERVER_TRANSFER_CUDA_RUNTIME_H_
#define ICECACHE_SERVER_TRANSFER_CUDA_RUNTIME_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "server/transfer/scatter_math.h"

namespace icecache {

// cudaIpcMemHandle_t is 64 opaque bytes.
inline constexpr size_t kCudaIpcHandleBytes = 64;
struct CudaIpcHandle {
  std::array<uint8_t, kCudaIpcHandleBytes> bytes{};
};
// A device UUID: 16 bytes (cudaUUID_t).
struct CudaDeviceUuid {
  std::array<uint8_t, 16> bytes{};
  // "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" (nvidia-smi form).
  std::string ToString() const;
};

// InvalidArgument unless `bytes` is exactly 64 bytes and not all zero.
absl::StatusOr<CudaIpcHandle> ParseCudaIpcHandle(std::string_view bytes);
// Accepts 16 raw bytes, or the text form with or without the "GPU-" prefix
// (32 hex digits, dashes optional). InvalidArgument otherwise.
absl::StatusOr<CudaDeviceUuid> ParseCudaDeviceUuid(std::string_view text_or_bytes);

class CudaRuntime {
 public:
  // Probes the runtime once (cudaGetDeviceCount); never fails: without CUDA
  // support or a device, available() is false.
  static std::unique_ptr<CudaRuntime> Create();
  virtual ~CudaRuntime() = default;

  virtual bool available() const = 0;
  // Why available() is false, e.g. "no CUDA device (built without CUDA)" or
  // "no CUDA device (cudaGetDeviceCount: ...)". Empty when available.
  virtual std::string unavailable_reason() const = 0;
  virtual int device_count() const = 0;

  // The following return FailedPrecondition "no CUDA device ..." when
  // !available(), InvalidArgument for bad arguments, Internal for CUDA errors.

  // Index of the device with this UUID; NotFound if none.
  virtual absl::StatusOr<int> FindDevice(const CudaDeviceUuid& uuid) const = 0;
  // Opens a peer's IPC allocation on `device` (cudaIpcOpenMemHandle).
  virtual absl::StatusOr<void*> OpenIpcHandle(int device, const CudaIpcHandle& handle) = 0;
  virtual absl::Status CloseIpcHandle(int device, void* device_ptr) = 0;
  // Synchronous host -> device copy of `n` bytes on a stream owned by the
  // runtime for `device` (cudaMemcpyAsync + cudaStreamSynchronize).
  virtual absl::Status CopyToDevice(int device, void* device_dst, const void* host_src,
                                    size_t n) = 0;
  // Pins / unpins host memory (cudaHostRegister, portable and mapped: the
  // device may read it in place at DevicePointerOf's address; Unregister).
  virtual absl::Status HostRegister(void* p, size_t n) = 0;
  virtual absl::Status HostUnregister(void* p) = 0;

  // --- the push (docs/architecture.md §6.3). Streams and events are opaque
  // (cudaStream_t / cudaEvent_t as void*), owned by the caller, destroyed
  // through the same runtime on the device they were made on.

  // A non-blocking stream on `device` (cudaStreamCreateWithFlags).
  virtual absl::StatusOr<void*> CreateStream(int device) = 0;
  virtual absl::Status DestroyStream(int device, void* stream) = 0;
  // Pinned, portable, mapped host memory (cudaHostAlloc) and the address the
  // device reads it, or memory pinned by HostRegister, at
  // (cudaHostGetDevicePointer; the zero-copy and direct modes).
  virtual absl::StatusOr<void*> AllocPinned(size_t n) = 0;
  virtual absl::Status FreePinned(void* p) = 0;
  virtual absl::StatusOr<void*> DevicePointerOf(void* pinned) = 0;
  // Device memory (cudaMalloc / cudaFree) on `device`.
  virtual absl::StatusOr<void*> AllocDevice(int device, size_t n) = 0;
  virtual absl::Status FreeDevice(int device, void* p) = 0;
  // Enqueues a host -> device copy on `stream` (cudaMemcpyAsync).
  virtual absl::Status CopyToDeviceAsync(int device, void* stream, void* device_dst,
                                         const void* host_src, size_t n) = 0;
  // Enqueues the scatter kernel (scatter_kernel.h) on `stream`; `tasks` and
  // what `src` names must be device-readable.
  virtual absl::Status LaunchScatter(int device, void* stream, const ScatterGeometry& geometry,
                                     const ScatterTask* tasks, uint32_t num_tasks,
                                     const ScatterSource& src, uint8_t* dst) = 0;
  // Enqueues the frame gather kernel (scatter_kernel.h): frame i of
  // `frames` (a device-readable table of device-readable addresses) to
  // dst + i x frame_bytes, in words of `word_bytes`.
  virtual absl::Status LaunchGatherFrames(int device, void* stream, const uint8_t* const* frames,
                                          uint32_t count, uint64_t frame_bytes, uint32_t word_bytes,
                                          uint8_t* dst) = 0;
  // Opens a peer's interprocess event (cudaIpcOpenEventHandle; the handle is
  // 64 bytes like a memory handle) and destroys it (cudaEventDestroy).
  virtual absl::StatusOr<void*> OpenIpcEvent(int device, const CudaIpcHandle& handle) = 0;
  virtual absl::Status DestroyEvent(int device, void* event) = 0;
  // cudaStreamWaitEvent / cudaEventRecord / cudaStreamSynchronize.
  virtual absl::Status StreamWaitEvent(int device, void* stream, void* event) = 0;
  virtual absl::Status RecordEvent(int device, void* stream, void* event) = 0;
  virtual absl::Status SynchronizeStream(int device, void* stream) = 0;
};

}  // namespace icecache

#endif  // ICECACHE_SERVER_TRANSFER_CUDA_RUNTIME_H_
