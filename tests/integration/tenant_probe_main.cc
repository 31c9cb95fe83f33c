// icecache_tenant_probe: a second client process for the integration tests,
// normally run as another uid (fork + setuid by the test). Prints one line
// per observation on stdout, flushed at once:
//   check <name> <CANONICAL_CODE>   outcome of one attempt
//   session <id> / buffer <id>      resources it created
//   ready                           everything above is printed
// Modes:
//   isolation SOCKET SESSION BUFFER PATH
//       tries to read, drop, keep alive, select, fetch from the other
//       tenant's SESSION, use/unregister its BUFFER, register its file PATH,
//       list every tenant's sessions and read admin stats; then creates its
//       own session and buffer, prints them, and holds (keep-alive loop).
//   hold SOCKET
//       creates a session (1 s TTL) with KV and a buffer, prints them, then
//       keeps them alive until killed.
//   stream SOCKET
//       as hold, and also runs DecodeStep on its session into its buffer in
//       a loop (one open stream), printing "streaming" after the first step
//       succeeded; a test kills it mid-stream.
// The fixed session shape: 1 layer, 2 KV heads, 4 query heads, 64 dims,
// fp16, 16-token pages, exact selector.
#include <unistd.h>

#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "client/client.h"
#include "common/dtype.h"

