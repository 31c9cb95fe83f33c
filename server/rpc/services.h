// The icecache.v1 gRPC services: thin handlers over SessionManager and
// BufferRegistry (docs/architecture.md §8). Each handler resolves the caller (auth.h),
// converts the request (convert.h), calls the core, converts back and maps
// the status (status.h); metrics and a debug log line are recorded for
// every call.
//
// API choice: synchronous gRPC services. Every handler's work is bounded
// (selection of one layer, a copy of at most one layer group's pages, an
// append bounded by the receive limit), the sync server's threads are capped
// by limits.max_concurrent_calls (grpc::ResourceQuota), and the bidi
// DecodeStep loop reads naturally as a loop. The per-message cost of the
// stream (thread hand-offs between gRPC's poller and the handler thread,
// HTTP/2 framing) and its thread per open stream are what the shared-memory
// ring avoids for local clients (decode_ring.h, docs/architecture.md §8.1);
// both paths handle a message with HandleDecodeMessage (decode_step.h).
//
// Ownership: ServiceDeps pointers are not owned and must outlive the
// services. Thread safety: handlers run concurrently; all state they touch
// is thread-safe.
#ifndef ICECACHE_SERVER_RPC_SERVICES_H_
#define ICECACHE_SERVER_RPC_SERVICES_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/caller.h"
#include "icecache/v1/admin.grpc.pb.h"
#include "icecache/v1/buffer.grpc.pb.h"
#include "icecache/v1/config.pb.h"
#include "icecache/v1/kv.grpc.pb.h"
#include "icecache/v1/session.grpc.pb.h"
#include "server/rpc/auth.h"
#include "server/rpc/call_limiter.h"
#include "server/rpc/convert.h"
#include "server/rpc/metrics.h"
#include "server/session/session_manager.h"
#include "server/transfer/buffer_registry.h"

namespace icecache::rpc {

// Metric families the services record into (created on a Registry).
struct RpcMetrics {
  explicit RpcMetrics(Registry* registry);
  Family<Histogram>* rpc_seconds;          // {method}
  Family<Counter>* rpc_total;              // {method, code}
  Family<Counter>* rejected_total;         // {code} (non-OK answers)
  Family<Histogram>* select_seconds;       // {} SelectPages / the select part of DecodeStep
  Family<Histogram>* fetch_seconds;        // {} FetchPages
  Family<Histogram>* decode_step_seconds;  // {} one DecodeStep layer message
  Family<Counter>* bytes_total;            // {direction = append_inline|append_buffer|fetch}
  Family<Counter>* token_rows_total;       // {how = copied|kept} token-granular fetch rows
  Gauge* in_flight;
};

// Counts a fetch's bytes moved (only the copied rows of an in-place write)
// and its token rows copied and kept.
void RecordFetchBytes(RpcMetrics& m, const FetchLayout& layout);

struct ServiceDeps {
  SessionManager* manager = nullptr;
  BufferRegistry* buffers = nullptr;
  const Authenticator* auth = nullptr;
  const PeerTable* peers = nullptr;
  RpcMetrics* metrics = nullptr;
  // Places for tenant calls (per tenant and in total); null = unlimited.
  CallLimiter* limiter = nullptr;
  const v1::IcecachedConfig* config = nullptr;  // defaulted and validated
  int64_t start_unix_ms = 0;
  // Called by AdminService.Drain: begins draining (health NOT_SERVING) and,
  // when `shutdown`, asks the daemon to exit after in-flight calls.
  // Whether the daemon drains is the SessionManager's to say (draining()).
  // AdminService.Drain: shutdown, and for_upgrade (keep the sessions for the
  // next daemon; asked only when can_upgrade() says it can).
  std::function<absl::Status(bool shutdown, bool for_upgrade)> on_drain;
  std::function<bool()> can_upgrade;
};

// What a handler may do with the caller's admin role.
enum class Role {
  // Tenant-scoped verbs (sessions, buffers, KV): the admin role is dropped,
  // so an admin's SessionService calls see only its own tenant's objects;
  // acting on other tenants goes through AdminService.
  kTenant,
  // The handler decides (ListSessions with all_tenants).
  kKeepAdmin,
  // AdminService: PermissionDenied without the admin role.
  kAdminOnly,
};

// Shared by the four services: caller resolution and per-call bookkeeping.
class CallContext {
 public:
  explicit CallContext(const ServiceDeps& deps) : deps_(deps) {}
  // Resolves the caller of `ctx` (Unauthenticated / PermissionDenied).
  absl::StatusOr<Caller> ResolveCaller(grpc::ServerContext* ctx) const;
  // Runs `fn(caller)` with metrics and logging, applying `role`.
  grpc::Status Run(grpc::ServerContext* ctx, const char* method, Role role,
                   const std::function<absl::Status(const Caller&)>& fn);
  const ServiceDeps& deps() const { return deps_; }
  void Record(const char* method, const absl::Status& status, double seconds);

