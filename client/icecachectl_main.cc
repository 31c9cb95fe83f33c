// icecachectl: the admin command line of icecached. See Usage() below.
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/client.h"
#include "client/output.h"

namespace icecache {
namespace {

constexpr int kExitOk = 0;
constexpr int kExitServerError = 1;
constexpr int kExitUsage = 2;
constexpr int kExitNotFound = 3;
constexpr int kExitPermission = 4;
constexpr int kExitUnavailable = 5;

const char kUsage[] = R"(usage: icecachectl [global flags] <command> [args]

Commands:
  status                      health, pool use and session count at a glance
  health                      grpc.health.v1 check (SERVING / NOT_SERVING)
  stats                       pool, size classes, tenants, counters
  sessions list [--all]       your sessions (--all: every tenant; admin)
  sessions show ID            one session in detail
  sessions drop ID            drop one of your sessions
  sessions pin ID [--unpin]   pin (never evicted) or unpin a session (admin)
  tenants                     tenants with usage, quota, sessions (admin)
  quota set TENANT BYTES      set a tenant's byte quota; BYTES accepts K/M/G/T
                              (binary) suffixes, 0 = no quota (admin)
  evict ID                    drop any tenant's session now (admin)
  drain [--shutdown]          refuse new sessions; --shutdown also exits the
                              daemon once in-flight calls finish (admin)
  config                      the daemon's effective configuration (admin)

Global flags:
  --socket PATH     Unix socket (default: $ICECACHE_SOCKET, else
                    /run/icecache/icecached.sock, $XDG_RUNTIME_DIR/icecached.sock,
                    /tmp/icecached-<uid>.sock, the first that exists)
  --address H:P     remote daemon over TCP with TLS (default $ICECACHE_ADDRESS)
  --token T         bearer token for --address (default $ICECACHE_TOKEN)
  --ca FILE         PEM CA certificate for --address (default: system roots)
  --timeout SECS    per-call deadline (default 10)
  --json            machine-readable JSON on stdout instead of tables
  -h, --help        this text

Exit codes:
  0  ok
  1  server error (any other failure reported by the daemon)
  2  usage error (bad command line)
  3  not found (unknown session, tenant or buffer)
  4  permission denied (admin role needed, or unauthenticated)
  5  unavailable (daemon not reachable, draining, or deadline exceeded)
)";

int ExitCodeFor(const absl::Status& s) {
  switch (s.code()) {
    case absl::StatusCode::kOk:
      return kExitOk;
    case absl::StatusCode::kNotFound:
      return kExitNotFound;
    case absl::StatusCode::kPermissionDenied:
    case absl::StatusCode::kUnauthenticated:
      return kExitPermission;
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kDeadlineExceeded:
      return kExitUnavailable;
    default:
      return kExitServerError;
  }
}

int Fail(const absl::Status& s) {
  std::cerr << "icecachectl: " << absl::StatusCodeToString(s.code()) << ": " << s.message() << "\n";
  return ExitCodeFor(s);
}

int UsageError(const std::string& msg) {
  std::cerr << "icecachectl: " << msg << "\n(run icecachectl --help for usage)\n";
  return kExitUsage;
}

std::string TimeText(absl::Time t) {
  if (t == absl::InfinitePast()) return "-";
  return absl::FormatTime("%Y-%m-%dT%H:%M:%SZ", t, absl::UTCTimeZone());
}

std::string FormatIn(absl::Time t) {
  if (t == absl::InfinitePast()) return "-";
  const absl::Duration d = t - absl::Now();
  return absl::StrFormat("%.1fs", absl::ToDoubleSeconds(d));
}

int64_t UnixMs(absl::Time t) { return t == absl::InfinitePast() ? 0 : absl::ToUnixMillis(t); }

// "4G", "512MiB", "1024" -> bytes.
bool ParseBytes(std::string text, uint64_t* out) {
  text = absl::AsciiStrToLower(text);
  uint64_t mult = 1;
  auto strip = [&](const char* suffix, uint64_t m) {
    const std::string s(suffix);
    if (text.size() > s.size() && text.compare(text.size() - s.size(), s.size(), s) == 0) {
      text.resize(text.size() - s.size());
      mult = m;
      return true;
    }
    return false;
  };
  strip("ib", 1) || strip("b", 1);
  if (mult == 1) {
    strip("k", 1ull << 10) || strip("m", 1ull << 20) || strip("g", 1ull << 30) ||
        strip("t", 1ull << 40);
  }
  uint64_t v = 0;
  if (!absl::SimpleAtoi(text, &v)) return false;
  if (mult != 1 && v > UINT64_MAX / mult) return false;
  *out = v * mult;
  return true;
}

void SessionJson(JsonWriter& w, const SessionInfo& s) {
  w.BeginObject();
  w.Key("session_id").String(s.id);
  w.Key("tenant").String(s.tenant);
  w.Key("epoch").String(absl::StrCat(s.epoch));  // > 2^53: a string, as proto JSON does
  w.Key("layers").Int(s.spec.layers);
  w.Key("kv_heads").Int(s.spec.kv_heads);
  w.Key("q_heads").Int(s.spec.q_heads);
  w.Key("head_dim").Int(s.spec.head_dim);
  w.Key("dtype").String(std::string(DTypeName(s.spec.dtype)));
  w.Key("page_tokens").Int(s.spec.page_tokens);
  w.Key("selector").String(std::string(SelectorTypeName(s.spec.selector)));
  w.Key("layer_reuse").Int(s.spec.layer_reuse);
  w.Key("ttl_ms").Int(absl::ToInt64Milliseconds(s.spec.ttl));
  w.Key("tokens").Uint(s.tokens);
  w.Key("bytes").Uint(s.bytes);
  w.Key("pages").Uint(s.pages);
  w.Key("index_bytes").Uint(s.index_bytes);
  w.Key("pinned").Bool(s.pinned);
  w.Key("in_flight").Uint(s.in_flight);
  w.Key("created_unix_ms").Int(UnixMs(s.created));
  w.Key("last_use_unix_ms").Int(UnixMs(s.last_use));
  w.Key("expires_unix_ms").Int(UnixMs(s.expires));
  w.EndObject();
}

void TenantJson(JsonWriter& w, const TenantInfo& t) {
  w.BeginObject();
  w.Key("tenant").String(t.tenant);
  w.Key("bytes_used").Uint(t.bytes_used);
  w.Key("quota_bytes").Uint(t.quota_bytes);
  w.Key("sessions").Uint(t.sessions);
  w.Key("buffers").Uint(t.buffers);
  w.EndObject();
}

std::string TenantTable(const std::vector<TenantInfo>& tenants) {
  TextTable t({"TENANT", "USED", "QUOTA", "SESSIONS", "BUFFERS"});
  for (const auto& x : tenants) {
    t.AddRow({x.tenant, HumanBytes(static_cast<int64_t>(x.bytes_used)),
              x.quota_bytes == 0 ? "-" : HumanBytes(static_cast<int64_t>(x.quota_bytes)),
              absl::StrCat(x.sessions), absl::StrCat(x.buffers)});
  }
  return t.Render();
}

struct Args {
  bool json = false;
  std::vector<std::string> positional;
  std::map<std::string, bool> switches;  // --all, --unpin, --shutdown
};

int Run(int argc, char** argv) {
  ClientOptions options;
  options.timeout = absl::Seconds(10);
  Args args;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    std::string value;
    const bool has_eq = a.rfind("--", 0) == 0 && a.find('=') != std::string::npos;
    if (has_eq) {
      value = a.substr(a.find('=') + 1);
      a = a.substr(0, a.find('='));
    }
    auto take = [&](std::string* dst) -> bool {
      if (has_eq) {
        *dst = value;
        return true;
      }
      if (i + 1 >= argc) return false;
      *dst = argv[++i];
      return true;
    };
    if (a == "-h" || a == "--help" || a == "help") {
      std::cout << kUsage;
      return kExitOk;
    } else if (a == "--json") {
      args.json = true;
    } else if (a == "--socket") {
      if (!take(&options.socket_path)) return UsageError("--socket needs a path");
    } else if (a == "--address") {
      if (!take(&options.address)) return UsageError("--address needs host:port");
    } else if (a == "--token") {
      if (!take(&options.token)) return UsageError("--token needs a value");
    } else if (a == "--ca") {
      if (!take(&options.ca_file)) return UsageError("--ca needs a file");
    } else if (a == "--timeout") {
      std::string t;
      double secs = 0;
      if (!take(&t) || !absl::SimpleAtod(t, &secs) || !(secs > 0)) {
        return UsageError("--timeout needs a positive number of seconds");
      }
      options.timeout = absl::Seconds(secs);
    } else if (a == "--all" || a == "--unpin" || a == "--shutdown") {
      args.switches[a] = true;
    } else if (a.rfind("--", 0) == 0) {
      return UsageError("unknown flag " + a);
    } else {
      args.positional.push_back(a);
    }
  }
  if (args.positional.empty()) return UsageError("no command given");
  const std::string cmd = args.positional[0];
  const std::vector<std::string> rest(args.positional.begin() + 1, args.positional.end());
  auto want = [&](size_t n) -> bool { return rest.size() == n; };

