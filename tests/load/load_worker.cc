#include "tests/load/load_worker.h"

#include <cmath>
#include <memory>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "client/client.h"
#include "client/kv_check.h"
#include "common/synthetic.h"

namespace icecache::load {
namespace {

using Code = absl::StatusCode;

// The tenant's model: synthetic "small" preset KV, shared read-only by its
// workers.
struct Model {
  KvDump dump;
  HostKv kv;
  SessionSpec spec;
  absl::Span<const float> Queries(int step, int layer) const {
    return absl::MakeConstSpan(dump.query(step % dump.steps, layer, 0),
                               static_cast<size_t>(dump.q_heads) * dump.head_dim);
  }
};

std::unique_ptr<Model> MakeModel(const TenantOptions& o) {
  SyntheticConfig c = SyntheticPreset("small").value();
  c.layers = o.layers;
  c.q_heads = c.q_heads / c.kv_heads * o.kv_heads;
  c.kv_heads = o.kv_heads;
  c.tokens = o.tokens;
  c.steps = 8;
  c.seed = o.seed;
  c.mean_segment = 64;
  auto m = std::make_unique<Model>();
  m->dump = GenerateSynthetic(c).value();
  m->kv = HostKv::FromDump(&m->dump);
  m->spec.layers = o.layers;
  m->spec.kv_heads = o.kv_heads;
  m->spec.q_heads = m->dump.q_heads;
  m->spec.head_dim = m->dump.head_dim;
  m->spec.dtype = DType::kF16;
  m->spec.page_tokens = 16;
  m->spec.layer_reuse = 1;
  m->spec.ttl = absl::Seconds(60);
  return m;
}

struct LiveSession {
  std::string id;
  int64_t tokens = 0;
};

// One worker thread: its sessions, buffers and counters.
class Worker {
 public:
  Worker(Client& client, const Model& model, const TenantOptions& o, int index)
      : client_(client), m_(model), o_(o), rng_(o.seed * 7919 + index), index_(index) {}

  LoadResult Run();

 private:
  double Micros(absl::Time start) const { return absl::ToDoubleMicroseconds(absl::Now() - start); }
  void Fail(const std::string& what, const absl::Status& st);
  void Good(const std::string& what, const absl::Status& st) {
    if (st.ok()) {
      ++r_.ops;
    } else {
      Fail(what, st);
    }
  }
  void Append(LiveSession& s);
  void Decode(LiveSession& s);
  void SelectFetch(LiveSession& s);
  void Bad(LiveSession& s);
  void Verify(const std::string& what, const LiveSession& s, const FetchLayout& layout,
              const std::vector<HeadSelection>& heads);

