#include "server/rpc/services.h"

#include <chrono>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/status_macros.h"
#include "server/rpc/config.h"
#include "server/rpc/decode_step.h"
#include "server/rpc/log.h"
#include "server/rpc/status.h"

namespace icecache::rpc {
namespace {

constexpr int kMaxKeepAliveIds = 1024;

std::optional<absl::string_view> AuthorizationHeader(grpc::ServerContext* ctx) {
  const auto& md = ctx->client_metadata();
  auto it = md.find("authorization");
  if (it == md.end()) return std::nullopt;
  return absl::string_view(it->second.data(), it->second.size());
}

// The call's deadline; InfiniteFuture when it set none (gRPC's is then the
// clock's largest time, which absl::Time must not be made from).
absl::Time CallDeadline(const grpc::ServerContext& ctx) {
  const auto deadline = ctx.deadline();
  const auto now = std::chrono::system_clock::now();
  if (deadline >= now + std::chrono::hours(24 * 365)) return absl::InfiniteFuture();
  return absl::Now() + absl::FromChrono(deadline - now);
}

}  // namespace

RpcMetrics::RpcMetrics(Registry* r)
    : rpc_seconds(r->AddHistogram("icecache_rpc_duration_seconds",
                                  "Latency of RPCs (per DecodeStep stream: whole stream)",
                                  {"method"}, LatencyBucketsSeconds())),
      rpc_total(r->AddCounter("icecache_rpc_requests_total", "RPCs finished, by method and code",
                              {"method", "code"})),
      rejected_total(r->AddCounter("icecache_rpc_rejected_total",
                                   "RPCs answered with a non-OK code", {"code"})),
      select_seconds(r->AddHistogram("icecache_select_duration_seconds",
                                     "SelectPages latency (one layer, all KV heads)", {},
                                     LatencyBucketsSeconds())),
      fetch_seconds(r->AddHistogram("icecache_fetch_duration_seconds",
                                    "FetchPages latency (gather into the client buffer)", {},
                                    LatencyBucketsSeconds())),
      decode_step_seconds(r->AddHistogram("icecache_decode_step_duration_seconds",
                                          "DecodeStep latency per layer message (select + fetch)",
                                          {}, LatencyBucketsSeconds())),
      bytes_total(r->AddCounter("icecache_bytes_moved_total", "KV bytes moved, by direction",
                                {"direction"})),
      token_rows_total(r->AddCounter(
          "icecache_token_rows_total",
          "Token-granular fetch rows per layer: copied, or kept where the previous write of the "
          "layer put them (DecodeStepRequest.in_place)",
          {"how"})),
      in_flight(r->AddGauge("icecache_rpc_in_flight", "RPCs being handled now")->WithLabels({})) {}

void RecordFetchBytes(RpcMetrics& m, const FetchLayout& layout) {
  // Rows kept in place were not moved: only the copied rows' bytes count.
  uint64_t moved = layout.total_bytes;
  if (layout.rows_kept > 0 && layout.page_tokens > 0) {
    moved = layout.rows_copied * (layout.frame_bytes / layout.page_tokens) * layout.num_layers;
  }
  m.bytes_total->WithLabels({"fetch"})->Add(moved);
  if (layout.rows_copied > 0) m.token_rows_total->WithLabels({"copied"})->Add(layout.rows_copied);
  if (layout.rows_kept > 0) m.token_rows_total->WithLabels({"kept"})->Add(layout.rows_kept);
}

absl::StatusOr<Caller> CallContext::ResolveCaller(grpc::ServerContext* ctx) const {
  return deps_.auth->Resolve(ctx->peer(), *deps_.peers, AuthorizationHeader(ctx));
}

void CallContext::Record(const char* method, const absl::Status& status, double seconds) {
  RpcMetrics* m = deps_.metrics;
  if (m == nullptr) return;
  const std::string code = absl::StatusCodeToString(status.code());
  m->rpc_seconds->WithLabels({method})->Observe(seconds);
  m->rpc_total->WithLabels({method, code})->Add();
  if (!status.ok()) m->rejected_total->WithLabels({code})->Add();
}

grpc::Status CallContext::Run(grpc::ServerContext* ctx, const char* method, Role role,
                              const std::function<absl::Status(const Caller&)>& fn) {
  const auto t0 = std::chrono::steady_clock::now();
  if (deps_.metrics) deps_.metrics->in_flight->Add(1);
  absl::Status status;
  std::string tenant;
  absl::StatusOr<Caller> caller = ResolveCaller(ctx);
  if (!caller.ok()) {
    status = caller.status();
  } else {
    tenant = caller->tenant;
    if (role == Role::kAdminOnly && !caller->admin) {
      status = absl::PermissionDeniedError(
          absl::StrCat(method, " needs the admin role (auth.admin_uids for uid ", caller->uid,
                       ", or an admin bearer token)"));
    } else {
      // Tenant verbs take a place first; admin verbs and health use the
      // threads reserved for them (call_limiter.h).
      absl::StatusOr<CallTicket> ticket = CallTicket();
      if (role != Role::kAdminOnly && deps_.limiter != nullptr) {
        ticket = deps_.limiter->Acquire(caller->tenant);
      }
      if (role == Role::kTenant) caller->admin = false;
      status = ticket.ok() ? fn(*caller) : ticket.status();
    }
  }
  const double seconds = SecondsSince(t0);
  if (deps_.metrics) deps_.metrics->in_flight->Add(-1);
  Record(method, status, seconds);
  if (!status.ok() && status.code() == absl::StatusCode::kInternal) {
    Log(LogLevel::kError, "rpc_internal_error",
        {{"method", method}, {"tenant", tenant}, {"error", status.message()}});
  } else if (!status.ok() && status.code() == absl::StatusCode::kDataLoss) {
    Log(LogLevel::kError, "page_checksum_mismatch",
        {{"method", method}, {"tenant", tenant}, {"error", status.message()}});
  } else if (LogEnabled(LogLevel::kDebug)) {
    Log(LogLevel::kDebug, "rpc",
        {{"method", method},
         {"tenant", tenant},
         {"code", absl::StatusCodeToString(status.code())},
         {"us", static_cast<int64_t>(seconds * 1e6)},
         {"error", status.message()}});
  }
  return ToGrpcStatus(status);
}

// ---------------------------------------------------------------- sessions

grpc::Status SessionServiceImpl::CreateSession(grpc::ServerContext* ctx,
                                               const v1::CreateSessionRequest* req,
                                               v1::CreateSessionResponse* resp) {
  return call_.Run(ctx, "CreateSession", Role::kTenant, [&](const Caller& caller) -> absl::Status {
    const auto& deps = call_.deps();
    ASSIGN_OR_RETURN(SessionConfig config,
                     SessionConfigFromProto(req->config(), SelectDefaultsFromConfig(*deps.config)));
    ASSIGN_OR_RETURN(SessionInfo info, deps.manager->CreateSession(caller, config));
    SessionInfoToProto(info, resp->mutable_session());
    Log(LogLevel::kInfo, "session_created", {{"tenant", caller.tenant}, {"id", info.id}});
    return absl::OkStatus();
  });
}

grpc::Status SessionServiceImpl::GetSession(grpc::ServerContext* ctx,
                                            const v1::GetSessionRequest* req,
                                            v1::GetSessionResponse* resp) {
  return call_.Run(ctx, "GetSession", Role::kTenant, [&](const Caller& caller) -> absl::Status {
    RETURN_IF_ERROR(RequireId(req->session_id(), "session_id"));
    ASSIGN_OR_RETURN(SessionInfo info, call_.deps().manager->GetSession(caller, req->session_id()));
    SessionInfoToProto(info, resp->mutable_session());
    return absl::OkStatus();
  });
}

grpc::Status SessionServiceImpl::ListSessions(grpc::ServerContext* ctx,
                                              const v1::ListSessionsRequest* req,
                                              v1::ListSessionsResponse* resp) {
  return call_.Run(ctx, "ListSessions", Role::kKeepAdmin,
                   [&](const Caller& caller) -> absl::Status {
                     if (req->all_tenants() && !caller.admin) {
                       return absl::PermissionDeniedError(
                           "ListSessions with all_tenants needs the admin role (auth.admin_uids)");
                     }
                     for (const SessionInfo& info : call_.deps().manager->ListSessions(caller)) {
                       // The core shows admins everything; without all_tenants they see their own.
                       if (!req->all_tenants() && info.tenant != caller.tenant) continue;
                       SessionInfoToProto(info, resp->add_sessions());
                     }
                     return absl::OkStatus();
                   });
}

grpc::Status SessionServiceImpl::DropSession(grpc::ServerContext* ctx,
                                             const v1::DropSessionRequest* req,
                                             v1::DropSessionResponse* resp) {
  return call_.Run(ctx, "DropSession", Role::kTenant, [&](const Caller& caller) -> absl::Status {
    RETURN_IF_ERROR(RequireId(req->session_id(), "session_id"));
    RETURN_IF_ERROR(call_.deps().manager->DropSession(caller, req->session_id()));
    Log(LogLevel::kInfo, "session_dropped", {{"tenant", caller.tenant}, {"id", req->session_id()}});
    return absl::OkStatus();
  });
}

grpc::Status SessionServiceImpl::KeepAlive(grpc::ServerContext* ctx,
                                           const v1::KeepAliveRequest* req,
                                           v1::KeepAliveResponse* resp) {
  return call_.Run(ctx, "KeepAlive", Role::kTenant, [&](const Caller& caller) -> absl::Status {
    if (req->session_ids().empty() || req->session_ids_size() > kMaxKeepAliveIds) {
      return absl::InvalidArgumentError(absl::StrCat("session_ids must list 1..", kMaxKeepAliveIds,
                                                     " ids, got ", req->session_ids_size()));
    }
    for (const std::string& id : req->session_ids()) {
      RETURN_IF_ERROR(RequireId(id, "session_ids[]"));
      ASSIGN_OR_RETURN(SessionInfo info, call_.deps().manager->KeepAlive(caller, id));
      resp->add_expires_unix_ms(absl::ToUnixMillis(info.expires));
    }
    return absl::OkStatus();
  });
}

// ----------------------------------------------------------------- buffers

grpc::Status BufferServiceImpl::RegisterBuffer(grpc::ServerContext* ctx,
                                               const v1::RegisterBufferRequest* req,
                                               v1::RegisterBufferResponse* resp) {
  return call_.Run(ctx, "RegisterBuffer", Role::kTenant, [&](const Caller& caller) -> absl::Status {
    BufferRegistry* reg = call_.deps().buffers;
    BufferInfo info;
    switch (req->buffer_case()) {
      case v1::RegisterBufferRequest::kHostShm: {
        const v1::HostShm& shm = req->host_shm();
        if (shm.path().empty()) return absl::InvalidArgumentError("host_shm.path is required");
        if (shm.size() == 0) return absl::InvalidArgumentError("host_shm.size must be > 0");
        ASSIGN_OR_RETURN(info, reg->RegisterShm(caller, shm.path(), shm.size(), absl::Now()));
        break;
      }
      case v1::RegisterBufferRequest::kCudaIpc: {
        const v1::CudaIpc& ipc = req->cuda_ipc();
        if (ipc.size() == 0) return absl::InvalidArgumentError("cuda_ipc.size must be > 0");
        std::optional<PagedKvLayout> paged_kv;
        if (ipc.has_paged_kv()) {
          ASSIGN_OR_RETURN(paged_kv, PagedKvFromProto(ipc.paged_kv()));
        }
        ASSIGN_OR_RETURN(info,
                         reg->RegisterCudaIpc(caller, ipc.handle(), ipc.size(), ipc.device_uuid(),
                                              absl::Now(), paged_kv ? &*paged_kv : nullptr));
        break;
      }
      default:
        return absl::InvalidArgumentError("buffer: set host_shm or cuda_ipc");
    }
    BufferInfoToProto(info, resp);
    Log(LogLevel::kInfo, "buffer_registered",
        {{"tenant", caller.tenant},
         {"id", info.id},
         {"kind", std::string(BufferKindName(info.kind))},
         {"size", info.size}});
    return absl::OkStatus();
  });
}

grpc::Status BufferServiceImpl::UnregisterBuffer(grpc::ServerContext* ctx,
                                                 const v1::UnregisterBufferRequest* req,
                                                 v1::UnregisterBufferResponse* resp) {
  return call_.Run(ctx, "UnregisterBuffer", Role::kTenant,
                   [&](const Caller& caller) -> absl::Status {
                     RETURN_IF_ERROR(RequireId(req->buffer_id(), "buffer_id"));
                     return call_.deps().buffers->Unregister(caller, req->buffer_id());
                   });
}

// ---------------------------------------------------------------------- kv

grpc::Status KvServiceImpl::AppendKv(grpc::ServerContext* ctx, const v1::AppendKvRequest* req,
                                     v1::AppendKvResponse* resp) {
  return call_.Run(ctx, "AppendKv", Role::kTenant, [&](const Caller& caller) -> absl::Status {
    const auto& deps = call_.deps();
    RETURN_IF_ERROR(RequireId(req->session_id(), "session_id"));
    if (req->num_tokens() == 0) return absl::InvalidArgumentError("num_tokens must be > 0");
    const int64_t n = req->num_tokens();
    ASSIGN_OR_RETURN(LayerRange range, LayerRangeFromProto(req->first_layer(), req->num_layers()));
    AppendResult result;
    switch (req->source_case()) {
      case v1::AppendKvRequest::kInlineKv: {
        const std::string& bytes = req->inline_kv();
        if (bytes.size() > deps.config->limits().max_inline_bytes()) {
          return absl::InvalidArgumentError(absl::StrCat(
              "inline_kv has ", bytes.size(), " bytes, above limits.max_inline_bytes = ",
              deps.config->limits().max_inline_bytes(), "; send it through a registered buffer"));
        }
        ASSIGN_OR_RETURN(
            result,
            deps.manager->AppendKv(
                caller, req->session_id(), n,
                absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()),
                range));
        deps.metrics->bytes_total->WithLabels({"append_inline"})->Add(bytes.size());
        break;
      }
      case v1::AppendKvRequest::kRegion: {
        const v1::BufferRegion& region = req->region();
        RETURN_IF_ERROR(RequireId(region.buffer_id(), "region.buffer_id"));
        ASSIGN_OR_RETURN(SessionInfo info, deps.manager->GetSession(caller, req->session_id()));
        const uint64_t want = AppendBytes(info.config, n, range);
        if (region.length() != 0 && region.length() != want) {
          return absl::InvalidArgumentError(absl::StrCat(
              "region.length = ", region.length(), " but ", n, " tokens of these layers take ",
              want, " bytes (2 x layers x kv_heads x n x head_dim x dtype size)"));
        }
        ASSIGN_OR_RETURN(result, deps.manager->AppendKvFromBuffer(
                                     caller, req->session_id(), n, region.buffer_id(),
                                     region.offset(), range, CallDeadline(*ctx)));
        deps.metrics->bytes_total->WithLabels({"append_buffer"})->Add(want);
        break;
      }
      default:
        return absl::InvalidArgumentError("source: set region or inline_kv");
    }
    resp->set_tokens(static_cast<uint64_t>(result.tokens));
    resp->set_bytes(result.frame_bytes);
    resp->set_next_layer(static_cast<uint32_t>(result.next_layer));
    return absl::OkStatus();
  });
}

