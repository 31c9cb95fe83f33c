// Internals of icecache::Client shared with icecachectl, the RPC benchmark
// and the integration tests: the channel, the generated stubs, the one
// status conversion and the struct <-> proto conversions. Includes gRPC and
// generated protobuf headers; the public client.h does not.
#ifndef ICECACHE_CLIENT_CLIENT_INTERNAL_H_
#define ICECACHE_CLIENT_CLIENT_INTERNAL_H_

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <map>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "client/client.h"
#include "client/decode_ring_client.h"
#include "icecache/v1/admin.grpc.pb.h"
#include "icecache/v1/buffer.grpc.pb.h"
#include "icecache/v1/decode_ring.grpc.pb.h"
#include "icecache/v1/kv.grpc.pb.h"
#include "icecache/v1/session.grpc.pb.h"

namespace icecache {

// grpc::Status -> absl::Status, code and message unchanged (the numbering of
// canonical codes is shared); codes outside the canonical range -> UNKNOWN.
absl::Status FromGrpcStatus(const grpc::Status& status);
// 0 (never) is absl::InfinitePast().
absl::Time FromUnixMs(int64_t ms);

v1::DType ToProtoDType(DType dtype);
absl::StatusOr<DType> FromProtoDType(v1::DType dtype);
void ToProto(const SessionSpec& spec, v1::SessionConfig* out);
void ToProto(const SelectOptions& options, v1::SelectParams* out);
SessionInfo FromProto(const v1::SessionInfo& info);
HeadSelection FromProto(const v1::HeadSelection& head);
FetchLayout FromProto(const v1::FetchLayout& layout);
TenantInfo FromProto(const v1::TenantInfo& tenant);

// InvalidArgument naming the field for an event handle that is not 64 bytes
// (or empty), or a block id listed twice (client_device.cc).
absl::Status CheckDeviceWrite(const DeviceWrite& device);
// The device fields of a FetchPagesRequest or DecodeStepRequest.
template <typename Request>
void DeviceToProto(const DeviceWrite& device, Request* req) {
  req->mutable_block_ids()->Add(device.block_ids.begin(), device.block_ids.end());
  req->set_wait_event(device.wait_event);
  req->set_done_event(device.done_event);
}

// One open DecodeStep stream; its mutex serialises the steps of a session.
struct DecodeStreamState {
  absl::Mutex mu;
  // The session's DecodeStep path: its ring when the daemon accepted one
  // (ClientOptions.decode_ring), else the stream below.
  std::unique_ptr<DecodeRingClient> ring ABSL_GUARDED_BY(mu);
  // Set once a ring was refused (or the option is off): the stream only.
  bool no_ring ABSL_GUARDED_BY(mu) = false;
  std::unique_ptr<grpc::ClientContext> context ABSL_GUARDED_BY(mu);
  std::unique_ptr<grpc::ClientReaderWriter<v1::DecodeStepRequest, v1::DecodeStepResponse>> stream
      ABSL_GUARDED_BY(mu);
};

struct Client::Impl {
  ClientOptions options;
  std::string target;
  std::string token;  // bearer token, TCP only
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<v1::SessionService::Stub> sessions;
  std::unique_ptr<v1::BufferService::Stub> buffers;
  std::unique_ptr<v1::KvService::Stub> kv;
  std::unique_ptr<v1::AdminService::Stub> admin;
  std::unique_ptr<v1::DecodeRingService::Stub> rings;
  std::unique_ptr<grpc::GenericStub> generic;

  absl::Mutex streams_mu;
  std::map<std::string, std::shared_ptr<DecodeStreamState>, std::less<>> streams
      ABSL_GUARDED_BY(streams_mu);

  // A context with the call deadline (unless `deadline` is false) and the
  // bearer token.
  std::unique_ptr<grpc::ClientContext> NewContext(bool deadline = true) const;
};

}  // namespace icecache

#endif  // ICECACHE_CLIENT_CLIENT_INTERNAL_H_