  auto client_or = Client::Create(options);
  if (!client_or.ok()) {
    if (client_or.status().code() == absl::StatusCode::kInvalidArgument) {
      return UsageError(std::string(client_or.status().message()));
    }
    return Fail(client_or.status());
  }
  Client& client = **client_or;
  JsonWriter w;

  if (cmd == "health") {
    if (!want(0)) return UsageError("health takes no arguments");
    auto h = client.Health();
    if (!h.ok()) return Fail(h.status());
    if (args.json) {
      w.BeginObject().Key("target").String(client.target());
      w.Key("status").String(*h ? "SERVING" : "NOT_SERVING").EndObject();
      std::cout << w.str() << "\n";
    } else {
      std::cout << (*h ? "SERVING" : "NOT_SERVING") << "\n";
    }
    return *h ? kExitOk : kExitUnavailable;
  }

  if (cmd == "status") {
    if (!want(0)) return UsageError("status takes no arguments");
    auto h = client.Health();
    if (!h.ok()) return Fail(h.status());
    auto stats = client.GetStats();
    // Non-admin callers still get health and their own sessions.
    auto sessions = client.ListSessions(false);
    if (!sessions.ok()) return Fail(sessions.status());
    if (args.json) {
      w.BeginObject();
      w.Key("target").String(client.target());
      w.Key("health").String(*h ? "SERVING" : "NOT_SERVING");
      w.Key("my_sessions").Uint(sessions->size());
      if (stats.ok()) {
        w.Key("epoch").String(absl::StrCat(stats->epoch));
        w.Key("capacity_bytes").Uint(stats->capacity_bytes);
        w.Key("bytes_used").Uint(stats->bytes_used);
        w.Key("sessions").Uint(stats->sessions);
        w.Key("buffers").Uint(stats->buffers);
        w.Key("draining").Bool(stats->draining);
      }
      w.EndObject();
      std::cout << w.str() << "\n";
    } else {
      TextTable t({"FIELD", "VALUE"});
      t.AddRow({"target", client.target()});
      t.AddRow({"health", *h ? "SERVING" : "NOT_SERVING"});
      t.AddRow({"my sessions", absl::StrCat(sessions->size())});
      if (stats.ok()) {
        t.AddRow({"epoch", absl::StrCat(stats->epoch)});
        t.AddRow({"up since", TimeText(stats->start)});
        t.AddRow({"pool used", absl::StrCat(HumanBytes(stats->bytes_used), " / ",
                                            HumanBytes(stats->capacity_bytes))});
        t.AddRow({"sessions (all)", absl::StrCat(stats->sessions)});
        t.AddRow({"buffers (all)", absl::StrCat(stats->buffers)});
        t.AddRow({"draining", stats->draining ? "yes" : "no"});
      } else {
        t.AddRow({"stats", absl::StrCat("(", absl::StatusCodeToString(stats.status().code()),
                                        ": admin role needed)")});
      }
      std::cout << t.Render();
    }
    return kExitOk;
  }

