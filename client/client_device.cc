// The device half of icecache::Client (client.h): CUDA IPC registration with
// an engine's paged KV cache layout, and the block ids and events of a
// fetch or decode step (docs/engines.md "Paged KV caches").
#include <set>
#include <string>

#include "absl/strings/str_cat.h"
#include "client/client.h"
#include "client/client_internal.h"
#include "common/status_macros.h"

namespace icecache {

namespace {

constexpr size_t kIpcHandleBytes = 64;

v1::PagedKvFormat ToProto(PagedKvFormat f) {
  switch (f) {
    case PagedKvFormat::kVllmFlash:
      return v1::PAGED_KV_FORMAT_VLLM_FLASH;
    case PagedKvFormat::kFlashInferNhd:
      return v1::PAGED_KV_FORMAT_FLASHINFER_NHD;
    case PagedKvFormat::kFlashInferHnd:
      return v1::PAGED_KV_FORMAT_FLASHINFER_HND;
    case PagedKvFormat::kCustom:
      return v1::PAGED_KV_FORMAT_CUSTOM;
  }
  return v1::PAGED_KV_FORMAT_UNSPECIFIED;
}

void ToProto(const PagedKvCache& c, v1::PagedKvCache* out) {
  out->set_format(ToProto(c.format));
  out->set_first_layer(c.first_layer);
  out->set_num_layers(c.num_layers);
  out->set_num_blocks(c.num_blocks);
  out->set_block_tokens(c.block_tokens);
  out->set_kv_heads(c.kv_heads);
  out->set_head_dim(c.head_dim);
  out->set_dtype(ToProtoDType(c.dtype));
  out->mutable_layer_offsets_bytes()->Add(c.layer_offsets_bytes.begin(),
                                          c.layer_offsets_bytes.end());
  out->set_base_offset_bytes(c.base_offset_bytes);
  out->set_layer_stride(c.layer_stride);
  out->set_kv_stride(c.kv_stride);
  out->set_block_stride(c.block_stride);
  out->set_token_stride(c.token_stride);
  out->set_head_stride(c.head_stride);
}

absl::Status CheckEvent(const char* field, const std::string& handle) {
  if (handle.empty() || handle.size() == kIpcHandleBytes) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(field, " must be a cudaIpcEventHandle_t of ",
                                                 kIpcHandleBytes, " bytes (or empty), got ",
                                                 handle.size(), " bytes"));
}

}  // namespace

absl::Status CheckDeviceWrite(const DeviceWrite& device) {
  RETURN_IF_ERROR(CheckEvent("wait_event", device.wait_event));
  RETURN_IF_ERROR(CheckEvent("done_event", device.done_event));
  std::set<uint32_t> seen;
  for (size_t i = 0; i < device.block_ids.size(); ++i) {
    if (!seen.insert(device.block_ids[i]).second) {
      return absl::InvalidArgumentError(absl::StrCat("block_ids: block ", device.block_ids[i],
                                                     " is listed twice (position ", i,
                                                     "); each page needs a block of its own"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> Client::RegisterCudaIpc(const CudaIpcBuffer& buffer) {
  if (buffer.handle.size() != kIpcHandleBytes) {
    return absl::InvalidArgumentError(absl::StrCat("handle must be a cudaIpcMemHandle_t of ",
                                                   kIpcHandleBytes, " bytes, got ",
                                                   buffer.handle.size(), " bytes"));
  }
  v1::RegisterBufferRequest req;
  v1::CudaIpc* ipc = req.mutable_cuda_ipc();
  ipc->set_handle(buffer.handle);
  ipc->set_size(buffer.size);
  ipc->set_device_uuid(buffer.device_uuid);
  if (buffer.paged_kv.has_value()) ToProto(*buffer.paged_kv, ipc->mutable_paged_kv());
  v1::RegisterBufferResponse resp;
  auto ctx = impl_->NewContext();
  RETURN_IF_ERROR(FromGrpcStatus(impl_->buffers->RegisterBuffer(ctx.get(), req, &resp)));
  return resp.buffer_id();
}

}  // namespace icecache
