// Every RPC's request, end to end below the transport: each input is a
// sequence of requests (wire format) that go through the conversion the
// handler does (server/rpc/convert.h) and into the real core (PagePool,
// BufferRegistry with a real shm file, SessionManager), as one tenant with
// the admin role. Ids in a request that are one byte long name the n-th
// session or buffer created so far, so the fuzzer reaches sessions that
// hold KV. Every request must answer a value or a status: no crash, no
// undefined behaviour, no allocation a request's size does not justify
// (libFuzzer's -malloc_limit_mb). Afterwards every session is dropped and
// the pool must hold nothing (no frame lost or double-counted).
//
// Input: records of <op byte><length: 2 bytes little endian><message>.
#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/status_macros.h"
#include "icecache/v1/admin.pb.h"
#include "icecache/v1/buffer.pb.h"
#include "icecache/v1/kv.pb.h"
#include "icecache/v1/session.pb.h"
#include "server/pool/page_pool.h"
#include "server/rpc/config.h"
#include "server/rpc/convert.h"
#include "server/session/session_manager.h"
#include "server/transfer/buffer_registry.h"
#include "tests/fuzz/fuzz_temp_dir.h"

namespace {

using namespace icecache;       // NOLINT: a fuzz target
using namespace icecache::rpc;  // NOLINT
using icecache::fuzz::FuzzTempDir;

constexpr uint64_t kShmBytes = 1 << 20;

// A private shm root with one 1 MiB file, "buf" (made once per process).
const std::string& ShmRoot() {
  static const std::string* root = [] {
    auto* dir = new std::string(FuzzTempDir("icecache_fuzz_requests_"));
    const int fd = open((*dir + "/buf").c_str(), O_RDWR | O_CREAT, 0600);
    if (fd < 0 || ftruncate(fd, kShmBytes) != 0) abort();
    close(fd);
    return dir;
  }();
  return *root;
}

// The core a daemon builds, small: a 64 MiB pool, sessions of at most 4096
// tokens, no reaper thread.
struct Core {
  std::unique_ptr<PagePool> pool;
  std::unique_ptr<BufferRegistry> buffers;
  std::unique_ptr<SessionManager> manager;
  Caller caller;
  std::vector<std::string> sessions;
  std::vector<std::string> buffer_ids;

  static std::unique_ptr<Core> Make() {
    auto c = std::make_unique<Core>();
    PagePoolOptions po;
    po.capacity_bytes = 64 << 20;
    po.use_huge_pages = false;
    c->pool = PagePool::Create(po).value();
    BufferRegistryOptions bo;
    bo.shm.root = ShmRoot();
    bo.shm.max_bytes = kShmBytes;
    c->buffers = BufferRegistry::Create(bo).value();
    SessionManagerOptions so;
    so.pool = c->pool.get();
    so.buffers = c->buffers.get();
    so.reaper_interval = absl::ZeroDuration();
    so.prefault_slabs = 0;
    so.max_tokens_per_session = 4096;
    so.max_append_tokens = 4096;
    c->manager = SessionManager::Create(so).value();
    c->caller.tenant = "alpha";
    c->caller.uid = geteuid();
    c->caller.admin = true;
    return c;
  }

  // A one-byte id names the n-th session (buffer) made so far.
  std::string Session(const std::string& id) const {
    if (id.size() != 1 || sessions.empty()) return id;
    return sessions[static_cast<uint8_t>(id[0]) % sessions.size()];
  }
  std::string Buffer(const std::string& id) const {
    if (id.size() != 1 || buffer_ids.empty()) return id;
    return buffer_ids[static_cast<uint8_t>(id[0]) % buffer_ids.size()];
  }
};

template <typename M>
bool Parse(const std::string& bytes, M* m) {
  return m->ParseFromString(bytes);
}

// The handlers' bounds on layer fields (server/rpc/services.cc): a layer
// index up to 2^20, a layer count 0 (= 1) .. 4096; -1 for out of bounds.
int LayerIndex(uint32_t layer) { return layer > (1u << 20) ? -1 : static_cast<int>(layer); }
int LayerCount(uint32_t n) { return n == 0 ? 1 : n > 4096 ? -1 : static_cast<int>(n); }

void CreateSession(Core& c, const std::string& bytes) {
  v1::CreateSessionRequest req;
  if (!Parse(bytes, &req)) return;
  auto config = SessionConfigFromProto(req.config(), SelectDefaults{});
  if (!config.ok()) return;
  (void)SessionConfigToProto(*config);
  auto info = c.manager->CreateSession(c.caller, *config);
  if (info.ok()) c.sessions.push_back(info->id);
}

void AppendKv(Core& c, const std::string& bytes) {
  v1::AppendKvRequest req;
  if (!Parse(bytes, &req)) return;
  auto range = LayerRangeFromProto(req.first_layer(), req.num_layers());
  if (!range.ok() || req.num_tokens() == 0) return;
  const std::string id = c.Session(req.session_id());
  if (req.has_region()) {
    (void)c.manager->AppendKvFromBuffer(c.caller, id, req.num_tokens(),
                                        c.Buffer(req.region().buffer_id()), req.region().offset(),
                                        *range);
  } else {
    const std::string& kv = req.inline_kv();
    (void)c.manager->AppendKv(
        c.caller, id, req.num_tokens(),
        absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(kv.data()), kv.size()), *range);
  }
}