namespace icecache {
namespace {

void Print(const std::string& line) {
  std::fputs((line + "\n").c_str(), stdout);
  std::fflush(stdout);
}

void Check(const std::string& name, const absl::Status& s) {
  Print(absl::StrCat("check ", name, " ", absl::StatusCodeToString(s.code())));
}

SessionSpec ProbeSpec(absl::Duration ttl) {
  SessionSpec s;
  s.layers = 1;
  s.kv_heads = 2;
  s.q_heads = 4;
  s.head_dim = 64;
  s.dtype = DType::kF16;
  s.page_tokens = 16;
  s.selector = SelectorType::kExact;
  s.layer_reuse = 1;
  s.ttl = ttl;
  return s;
}

std::vector<uint8_t> RandomKv(const SessionSpec& spec, uint32_t tokens) {
  std::mt19937 rng(5);
  std::normal_distribution<float> dist(0.f, 1.f);
  const size_t n = spec.ChunkBytes(tokens) / 2;
  std::vector<uint16_t> h(n);
  for (auto& x : h) x = FloatToHalf(dist(rng));
  std::vector<uint8_t> out(n * 2);
  std::memcpy(out.data(), h.data(), out.size());
  return out;
}

// Creates a session with 64 tokens and a 1 MiB buffer; prints both, then
// keeps them alive until the process is killed.
int CreateAndHold(Client& client, absl::Duration ttl) {
  const SessionSpec spec = ProbeSpec(ttl);
  auto session = client.CreateSession(spec);
  Check("create_own_session", session.status());
  if (!session.ok()) return 1;
  const std::vector<uint8_t> kv = RandomKv(spec, 64);
  Check("append_own", client.AppendKvInline(session->id, kv, 64).status());
  auto buffer = client.CreateShmBuffer(1 << 20);
  Check("create_own_buffer", buffer.status());
  if (!buffer.ok()) return 1;
  Print("session " + session->id);
  Print("buffer " + buffer->buffer_id());
  Print("path " + buffer->path());
  Print("ready");
  while (true) {
    (void)client.KeepAlive({session->id});
    absl::SleepFor(absl::Milliseconds(200));
  }
}

// As CreateAndHold, with a DecodeStep stream busy all the time.
int CreateAndStream(Client& client, absl::Duration ttl) {
  const SessionSpec spec = ProbeSpec(ttl);
  auto session = client.CreateSession(spec);
  Check("create_own_session", session.status());
  if (!session.ok()) return 1;
  const std::vector<uint8_t> kv = RandomKv(spec, 64);
  Check("append_own", client.AppendKvInline(session->id, kv, 64).status());
  auto buffer = client.CreateShmBuffer(1 << 20);
  Check("create_own_buffer", buffer.status());
  if (!buffer.ok()) return 1;
  Print("session " + session->id);
  Print("buffer " + buffer->buffer_id());
  Print("path " + buffer->path());
  Print("ready");
  std::vector<float> q(4 * 64, 0.25f);
  absl::Time renewed = absl::Now();
  for (int64_t step = 0;; ++step) {
    const absl::Status st = client.DecodeStep(session->id, 0, q, buffer->buffer_id(), 0).status();
    if (step == 0) {
      Check("decode_step", st);
      Print("streaming");
    }
    if (absl::Now() - renewed > absl::Milliseconds(200)) {
      (void)client.KeepAlive({session->id});
      renewed = absl::Now();
    }
  }
}

int Isolation(Client& client, const std::string& session, const std::string& buffer,
              const std::string& path) {
  Check("get_session", client.GetSession(session).status());
  Check("keepalive", client.KeepAlive({session}).status());
  Check("pin_session", client.PinSession(session, true).status());
  std::vector<float> q(4 * 64, 0.5f);
  Check("select_pages", client.SelectPages(session, 0, q).status());
  Check("fetch_pages",
        client.FetchPages(session, 0, std::vector<std::vector<uint32_t>>{{0}, {0}}, buffer, 0)
            .status());
  Check("decode_step", client.DecodeStep(session, 0, q, buffer, 0).status());
  Check("drop_session", client.DropSession(session));
  Check("evict_session", client.EvictSession(session));
  Check("unregister_buffer", client.UnregisterBuffer(buffer));
  Check("register_other_file", client.RegisterShm(path, 4096).status());
  Check("list_all_tenants", client.ListSessions(true).status());
  Check("get_stats", client.GetStats().status());
  Check("list_tenants", client.ListTenants().status());
  Check("set_quota", client.SetQuota("beta", 1ull << 40).status());
  auto mine = client.ListSessions(false);
  Check("list_own", mine.status());
  if (mine.ok()) Print(absl::StrCat("visible_sessions ", mine->size()));
  // With a session of its own: the other tenant's buffer as source and sink.
  const SessionSpec spec = ProbeSpec(absl::Seconds(60));
  auto own = client.CreateSession(spec);
  Check("create_own_session", own.status());
  if (!own.ok()) return 1;
  const std::vector<uint8_t> kv = RandomKv(spec, 64);
  Check("append_own", client.AppendKvInline(own->id, kv, 64).status());
  Check("append_from_other_buffer",
        client.AppendKv(own->id, buffer, 0, spec.ChunkBytes(16), 16).status());
  Check("fetch_into_other_buffer",
        client.FetchPages(own->id, 0, std::vector<std::vector<uint32_t>>{{0}, {0}}, buffer, 0)
            .status());
  Check("decode_into_other_buffer", client.DecodeStep(own->id, 0, q, buffer, 0).status());
  Check("drop_own_session", client.DropSession(own->id));
  return CreateAndHold(client, absl::Seconds(60));
}

int Main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s isolation|hold|stream SOCKET [SESSION BUFFER PATH]\n", argv[0]);
    return 2;
  }
  const std::string mode = argv[1];
  ClientOptions o;
  o.socket_path = argv[2];
  o.timeout = absl::Seconds(30);
  auto client = Client::Create(o);
  if (!client.ok()) {
    Check("connect", client.status());
    return 1;
  }
  // A 3 s lease renewed every 200 ms (lifecycle_test.cc kProbeLease).
  if (mode == "hold") return CreateAndHold(**client, absl::Seconds(3));
  if (mode == "stream") return CreateAndStream(**client, absl::Seconds(3));
  if (mode == "isolation" && argc == 6) return Isolation(**client, argv[3], argv[4], argv[5]);
  std::fprintf(stderr, "bad arguments\n");
  return 2;
}

}  // namespace
}  // namespace icecache

int main(int argc, char** argv) { return icecache::Main(argc, argv); }