  if (cmd == "stats") {
    if (!want(0)) return UsageError("stats takes no arguments");
    auto s = client.GetStats();
    if (!s.ok()) return Fail(s.status());
    if (args.json) {
      w.BeginObject();
      w.Key("epoch").String(absl::StrCat(s->epoch));
      w.Key("start_unix_ms").Int(UnixMs(s->start));
      w.Key("capacity_bytes").Uint(s->capacity_bytes);
      w.Key("bytes_reserved").Uint(s->bytes_reserved);
      w.Key("bytes_used").Uint(s->bytes_used);
      w.Key("frames_used").Uint(s->frames_used);
      w.Key("frames_free").Uint(s->frames_free);
      w.Key("sessions").Uint(s->sessions);
      w.Key("buffers").Uint(s->buffers);
      w.Key("in_flight").Uint(s->in_flight);
      w.Key("draining").Bool(s->draining);
      w.Key("huge_pages").Bool(s->huge_pages);
      w.Key("evictions").Uint(s->evictions);
      w.Key("expirations").Uint(s->expirations);
      w.Key("sessions_created").Uint(s->sessions_created);
      w.Key("sessions_dropped").Uint(s->sessions_dropped);
      w.Key("admissions_rejected").Uint(s->admissions_rejected);
      w.Key("size_classes").BeginArray();
      for (const auto& c : s->size_classes) {
        w.BeginObject().Key("frame_bytes").Uint(c.frame_bytes);
        w.Key("frames_used").Uint(c.frames_used).Key("frames_free").Uint(c.frames_free);
        w.Key("bytes_reserved").Uint(c.bytes_reserved).EndObject();
      }
      w.EndArray();
      w.Key("tenants").BeginArray();
      for (const auto& t : s->tenants) TenantJson(w, t);
      w.EndArray();
      w.EndObject();
      std::cout << w.str() << "\n";
      return kExitOk;
    }
    TextTable t({"FIELD", "VALUE"});
    t.AddRow({"epoch", absl::StrCat(s->epoch)});
    t.AddRow({"up since", TimeText(s->start)});
    t.AddRow({"capacity", HumanBytes(s->capacity_bytes)});
    t.AddRow({"reserved", HumanBytes(s->bytes_reserved)});
    t.AddRow({"used", HumanBytes(s->bytes_used)});
    t.AddRow({"frames used", absl::StrCat(s->frames_used)});
    t.AddRow({"frames free", absl::StrCat(s->frames_free)});
    t.AddRow({"sessions", absl::StrCat(s->sessions)});
    t.AddRow({"buffers", absl::StrCat(s->buffers)});
    t.AddRow({"in flight", absl::StrCat(s->in_flight)});
    t.AddRow({"draining", s->draining ? "yes" : "no"});
    t.AddRow({"huge pages", s->huge_pages ? "yes" : "no"});
    t.AddRow({"sessions created", absl::StrCat(s->sessions_created)});
    t.AddRow({"sessions dropped", absl::StrCat(s->sessions_dropped)});
    t.AddRow({"evictions", absl::StrCat(s->evictions)});
    t.AddRow({"expirations", absl::StrCat(s->expirations)});
    t.AddRow({"admissions rejected", absl::StrCat(s->admissions_rejected)});
    std::cout << t.Render();
    if (!s->size_classes.empty()) {
      TextTable c({"FRAME_BYTES", "USED", "FREE", "RESERVED"});
      for (const auto& x : s->size_classes) {
        c.AddRow({absl::StrCat(x.frame_bytes), absl::StrCat(x.frames_used),
                  absl::StrCat(x.frames_free), HumanBytes(x.bytes_reserved)});
      }
      std::cout << "\n" << c.Render();
    }
    if (!s->tenants.empty()) std::cout << "\n" << TenantTable(s->tenants);
    return kExitOk;
  }

