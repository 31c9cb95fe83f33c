#include "client/client.h"

#include <fcntl.h>
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
#include "common/populate.h"
#include "common/random_id.h"
#include "common/socket_path.h"
#include "common/status_macros.h"

namespace icecache {
namespace {

std::string Env(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr ? std::string() : std::string(v);
}

bool HasPrefix(std::string_view s, std::string_view p) { return s.substr(0, p.size()) == p; }

}  // namespace

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
  // The file's memory is taken now, not at the first write: a /dev/shm
  // without room fails here with a status instead of a SIGBUS in the middle
  // of a copy, and a prefill's first chunk does not pay a page allocation
  // per 4 KiB (docs/bench/first40.md). MAP_POPULATE then maps every page.
  if (const int e = ::posix_fallocate(buf.fd_, 0, static_cast<off_t>(size)); e != 0) {
    if (e == ENOSPC) {
      return absl::ResourceExhaustedError(
          absl::StrCat("/dev/shm has no room for a buffer of ", size,
                       " bytes: free space there (df -h /dev/shm), or use smaller buffers"));
    }
    if (e != EOPNOTSUPP && e != EINVAL) {
      return absl::InternalError(
          absl::StrCat("posix_fallocate(", buf.path_, ", ", size, "): ", std::strerror(e)));
    }
  }
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, buf.fd_, 0);
  if (p == MAP_FAILED) {
    return absl::InternalError(
        absl::StrCat("mmap(", buf.path_, ", ", size, "): ", std::strerror(errno)));
  }
  buf.data_ = static_cast<uint8_t*>(p);
  buf.size_ = size;
  TouchZeroPages(buf.data_, size);  // resident before any copy is timed
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
      DecodeRingClient::Open(client, session_id, impl.options.decode_ring_spin);
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
    // Broken: the next step reopens one. NotFound (the session was dropped
    // or expired, or a buffer is unknown): the ring is given back, so rings
    // of dead sessions do not pile up; the next step asks for a new one.
    if (state->ring->broken() || absl::IsNotFound(s)) state->ring.reset();
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
  req.set_in_place(step.in_place);
  req.set_positions_as_bytes(true);
  // Parsed into call after call on this thread, keeping its storage: 11.5
  // against 20.7 us for a fresh message at 8 KV heads x 256 tokens
  // (icecache-proto-bench, docs/bench/rpc.md).
  thread_local v1::DecodeStepResponse resp;
  RETURN_IF_ERROR(Exchange(*this, session_id, req, &resp));
  StepResult out;
  out.layer = resp.layer();
  for (const auto& h : resp.heads()) out.heads.push_back(FromProto(h));
  out.layout = FromProto(resp.layout());
  out.reused = resp.reused();
  out.prefetching = resp.prefetching();
  out.prefetched = resp.prefetched();
  out.select_ns = resp.select_ns();
  out.gather_ns = resp.gather_ns();
  out.step_ns = resp.step_ns();
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
    out->set_in_place(e.in_place);
  }
  req.set_positions_as_bytes(true);
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

}  // namespace icecache
