#include "server/rpc/decode_ring_service.h"

#include <chrono>

#include "common/decode_ring_layout.h"
#include "common/status_macros.h"
#include "server/rpc/decode_step.h"
#include "server/rpc/log.h"

namespace icecache::rpc {

grpc::Status DecodeRingServiceImpl::OpenDecodeRing(grpc::ServerContext* ctx,
                                                   const v1::OpenDecodeRingRequest* req,
                                                   v1::OpenDecodeRingResponse* resp) {
  return call_.Run(ctx, "OpenDecodeRing", Role::kTenant, [&](const Caller& caller) -> absl::Status {
    const ServiceDeps& deps = call_.deps();
    RETURN_IF_ERROR(RequireId(req->session_id(), "session_id"));
    RETURN_IF_ERROR(RequireId(req->buffer_id(), "buffer_id"));
    if (req->request_fifo().empty() || req->response_fifo().empty()) {
      return absl::InvalidArgumentError("request_fifo and response_fifo are required");
    }
    if (rings_ == nullptr || deps.manager->draining()) {
      return absl::UnavailableError("the daemon is draining; use the DecodeStep stream");
    }
    RETURN_IF_ERROR(deps.manager->GetSession(caller, req->session_id()).status());
    RingOpenParams p{req->session_id(),        req->buffer_id(),    req->request_capacity(),
                     req->response_capacity(), req->request_fifo(), req->response_fifo()};
    ASSIGN_OR_RETURN(std::string id, rings_->Open(caller, p));
    resp->set_ring_id(id);
    resp->set_version(ring::kVersion);
    Log(LogLevel::kDebug, "decode_ring_opened",
        {{"tenant", caller.tenant}, {"id", id}, {"session", req->session_id()}});
    return absl::OkStatus();
  });
}

absl::Status DecodeRingServiceImpl::HandleRingMessage(const Caller& caller,
                                                      const v1::DecodeStepRequest& req,
                                                      DecodeCursor* cursor,
                                                      v1::DecodeStepResponse* resp) {
  const ServiceDeps& deps = call_.deps();
  const auto t0 = std::chrono::steady_clock::now();
  absl::Status status;
  {
    absl::StatusOr<CallTicket> ticket = CallTicket();
    if (deps.limiter != nullptr) ticket = deps.limiter->Acquire(caller.tenant);
    status = ticket.ok() ? HandleDecodeMessage(deps, caller, req, cursor, resp) : ticket.status();
  }
  call_.Record("DecodeRingStep", status,
               std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  return status;
}

}  // namespace icecache::rpc
