// DecodeRingServiceImpl: OpenDecodeRing, which attaches a client's
// shared-memory ring to the DecodeRingServer, and the handler the ring
// server runs for every message (docs/architecture.md §8.1). Thin: checks,
// conversion and the one SessionManager call are HandleDecodeMessage's.
//
// Ownership: deps and the ring server are not owned and must outlive the
// service. Thread safety: as the other services.
#ifndef ICECACHE_SERVER_RPC_DECODE_RING_SERVICE_H_
#define ICECACHE_SERVER_RPC_DECODE_RING_SERVICE_H_

#include <grpcpp/grpcpp.h>

#include "absl/status/status.h"
#include "icecache/v1/decode_ring.grpc.pb.h"
#include "server/rpc/decode_ring.h"
#include "server/rpc/services.h"

namespace icecache::rpc {

class DecodeRingServiceImpl final : public v1::DecodeRingService::Service {
 public:
  explicit DecodeRingServiceImpl(const ServiceDeps& deps) : call_(deps) {}
  // Set once, before the server starts (the ring server takes the handler
  // below, so it is created after the service).
  void set_rings(DecodeRingServer* rings) { rings_ = rings; }

  grpc::Status OpenDecodeRing(grpc::ServerContext* ctx, const v1::OpenDecodeRingRequest* req,
                              v1::OpenDecodeRingResponse* resp) override;

  // One ring message: a call ticket of the caller's tenant (RESOURCE_EXHAUSTED
  // as for any tenant call), HandleDecodeMessage, metrics under method
  // "DecodeRingStep".
  absl::Status HandleRingMessage(const Caller& caller, const v1::DecodeStepRequest& req,
                                 DecodeCursor* cursor, v1::DecodeStepResponse* resp);

 private:
  CallContext call_;
  DecodeRingServer* rings_ = nullptr;
};

}  // namespace icecache::rpc

#endif  // ICECACHE_SERVER_RPC_DECODE_RING_SERVICE_H_