  if (cmd == "sessions") {
    if (rest.empty()) return UsageError("sessions needs list|show|drop|pin");
    const std::string sub = rest[0];
    if (sub == "list") {
      if (rest.size() != 1) return UsageError("sessions list takes no arguments");
      auto list = client.ListSessions(args.switches.count("--all") > 0);
      if (!list.ok()) return Fail(list.status());
      if (args.json) {
        w.BeginArray();
        for (const auto& s : *list) SessionJson(w, s);
        w.EndArray();
        std::cout << w.str() << "\n";
        return kExitOk;
      }
      TextTable t({"ID", "TENANT", "SHAPE", "DTYPE", "SELECTOR", "TOKENS", "BYTES", "PINNED",
                   "EXPIRES_IN"});
      for (const auto& s : *list) {
        t.AddRow({s.id, s.tenant,
                  absl::StrFormat("%dx%d/%dx%d", s.spec.layers, s.spec.kv_heads, s.spec.q_heads,
                                  s.spec.head_dim),
                  std::string(DTypeName(s.spec.dtype)),
                  std::string(SelectorTypeName(s.spec.selector)), absl::StrCat(s.tokens),
                  HumanBytes(static_cast<int64_t>(s.bytes)), s.pinned ? "yes" : "no",
                  FormatIn(s.expires)});
      }
      std::cout << t.Render();
      return kExitOk;
    }
    if (sub == "show" || sub == "drop" || sub == "pin") {
      if (rest.size() != 2) return UsageError("sessions " + sub + " needs exactly one session id");
      const std::string& id = rest[1];
      if (sub == "drop") {
        absl::Status s = client.DropSession(id);
        if (!s.ok()) return Fail(s);
        if (args.json) {
          std::cout << w.BeginObject().Key("dropped").String(id).EndObject().str() << "\n";
        } else {
          std::cout << "dropped " << id << "\n";
        }
        return kExitOk;
      }
      absl::StatusOr<SessionInfo> info =
          sub == "show" ? client.GetSession(id)
                        : client.PinSession(id, !args.switches.count("--unpin"));
      if (!info.ok()) return Fail(info.status());
      if (args.json) {
        SessionJson(w, *info);
        std::cout << w.str() << "\n";
        return kExitOk;
      }
      TextTable t({"FIELD", "VALUE"});
      t.AddRow({"id", info->id});
      t.AddRow({"tenant", info->tenant});
      t.AddRow({"epoch", absl::StrCat(info->epoch)});
      t.AddRow({"layers", absl::StrCat(info->spec.layers)});
      t.AddRow({"kv heads", absl::StrCat(info->spec.kv_heads)});
      t.AddRow({"q heads", absl::StrCat(info->spec.q_heads)});
      t.AddRow({"head dim", absl::StrCat(info->spec.head_dim)});
      t.AddRow({"dtype", std::string(DTypeName(info->spec.dtype))});
      t.AddRow({"page tokens", absl::StrCat(info->spec.page_tokens)});
      t.AddRow({"selector", std::string(SelectorTypeName(info->spec.selector))});
      t.AddRow({"layer reuse", absl::StrCat(info->spec.layer_reuse)});
      t.AddRow({"ttl", absl::FormatDuration(info->spec.ttl)});
      t.AddRow({"tokens", absl::StrCat(info->tokens)});
      t.AddRow({"bytes", HumanBytes(static_cast<int64_t>(info->bytes))});
      t.AddRow({"pages", absl::StrCat(info->pages)});
      t.AddRow({"index bytes", HumanBytes(static_cast<int64_t>(info->index_bytes))});
      t.AddRow({"pinned", info->pinned ? "yes" : "no"});
      t.AddRow({"in flight", absl::StrCat(info->in_flight)});
      t.AddRow({"created", TimeText(info->created)});
      t.AddRow({"last use", TimeText(info->last_use)});
      t.AddRow({"expires", TimeText(info->expires)});
      std::cout << t.Render();
      return kExitOk;
    }
    return UsageError("unknown sessions subcommand '" + sub + "' (list|show|drop|pin)");
  }