  Client& client_;
  const Model& m_;
  const TenantOptions& o_;
  std::mt19937_64 rng_;
  int index_;
  int64_t chunk_tokens_ = 0;
  int step_ = 0;
  std::unique_ptr<ShmBuffer> out_, staging_;
  LoadResult r_;
};

void Worker::Fail(const std::string& what, const absl::Status& st) {
  ++r_.errors;
  if (r_.first_failures.size() < 8)
    r_.first_failures.push_back(absl::StrCat(what, ": ", st.ToString()));
}

void Worker::Verify(const std::string& what, const LiveSession& s, const FetchLayout& layout,
                    const std::vector<HeadSelection>& heads) {
  auto n = VerifyFetch(m_.kv, s.tokens, layout, heads, out_->data(), out_->size());
  if (!n.ok()) {
    ++r_.wrong_bytes;
    if (r_.first_failures.size() < 8) {
      r_.first_failures.push_back(absl::StrCat(what, " wrong bytes: ", n.status().ToString()));
    }
    return;
  }
  r_.pages_checked += *n;
}

void Worker::Append(LiveSession& s) {
  const int64_t begin = s.tokens, end = std::min(begin + chunk_tokens_, m_.kv.tokens());
  const uint32_t n = static_cast<uint32_t>(end - begin);
  const absl::Time start = absl::Now();
  absl::StatusOr<uint64_t> grown;
  if ((begin / chunk_tokens_) % 2 == 0) {
    grown = client_.AppendKvInline(s.id, m_.kv.Chunk(begin, end), n);
  } else {
    m_.kv.FillChunk(begin, end, staging_->data());
    grown = client_.AppendKv(s.id, *staging_, 0, m_.kv.ChunkBytes(begin, end), n);
  }
  r_.append_us.push_back(Micros(start));
  if (grown.ok() && *grown != static_cast<uint64_t>(end)) {
    grown = absl::InternalError(absl::StrCat("token count ", *grown, ", expected ", end));
  }
  Good("append", grown.status());
  if (grown.ok()) s.tokens = end;
}

void Worker::Decode(LiveSession& s) {
  SelectOptions opt;
  opt.budget_tokens = 128;
  opt.want_positions = true;
  const uint32_t layer = static_cast<uint32_t>(rng_() % m_.spec.layers);
  const absl::Time start = absl::Now();
  auto r = client_.DecodeStep(s.id, layer, m_.Queries(step_++, layer), out_->buffer_id(), 0, opt);
  r_.decode_us.push_back(Micros(start));
  Good("decode_step", r.status());
  if (r.ok()) Verify("decode_step", s, r->layout, r->heads);
}

void Worker::SelectFetch(LiveSession& s) {
  SelectOptions opt;
  opt.budget_tokens = 64;
  opt.want_positions = true;
  const uint32_t layer = static_cast<uint32_t>(rng_() % m_.spec.layers);
  auto sel = client_.SelectPages(s.id, layer, m_.Queries(step_++, layer), opt);
  Good("select_pages", sel.status());
  if (!sel.ok()) return;
  auto layout = client_.FetchPages(s.id, layer, *sel, out_->buffer_id(), 0, true);
  Good("fetch_pages", layout.status());
  if (layout.ok()) Verify("fetch_pages", s, *layout, *sel);
}

// A request that must be refused with `want`; it changes nothing.
void Worker::Bad(LiveSession& s) {
  ++r_.bad_requests;
  absl::Status got;
  Code want = Code::kInvalidArgument;
  std::vector<float> q(m_.Queries(0, 0).begin(), m_.Queries(0, 0).end());
  switch (rng_() % 6) {
    case 0:
      q[rng_() % q.size()] = std::nanf("");
      got = client_.DecodeStep(s.id, 0, q, out_->buffer_id(), 0).status();
      break;
    case 1:
      got = client_.SelectPages(s.id, m_.spec.layers, q).status();
      break;
    case 2:
      q.pop_back();
      got = client_.SelectPages(s.id, 0, q).status();
      break;
    case 3: {
      std::vector<uint8_t> kv = m_.kv.Chunk(0, 1);
      kv.pop_back();
      got = client_.AppendKvInline(s.id, kv, 1).status();
      break;
    }
    case 4:
      want = Code::kNotFound;
      got = client_.GetSession(absl::StrCat("no-such-session-", rng_())).status();
      break;
    default:
      want = Code::kOutOfRange;
      got = client_
                .FetchPages(s.id, 0, std::vector<std::vector<uint32_t>>(m_.spec.kv_heads, {0}),
                            out_->buffer_id(), out_->size())
                .status();
      break;
  }
  if (got.code() != want) {
    ++r_.bad_wrong_code;
    if (r_.first_failures.size() < 8) {
      r_.first_failures.push_back(absl::StrCat(
          "bad request expected ", absl::StatusCodeToString(want), ", got ", got.ToString()));
    }
  }
}

LoadResult Worker::Run() {
  chunk_tokens_ = std::max<int64_t>(1, m_.kv.tokens() / o_.chunks);
  auto out = client_.CreateShmBuffer(4 << 20);
  auto staging = client_.CreateShmBuffer(m_.kv.ChunkBytes(0, chunk_tokens_));
  if (!out.ok() || !staging.ok()) {
    Fail("create buffers", out.ok() ? staging.status() : out.status());
    return r_;
  }
  out_ = std::make_unique<ShmBuffer>(*std::move(out));
  staging_ = std::make_unique<ShmBuffer>(*std::move(staging));
  std::vector<LiveSession> sessions(o_.sessions);
  int64_t good_since_bad = 0;
  while (absl::Now() < o_.deadline) {
    LiveSession& s = sessions[rng_() % sessions.size()];
    if (s.id.empty()) {
      SessionSpec spec = m_.spec;
      spec.selector =
          (index_ + r_.sessions_created) % 2 ? SelectorType::kMdci : SelectorType::kExact;
      auto created = client_.CreateSession(spec);
      Good("create_session", created.status());
      if (!created.ok()) continue;
      s = LiveSession{created->id, 0};
      ++r_.sessions_created;
    }
    if (s.tokens < m_.kv.tokens() && (s.tokens == 0 || rng_() % 4 == 0)) {
      Append(s);
    } else if (s.tokens == m_.kv.tokens() && rng_() % 32 == 0) {
      Good("drop_session", client_.DropSession(s.id));
      s = LiveSession{};
      continue;
    } else if (rng_() % 5 == 0) {
      SelectFetch(s);
    } else {
      Decode(s);
    }
    if (o_.bad_every > 0 && ++good_since_bad >= o_.bad_every && s.tokens > 0) {
      good_since_bad = 0;
      Bad(s);
    }
  }
  for (LiveSession& s : sessions) {
    if (!s.id.empty()) Good("drop_session", client_.DropSession(s.id));
  }
  Good("unregister", out_->Unregister());
  Good("unregister", staging_->Unregister());
  out_.reset();
  staging_.reset();
  return r_;
}

}  // namespace

void LoadResult::Merge(const LoadResult& o) {
  ops += o.ops;
  errors += o.errors;
  wrong_bytes += o.wrong_bytes;
  pages_checked += o.pages_checked;
  bad_requests += o.bad_requests;
  bad_wrong_code += o.bad_wrong_code;
  sessions_created += o.sessions_created;
  for (const auto& f : o.first_failures) {
    if (first_failures.size() < 8) first_failures.push_back(f);
  }
  decode_us.insert(decode_us.end(), o.decode_us.begin(), o.decode_us.end());
  append_us.insert(append_us.end(), o.append_us.begin(), o.append_us.end());
}

Json LoadResult::ToJson(bool with_samples) const {
  Json j = {{"ops", ops},
            {"errors", errors},
            {"wrong_bytes", wrong_bytes},
            {"pages_checked", pages_checked},
            {"bad_requests", bad_requests},
            {"bad_wrong_code", bad_wrong_code},
            {"sessions_created", sessions_created},
            {"first_failures", first_failures}};
  if (with_samples) {
    j["decode_us"] = decode_us;
    j["append_us"] = append_us;
  }
  return j;
}

LoadResult LoadResult::FromJson(const Json& j) {
  LoadResult r;
  r.ops = j.value("ops", int64_t{0});
  r.errors = j.value("errors", int64_t{0});
  r.wrong_bytes = j.value("wrong_bytes", int64_t{0});
  r.pages_checked = j.value("pages_checked", int64_t{0});
  r.bad_requests = j.value("bad_requests", int64_t{0});
  r.bad_wrong_code = j.value("bad_wrong_code", int64_t{0});
  r.sessions_created = j.value("sessions_created", int64_t{0});
  r.first_failures = j.value("first_failures", std::vector<std::string>{});
  r.decode_us = j.value("decode_us", std::vector<double>{});
  r.append_us = j.value("append_us", std::vector<double>{});
  return r;
}

LoadResult RunTenant(const TenantOptions& o) {
  LoadResult total;
  ClientOptions co;
  co.socket_path = o.socket_path;
  co.timeout = absl::Seconds(60);
  auto client = Client::Create(co);
  if (!client.ok()) {
    total.errors = 1;
    total.first_failures.push_back(client.status().ToString());
    return total;
  }
  const std::unique_ptr<Model> model = MakeModel(o);
  std::vector<LoadResult> results(o.workers);
  std::vector<std::thread> threads;
  for (int w = 0; w < o.workers; ++w) {
    threads.emplace_back([&, w] { results[w] = Worker(**client, *model, o, w).Run(); });
  }
  for (auto& t : threads) t.join();
  for (const auto& r : results) total.Merge(r);
  return total;
}

}  // namespace icecache::load
