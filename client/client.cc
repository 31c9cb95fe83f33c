#include "client/client.h"

#include <fcntl.h>
#include <google/protobuf/text_format.h>
#include <google/protobuf/util/json_util.h>
#include <grpcpp/generic/generic_stub.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/client_internal.h"
#include "common/file_util.h"
#include "common/random_id.h"
#include "common/socket_path.h"
#include "common/status_macros.h"

namespace icecache {
namespace {

std::string Env(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr ? std::string() : std::string(v);
}

absl::Time FromUnixMs(int64_t ms) {
  return ms == 0 ? absl::InfinitePast() : absl::FromUnixMillis(ms);
}

absl::string_view Sv(std::string_view s) { return absl::string_view(s.data(), s.size()); }
bool HasPrefix(std::string_view s, std::string_view p) { return s.substr(0, p.size()) == p; }

constexpr char kHealthCheckMethod[] = "/grpc.health.v1.Health/Check";

}  // namespace

// ---------------------------------------------------------------- status

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  int code = static_cast<int>(status.error_code());
  if (code < 0 || code > static_cast<int>(absl::StatusCode::kUnauthenticated)) {
    code = static_cast<int>(absl::StatusCode::kUnknown);
  }
  return absl::Status(static_cast<absl::StatusCode>(code), status.error_message());
}

// ---------------------------------------------------------------- names

std::string_view SelectorTypeName(SelectorType type) {
  switch (type) {
    case SelectorType::kDefault:
      return "default";
    case SelectorType::kMdci:
      return "mdci";
    case SelectorType::kExactMdci:
      return "exact-mdci";
    case SelectorType::kExact:
      return "exact";
    case SelectorType::kQuest:
      return "quest";
    case SelectorType::kStreaming:
      return "streaming";
    case SelectorType::kArkvale:
      return "arkvale";
    case SelectorType::kPqcache:
      return "pqcache";
    case SelectorType::kSnapkv:
      return "snapkv";
    case SelectorType::kOmnikv:
      return "omnikv";
    case SelectorType::kMagicpig:
      return "magicpig";
    case SelectorType::kMdciPublished:
      return "mdci-published";
  }
  return "unknown";
}

absl::StatusOr<SelectorType> ParseSelectorType(std::string_view name) {
  for (SelectorType t :
       {SelectorType::kDefault, SelectorType::kMdci, SelectorType::kExactMdci, SelectorType::kExact,
        SelectorType::kQuest, SelectorType::kStreaming, SelectorType::kArkvale,
        SelectorType::kPqcache, SelectorType::kSnapkv, SelectorType::kOmnikv,
        SelectorType::kMagicpig, SelectorType::kMdciPublished}) {
    if (name == SelectorTypeName(t)) return t;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown selector '", Sv(name),
      "'; known: default, mdci, exact-mdci, exact, quest, streaming, arkvale, pqcache, snapkv, "
      "omnikv, magicpig, mdci-published"));
}

size_t SessionSpec::ChunkBytes(int64_t tokens) const {
  return 2 * static_cast<size_t>(layers) * kv_heads * static_cast<size_t>(tokens) * head_dim *
         DTypeSize(dtype);
}

// ---------------------------------------------------------------- proto conversions

v1::DType ToProtoDType(DType dtype) {
  switch (dtype) {
    case DType::kF16:
      return v1::DTYPE_FLOAT16;
    case DType::kBF16:
      return v1::DTYPE_BFLOAT16;
    case DType::kF32:
      return v1::DTYPE_FLOAT32;
  }
  return v1::DTYPE_UNSPECIFIED;
}