grpc::Status KvServiceImpl::SelectPages(grpc::ServerContext* ctx, const v1::SelectPagesRequest* req,
                                        v1::SelectPagesResponse* resp) {
  return call_.Run(ctx, "SelectPages", Role::kTenant, [&](const Caller& caller) -> absl::Status {
    const auto& deps = call_.deps();
    RETURN_IF_ERROR(RequireId(req->session_id(), "session_id"));
    SelectRequest sr;
    ASSIGN_OR_RETURN(sr.layer, LayerIndex(req->layer()));
    ASSIGN_OR_RETURN(sr.queries, QueriesFromProto(req->queries(), req->query_dtype(),
                                                  req->reuse_group_selection()));
    ASSIGN_OR_RETURN(sr.params, SelectParamsFromProto(req->params()));
    ASSIGN_OR_RETURN(sr.granularity,
                     GranularityFromProto(req->params().granularity(), "params.granularity"));
    sr.reuse_group_selection = req->reuse_group_selection();
    const auto t0 = std::chrono::steady_clock::now();
    ASSIGN_OR_RETURN(SelectResult r, deps.manager->SelectPages(caller, req->session_id(), sr));
    deps.metrics->select_seconds->WithLabels({})->Observe(SecondsSince(t0));
    for (size_t h = 0; h < r.heads.size(); ++h) {
      SelectionToProto(r.heads[h], static_cast<int>(h), resp->add_heads());
    }
    resp->set_reused(r.reused);
    return absl::OkStatus();
  });
}

