// icecachectl: the admin command line of icecached (icecachectl --help).
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/client.h"
#include "client/output.h"
#include "common/cli.h"

namespace icecache {
namespace {

constexpr int kExitOk = 0;
constexpr int kExitServerError = 1;
constexpr int kExitUsage = cli::kExitUsage;
constexpr int kExitNotFound = 3;
constexpr int kExitPermission = 4;
constexpr int kExitUnavailable = 5;

const char kExitCodes[] = R"(Exit codes:
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

std::string TenantTable(const std::vector<TenantInfo>& tenants) {
  TextTable t({"TENANT", "USED", "QUOTA", "SESSIONS", "BUFFERS"});
  for (const auto& x : tenants) {
    t.AddRow({x.tenant, HumanBytes(static_cast<int64_t>(x.bytes_used)),
              x.quota_bytes == 0 ? "-" : HumanBytes(static_cast<int64_t>(x.quota_bytes)),
              absl::StrCat(x.sessions), absl::StrCat(x.buffers)});
  }
  return t.Render();
}

void PrintJson(const Json& j) { std::cout << DumpJson(j) << "\n"; }

int CmdHealth(Client& client, bool json) {
  auto h = client.Health();
  if (!h.ok()) return Fail(h.status());
  const char* text = *h ? "SERVING" : "NOT_SERVING";
  if (json) {
    PrintJson({{"target", client.target()}, {"status", text}});
  } else {
    std::cout << text << "\n";
  }
  return *h ? kExitOk : kExitUnavailable;
}

void PrintStatusTable(Client& client, bool serving, size_t my_sessions,
                      const absl::StatusOr<DaemonStats>& stats) {
  TextTable t({"FIELD", "VALUE"});
  t.AddRow({"target", client.target()});
  t.AddRow({"health", serving ? "SERVING" : "NOT_SERVING"});
  t.AddRow({"my sessions", absl::StrCat(my_sessions)});
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

int CmdStatus(Client& client, bool json) {
  auto h = client.Health();
  if (!h.ok()) return Fail(h.status());
  auto stats = client.GetStats();
  // Non-admin callers still get health and their own sessions.
  auto sessions = client.ListSessions(false);
  if (!sessions.ok()) return Fail(sessions.status());
  if (!json) {
    PrintStatusTable(client, *h, sessions->size(), stats);
    return kExitOk;
  }
  Json j = {{"target", client.target()},
            {"health", *h ? "SERVING" : "NOT_SERVING"},
            {"my_sessions", sessions->size()}};
  if (stats.ok()) {
    j["epoch"] = absl::StrCat(stats->epoch);
    j["capacity_bytes"] = stats->capacity_bytes;
    j["bytes_used"] = stats->bytes_used;
    j["sessions"] = stats->sessions;
    j["buffers"] = stats->buffers;
    j["draining"] = stats->draining;
  }
  PrintJson(j);
  return kExitOk;
}

void PrintStatsTables(const DaemonStats& s) {
  TextTable t({"FIELD", "VALUE"});
  t.AddRow({"epoch", absl::StrCat(s.epoch)});
  t.AddRow({"up since", TimeText(s.start)});
  t.AddRow({"capacity", HumanBytes(s.capacity_bytes)});
  t.AddRow({"reserved", HumanBytes(s.bytes_reserved)});
  t.AddRow({"used", HumanBytes(s.bytes_used)});
  t.AddRow({"frames used", absl::StrCat(s.frames_used)});
  t.AddRow({"frames free", absl::StrCat(s.frames_free)});
  t.AddRow({"sessions", absl::StrCat(s.sessions)});
  t.AddRow({"buffers", absl::StrCat(s.buffers)});
  t.AddRow({"in flight", absl::StrCat(s.in_flight)});
  t.AddRow({"draining", s.draining ? "yes" : "no"});
  t.AddRow({"huge pages", s.huge_pages ? "yes" : "no"});
  t.AddRow({"sessions created", absl::StrCat(s.sessions_created)});
  t.AddRow({"sessions dropped", absl::StrCat(s.sessions_dropped)});
  t.AddRow({"evictions", absl::StrCat(s.evictions)});
  t.AddRow({"expirations", absl::StrCat(s.expirations)});
  t.AddRow({"admissions rejected", absl::StrCat(s.admissions_rejected)});
  t.AddRow(
      {"gpu direct reads", s.pool_pinned_bytes > 0
                               ? absl::StrCat("on (", HumanBytes(s.pool_pinned_bytes), " pinned)")
                               : "off (pool not pinned)"});
  t.AddRow({"gpu pushes",
            absl::StrCat(s.gpu_pushes_in_place, " in place, ", s.gpu_pushes_staged, " staged")});
  std::cout << t.Render();
  if (!s.size_classes.empty()) {
    TextTable c({"FRAME_BYTES", "USED", "FREE", "RESERVED"});
    for (const auto& x : s.size_classes) {
      c.AddRow({absl::StrCat(x.frame_bytes), absl::StrCat(x.frames_used),
                absl::StrCat(x.frames_free), HumanBytes(x.bytes_reserved)});
    }
    std::cout << "\n" << c.Render();
  }
  if (!s.tenants.empty()) std::cout << "\n" << TenantTable(s.tenants);
}

int CmdStats(Client& client, bool json) {
  auto s = client.GetStats();
  if (!s.ok()) return Fail(s.status());
  if (json) {
    PrintJson(StatsJson(*s));
  } else {
    PrintStatsTables(*s);
  }
  return kExitOk;
}

int CmdSessionsList(Client& client, bool json, bool all) {
  auto list = client.ListSessions(all);
  if (!list.ok()) return Fail(list.status());
  if (json) {
    Json j = Json::array();
    for (const auto& s : *list) j.push_back(SessionJson(s));
    PrintJson(j);
    return kExitOk;
  }
  TextTable t(
      {"ID", "TENANT", "SHAPE", "DTYPE", "SELECTOR", "TOKENS", "BYTES", "PINNED", "EXPIRES_IN"});
  for (const auto& s : *list) {
    t.AddRow({s.id, s.tenant,
              absl::StrFormat("%dx%d/%dx%d", s.spec.layers, s.spec.kv_heads, s.spec.q_heads,
                              s.spec.head_dim),
              std::string(DTypeName(s.spec.dtype)), std::string(SelectorTypeName(s.spec.selector)),
              absl::StrCat(s.tokens), HumanBytes(static_cast<int64_t>(s.bytes)),
              s.pinned ? "yes" : "no", FormatIn(s.expires)});
  }
  std::cout << t.Render();
  return kExitOk;
}

// Per-head quality rows are printed up to this many indexes.
constexpr size_t kMaxHeadRows = 64;

// "min / median / max" of the tree heads' widths, and how many select exactly.
std::string WidthSummary(const SessionQuality& q) {
  std::vector<double> w;
  size_t exact = 0;
  for (const HeadQuality& h : q.heads) {
    if (h.exact) {
      ++exact;
    } else {
      w.push_back(h.width);
    }
  }
  const std::string fallback = exact == 0
                                   ? std::string()
                                   : absl::StrCat("; ", exact, " of ", q.heads.size(),
                                                  " heads select exactly (the tree did not pay)");
  if (w.empty()) return exact == 0 ? std::string("-") : fallback.substr(2);
  std::sort(w.begin(), w.end());
  return absl::StrFormat("%.2f / %.2f / %.2f (min / median / max, x the session's width)%s",
                         w.front(), w[w.size() / 2], w.back(), fallback);
}

// Heads whose fresh scans' candidates serve the next steps now.
size_t CarryingHeads(const SessionQuality& q) {
  size_t n = 0;
  for (const HeadQuality& h : q.heads) n += h.carry_steps > 0 ? 1 : 0;
  return n;
}

// The candidate carry-over: heads carrying now, heads that stopped (their
// carried steps fell behind their fresh ones), and the selections carried.
std::string CarrySummary(const SessionQuality& q) {
  size_t stopped = 0;
  for (const HeadQuality& h : q.heads) stopped += h.carry_stops > 0 && h.carry_steps == 0 ? 1 : 0;
  std::string pooled;
  if (q.carry_stopped) {
    pooled = "; stopped for the session's unjudged heads";
  } else if (q.carry_pool_steps > 0) {
    pooled = absl::StrCat("; unjudged heads carry ", q.carry_pool_steps, " step",
                          q.carry_pool_steps == 1 ? "" : "s");
  }
  if (q.carry_shortened > 0) absl::StrAppend(&pooled, " (shortened ", q.carry_shortened, "x)");
  return absl::StrCat(CarryingHeads(q), " of ", q.heads.size(), " heads carry, ", stopped,
                      " stopped; ", q.carried_selections, " selections carried", pooled);
}

// How many heads took a sample, and the samples per head: at model scale
// (32 layers x 8 KV heads) a session's sampling budget reaches few heads in
// its first hundreds of steps, so most still select at their starting width
// (docs/architecture.md, calibration memory).
std::string SampledHeads(const SessionQuality& q) {
  std::vector<uint64_t> n;
  size_t sampled = 0;
  for (const HeadQuality& h : q.heads) {
    n.push_back(h.samples);
    if (h.samples > 0) ++sampled;
  }
  std::sort(n.begin(), n.end());
  return absl::StrCat(sampled, " of ", q.heads.size(), " (samples per head: ", n.front(), " / ",
                      n[n.size() / 2], " / ", n.back(), " min / median / max)");
}

// A head's mode: its width, "exact" (exact fallback) or "-" (not calibrated).
std::string ModeText(const HeadQuality& h) {
  if (!h.calibrated) return "-";
  if (h.exact) return "exact";
  const std::string method = h.search_method.empty() ? std::string("tree") : h.search_method;
  // The method duel's trials (with the scan configured): won / run.
  return h.method_trials > 0 ? absl::StrCat(method, " ", h.method_switches, "/", h.method_trials)
                             : method;
}

void AddQualityRows(const SessionQuality& q, TextTable* t) {
  if (!q.monitored) {
    t->AddRow({"quality", "not monitored (positional selectors, or quality.enabled false)"});
    return;
  }
  t->AddRow(
      {"target mass ratio", q.target_mass_ratio > 0
                                ? absl::StrFormat("%.3f (width calibrated)", q.target_mass_ratio)
                                : std::string("off (fixed width)")});
  t->AddRow({"samples", absl::StrCat(q.samples, " measured, ", q.samples_dropped, " dropped, ",
                                     q.samples_stale, " stale")});
  if (!q.heads.empty()) t->AddRow({"heads sampled", SampledHeads(q)});
  if (q.samples > 0) {
    t->AddRow({"mass ratio",
               absl::StrFormat("%.4f mean, %.4f recent", q.mean_mass_ratio, q.recent_mass_ratio)});
    t->AddRow({"top-k recall", absl::StrFormat("%.4f", q.mean_topk_recall)});
  }
  if (q.target_mass_ratio > 0) t->AddRow({"width per head", WidthSummary(q)});
  if (q.seeded_heads > 0) {
    t->AddRow({"seeded", absl::StrCat(q.seeded_heads, " of ", q.heads.size(),
                                      " heads started from an earlier session's width")});
  }
  if (q.pool_width > 0) {
    t->AddRow({"pooled width",
               absl::StrFormat("x%.3g from %u samples; %u of %zu heads started there", q.pool_width,
                               q.pool_samples, q.pooled_heads, q.heads.size())});
  }
  if (q.carried_selections > 0 || q.carry_stopped || CarryingHeads(q) > 0) {
    t->AddRow({"carry-over", CarrySummary(q)});
  }
  const double share = q.selection_ms > 0 ? 100.0 * q.calibration_cpu_ms / q.selection_ms : 0.0;
  t->AddRow({"calibration cpu", absl::StrFormat("%.1f ms (%.1f%% of %.1f ms selection)",
                                                q.calibration_cpu_ms, share, q.selection_ms)});
}

// "loudest" or "normalized", with the other ranking's moving gain and the
// switches so far; "-" for heads without a calibrator.
std::string RankingText(const HeadQuality& h) {
  if (!h.calibrated || h.descent_ranking.empty()) return "-";
  return absl::StrFormat("%s %+.3f %dx", h.descent_ranking, h.ranking_trial_gain,
                         static_cast<int>(h.ranking_switches));
}

TextTable HeadQualityTable(const SessionQuality& q) {
  TextTable t({"GROUP", "KV_HEAD", "MODE", "RANKING", "WIDTH", "FOV", "CAND", "CHANGES",
               "FALLBACKS", "EXACT_SEL", "SAMPLES", "EVERY", "MEAN_RATIO", "RECENT", "TOPK"});
  for (const HeadQuality& h : q.heads) {
    t.AddRow({absl::StrCat(h.layer_group), absl::StrCat(h.kv_head), ModeText(h), RankingText(h),
              h.calibrated ? absl::StrFormat("%.2f", h.width) : std::string("-"),
              h.calibrated ? absl::StrCat(h.field_of_view) : std::string("-"),
              h.calibrated ? absl::StrFormat("%.1f", h.candidate_factor) : std::string("-"),
              absl::StrCat(h.width_changes), absl::StrCat(h.fallbacks),
              absl::StrCat(h.exact_selections), absl::StrCat(h.samples),
              absl::StrCat(h.sample_interval), absl::StrFormat("%.4f", h.mean_mass_ratio),
              absl::StrFormat("%.4f", h.recent_mass_ratio),
              absl::StrFormat("%.3f", h.mean_topk_recall)});
  }
  return t;
}

void PrintSessionTable(const SessionInfo& info) {
  TextTable t({"FIELD", "VALUE"});
  t.AddRow({"id", info.id});
  t.AddRow({"tenant", info.tenant});
  t.AddRow({"epoch", absl::StrCat(info.epoch)});
  t.AddRow({"layers", absl::StrCat(info.spec.layers)});
  t.AddRow({"kv heads", absl::StrCat(info.spec.kv_heads)});
  t.AddRow({"q heads", absl::StrCat(info.spec.q_heads)});
  t.AddRow({"head dim", absl::StrCat(info.spec.head_dim)});
  t.AddRow({"dtype", std::string(DTypeName(info.spec.dtype))});
  t.AddRow({"page tokens", absl::StrCat(info.spec.page_tokens)});
  t.AddRow({"selector", std::string(SelectorTypeName(info.spec.selector))});
  if (info.spec.selector == SelectorType::kMdci) {
    const float pq = info.spec.mdci_pq_factor.value_or(0.0f);
    t.AddRow({"candidates",
              pq > 0.0f ? absl::StrFormat("tree descent or PQ scan per head (pq_factor %g)", pq)
                        : std::string("tree descent (no PQ codes)")});
  }
  t.AddRow({"layer reuse", absl::StrCat(info.spec.layer_reuse)});
  const std::string unit = GranularityText(info.spec.defaults.granularity);
  t.AddRow({"granularity", unit == "by-destination"
                               ? "by destination (token into shm, page into device buffers)"
                               : unit});
  t.AddRow({"ttl", absl::FormatDuration(info.spec.ttl)});
  t.AddRow({"tokens", absl::StrCat(info.tokens)});
  t.AddRow({"bytes", HumanBytes(static_cast<int64_t>(info.bytes))});
  t.AddRow({"pages", absl::StrCat(info.pages)});
  t.AddRow({"index bytes", HumanBytes(static_cast<int64_t>(info.index_bytes))});
  if (info.decode_keys > 0) {
    t.AddRow({"decode keys",
              absl::StrFormat("%d inserted, %.0f%% joined a recent node unrouted", info.decode_keys,
                              100.0 * static_cast<double>(info.decode_keys_unrouted) /
                                  static_cast<double>(info.decode_keys))});
  }
  t.AddRow({"pinned", info.pinned ? "yes" : "no"});
  t.AddRow({"in flight", absl::StrCat(info.in_flight)});
  t.AddRow(
      {"index", info.trees_built < info.trees_total
                    ? absl::StrCat("indexing ", info.trees_built, "/", info.trees_total, " trees")
                    : absl::StrCat("ready (", info.trees_total, " trees)")});
  t.AddRow({"created", TimeText(info.created)});
  t.AddRow({"last use", TimeText(info.last_use)});
  t.AddRow({"expires", TimeText(info.expires)});
  AddQualityRows(info.quality, &t);
  std::cout << t.Render();
  if (info.quality.monitored && !info.quality.heads.empty()) {
    if (info.quality.heads.size() <= kMaxHeadRows) {
      std::cout << "\n" << HeadQualityTable(info.quality).Render();
    } else {
      std::cout << "\n(" << info.quality.heads.size()
                << " (layer group, kv head) indexes: --json lists each one's width and ratio)\n";
    }
  }
}

int PrintSession(const absl::StatusOr<SessionInfo>& info, bool json) {
  if (!info.ok()) return Fail(info.status());
  if (json) {
    PrintJson(SessionJson(*info));
  } else {
    PrintSessionTable(*info);
  }
  return kExitOk;
}

// `drop` and `evict`: one line saying what went.
int Removed(const absl::Status& s, bool json, const char* verb, const std::string& id) {
  if (!s.ok()) return Fail(s);
  if (json) {
    PrintJson({{verb, id}});
  } else {
    std::cout << verb << " " << id << "\n";
  }
  return kExitOk;
}

int CmdTenants(Client& client, bool json) {
  auto list = client.ListTenants();
  if (!list.ok()) return Fail(list.status());
  if (json) {
    Json j = Json::array();
    for (const auto& t : *list) j.push_back(TenantJson(t));
    PrintJson(j);
  } else {
    std::cout << TenantTable(*list);
  }
  return kExitOk;
}

int CmdQuotaSet(Client& client, bool json, const std::string& tenant, const std::string& text) {
  uint64_t bytes = 0;
  if (!ParseBytes(text, &bytes)) {
    return UsageError("quota set: '" + text +
                      "' is not a byte count (e.g. 1073741824, 4G, 512MiB)");
  }
  auto t = client.SetQuota(tenant, bytes);
  if (!t.ok()) return Fail(t.status());
  if (json) {
    PrintJson(TenantJson(*t));
  } else {
    std::cout << TenantTable({*t});
  }
  return kExitOk;
}

int CmdDrain(Client& client, bool json, bool shutdown, bool for_upgrade) {
  auto d = client.Drain(shutdown, for_upgrade);
  if (!d.ok()) return Fail(d.status());
  if (for_upgrade) {
    if (json) {
      PrintJson({{"draining", true},
                 {"for_upgrade", true},
                 {"in_flight", d->in_flight},
                 {"sessions", d->sessions}});
    } else {
      std::cout << "draining for upgrade (the daemon writes its snapshot and exits with code 3; "
                   "the next daemon recovers the sessions): in_flight="
                << d->in_flight << " sessions=" << d->sessions << "\n";
    }
    return kExitOk;
  }
  if (json) {
    PrintJson({{"draining", true},
               {"shutdown", shutdown},
               {"in_flight", d->in_flight},
               {"sessions", d->sessions}});
  } else {
    std::cout << "draining" << (shutdown ? " (daemon exits when in-flight calls finish)" : "")
              << ": in_flight=" << d->in_flight << " sessions=" << d->sessions << "\n";
  }
  return kExitOk;
}

int CmdConfig(Client& client, bool json) {
  auto c = client.GetConfig(json);
  if (!c.ok()) return Fail(c.status());
  std::cout << *c;
  if (!c->empty() && c->back() != '\n') std::cout << "\n";
  return kExitOk;
}

// The command line: global flags, then one command (flags of the global set
// are accepted after the command too).
struct CommandLine {
  ClientOptions options;
  double timeout_s = 10;
  bool json = false;
  std::string id, tenant, bytes;
  bool all = false, unpin = false, shutdown = false, for_upgrade = false;
  CLI::App* health = nullptr;
  CLI::App* status = nullptr;
  CLI::App* stats = nullptr;
  CLI::App* sessions_list = nullptr;
  CLI::App* sessions_show = nullptr;
  CLI::App* sessions_drop = nullptr;
  CLI::App* sessions_pin = nullptr;
  CLI::App* tenants = nullptr;
  CLI::App* quota_set = nullptr;
  CLI::App* evict = nullptr;
  CLI::App* drain = nullptr;
  CLI::App* config = nullptr;
  CLI::App* help = nullptr;
};

void AddGlobalFlags(CLI::App& app, CommandLine* c) {
  app.add_option("--socket", c->options.socket_path,
                 "Unix socket (default: $ICECACHE_SOCKET, else /run/icecache/icecached.sock, "
                 "$XDG_RUNTIME_DIR/icecached.sock, /tmp/icecached-<uid>.sock, the first that "
                 "exists)")
      ->type_name("PATH");
  app.add_option("--address", c->options.address,
                 "remote daemon over TCP with TLS (default $ICECACHE_ADDRESS)")
      ->type_name("HOST:PORT");
  app.add_option("--token", c->options.token,
                 "bearer token for --address (default $ICECACHE_TOKEN)");
  app.add_option("--ca", c->options.ca_file,
                 "PEM CA certificate for --address (default: system roots)")
      ->type_name("FILE");
  app.add_option("--timeout", c->timeout_s, "per-call deadline in seconds");
  app.add_flag("--json", c->json, "machine-readable JSON on stdout instead of tables");
}

CLI::App* AddIdCommand(CLI::App& parent, const char* name, const char* help, CommandLine* c) {
  CLI::App* sub = parent.add_subcommand(name, help);
  sub->add_option("ID", c->id, "session id")->required();
  return sub;
}

void AddCommands(CLI::App& app, CommandLine* c) {
  c->status = app.add_subcommand("status", "health, pool use and session count at a glance");
  c->health = app.add_subcommand("health", "grpc.health.v1 check (SERVING / NOT_SERVING)");
  c->stats = app.add_subcommand("stats", "pool, size classes, tenants, counters");
  CLI::App* sessions = app.add_subcommand("sessions", "list, show, drop or pin sessions");
  sessions->require_subcommand(1);
  c->sessions_list = sessions->add_subcommand("list", "your sessions");
  c->sessions_list->add_flag("--all", c->all, "every tenant's sessions (admin)");
  c->sessions_show = AddIdCommand(*sessions, "show", "one session in detail", c);
  c->sessions_drop = AddIdCommand(*sessions, "drop", "drop one of your sessions", c);
  c->sessions_pin = AddIdCommand(
      *sessions, "pin", "pin (never evicted) or, with --unpin, unpin a session (admin)", c);
  c->sessions_pin->add_flag("--unpin", c->unpin, "unpin instead");
  c->tenants = app.add_subcommand("tenants", "tenants with usage, quota, sessions (admin)");
  CLI::App* quota = app.add_subcommand("quota", "tenant quotas (admin)");
  quota->require_subcommand(1);
  c->quota_set = quota->add_subcommand(
      "set", "set a tenant's byte quota; BYTES accepts K/M/G/T (binary) suffixes, 0 = no quota");
  c->quota_set->add_option("TENANT", c->tenant, "tenant name")->required();
  c->quota_set->add_option("BYTES", c->bytes, "quota in bytes")->required();
  c->evict = AddIdCommand(app, "evict", "drop any tenant's session now (admin)", c);
  c->drain = app.add_subcommand(
      "drain",
      "refuse new sessions; --shutdown also exits the daemon once in-flight calls finish "
      "(admin)");
  c->drain->add_flag("--shutdown", c->shutdown, "exit the daemon once in-flight calls finish");
  c->drain->add_flag("--for-upgrade,--for_upgrade", c->for_upgrade,
                     "exit keeping every session for the next daemon (warm restart: needs "
                     "pool.backing_dir; the daemon exits with code 3)");
  c->config = app.add_subcommand("config", "the daemon's effective configuration (admin)");
  c->help = app.add_subcommand("help", "this text (as --help)");
}

int RunCommand(Client& client, const CommandLine& c) {
  const bool json = c.json;
  if (c.health->parsed()) return CmdHealth(client, json);
  if (c.status->parsed()) return CmdStatus(client, json);
  if (c.stats->parsed()) return CmdStats(client, json);
  if (c.sessions_list->parsed()) return CmdSessionsList(client, json, c.all);
  if (c.sessions_show->parsed()) return PrintSession(client.GetSession(c.id), json);
  if (c.sessions_pin->parsed()) return PrintSession(client.PinSession(c.id, !c.unpin), json);
  if (c.sessions_drop->parsed()) return Removed(client.DropSession(c.id), json, "dropped", c.id);
  if (c.evict->parsed()) return Removed(client.EvictSession(c.id), json, "evicted", c.id);
  if (c.tenants->parsed()) return CmdTenants(client, json);
  if (c.quota_set->parsed()) return CmdQuotaSet(client, json, c.tenant, c.bytes);
  if (c.drain->parsed()) return CmdDrain(client, json, c.shutdown, c.for_upgrade);
  if (c.config->parsed()) return CmdConfig(client, json);
  return UsageError("no command given");
}

int Run(int argc, char** argv) {
  CLI::App app("The admin command line of icecached.", "icecachectl");
  cli::Configure(app);
  app.require_subcommand(1);
  app.footer(kExitCodes);
  CommandLine c;
  AddGlobalFlags(app, &c);
  AddCommands(app, &c);
  if (auto code = cli::Parse(app, argc, argv)) return *code;
  if (c.help->parsed()) {
    std::cout << app.help();
    return kExitOk;
  }
  if (!(c.timeout_s > 0)) return UsageError("--timeout needs a positive number of seconds");
  c.options.timeout = absl::Seconds(c.timeout_s);
  auto client = Client::Create(c.options);
  if (!client.ok()) {
    if (client.status().code() == absl::StatusCode::kInvalidArgument) {
      return UsageError(std::string(client.status().message()));
    }
    return Fail(client.status());
  }
  return RunCommand(**client, c);
}

}  // namespace
}  // namespace icecache

int main(int argc, char** argv) { return icecache::Run(argc, argv); }