  if (cmd == "tenants") {
    if (!want(0)) return UsageError("tenants takes no arguments");
    auto list = client.ListTenants();
    if (!list.ok()) return Fail(list.status());
    if (args.json) {
      w.BeginArray();
      for (const auto& t : *list) TenantJson(w, t);
      w.EndArray();
      std::cout << w.str() << "\n";
    } else {
      std::cout << TenantTable(*list);
    }
    return kExitOk;
  }

  if (cmd == "quota") {
    if (rest.size() != 3 || rest[0] != "set") return UsageError("usage: quota set TENANT BYTES");
    uint64_t bytes = 0;
    if (!ParseBytes(rest[2], &bytes)) {
      return UsageError("quota set: '" + rest[2] +
                        "' is not a byte count (e.g. 1073741824, 4G, 512MiB)");
    }
    auto t = client.SetQuota(rest[1], bytes);
    if (!t.ok()) return Fail(t.status());
    if (args.json) {
      TenantJson(w, *t);
      std::cout << w.str() << "\n";
    } else {
      std::cout << TenantTable({*t});
    }
    return kExitOk;
  }

  if (cmd == "evict") {
    if (!want(1)) return UsageError("evict needs exactly one session id");
    absl::Status s = client.EvictSession(rest[0]);
    if (!s.ok()) return Fail(s);
    if (args.json) {
      std::cout << w.BeginObject().Key("evicted").String(rest[0]).EndObject().str() << "\n";
    } else {
      std::cout << "evicted " << rest[0] << "\n";
    }
    return kExitOk;
  }

  if (cmd == "drain") {
    if (!want(0)) return UsageError("drain takes no arguments (only --shutdown)");
    const bool shutdown = args.switches.count("--shutdown") > 0;
    auto d = client.Drain(shutdown);
    if (!d.ok()) return Fail(d.status());
    if (args.json) {
      w.BeginObject().Key("draining").Bool(true).Key("shutdown").Bool(shutdown);
      w.Key("in_flight").Uint(d->in_flight).Key("sessions").Uint(d->sessions).EndObject();
      std::cout << w.str() << "\n";
    } else {
      std::cout << "draining" << (shutdown ? " (daemon exits when in-flight calls finish)" : "")
                << ": in_flight=" << d->in_flight << " sessions=" << d->sessions << "\n";
    }
    return kExitOk;
  }

  if (cmd == "config") {
    if (!want(0)) return UsageError("config takes no arguments");
    auto c = client.GetConfig(args.json);
    if (!c.ok()) return Fail(c.status());
    std::cout << *c;
    if (!c->empty() && c->back() != '\n') std::cout << "\n";
    return kExitOk;
  }

  return UsageError("unknown command '" + cmd + "'");
}

}  // namespace
}  // namespace icecache

int main(int argc, char** argv) { return icecache::Run(argc, argv); }