grpc::Status KvServiceImpl::FetchPages(grpc::ServerContext* ctx, const v1::FetchPagesRequest* req,
                                       v1::FetchPagesResponse* resp) {
  return call_.Run(ctx, "FetchPages", Role::kTenant, [&](const Caller& caller) -> absl::Status {
    const auto& deps = call_.deps();
    RETURN_IF_ERROR(RequireId(req->session_id(), "session_id"));
    RETURN_IF_ERROR(RequireId(req->buffer_id(), "buffer_id"));
    FetchRequest fr;
    ASSIGN_OR_RETURN(fr.layer, LayerIndex(req->layer()));
    ASSIGN_OR_RETURN(fr.num_layers, LayerCount(req->num_layers()));
    ASSIGN_OR_RETURN(fr.pages, FetchPagesFromProto(req->heads()));
    ASSIGN_OR_RETURN(fr.tokens, FetchTokensFromProto(req->heads()));
    if (!fr.tokens.empty()) fr.pages.clear();
    fr.buffer_id = req->buffer_id();
    fr.offset = req->offset();
    fr.want_positions = req->want_positions();
    fr.device = DeviceWriteFromProto(*req);
    const auto t0 = std::chrono::steady_clock::now();
    ASSIGN_OR_RETURN(FetchLayout layout, deps.manager->FetchPages(caller, req->session_id(), fr));
    deps.metrics->fetch_seconds->WithLabels({})->Observe(SecondsSince(t0));
    RecordFetchBytes(*deps.metrics, layout);
    FetchLayoutToProto(layout, req->buffer_id(), resp->mutable_layout());
    return absl::OkStatus();
  });
}