absl::StatusOr<SelectRequest> SelectFrom(const v1::SelectParams& params, const std::string& queries,
                                         v1::DType dtype, bool reuse, uint32_t layer) {
  SelectRequest sr;
  sr.layer = LayerIndex(layer);
  if (sr.layer < 0) return absl::InvalidArgumentError("layer");
  sr.reuse_group_selection = reuse;
  ASSIGN_OR_RETURN(sr.queries, QueriesFromProto(queries, dtype, reuse));
  ASSIGN_OR_RETURN(sr.params, SelectParamsFromProto(params));
  ASSIGN_OR_RETURN(sr.granularity, GranularityFromProto(params.granularity(), "granularity"));
  return sr;
}

void SelectPages(Core& c, const std::string& bytes) {
  v1::SelectPagesRequest req;
  if (!Parse(bytes, &req)) return;
  auto sr = SelectFrom(req.params(), req.queries(), req.query_dtype(), req.reuse_group_selection(),
                       req.layer());
  if (!sr.ok()) return;
  auto r = c.manager->SelectPages(c.caller, c.Session(req.session_id()), *sr);
  if (!r.ok()) return;
  v1::SelectPagesResponse resp;
  for (size_t h = 0; h < r->heads.size(); ++h) {
    SelectionToProto(r->heads[h], static_cast<int>(h), resp.add_heads());
  }
}

void FetchPages(Core& c, const std::string& bytes) {
  v1::FetchPagesRequest req;
  if (!Parse(bytes, &req)) return;
  FetchRequest fr;
  auto pages = FetchPagesFromProto(req.heads());
  auto tokens = FetchTokensFromProto(req.heads());
  if (!pages.ok() || !tokens.ok()) return;
  fr.pages = *std::move(pages);
  fr.tokens = *std::move(tokens);
  if (!fr.tokens.empty()) fr.pages.clear();
  fr.layer = LayerIndex(req.layer());
  fr.num_layers = LayerCount(req.num_layers());
  if (fr.layer < 0 || fr.num_layers < 0) return;
  fr.buffer_id = c.Buffer(req.buffer_id());
  fr.offset = req.offset();
  fr.want_positions = req.want_positions();
  fr.device = DeviceWriteFromProto(req);
  auto layout = c.manager->FetchPages(c.caller, c.Session(req.session_id()), fr);
  if (layout.ok()) {
    v1::FetchPagesResponse resp;
    FetchLayoutToProto(*layout, fr.buffer_id, resp.mutable_layout());
  }
}

void DecodeStep(Core& c, const std::string& bytes) {
  v1::DecodeStepRequest req;
  if (!Parse(bytes, &req)) return;
  const int num_layers = LayerCount(req.num_layers());
  if (num_layers < 0) return;
  if (req.batch_size() == 0) {
    auto sr = SelectFrom(req.params(), req.queries(), req.query_dtype(),
                         req.reuse_group_selection(), req.layer());
    if (!sr.ok()) return;
    (void)c.manager->DecodeStep(c.caller, c.Session(req.session_id()), *sr,
                                c.Buffer(req.buffer_id()), req.offset(), num_layers,
                                DeviceWriteFromProto(req));
    return;
  }
  if (!CheckDecodeBatchRequest(req).ok()) return;
  DecodeBatchEntry shared;
  shared.select.layer = LayerIndex(req.layer());
  shared.num_layers = num_layers;
  auto params = SelectParamsFromProto(req.params());
  auto granularity = GranularityFromProto(req.params().granularity(), "params.granularity");
  if (shared.select.layer < 0 || !params.ok() || !granularity.ok()) return;
  shared.select.params = *params;
  shared.select.granularity = *granularity;
  std::vector<DecodeBatchEntry> entries;
  for (int i = 0; i < req.batch_size(); ++i) {
    auto e = DecodeBatchEntryFromProto(req, i, shared, c.Buffer(req.buffer_id()));
    if (!e.ok()) continue;
    e->session_id = c.Session(e->session_id);
    e->buffer_id = c.Buffer(e->buffer_id);
    entries.push_back(*std::move(e));
  }
  auto results = c.manager->DecodeBatch(c.caller, entries);
  v1::DecodeStepResponse resp;
  for (size_t i = 0; i < results.size(); ++i) {
    DecodeBatchResultToProto(static_cast<int>(i), entries[i], results[i], resp.add_batch());
  }
}

