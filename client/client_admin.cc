// The C++ client's admin calls: stats, tenants and quotas, eviction and
// pinning, drain, the daemon's config and health (client.h).
#include <google/protobuf/text_format.h>
#include <google/protobuf/util/json_util.h>

#include <string>
#include <string_view>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/client_internal.h"
#include "common/status_macros.h"

namespace icecache {
namespace {

constexpr char kHealthCheckMethod[] = "/grpc.health.v1.Health/Check";

}  // namespace

// ---------------------------------------------------------------- admin

absl::StatusOr<DaemonStats> Client::GetStats() {
  v1::GetStatsRequest req;
  v1::GetStatsResponse r;
  auto ctx = impl_->NewContext();
  RETURN_IF_ERROR(FromGrpcStatus(impl_->admin->GetStats(ctx.get(), req, &r)));
  DaemonStats s;
  s.epoch = r.epoch();
  s.start = FromUnixMs(r.start_unix_ms());
  s.capacity_bytes = r.capacity_bytes();
  s.bytes_reserved = r.bytes_reserved();
  s.bytes_used = r.bytes_used();
  s.sessions = r.sessions();
  s.buffers = r.buffers();
  s.evictions = r.evictions();
  s.expirations = r.expirations();
  s.in_flight = r.in_flight();
  s.draining = r.draining();
  s.sessions_created = r.sessions_created();
  s.sessions_dropped = r.sessions_dropped();
  s.admissions_rejected = r.admissions_rejected();
  s.frames_used = r.frames_used();
  s.frames_free = r.frames_free();
  s.huge_pages = r.huge_pages();
  s.pages_verified = r.pages_verified();
  s.checksum_failures = r.checksum_failures();
  s.pool_pinned_bytes = r.pool_pinned_bytes();
  s.gpu_pushes_in_place = r.gpu_pushes_in_place();
  s.gpu_pushes_staged = r.gpu_pushes_staged();
  for (const auto& c : r.size_classes()) {
    s.size_classes.push_back(
        SizeClassInfo{c.frame_bytes(), c.frames_used(), c.frames_free(), c.bytes_reserved()});
  }
  for (const auto& t : r.tenants()) s.tenants.push_back(FromProto(t));
  return s;
}

absl::StatusOr<std::vector<TenantInfo>> Client::ListTenants() {
  v1::ListTenantsRequest req;
  v1::ListTenantsResponse resp;
  auto ctx = impl_->NewContext();
  RETURN_IF_ERROR(FromGrpcStatus(impl_->admin->ListTenants(ctx.get(), req, &resp)));
  std::vector<TenantInfo> out;
  for (const auto& t : resp.tenants()) out.push_back(FromProto(t));
  return out;
}

absl::StatusOr<TenantInfo> Client::SetQuota(std::string_view tenant, uint64_t quota_bytes) {
  v1::SetQuotaRequest req;
  req.set_tenant(std::string(tenant));
  req.set_quota_bytes(quota_bytes);
  v1::SetQuotaResponse resp;
  auto ctx = impl_->NewContext();
  RETURN_IF_ERROR(FromGrpcStatus(impl_->admin->SetQuota(ctx.get(), req, &resp)));
  return FromProto(resp.tenant());
}

absl::Status Client::EvictSession(std::string_view session_id) {
  (void)CloseDecodeStream(session_id);
  v1::EvictSessionRequest req;
  req.set_session_id(std::string(session_id));
  v1::EvictSessionResponse resp;
  auto ctx = impl_->NewContext();
  return FromGrpcStatus(impl_->admin->EvictSession(ctx.get(), req, &resp));
}

absl::StatusOr<SessionInfo> Client::PinSession(std::string_view session_id, bool pinned) {
  v1::PinSessionRequest req;
  req.set_session_id(std::string(session_id));
  req.set_pinned(pinned);
  v1::PinSessionResponse resp;
  auto ctx = impl_->NewContext();
  RETURN_IF_ERROR(FromGrpcStatus(impl_->admin->PinSession(ctx.get(), req, &resp)));
  return FromProto(resp.session());
}

absl::StatusOr<DrainInfo> Client::Drain(bool shutdown, bool for_upgrade) {
  v1::DrainRequest req;
  req.set_shutdown(shutdown);
  req.set_for_upgrade(for_upgrade);
  v1::DrainResponse resp;
  auto ctx = impl_->NewContext();
  RETURN_IF_ERROR(FromGrpcStatus(impl_->admin->Drain(ctx.get(), req, &resp)));
  return DrainInfo{resp.in_flight(), resp.sessions()};
}

absl::StatusOr<std::string> Client::GetConfig(bool json) {
  v1::GetConfigRequest req;
  v1::GetConfigResponse resp;
  auto ctx = impl_->NewContext();
  RETURN_IF_ERROR(FromGrpcStatus(impl_->admin->GetConfig(ctx.get(), req, &resp)));
  std::string out;
  if (json) {
    google::protobuf::util::JsonPrintOptions opts;
    opts.add_whitespace = true;
    opts.preserve_proto_field_names = true;
    auto st = google::protobuf::util::MessageToJsonString(resp.config(), &out, opts);
    if (!st.ok()) return absl::InternalError(absl::StrCat("config to JSON: ", st.ToString()));
  } else if (!google::protobuf::TextFormat::PrintToString(resp.config(), &out)) {
    return absl::InternalError("config to text format failed");
  }
  return out;
}

absl::StatusOr<bool> Client::Health(std::string_view service) {
  // grpc.health.v1.HealthCheckRequest { string service = 1; } encoded by
  // hand: no generated health stubs ship with Debian's gRPC.
  std::string req;
  if (!service.empty()) {
    if (service.size() > 127) return absl::InvalidArgumentError("health service name too long");
    req.push_back(0x0a);
    req.push_back(static_cast<char>(service.size()));
    req.append(service);
  }
  grpc::Slice slice(req);
  grpc::ByteBuffer request(&slice, 1);
  grpc::ByteBuffer response;
  auto ctx = impl_->NewContext();
  absl::Mutex mu;
  bool done = false;
  grpc::Status status;
  impl_->generic->UnaryCall(ctx.get(), kHealthCheckMethod, grpc::StubOptions(), &request, &response,
                            [&](grpc::Status s) {
                              absl::MutexLock lock(&mu);
                              status = std::move(s);
                              done = true;
                            });
  {
    absl::MutexLock lock(&mu);
    mu.Await(absl::Condition(&done));
  }
  RETURN_IF_ERROR(FromGrpcStatus(status));
  std::vector<grpc::Slice> slices;
  if (!response.Dump(&slices).ok()) return absl::InternalError("cannot read health response");
  std::string bytes;
  for (const auto& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  // HealthCheckResponse { ServingStatus status = 1; }: SERVING = 1.
  int value = 0;
  if (bytes.size() >= 2 && bytes[0] == 0x08) value = static_cast<unsigned char>(bytes[1]);
  return value == 1;
}

}  // namespace icecache