grpc::Status KvServiceImpl::DecodeStep(
    grpc::ServerContext* ctx,
    grpc::ServerReaderWriter<v1::DecodeStepResponse, v1::DecodeStepRequest>* stream) {
  return call_.Run(ctx, "DecodeStep", Role::kTenant, [&](const Caller& caller) -> absl::Status {
    DecodeCursor cursor;
    v1::DecodeStepRequest req;
    v1::DecodeStepResponse resp;
    while (stream->Read(&req)) {
      RETURN_IF_ERROR(HandleDecodeMessage(call_.deps(), caller, req, &cursor, &resp));
      if (!stream->Write(resp)) return absl::CancelledError("DecodeStep: the client went away");
    }
    return absl::OkStatus();
  });
}

// ------------------------------------------------------------------- admin

grpc::Status AdminServiceImpl::GetStats(grpc::ServerContext* ctx, const v1::GetStatsRequest* req,
                                        v1::GetStatsResponse* resp) {
  return call_.Run(ctx, "GetStats", Role::kAdminOnly, [&](const Caller& caller) -> absl::Status {
    const auto& deps = call_.deps();
    ASSIGN_OR_RETURN(ManagerStats stats, deps.manager->Stats(caller));
    ASSIGN_OR_RETURN(std::vector<TenantInfo> tenants, deps.manager->ListTenants(caller));
    StatsToProto(stats, tenants, deps.start_unix_ms, resp);
    return absl::OkStatus();
  });
}