 private:
  const ServiceDeps& deps_;
};

class SessionServiceImpl final : public v1::SessionService::Service {
 public:
  explicit SessionServiceImpl(const ServiceDeps& deps) : call_(deps) {}
  grpc::Status CreateSession(grpc::ServerContext* ctx, const v1::CreateSessionRequest* req,
                             v1::CreateSessionResponse* resp) override;
  grpc::Status GetSession(grpc::ServerContext* ctx, const v1::GetSessionRequest* req,
                          v1::GetSessionResponse* resp) override;
  grpc::Status ListSessions(grpc::ServerContext* ctx, const v1::ListSessionsRequest* req,
                            v1::ListSessionsResponse* resp) override;
  grpc::Status DropSession(grpc::ServerContext* ctx, const v1::DropSessionRequest* req,
                           v1::DropSessionResponse* resp) override;
  grpc::Status KeepAlive(grpc::ServerContext* ctx, const v1::KeepAliveRequest* req,
                         v1::KeepAliveResponse* resp) override;

 private:
  CallContext call_;
};

class BufferServiceImpl final : public v1::BufferService::Service {
 public:
  explicit BufferServiceImpl(const ServiceDeps& deps) : call_(deps) {}
  grpc::Status RegisterBuffer(grpc::ServerContext* ctx, const v1::RegisterBufferRequest* req,
                              v1::RegisterBufferResponse* resp) override;
  grpc::Status UnregisterBuffer(grpc::ServerContext* ctx, const v1::UnregisterBufferRequest* req,
                                v1::UnregisterBufferResponse* resp) override;

 private:
  CallContext call_;
};

class KvServiceImpl final : public v1::KvService::Service {
 public:
  explicit KvServiceImpl(const ServiceDeps& deps) : call_(deps) {}
  grpc::Status AppendKv(grpc::ServerContext* ctx, const v1::AppendKvRequest* req,
                        v1::AppendKvResponse* resp) override;
  grpc::Status SelectPages(grpc::ServerContext* ctx, const v1::SelectPagesRequest* req,
                           v1::SelectPagesResponse* resp) override;
  grpc::Status FetchPages(grpc::ServerContext* ctx, const v1::FetchPagesRequest* req,
                          v1::FetchPagesResponse* resp) override;
  grpc::Status DecodeStep(
      grpc::ServerContext* ctx,
      grpc::ServerReaderWriter<v1::DecodeStepResponse, v1::DecodeStepRequest>* stream) override;

 private:
  CallContext call_;
};

class AdminServiceImpl final : public v1::AdminService::Service {
 public:
  explicit AdminServiceImpl(const ServiceDeps& deps) : call_(deps) {}
  grpc::Status GetStats(grpc::ServerContext* ctx, const v1::GetStatsRequest* req,
                        v1::GetStatsResponse* resp) override;
  grpc::Status ListTenants(grpc::ServerContext* ctx, const v1::ListTenantsRequest* req,
                           v1::ListTenantsResponse* resp) override;
  grpc::Status SetQuota(grpc::ServerContext* ctx, const v1::SetQuotaRequest* req,
                        v1::SetQuotaResponse* resp) override;
  grpc::Status EvictSession(grpc::ServerContext* ctx, const v1::EvictSessionRequest* req,
                            v1::EvictSessionResponse* resp) override;
  grpc::Status PinSession(grpc::ServerContext* ctx, const v1::PinSessionRequest* req,
                          v1::PinSessionResponse* resp) override;
  grpc::Status Drain(grpc::ServerContext* ctx, const v1::DrainRequest* req,
                     v1::DrainResponse* resp) override;
  grpc::Status GetConfig(grpc::ServerContext* ctx, const v1::GetConfigRequest* req,
                         v1::GetConfigResponse* resp) override;

 private:
  CallContext call_;
};

}  // namespace icecache::rpc

#endif  // ICECACHE_SERVER_RPC_SERVICES_H_
