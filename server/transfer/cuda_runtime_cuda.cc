// CudaRuntime over the CUDA runtime API (library icecache_cuda, built only
// with ICECACHE_ENABLE_CUDA). The only file of the daemon that includes a
// CUDA header.
#include <cuda_runtime_api.h>

#include <cstring>
#include <map>
#include <mutex>
#include <string>

#include "absl/strings/str_cat.h"
#include "server/transfer/cuda_runtime.h"
#include "server/transfer/scatter_kernel.h"

namespace icecache {
namespace {

absl::Status CudaError(const char* call, cudaError_t err) {
  return absl::InternalError(absl::StrCat(call, ": ", cudaGetErrorString(err)));
}

// A CUDA call's error as Internal "<call>: <CUDA error string>".
#define RETURN_IF_CUDA(call)                      \
  do {                                            \
    const cudaError_t icecache_cuda_err = (call); \
    if (icecache_cuda_err != cudaSuccess) {       \
      return CudaError(#call, icecache_cuda_err); \
    }                                             \
  } while (0)
#define RETURN_IF_CUDA_STATUS(expr)            \
  do {                                         \
    const absl::Status icecache_st = (expr);   \
    if (!icecache_st.ok()) return icecache_st; \
  } while (0)

class CudaRuntimeImpl final : public CudaRuntime {
 public:
  CudaRuntimeImpl() {
    int n = 0;
    cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess) {
      reason_ = absl::StrCat("no CUDA device (cudaGetDeviceCount: ", cudaGetErrorString(err), ")");
      cudaGetLastError();  // clear the sticky-free error state
      return;
    }
    if (n <= 0) {
      reason_ = "no CUDA device (cudaGetDeviceCount returned 0)";
      return;
    }
    count_ = n;
  }
  ~CudaRuntimeImpl() override {
    std::lock_guard<std::mutex> l(mu_);
    for (auto& [dev, s] : streams_) {
      cudaSetDevice(dev);
      cudaStreamDestroy(s);
    }
  }

  bool available() const override { return count_ > 0; }
  std::string unavailable_reason() const override { return reason_; }
  int device_count() const override { return count_; }

  absl::StatusOr<int> FindDevice(const CudaDeviceUuid& uuid) const override {
    if (absl::Status s = Check(); !s.ok()) return s;
    for (int d = 0; d < count_; ++d) {
      cudaDeviceProp prop;
      cudaError_t err = cudaGetDeviceProperties(&prop, d);
      if (err != cudaSuccess) return CudaError("cudaGetDeviceProperties", err);
      if (std::memcmp(prop.uuid.bytes, uuid.bytes.data(), 16) == 0) return d;
    }
    return absl::NotFoundError(absl::StrCat("no CUDA device with UUID ", uuid.ToString()));
  }

  absl::StatusOr<void*> OpenIpcHandle(int device, const CudaIpcHandle& handle) override {
    if (absl::Status s = CheckDevice(device); !s.ok()) return s;
    cudaIpcMemHandle_t h;
    static_assert(sizeof(h) == kCudaIpcHandleBytes, "cudaIpcMemHandle_t size");
    std::memcpy(&h, handle.bytes.data(), sizeof(h));
    cudaError_t err = cudaSetDevice(device);
    if (err != cudaSuccess) return CudaError("cudaSetDevice", err);
    void* p = nullptr;
    err = cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess);
    if (err != cudaSuccess) return CudaError("cudaIpcOpenMemHandle", err);
    return p;
  }

  absl::Status CloseIpcHandle(int device, void* p) override {
    if (absl::Status s = CheckDevice(device); !s.ok()) return s;
    cudaError_t err = cudaSetDevice(device);
    if (err != cudaSuccess) return CudaError("cudaSetDevice", err);
    err = cudaIpcCloseMemHandle(p);
    if (err != cudaSuccess) return CudaError("cudaIpcCloseMemHandle", err);
    return absl::OkStatus();
  }