grpc::Status AdminServiceImpl::ListTenants(grpc::ServerContext* ctx,
                                           const v1::ListTenantsRequest* req,
                                           v1::ListTenantsResponse* resp) {
  return call_.Run(ctx, "ListTenants", Role::kAdminOnly, [&](const Caller& caller) -> absl::Status {
    ASSIGN_OR_RETURN(std::vector<TenantInfo> tenants, call_.deps().manager->ListTenants(caller));
    for (const TenantInfo& t : tenants) TenantInfoToProto(t, resp->add_tenants());
    return absl::OkStatus();
  });
}

grpc::Status AdminServiceImpl::SetQuota(grpc::ServerContext* ctx, const v1::SetQuotaRequest* req,
                                        v1::SetQuotaResponse* resp) {
  return call_.Run(ctx, "SetQuota", Role::kAdminOnly, [&](const Caller& caller) -> absl::Status {
    if (!IsValidTenantName(req->tenant())) {
      return absl::InvalidArgumentError(
          absl::StrCat("tenant \"", req->tenant(), "\" must be 1..128 bytes of [A-Za-z0-9._@:-]"));
    }
    SessionManager* m = call_.deps().manager;
    RETURN_IF_ERROR(m->SetQuota(caller, req->tenant(), QuotaFromProto(req->quota_bytes())));
    ASSIGN_OR_RETURN(std::vector<TenantInfo> tenants, m->ListTenants(caller));
    v1::TenantInfo* out = resp->mutable_tenant();
    out->set_tenant(req->tenant());
    out->set_quota_bytes(req->quota_bytes());
    for (const TenantInfo& t : tenants) {
      if (t.tenant == req->tenant()) TenantInfoToProto(t, out);
    }
    Log(LogLevel::kInfo, "quota_set", {{"tenant", req->tenant()}, {"bytes", req->quota_bytes()}});
    return absl::OkStatus();
  });
}

