#include "client/output.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/time.h"

namespace icecache {
namespace {

bool LooksNumeric(const std::string& s) {
  if (s.empty()) return false;
  bool digit = false;
  for (char c : s) {
    if (c >= '0' && c <= '9') {
      digit = true;
    } else if (c != '.' && c != '-' && c != '+' && c != '%' && c != 'e') {
      return false;
    }
  }
  return digit;
}

}  // namespace

std::string TextTable::Render() const {
  size_t cols = header_.size();
  for (const auto& r : rows_) cols = std::max(cols, r.size());
  std::vector<size_t> width(cols, 0);
  // A column is right-aligned when every non-empty body cell is numeric.
  std::vector<bool> numeric(cols, false);
  auto cell = [&](const std::vector<std::string>& r, size_t i) -> const std::string& {
    static const std::string kEmpty;
    return i < r.size() ? r[i] : kEmpty;
  };
  for (size_t i = 0; i < cols; ++i) {
    width[i] = cell(header_, i).size();
    bool any = false, all = true;
    for (const auto& r : rows_) {
      width[i] = std::max(width[i], cell(r, i).size());
      if (cell(r, i).empty()) continue;
      any = true;
      all = all && LooksNumeric(cell(r, i));
    }
    numeric[i] = any && all;
  }
  std::string out;
  auto emit = [&](const std::vector<std::string>& r, bool header) {
    std::string line;
    for (size_t i = 0; i < cols; ++i) {
      const std::string& c = cell(r, i);
      const size_t pad = width[i] - c.size();
      if (i > 0) line += "  ";
      if (numeric[i]) {
        line.append(pad, ' ');
        line += c;
      } else {
        line += c;
        if (i + 1 < cols) line.append(pad, ' ');
      }
    }
    while (!line.empty() && line.back() == ' ') line.pop_back();
    out += line;
    out += '\n';
  };
  emit(header_, true);
  for (const auto& r : rows_) emit(r, false);
  return out;
}

namespace {

int64_t UnixMs(absl::Time t) { return t == absl::InfinitePast() ? 0 : absl::ToUnixMillis(t); }

}  // namespace

std::string GranularityText(SelectionGranularity granularity) {
  switch (granularity) {
    case SelectionGranularity::kPage:
      return "page";
    case SelectionGranularity::kToken:
      return "token";
    case SelectionGranularity::kDefault:
      break;
  }
  return "by-destination";
}

Json SessionJson(const SessionInfo& s) {
  Json j = Json::object();
  j["session_id"] = s.id;
  j["tenant"] = s.tenant;
  j["epoch"] = absl::StrCat(s.epoch);  // > 2^53: a string, as proto JSON does
  j["layers"] = s.spec.layers;
  j["kv_heads"] = s.spec.kv_heads;
  j["q_heads"] = s.spec.q_heads;
  j["head_dim"] = s.spec.head_dim;
  j["dtype"] = std::string(DTypeName(s.spec.dtype));
  j["page_tokens"] = s.spec.page_tokens;
  j["selector"] = std::string(SelectorTypeName(s.spec.selector));
  // MDCI's product-quantised scan factor (0: the tree's descent only).
  if (s.spec.selector == SelectorType::kMdci)
    j["mdci_pq_factor"] = s.spec.mdci_pq_factor.value_or(0);
  if (s.spec.selector == SelectorType::kMdci && s.spec.mdci_carry_keep_factor) {
    j["mdci_carry_keep_factor"] = *s.spec.mdci_carry_keep_factor;
  }
  if (s.spec.selector == SelectorType::kMdci && s.spec.mdci_insert_fit) {
    j["mdci_insert_fit"] = *s.spec.mdci_insert_fit;
  }
  j["layer_reuse"] = s.spec.layer_reuse;
  j["granularity"] = GranularityText(s.spec.defaults.granularity);
  j["ttl_ms"] = absl::ToInt64Milliseconds(s.spec.ttl);
  j["tokens"] = s.tokens;
  j["bytes"] = s.bytes;
  j["pages"] = s.pages;
  j["index_bytes"] = s.index_bytes;
  j["decode_keys"] = s.decode_keys;
  j["decode_keys_unrouted"] = s.decode_keys_unrouted;
  j["pinned"] = s.pinned;
  j["in_flight"] = s.in_flight;
  j["trees_built"] = s.trees_built;
  j["trees_total"] = s.trees_total;
  j["created_unix_ms"] = UnixMs(s.created);
  j["last_use_unix_ms"] = UnixMs(s.last_use);
  j["expires_unix_ms"] = UnixMs(s.expires);
  j["quality"] = QualityJson(s.quality);
  return j;
}

Json QualityJson(const SessionQuality& q) {
  Json j = Json::object();
  j["monitored"] = q.monitored;
  j["target_mass_ratio"] = q.target_mass_ratio;
  j["samples"] = q.samples;
  j["samples_dropped"] = q.samples_dropped;
  j["samples_stale"] = q.samples_stale;
  j["mean_mass_ratio"] = q.mean_mass_ratio;
  j["recent_mass_ratio"] = q.recent_mass_ratio;
  j["mean_topk_recall"] = q.mean_topk_recall;
  j["calibration_cpu_ms"] = q.calibration_cpu_ms;
  j["selection_ms"] = q.selection_ms;
  j["seeded_heads"] = q.seeded_heads;
  j["pooled_heads"] = q.pooled_heads;
  j["pool_width"] = q.pool_width;
  j["pool_samples"] = q.pool_samples;
  j["carried_selections"] = q.carried_selections;
  j["carry_stopped"] = q.carry_stopped;
  j["carry_pool_steps"] = q.carry_pool_steps;
  j["carry_shortened"] = q.carry_shortened;
  Json heads = Json::array();
  for (const HeadQuality& h : q.heads) {
    heads.push_back({{"layer_group", h.layer_group},
                     {"kv_head", h.kv_head},
                     {"calibrated", h.calibrated},
                     {"width", h.width},
                     {"field_of_view", h.field_of_view},
                     {"candidate_factor", h.candidate_factor},
                     {"width_changes", h.width_changes},
                     {"samples", h.samples},
                     {"mean_mass_ratio", h.mean_mass_ratio},
                     {"recent_mass_ratio", h.recent_mass_ratio},
                     {"last_mass_ratio", h.last_mass_ratio},
                     {"mean_topk_recall", h.mean_topk_recall},
                     {"mode", h.calibrated ? (h.exact ? "exact" : "tree") : "-"},
                     {"exact_selections", h.exact_selections},
                     {"fallbacks", h.fallbacks},
                     {"sample_interval", h.sample_interval},
                     {"descent_ranking", h.descent_ranking},
                     {"ranking_trial_samples", h.ranking_trial_samples},
                     {"ranking_trial_gain", h.ranking_trial_gain},
                     {"ranking_switches", h.ranking_switches},
                     {"seeded", h.seeded},
                     {"search_method", h.search_method},
                     {"method_trials", h.method_trials},
                     {"method_switches", h.method_switches},
                     {"pooled", h.pooled},
                     {"carry_steps", h.carry_steps},
                     {"carry_stops", h.carry_stops}});
  }
  j["heads"] = std::move(heads);
  return j;
}

Json TenantJson(const TenantInfo& t) {
  Json j = Json::object();
  j["tenant"] = t.tenant;
  j["bytes_used"] = t.bytes_used;
  j["quota_bytes"] = t.quota_bytes;
  j["sessions"] = t.sessions;
  j["buffers"] = t.buffers;
  return j;
}

Json StatsJson(const DaemonStats& s) {
  Json j = Json::object();
  j["epoch"] = absl::StrCat(s.epoch);
  j["start_unix_ms"] = UnixMs(s.start);
  j["capacity_bytes"] = s.capacity_bytes;
  j["bytes_reserved"] = s.bytes_reserved;
  j["bytes_used"] = s.bytes_used;
  j["frames_used"] = s.frames_used;
  j["frames_free"] = s.frames_free;
  j["sessions"] = s.sessions;
  j["buffers"] = s.buffers;
  j["in_flight"] = s.in_flight;
  j["draining"] = s.draining;
  j["huge_pages"] = s.huge_pages;
  j["evictions"] = s.evictions;
  j["expirations"] = s.expirations;
  j["sessions_created"] = s.sessions_created;
  j["sessions_dropped"] = s.sessions_dropped;
  j["admissions_rejected"] = s.admissions_rejected;
  j["pool_pinned_bytes"] = s.pool_pinned_bytes;
  j["gpu_pushes_in_place"] = s.gpu_pushes_in_place;
  j["gpu_pushes_staged"] = s.gpu_pushes_staged;
  Json classes = Json::array();
  for (const auto& c : s.size_classes) {
    classes.push_back({{"frame_bytes", c.frame_bytes},
                       {"frames_used", c.frames_used},
                       {"frames_free", c.frames_free},
                       {"bytes_reserved", c.bytes_reserved}});
  }
  j["size_classes"] = std::move(classes);
  Json tenants = Json::array();
  for (const auto& t : s.tenants) tenants.push_back(TenantJson(t));
  j["tenants"] = std::move(tenants);
  return j;
}

std::string HumanBytes(int64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (std::fabs(v) >= 1024 && u < 4) {
    v /= 1024;
    ++u;
  }
  if (u == 0) return absl::StrCat(bytes, " B");
  return absl::StrFormat("%.1f %s", v, units[u]);
}

}  // namespace icecache