// GetSession, KeepAlive, DropSession, PinSession, EvictSession, ListSessions
// and the admin reads, picked by the low bits of the message's first byte.
void SessionVerb(Core& c, const std::string& bytes) {
  v1::PinSessionRequest req;  // session_id + pinned: the widest of these requests
  if (!Parse(bytes, &req)) return;
  const std::string id = c.Session(req.session_id());
  switch (bytes.empty() ? 0 : static_cast<uint8_t>(bytes.back()) % 7) {
    case 0:
      (void)c.manager->GetSession(c.caller, id);
      break;
    case 1:
      (void)c.manager->KeepAlive(c.caller, id);
      break;
    case 2:
      (void)c.manager->DropSession(c.caller, id);
      break;
    case 3:
      (void)c.manager->PinSession(c.caller, id, req.pinned());
      break;
    case 4:
      (void)c.manager->EvictSession(c.caller, id);
      break;
    case 5:
      (void)c.manager->ListSessions(c.caller);
      break;
    default: {
      auto stats = c.manager->Stats(c.caller);
      auto tenants = c.manager->ListTenants(c.caller);
      if (stats.ok() && tenants.ok()) {
        v1::GetStatsResponse resp;
        StatsToProto(*stats, *tenants, 0, &resp);
      }
      break;
    }
  }
}

void RegisterBuffer(Core& c, const std::string& bytes) {
  v1::RegisterBufferRequest req;
  if (!Parse(bytes, &req)) return;
  absl::StatusOr<BufferInfo> info = absl::InvalidArgumentError("neither");
  if (req.has_host_shm()) {
    if (req.host_shm().size() == 0) return;
    std::string path = req.host_shm().path();
    if (path.empty() || path[0] != '/') path = ShmRoot() + "/" + path;
    info = c.buffers->RegisterShm(c.caller, path, req.host_shm().size(), absl::Now());
  } else if (req.has_cuda_ipc()) {
    const v1::CudaIpc& ipc = req.cuda_ipc();
    if (ipc.size() == 0) return;
    std::optional<PagedKvLayout> paged_kv;
    if (ipc.has_paged_kv()) {
      auto p = PagedKvFromProto(ipc.paged_kv());
      if (!p.ok()) return;
      paged_kv = *p;
    }
    info = c.buffers->RegisterCudaIpc(c.caller, ipc.handle(), ipc.size(), ipc.device_uuid(),
                                      absl::Now(), paged_kv ? &*paged_kv : nullptr);
  }
  if (!info.ok()) return;
  v1::RegisterBufferResponse resp;
  BufferInfoToProto(*info, &resp);
  c.buffer_ids.push_back(info->id);
}

void UnregisterBuffer(Core& c, const std::string& bytes) {
  v1::UnregisterBufferRequest req;
  if (!Parse(bytes, &req)) return;
  (void)c.buffers->Unregister(c.caller, c.Buffer(req.buffer_id()));
}

void SetQuota(Core& c, const std::string& bytes) {
  v1::SetQuotaRequest req;
  if (!Parse(bytes, &req)) return;
  if (!IsValidTenantName(req.tenant())) return;
  (void)c.manager->SetQuota(c.caller, req.tenant(), QuotaFromProto(req.quota_bytes()));
}

using Op = void (*)(Core&, const std::string&);
constexpr Op kOps[] = {CreateSession, AppendKv,       SelectPages,      FetchPages, DecodeStep,
                       SessionVerb,   RegisterBuffer, UnregisterBuffer, SetQuota};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto core = Core::Make();
  size_t at = 0;
  while (at + 3 <= size) {
    const uint8_t op = data[at];
    const size_t len = std::min<size_t>(data[at + 1] | (size_t{data[at + 2]} << 8), size - at - 3);
    const std::string msg(reinterpret_cast<const char*>(data + at + 3), len);
    at += 3 + len;
    kOps[op % (sizeof(kOps) / sizeof(kOps[0]))](*core, msg);
  }
  // Nothing lost: once every session is dropped the pool holds no frame.
  for (const SessionInfo& s : core->manager->ListSessions(core->caller)) {
    (void)core->manager->DropSession(core->caller, s.id);
  }
  if (core->pool->used_bytes() != 0) abort();
  return 0;
}