  absl::Status CopyToDevice(int device, void* dst, const void* src, size_t n) override {
    if (absl::Status s = CheckDevice(device); !s.ok()) return s;
    if (n == 0) return absl::OkStatus();
    cudaError_t err = cudaSetDevice(device);
    if (err != cudaSuccess) return CudaError("cudaSetDevice", err);
    cudaStream_t stream;
    {
      std::lock_guard<std::mutex> l(mu_);
      auto it = streams_.find(device);
      if (it == streams_.end()) {
        err = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
        if (err != cudaSuccess) return CudaError("cudaStreamCreateWithFlags", err);
        streams_[device] = stream;
      } else {
        stream = it->second;
      }
    }
    err = cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, stream);
    if (err != cudaSuccess) return CudaError("cudaMemcpyAsync", err);
    err = cudaStreamSynchronize(stream);
    if (err != cudaSuccess) return CudaError("cudaStreamSynchronize", err);
    return absl::OkStatus();
  }

  absl::Status HostRegister(void* p, size_t n) override {
    if (absl::Status s = Check(); !s.ok()) return s;
    cudaError_t err = cudaHostRegister(p, n, cudaHostRegisterPortable | cudaHostRegisterMapped);
    if (err != cudaSuccess) return CudaError("cudaHostRegister", err);
    return absl::OkStatus();
  }
  absl::Status HostUnregister(void* p) override {
    if (absl::Status s = Check(); !s.ok()) return s;
    cudaError_t err = cudaHostUnregister(p);
    if (err != cudaSuccess) return CudaError("cudaHostUnregister", err);
    return absl::OkStatus();
  }