absl::StatusOr<DType> FromProtoDType(v1::DType dtype) {
  switch (dtype) {
    case v1::DTYPE_FLOAT16:
      return DType::kF16;
    case v1::DTYPE_BFLOAT16:
      return DType::kBF16;
    case v1::DTYPE_FLOAT32:
      return DType::kF32;
    default:
      break;
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown dtype ", static_cast<int>(dtype)));
}

void ToProto(const SelectOptions& options, v1::SelectParams* out) {
  if (options.budget_tokens) out->set_budget_tokens(*options.budget_tokens);
  if (options.sink_tokens) out->set_sink_tokens(*options.sink_tokens);
  if (options.recent_tokens) out->set_recent_tokens(*options.recent_tokens);
  out->set_want_positions(options.want_positions);
  switch (options.granularity) {
    case SelectionGranularity::kPage:
      out->set_granularity(v1::GRANULARITY_PAGE);
      break;
    case SelectionGranularity::kToken:
      out->set_granularity(v1::GRANULARITY_TOKEN);
      break;
    default:
      break;
  }
}

void ToProto(const SessionSpec& spec, v1::SessionConfig* out) {
  auto* m = out->mutable_model();
  m->set_layers(static_cast<uint32_t>(spec.layers));
  m->set_kv_heads(static_cast<uint32_t>(spec.kv_heads));
  m->set_q_heads(static_cast<uint32_t>(spec.q_heads));
  m->set_head_dim(static_cast<uint32_t>(spec.head_dim));
  m->set_dtype(ToProtoDType(spec.dtype));
  out->set_page_tokens(static_cast<uint32_t>(spec.page_tokens));
  out->mutable_selector()->set_kind(static_cast<v1::SelectorKind>(spec.selector));
  out->set_layer_reuse(static_cast<uint32_t>(spec.layer_reuse));
  ToProto(spec.defaults, out->mutable_defaults());
  out->set_ttl_ms(static_cast<uint64_t>(absl::ToInt64Milliseconds(spec.ttl)));
  out->set_pinned(spec.pinned);
  if (spec.target_mass_ratio) out->set_target_mass_ratio(*spec.target_mass_ratio);
  out->mutable_checksums()->set_mode(static_cast<v1::ChecksumMode>(spec.checksums));
  out->mutable_checksums()->set_sample_fraction(spec.checksum_sample_fraction);
}

namespace {

SessionQuality QualityFromProto(const v1::SessionQuality& q) {
  SessionQuality s;
  s.monitored = q.monitored();
  s.target_mass_ratio = q.target_mass_ratio();
  s.samples = q.samples();
  s.samples_dropped = q.samples_dropped();
  s.samples_stale = q.samples_stale();
  s.mean_mass_ratio = q.mean_mass_ratio();
  s.recent_mass_ratio = q.recent_mass_ratio();
  s.mean_topk_recall = q.mean_topk_recall();
  s.calibration_cpu_ms = q.calibration_cpu_ms();
  s.selection_ms = q.selection_ms();
  for (const v1::HeadQuality& h : q.heads()) {
    HeadQuality o;
    o.layer_group = h.layer_group();
    o.kv_head = h.kv_head();
    o.calibrated = h.calibrated();
    o.width = h.width();
    o.field_of_view = h.field_of_view();
    o.candidate_factor = h.candidate_factor();
    o.width_changes = h.width_changes();
    o.samples = h.samples();
    o.mean_mass_ratio = h.mean_mass_ratio();
    o.recent_mass_ratio = h.recent_mass_ratio();
    o.last_mass_ratio = h.last_mass_ratio();
    o.mean_topk_recall = h.mean_topk_recall();
    s.heads.push_back(o);
  }
  return s;
}

}  // namespace

SessionInfo FromProto(const v1::SessionInfo& info) {
  SessionInfo s;
  s.id = info.session_id();
  s.epoch = info.epoch();
  s.tenant = info.tenant();
  const auto& c = info.config();
  s.spec.layers = static_cast<int>(c.model().layers());
  s.spec.kv_heads = static_cast<int>(c.model().kv_heads());
  s.spec.q_heads = static_cast<int>(c.model().q_heads());
  s.spec.head_dim = static_cast<int>(c.model().head_dim());
  s.spec.dtype = FromProtoDType(c.model().dtype()).value_or(DType::kF16);
  s.spec.page_tokens = static_cast<int>(c.page_tokens());
  s.spec.selector = static_cast<SelectorType>(c.selector().kind());
  s.spec.layer_reuse = static_cast<int>(c.layer_reuse());
  if (c.defaults().has_budget_tokens())
    s.spec.defaults.budget_tokens = c.defaults().budget_tokens();
  if (c.defaults().has_sink_tokens()) s.spec.defaults.sink_tokens = c.defaults().sink_tokens();
  if (c.defaults().has_recent_tokens())
    s.spec.defaults.recent_tokens = c.defaults().recent_tokens();
  if (c.defaults().granularity() == v1::GRANULARITY_PAGE) {
    s.spec.defaults.granularity = SelectionGranularity::kPage;
  } else if (c.defaults().granularity() == v1::GRANULARITY_TOKEN) {
    s.spec.defaults.granularity = SelectionGranularity::kToken;
  }
  s.spec.ttl = absl::Milliseconds(static_cast<int64_t>(c.ttl_ms()));
  s.spec.pinned = c.pinned();
  if (c.has_target_mass_ratio()) s.spec.target_mass_ratio = c.target_mass_ratio();
  if (c.checksums().mode() >= v1::CHECKSUM_MODE_OFF &&
      c.checksums().mode() <= v1::CHECKSUM_MODE_SAMPLED) {
    s.spec.checksums = static_cast<SessionSpec::Checksums>(c.checksums().mode());
  }
  s.spec.checksum_sample_fraction = c.checksums().sample_fraction();
  s.tokens = info.tokens();
  s.created = FromUnixMs(info.created_unix_ms());
  s.last_use = FromUnixMs(info.last_use_unix_ms());
  s.expires = FromUnixMs(info.expires_unix_ms());
  s.pinned = info.pinned();
  s.bytes = info.bytes();
  s.pages = info.pages();
  s.index_bytes = info.index_bytes();
  s.in_flight = info.in_flight();
  s.trees_built = info.trees_built();
  s.trees_total = info.trees_total();
  s.next_layer = info.next_layer();
  s.quality = QualityFromProto(info.quality());
  return s;
}

HeadSelection FromProto(const v1::HeadSelection& head) {
  HeadSelection h;
  h.kv_head = head.kv_head();
  h.pages.assign(head.pages().begin(), head.pages().end());
  h.fills.assign(head.fills().begin(), head.fills().end());
  h.scores.assign(head.scores().begin(), head.scores().end());
  h.positions.assign(head.positions().begin(), head.positions().end());
  h.keys_touched = head.keys_touched();
  return h;
}

FetchLayout FromProto(const v1::FetchLayout& layout) {
  FetchLayout l;
  l.buffer_id = layout.buffer_id();
  l.offset = layout.offset();
  l.total_bytes = layout.total_bytes();
  l.page_bytes = layout.page_bytes();
  l.first_layer = layout.first_layer();
  l.num_layers = layout.num_layers();
  l.layer_stride_bytes = layout.layer_stride_bytes();
  l.page_tokens = layout.page_tokens();
  l.head_dim = layout.head_dim();
  l.dtype = FromProtoDType(layout.dtype()).value_or(DType::kF16);
  for (const auto& h : layout.heads()) {
    HeadLayout hl;
    hl.kv_head = h.kv_head();
    hl.pages.assign(h.pages().begin(), h.pages().end());
    hl.slots.assign(h.slots().begin(), h.slots().end());
    hl.fills.assign(h.fills().begin(), h.fills().end());
    hl.byte_offsets.assign(h.byte_offsets().begin(), h.byte_offsets().end());
    hl.positions.assign(h.positions().begin(), h.positions().end());
    l.heads.push_back(std::move(hl));
  }
  return l;
}

TenantInfo FromProto(const v1::TenantInfo& tenant) {
  TenantInfo t;
  t.tenant = tenant.tenant();
  t.bytes_used = tenant.bytes_used();
  t.quota_bytes = tenant.quota_bytes();
  t.sessions = tenant.sessions();
  t.buffers = tenant.buffers();
  return t;
}

// ---------------------------------------------------------------- Impl

std::unique_ptr<grpc::ClientContext> Client::Impl::NewContext(bool deadline) const {
  auto ctx = std::make_unique<grpc::ClientContext>();
  if (deadline) {
    ctx->set_deadline(absl::ToChronoTime(absl::Now() + options.timeout));
  }
  if (!token.empty()) ctx->AddMetadata("authorization", "Bearer " + token);
  return ctx;
}

absl::StatusOr<std::unique_ptr<Client>> Client::Create(const ClientOptions& options) {
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  if (options.timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("ClientOptions.timeout must be positive");
  }
  if (options.max_message_bytes < 4096) {
    return absl::InvalidArgumentError("ClientOptions.max_message_bytes must be >= 4096");
  }
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(options.max_message_bytes);
  args.SetMaxSendMessageSize(options.max_message_bytes);
  std::string address = options.address.empty() ? Env("ICECACHE_ADDRESS") : options.address;
  std::shared_ptr<grpc::ChannelCredentials> creds;
  if (!address.empty()) {
    impl->target = address;
    impl->token = options.token.empty() ? Env("ICECACHE_TOKEN") : options.token;
    grpc::SslCredentialsOptions ssl;
    if (!options.ca_file.empty()) {
      ASSIGN_OR_RETURN(ssl.pem_root_certs, ReadFileToString(options.ca_file));
    }
    creds = grpc::SslCredentials(ssl);
  } else {
    std::string path = options.socket_path;
    if (path.empty()) path = Env("ICECACHE_SOCKET");
    if (path.empty()) path = ClientDefaultSocketPath();  // common/socket_path.h
    if (HasPrefix(path, "unix:")) path = path.substr(5);
    if (path.empty() || path[0] != '/') {
      return absl::InvalidArgumentError(absl::StrCat(
          "socket path '", path, "' must be absolute (e.g. /run/icecache/icecached.sock)"));
    }
    impl->target = "unix:" + path;
    creds = grpc::InsecureChannelCredentials();
  }
  impl->channel = grpc::CreateCustomChannel(impl->target, creds, args);
  impl->sessions = v1::SessionService::NewStub(impl->channel);
  impl->buffers = v1::BufferService::NewStub(impl->channel);
  impl->kv = v1::KvService::NewStub(impl->channel);
  impl->admin = v1::AdminService::NewStub(impl->channel);
  impl->rings = v1::DecodeRingService::NewStub(impl->channel);
  impl->generic = std::make_unique<grpc::GenericStub>(impl->channel);
  return std::unique_ptr<Client>(new Client(std::move(impl)));
}

absl::StatusOr<std::unique_ptr<Client>> Client::Create(std::string_view target) {
  ClientOptions options;
  if (HasPrefix(target, "unix:") || HasPrefix(target, "/")) {
    options.socket_path = std::string(target);
  } else {
    options.address = std::string(target);
  }
  return Create(options);
}

Client::Client(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Client::~Client() {
  std::vector<std::string> ids;
  {
    absl::MutexLock lock(&impl_->streams_mu);
    for (const auto& [id, state] : impl_->streams) ids.push_back(id);
  }
  for (const auto& id : ids) (void)CloseDecodeStream(id);
}

const std::string& Client::target() const { return impl_->target; }

// ---------------------------------------------------------------- sessions

absl::StatusOr<SessionInfo> Client::CreateSession(const SessionSpec& spec) {
  v1::CreateSessionRequest req;
  ToProto(spec, req.mutable_config());
  v1::CreateSessionResponse resp;
  auto ctx = impl_->NewContext();
  RETURN_IF_ERROR(FromGrpcStatus(impl_->sessions->CreateSession(ctx.get(), req, &resp)));
  return FromProto(resp.session());
}

absl::StatusOr<SessionInfo> Client::GetSession(std::string_view session_id) {
  v1::GetSessionRequest req;
  req.set_session_id(std::string(session_id));
  v1::GetSessionResponse resp;
  auto ctx = impl_->NewContext();
  RETURN_IF_ERROR(FromGrpcStatus(impl_->sessions->GetSession(ctx.get(), req, &resp)));
  return FromProto(resp.session());
}

absl::StatusOr<std::vector<SessionInfo>> Client::ListSessions(bool all_tenants) {
  v1::ListSessionsRequest req;
  req.set_all_tenants(all_tenants);
  v1::ListSessionsResponse resp;
  auto ctx = impl_->NewContext();
  RETURN_IF_ERROR(FromGrpcStatus(impl_->sessions->ListSessions(ctx.get(), req, &resp)));
  std::vector<SessionInfo> out;
  for (const auto& s : resp.sessions()) out.push_back(FromProto(s));
  return out;
}

absl::StatusOr<std::vector<absl::Time>> Client::KeepAlive(
    const std::vector<std::string>& session_ids) {
  v1::KeepAliveRequest req;
  for (const auto& id : session_ids) req.add_session_ids(id);
  v1::KeepAliveResponse resp;
  auto ctx = impl_->NewContext();
  RETURN_IF_ERROR(FromGrpcStatus(impl_->sessions->KeepAlive(ctx.get(), req, &resp)));
  std::vector<absl::Time> out;
  for (int64_t ms : resp.expires_unix_ms()) out.push_back(FromUnixMs(ms));
  return out;
}

absl::Status Client::DropSession(std::string_view session_id) {
  (void)CloseDecodeStream(session_id);
  v1::DropSessionRequest req;
  req.set_session_id(std::string(session_id));
  v1::DropSessionResponse resp;
  auto ctx = impl_->NewContext();
  return FromGrpcStatus(impl_->sessions->DropSession(ctx.get(), req, &resp));
}

// ---------------------------------------------------------------- buffers

absl::StatusOr<std::string> Client::RegisterShm(std::string_view path, uint64_t size) {
  v1::RegisterBufferRequest req;
  req.mutable_host_shm()->set_path(std::string(path));
  req.mutable_host_shm()->set_size(size);
  v1::RegisterBufferResponse resp;
  auto ctx = impl_->NewContext();
  RETURN_IF_ERROR(FromGrpcStatus(impl_->buffers->RegisterBuffer(ctx.get(), req, &resp)));
  return resp.buffer_id();
}

absl::Status Client::UnregisterBuffer(std::string_view buffer_id) {
  v1::UnregisterBufferRequest req;
  req.set_buffer_id(std::string(buffer_id));
  v1::UnregisterBufferResponse resp;
  auto ctx = impl_->NewContext();
  return FromGrpcStatus(impl_->buffers->UnregisterBuffer(ctx.get(), req, &resp));
}

absl::StatusOr<ShmBuffer> Client::CreateShmBuffer(size_t size) {
  if (size == 0) return absl::InvalidArgumentError("shm buffer size must be > 0");
  ShmBuffer buf;
  buf.path_ = absl::StrFormat("/dev/shm/icecache-%d-%s", ::getpid(), RandomHexId());
  buf.fd_ = ::open(buf.path_.c_str(), O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (buf.fd_ < 0) {
    const int e = errno;
    buf.path_.clear();
    return absl::InternalError(
        absl::StrCat("cannot create shm file under /dev/shm: ", std::strerror(e)));
  }
  if (::ftruncate(buf.fd_, static_cast<off_t>(size)) != 0) {
    return absl::InternalError(
        absl::StrCat("ftruncate(", buf.path_, ", ", size, "): ", std::strerror(errno)));
  }
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, buf.fd_, 0);
  if (p == MAP_FAILED) {
    return absl::InternalError(
        absl::StrCat("mmap(", buf.path_, ", ", size, "): ", std::strerror(errno)));
  }
  buf.data_ = static_cast<uint8_t*>(p);
  buf.size_ = size;
  // Registration failing leaves `buf` without client_/id: its destructor
  // unmaps and unlinks.
  ASSIGN_OR_RETURN(buf.buffer_id_, RegisterShm(buf.path_, size));
  buf.client_ = this;
  return buf;
}

ShmBuffer::~ShmBuffer() { Release(); }

ShmBuffer::ShmBuffer(ShmBuffer&& other) noexcept { *this = std::move(other); }

ShmBuffer& ShmBuffer::operator=(ShmBuffer&& other) noexcept {
  if (this != &other) {
    Release();
    client_ = std::exchange(other.client_, nullptr);
    path_ = std::exchange(other.path_, std::string());
    buffer_id_ = std::exchange(other.buffer_id_, std::string());
    fd_ = std::exchange(other.fd_, -1);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

absl::Status ShmBuffer::Unregister() {
  if (client_ == nullptr || buffer_id_.empty()) {
    return absl::FailedPreconditionError("shm buffer is not registered");
  }
  absl::Status s = client_->UnregisterBuffer(buffer_id_);
  client_ = nullptr;
  return s;
}

void ShmBuffer::Release() {
  if (client_ != nullptr && !buffer_id_.empty()) (void)client_->UnregisterBuffer(buffer_id_);
  client_ = nullptr;
  buffer_id_.clear();
  if (data_ != nullptr) ::munmap(data_, size_);
  data_ = nullptr;
  size_ = 0;
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
  if (!path_.empty()) ::unlink(path_.c_str());
  path_.clear();
}

// ---------------------------------------------------------------- KV

absl::StatusOr<uint64_t> Client::AppendKv(std::string_view session_id, const ShmBuffer& buffer,
                                          uint64_t offset, uint64_t length, uint32_t num_tokens) {
  if (!buffer.valid() || buffer.buffer_id().empty()) {
    return absl::FailedPreconditionError("AppendKv from a shm buffer that is not registered");
  }
  return AppendKv(session_id, buffer.buffer_id(), offset, length, num_tokens);
}

absl::StatusOr<uint64_t> Client::AppendKv(std::string_view session_id, std::string_view buffer_id,
                                          uint64_t offset, uint64_t length, uint32_t num_tokens) {
  v1::AppendKvRequest req;
  req.set_session_id(std::string(session_id));
  req.set_num_tokens(num_tokens);
  req.mutable_region()->set_buffer_id(std::string(buffer_id));
  req.mutable_region()->set_offset(offset);
  req.mutable_region()->set_length(length);
  v1::AppendKvResponse resp;
  auto ctx = impl_->NewContext();
  RETURN_IF_ERROR(FromGrpcStatus(impl_->kv->AppendKv(ctx.get(), req, &resp)));
  return resp.tokens();
}

absl::StatusOr<uint32_t> Client::AppendKvLayers(std::string_view session_id,
                                                std::string_view buffer_id, uint64_t offset,
                                                uint64_t length, uint32_t num_tokens,
                                                uint32_t first_layer, uint32_t num_layers) {
  v1::AppendKvRequest req;
  req.set_session_id(std::string(session_id));
  req.set_num_tokens(num_tokens);
  req.mutable_region()->set_buffer_id(std::string(buffer_id));
  req.mutable_region()->set_offset(offset);
  req.mutable_region()->set_length(length);
  req.set_first_layer(first_layer);
  req.set_num_layers(num_layers);
  v1::AppendKvResponse resp;
  auto ctx = impl_->NewContext();
  RETURN_IF_ERROR(FromGrpcStatus(impl_->kv->AppendKv(ctx.get(), req, &resp)));
  return resp.next_layer();
}

absl::StatusOr<uint64_t> Client::AppendKvInline(std::string_view session_id,
                                                absl::Span<const uint8_t> kv, uint32_t num_tokens) {
  v1::AppendKvRequest req;
  req.set_session_id(std::string(session_id));
  req.set_num_tokens(num_tokens);
  req.set_inline_kv(reinterpret_cast<const char*>(kv.data()), kv.size());
  v1::AppendKvResponse resp;
  auto ctx = impl_->NewContext();
  RETURN_IF_ERROR(FromGrpcStatus(impl_->kv->AppendKv(ctx.get(), req, &resp)));
  return resp.tokens();
}

absl::StatusOr<std::vector<HeadSelection>> Client::SelectPages(std::string_view session_id,
                                                               uint32_t layer,
                                                               absl::Span<const float> queries,
                                                               const SelectOptions& options) {
  v1::SelectPagesRequest req;
  req.set_session_id(std::string(session_id));
  req.set_layer(layer);
  req.set_queries(reinterpret_cast<const char*>(queries.data()), queries.size() * sizeof(float));
  req.set_query_dtype(v1::DTYPE_FLOAT32);
  ToProto(options, req.mutable_params());
  req.set_reuse_group_selection(options.reuse_group_selection);
  v1::SelectPagesResponse resp;
  auto ctx = impl_->NewContext();
  RETURN_IF_ERROR(FromGrpcStatus(impl_->kv->SelectPages(ctx.get(), req, &resp)));
  std::vector<HeadSelection> out;
  for (const auto& h : resp.heads()) out.push_back(FromProto(h));
  return out;
}

namespace {

// A FetchPages request for `lists[h]` of every KV head h: page ids
// (FetchPages) or token positions (FetchTokens), sent unary.
template <typename T>
absl::StatusOr<FetchLayout> SendFetch(Client::Impl& impl, std::string_view session_id,
                                      uint32_t layer, const std::vector<std::vector<T>>& lists,
                                      bool tokens, std::string_view buffer_id, uint64_t offset,
                                      bool want_positions, uint32_t num_layers,
                                      const DeviceWrite& device = {}) {
  RETURN_IF_ERROR(CheckDeviceWrite(device));
  v1::FetchPagesRequest req;
  req.set_session_id(std::string(session_id));
  req.set_layer(layer);
  for (size_t h = 0; h < lists.size(); ++h) {
    auto* hp = req.add_heads();
    hp->set_kv_head(static_cast<uint32_t>(h));
    if (tokens) {
      hp->mutable_tokens()->Add(lists[h].begin(), lists[h].end());
    } else {
      hp->mutable_pages()->Add(lists[h].begin(), lists[h].end());
    }
  }
  req.set_buffer_id(std::string(buffer_id));
  req.set_offset(offset);
  req.set_want_positions(want_positions);
  req.set_num_layers(num_layers);
  DeviceToProto(device, &req);
  v1::FetchPagesResponse resp;
  auto ctx = impl.NewContext();
  RETURN_IF_ERROR(FromGrpcStatus(impl.kv->FetchPages(ctx.get(), req, &resp)));
  return FromProto(resp.layout());
}

}  // namespace

absl::StatusOr<FetchLayout> Client::FetchPages(std::string_view session_id, uint32_t layer,
                                               const std::vector<std::vector<uint32_t>>& pages,
                                               std::string_view buffer_id, uint64_t offset,
                                               bool want_positions, uint32_t num_layers) {
  return SendFetch(*impl_, session_id, layer, pages, /*tokens=*/false, buffer_id, offset,
                   want_positions, num_layers);
}

absl::StatusOr<FetchLayout> Client::FetchPages(std::string_view session_id, uint32_t layer,
                                               const std::vector<std::vector<uint32_t>>& pages,
                                               std::string_view buffer_id, uint64_t offset,
                                               bool want_positions, uint32_t num_layers,
                                               const DeviceWrite& device) {
  return SendFetch(*impl_, session_id, layer, pages, /*tokens=*/false, buffer_id, offset,
                   want_positions, num_layers, device);
}

absl::StatusOr<FetchLayout> Client::FetchPages(std::string_view session_id, uint32_t layer,
                                               const std::vector<HeadSelection>& selection,
                                               std::string_view buffer_id, uint64_t offset,
                                               bool want_positions) {
  const bool by_token =
      !selection.empty() && std::all_of(selection.begin(), selection.end(), [](const auto& h) {
        return h.pages.empty() && !h.positions.empty();
      });
  if (by_token) {
    std::vector<std::vector<int32_t>> tokens;
    for (const auto& h : selection) tokens.push_back(h.positions);
    return FetchTokens(session_id, layer, tokens, buffer_id, offset, want_positions, 1);
  }
  std::vector<std::vector<uint32_t>> pages;
  for (const auto& h : selection) pages.push_back(h.pages);
  return FetchPages(session_id, layer, pages, buffer_id, offset, want_positions, 1);
}

absl::StatusOr<FetchLayout> Client::FetchTokens(std::string_view session_id, uint32_t layer,
                                                const std::vector<std::vector<int32_t>>& positions,
                                                std::string_view buffer_id, uint64_t offset,
                                                bool want_positions, uint32_t num_layers) {
  return SendFetch(*impl_, session_id, layer, positions, /*tokens=*/true, buffer_id, offset,
                   want_positions, num_layers);
}

namespace {

// The stream of `key` (a session id, or "" for the batch stream), created on
// first use.
std::shared_ptr<DecodeStreamState> StreamState(Client::Impl& impl, std::string_view key) {
  absl::MutexLock lock(&impl.streams_mu);
  auto it = impl.streams.find(key);
  if (it == impl.streams.end()) {
    it = impl.streams.emplace(std::string(key), std::make_shared<DecodeStreamState>()).first;
  }
  return it->second;
}

// One request and its response on the gRPC stream of `state`, opened on
// first use. When the stream ends, the daemon's status; a fresh stream is
// opened on the next call.
absl::Status StreamExchange(Client::Impl& impl, DecodeStreamState& state,
                            const v1::DecodeStepRequest& req, v1::DecodeStepResponse* resp)
    ABSL_EXCLUSIVE_LOCKS_REQUIRED(state.mu) {
  if (state.stream == nullptr) {
    state.context = impl.NewContext(/*deadline=*/false);
    state.stream = impl.kv->DecodeStep(state.context.get());
  }
  if (state.stream->Write(req) && state.stream->Read(resp)) return absl::OkStatus();
  state.stream->WritesDone();
  absl::Status s = FromGrpcStatus(state.stream->Finish());
  state.stream.reset();
  state.context.reset();
  if (s.ok()) s = absl::InternalError("decode stream closed by the daemon without a status");
  return s;
}

// Opens the session's ring on first use; a refusal (an older daemon, a TCP
// connection, limits) leaves the session on the stream.
void MaybeOpenRing(Client& client, DecodeStreamState& state, std::string_view session_id)
    ABSL_EXCLUSIVE_LOCKS_REQUIRED(state.mu) {
  if (state.ring != nullptr || state.no_ring) return;
  const Client::Impl& impl = *client.impl();
  if (!impl.options.decode_ring || !HasPrefix(impl.target, "unix:")) {
    state.no_ring = true;
    return;
  }
  absl::StatusOr<std::unique_ptr<DecodeRingClient>> ring =
      DecodeRingClient::Open(client, session_id);
  if (ring.ok()) {
    state.ring = std::move(*ring);
  } else {
    state.no_ring = true;
  }
}

// One request and its response for `key` (a session id, or "" for the
// batch stream): over the session's ring when it has one, else the stream.
absl::Status Exchange(Client& client, std::string_view key, const v1::DecodeStepRequest& req,
                      v1::DecodeStepResponse* resp) {
  Client::Impl& impl = *client.impl();
  std::shared_ptr<DecodeStreamState> state = StreamState(impl, key);
  absl::MutexLock lock(&state->mu);
  if (!key.empty()) MaybeOpenRing(client, *state, key);
  if (state->ring != nullptr && state->ring->Fits(req)) {
    absl::Status s = state->ring->Exchange(req, resp);
    if (state->ring->broken()) state->ring.reset();  // the next step reopens one
    return s;
  }
  return StreamExchange(impl, *state, req, resp);
}

}  // namespace

absl::StatusOr<StepResult> Client::DecodeStep(std::string_view session_id, uint32_t layer,
                                              absl::Span<const float> queries,
                                              std::string_view buffer_id, uint64_t offset,
                                              const SelectOptions& options, uint32_t num_layers) {
  StepOptions step;
  step.num_layers = num_layers;
  return DecodeStep(session_id, layer, queries, buffer_id, offset, options, step);
}

absl::StatusOr<StepResult> Client::DecodeStep(std::string_view session_id, uint32_t layer,
                                              absl::Span<const float> queries,
                                              std::string_view buffer_id, uint64_t offset,
                                              const SelectOptions& options,
                                              const StepOptions& step) {
  RETURN_IF_ERROR(CheckDeviceWrite(step.device));
  const uint32_t num_layers = step.num_layers;
  v1::DecodeStepRequest req;
  req.set_session_id(std::string(session_id));
  req.set_layer(layer);
  req.set_queries(reinterpret_cast<const char*>(queries.data()), queries.size() * sizeof(float));
  req.set_query_dtype(v1::DTYPE_FLOAT32);
  ToProto(options, req.mutable_params());
  req.set_reuse_group_selection(options.reuse_group_selection);
  req.set_buffer_id(std::string(buffer_id));
  req.set_offset(offset);
  req.set_num_layers(num_layers);
  DeviceToProto(step.device, &req);
  req.set_prefetch_group(step.prefetch_group);
  v1::DecodeStepResponse resp;
  RETURN_IF_ERROR(Exchange(*this, session_id, req, &resp));
  StepResult out;
  out.layer = resp.layer();
  for (const auto& h : resp.heads()) out.heads.push_back(FromProto(h));
  out.layout = FromProto(resp.layout());
  out.reused = resp.reused();
  out.prefetching = resp.prefetching();
  out.prefetched = resp.prefetched();
  return out;
}

absl::StatusOr<std::vector<absl::StatusOr<StepResult>>> Client::DecodeBatch(
    uint32_t layer, absl::Span<const DecodeBatchEntry> entries, const SelectOptions& options,
    uint32_t num_layers) {
  if (entries.empty()) {
    return absl::InvalidArgumentError("a batched decode step needs at least one entry");
  }
  v1::DecodeStepRequest req;
  req.set_layer(layer);
  req.set_query_dtype(v1::DTYPE_FLOAT32);
  ToProto(options, req.mutable_params());
  req.set_num_layers(num_layers);
  for (const DecodeBatchEntry& e : entries) {
    v1::DecodeBatchEntry* out = req.add_batch();
    out->set_session_id(e.session_id);
    out->set_queries(reinterpret_cast<const char*>(e.queries.data()),
                     e.queries.size() * sizeof(float));
    out->set_buffer_id(e.buffer_id);
    out->set_offset(e.offset);
    out->set_reuse_group_selection(e.reuse_group_selection);
    out->set_prefetch_group(e.prefetch_group);
  }
  v1::DecodeStepResponse resp;
  RETURN_IF_ERROR(Exchange(*this, /*key=*/"", req, &resp));
  std::vector<absl::StatusOr<StepResult>> results;
  for (const v1::DecodeBatchResult& r : resp.batch()) {
    if (r.code() != 0) {
      results.push_back(absl::Status(static_cast<absl::StatusCode>(r.code()), r.message()));
      continue;
    }
    StepResult out;
    out.layer = resp.layer();
    for (const auto& h : r.heads()) out.heads.push_back(FromProto(h));
    out.layout = FromProto(r.layout());
    out.reused = r.reused();
    out.prefetching = r.prefetching();
    out.prefetched = r.prefetched();
    results.push_back(std::move(out));
  }
  if (results.size() != entries.size()) {
    return absl::InternalError(absl::StrCat("batched decode: ", entries.size(), " entries sent, ",
                                            results.size(), " answered"));
  }
  return results;
}

absl::Status Client::CloseDecodeStream(std::string_view session_id) {
  std::shared_ptr<DecodeStreamState> state;
  {
    absl::MutexLock lock(&impl_->streams_mu);
    auto it = impl_->streams.find(session_id);
    if (it == impl_->streams.end()) return absl::OkStatus();
    state = it->second;
    impl_->streams.erase(it);
  }
  absl::MutexLock lock(&state->mu);
  state->ring.reset();  // the daemon sees end of file and reclaims the ring
  if (state->stream == nullptr) return absl::OkStatus();
  state->stream->WritesDone();
  absl::Status s = FromGrpcStatus(state->stream->Finish());
  state->stream.reset();
  state->context.reset();
  return s;
}

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