grpc::Status AdminServiceImpl::EvictSession(grpc::ServerContext* ctx,
                                            const v1::EvictSessionRequest* req,
                                            v1::EvictSessionResponse* resp) {
  return call_.Run(ctx, "EvictSession", Role::kAdminOnly,
                   [&](const Caller& caller) -> absl::Status {
                     RETURN_IF_ERROR(RequireId(req->session_id(), "session_id"));
                     RETURN_IF_ERROR(call_.deps().manager->EvictSession(caller, req->session_id()));
                     Log(LogLevel::kInfo, "session_evicted_by_admin", {{"id", req->session_id()}});
                     return absl::OkStatus();
                   });
}

grpc::Status AdminServiceImpl::PinSession(grpc::ServerContext* ctx,
                                          const v1::PinSessionRequest* req,
                                          v1::PinSessionResponse* resp) {
  return call_.Run(ctx, "PinSession", Role::kAdminOnly, [&](const Caller& caller) -> absl::Status {
    RETURN_IF_ERROR(RequireId(req->session_id(), "session_id"));
    ASSIGN_OR_RETURN(SessionInfo info,
                     call_.deps().manager->PinSession(caller, req->session_id(), req->pinned()));
    SessionInfoToProto(info, resp->mutable_session());
    return absl::OkStatus();
  });
}

grpc::Status AdminServiceImpl::Drain(grpc::ServerContext* ctx, const v1::DrainRequest* req,
                                     v1::DrainResponse* resp) {
  return call_.Run(ctx, "Drain", Role::kAdminOnly, [&](const Caller& caller) -> absl::Status {
    const auto& deps = call_.deps();
    // Refused (nothing changes) when the daemon cannot keep its sessions.
    if (req->for_upgrade() && deps.can_upgrade && !deps.can_upgrade()) {
      return absl::FailedPreconditionError(
          "drain --for-upgrade needs a file-backed arena (pool.backing_dir); without it the "
          "sessions end with the process: use drain --shutdown");
    }
    ASSIGN_OR_RETURN(int in_flight, deps.manager->Drain(caller, true));
    ASSIGN_OR_RETURN(ManagerStats stats, deps.manager->Stats(caller));
    // This call itself is in flight as an RPC but not on a session.
    resp->set_in_flight(static_cast<uint32_t>(std::max(0, in_flight)));
    resp->set_sessions(static_cast<uint32_t>(std::max(0, stats.sessions)));
    Log(LogLevel::kWarn, "drain_requested",
        {{"by", caller.tenant},
         {"shutdown", req->shutdown() || req->for_upgrade() ? "true" : "false"},
         {"for_upgrade", req->for_upgrade() ? "true" : "false"}});
    if (deps.on_drain) {
      RETURN_IF_ERROR(deps.on_drain(req->shutdown() || req->for_upgrade(), req->for_upgrade()));
    }
    return absl::OkStatus();
  });
}

grpc::Status AdminServiceImpl::GetConfig(grpc::ServerContext* ctx, const v1::GetConfigRequest* req,
                                         v1::GetConfigResponse* resp) {
  return call_.Run(ctx, "GetConfig", Role::kAdminOnly, [&](const Caller&) -> absl::Status {
    *resp->mutable_config() = RedactSecrets(*call_.deps().config);
    return absl::OkStatus();
  });
}

}  // namespace icecache::rpc