  absl::StatusOr<void*> CreateStream(int device) override {
    RETURN_IF_CUDA_STATUS(OnDevice(device));
    cudaStream_t s = nullptr;
    RETURN_IF_CUDA(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    return static_cast<void*>(s);
  }
  absl::Status DestroyStream(int device, void* stream) override {
    RETURN_IF_CUDA_STATUS(OnDevice(device));
    RETURN_IF_CUDA(cudaStreamDestroy(static_cast<cudaStream_t>(stream)));
    return absl::OkStatus();
  }
  absl::StatusOr<void*> AllocPinned(size_t n) override {
    RETURN_IF_CUDA_STATUS(Check());
    void* p = nullptr;
    RETURN_IF_CUDA(cudaHostAlloc(&p, n, cudaHostAllocPortable | cudaHostAllocMapped));
    return p;
  }
  absl::Status FreePinned(void* p) override {
    RETURN_IF_CUDA_STATUS(Check());
    RETURN_IF_CUDA(cudaFreeHost(p));
    return absl::OkStatus();
  }
  absl::StatusOr<void*> DevicePointerOf(void* pinned) override {
    RETURN_IF_CUDA_STATUS(Check());
    void* d = nullptr;
    RETURN_IF_CUDA(cudaHostGetDevicePointer(&d, pinned, 0));
    return d;
  }
  absl::StatusOr<void*> AllocDevice(int device, size_t n) override {
    RETURN_IF_CUDA_STATUS(OnDevice(device));
    void* p = nullptr;
    RETURN_IF_CUDA(cudaMalloc(&p, n));
    return p;
  }
  absl::Status FreeDevice(int device, void* p) override {
    RETURN_IF_CUDA_STATUS(OnDevice(device));
    RETURN_IF_CUDA(cudaFree(p));
    return absl::OkStatus();
  }
  absl::Status CopyToDeviceAsync(int device, void* stream, void* dst, const void* src,
                                 size_t n) override {
    RETURN_IF_CUDA_STATUS(OnDevice(device));
    RETURN_IF_CUDA(
        cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, static_cast<cudaStream_t>(stream)));
    return absl::OkStatus();
  }
  absl::Status LaunchScatter(int device, void* stream, const ScatterGeometry& g,
                             const ScatterTask* tasks, uint32_t n, const ScatterSource& src,
                             uint8_t* dst) override {
    RETURN_IF_CUDA_STATUS(OnDevice(device));
    const cudaError_t err =
        static_cast<cudaError_t>(LaunchScatterKernel(stream, g, tasks, n, src, dst));
    if (err != cudaSuccess) return CudaError("scatter kernel launch", err);
    return absl::OkStatus();
  }
  absl::Status LaunchGatherFrames(int device, void* stream, const uint8_t* const* frames,
                                  uint32_t count, uint64_t frame_bytes, uint32_t word_bytes,
                                  uint8_t* dst) override {
    RETURN_IF_CUDA_STATUS(OnDevice(device));
    const cudaError_t err = static_cast<cudaError_t>(
        LaunchGatherFramesKernel(stream, frames, count, frame_bytes, word_bytes, dst));
    if (err != cudaSuccess) return CudaError("frame gather kernel launch", err);
    return absl::OkStatus();
  }
  absl::StatusOr<void*> OpenIpcEvent(int device, const CudaIpcHandle& handle) override {
    RETURN_IF_CUDA_STATUS(OnDevice(device));
    cudaIpcEventHandle_t h;
    static_assert(sizeof(h) == kCudaIpcHandleBytes, "cudaIpcEventHandle_t size");
    std::memcpy(&h, handle.bytes.data(), sizeof(h));
    cudaEvent_t e = nullptr;
    RETURN_IF_CUDA(cudaIpcOpenEventHandle(&e, h));
    return static_cast<void*>(e);
  }
  absl::Status DestroyEvent(int device, void* event) override {
    RETURN_IF_CUDA_STATUS(OnDevice(device));
    RETURN_IF_CUDA(cudaEventDestroy(static_cast<cudaEvent_t>(event)));
    return absl::OkStatus();
  }
  absl::Status StreamWaitEvent(int device, void* stream, void* event) override {
    RETURN_IF_CUDA_STATUS(OnDevice(device));
    RETURN_IF_CUDA(
        cudaStreamWaitEvent(static_cast<cudaStream_t>(stream), static_cast<cudaEvent_t>(event), 0));
    return absl::OkStatus();
  }
  absl::Status RecordEvent(int device, void* stream, void* event) override {
    RETURN_IF_CUDA_STATUS(OnDevice(device));
    RETURN_IF_CUDA(
        cudaEventRecord(static_cast<cudaEvent_t>(event), static_cast<cudaStream_t>(stream)));
    return absl::OkStatus();
  }
  absl::Status SynchronizeStream(int device, void* stream) override {
    RETURN_IF_CUDA_STATUS(OnDevice(device));
    RETURN_IF_CUDA(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)));
    return absl::OkStatus();
  }

 private:
  absl::Status Check() const {
    if (count_ <= 0) return absl::FailedPreconditionError(reason_);
    return absl::OkStatus();
  }
  // CheckDevice, then cudaSetDevice(device) on this thread.
  absl::Status OnDevice(int device) const {
    if (absl::Status s = CheckDevice(device); !s.ok()) return s;
    cudaError_t err = cudaSetDevice(device);
    if (err != cudaSuccess) return CudaError("cudaSetDevice", err);
    return absl::OkStatus();
  }
  absl::Status CheckDevice(int device) const {
    if (absl::Status s = Check(); !s.ok()) return s;
    if (device < 0 || device >= count_) {
      return absl::InvalidArgumentError(
          absl::StrCat("CUDA device ", device, " out of range 0..", count_ - 1));
    }
    return absl::OkStatus();
  }

  int count_ = 0;
  std::string reason_;
  std::mutex mu_;
  std::map<int, cudaStream_t> streams_;  // guarded by mu_
};

}  // namespace

std::unique_ptr<CudaRuntime> CudaRuntime::Create() { return std::make_unique<CudaRuntimeImpl>(); }

}  // namespace icecache
