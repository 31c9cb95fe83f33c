#include "server/session/calibration_memory.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "server/session/session.h"

namespace icecache {
namespace {

// The context's nearest power of two (round(log2(tokens)); 0 for fewer than
// 2): a prompt of 2^k tokens and one a few tokens short of it share a bucket.
int ContextBucket(int64_t tokens) {
  if (tokens < 2) return 0;
  return static_cast<int>(std::lround(std::log2(static_cast<double>(tokens))));
}

}  // namespace

std::string CalibrationKey(std::string_view tenant, const SessionConfig& c, int64_t tokens) {
  const MdciParams& m = c.mdci;
  const SelectParams& d = c.default_select;
  // Every knob that changes what a width buys; names so a key reads in a log.
  std::string key =
      absl::StrCat(std::string(tenant), "|shape ", c.layers, "x", c.kv_heads, "x", c.q_heads, "x",
                   c.head_dim, " ", std::string(DTypeName(c.dtype)), "|",
                   std::string(SelectorKindName(c.selector)), " page ", c.page_tokens);
  absl::StrAppend(&key, " reuse ", c.layer_reuse, " target ", c.target_mass_ratio, " budget ",
                  d.budget_tokens, " sink ", d.sink_tokens, " recent ", d.recent_tokens);
  absl::StrAppend(&key, " gran ",
                  c.granularity.has_value() ? static_cast<int>(*c.granularity) : -1);
  absl::StrAppend(&key, "|mdci ", m.num_composite, " ", m.num_simple, " ", m.field_of_view, " ",
                  m.candidate_factor, " ", m.norm_headroom, " ", m.rebuild_fraction, " ", m.seed);
  absl::StrAppend(&key, " ", m.promotion_ratio, " ", m.route_fov, "/", m.insert_route_fov, "/",
                  m.insert_fit, " ", m.build_candidates, " ", m.refine_iters, " ", m.cover_factor,
                  " ", m.entry_nodes, " ", m.spread_weight);
  absl::StrAppend(&key, " ", int{m.calibrated_rest}, int{m.normalized_descent}, int{m.query_quotas},
                  int{m.augmented_routing}, int{m.sketch_scoring}, " ", m.spread_rank, " ",
                  m.locality_window, " ", m.min_candidate_pages, " ", m.decode_slack, " pq ",
                  m.pq_factor);
  absl::StrAppend(&key, "|context 2^", ContextBucket(tokens));
  return key;
}

void CalibrationMemory::Remember(const Session& s, int64_t min_samples) {
  if (s.quality.empty()) return;
  // The context it started decoding at: what the next session's first
  // selection looks the entry up by.
  const int64_t tokens = s.first_select_tokens.load(std::memory_order_relaxed);
  if (tokens <= 0) return;  // never selected: nothing learnt
  Entry e;
  e.heads.reserve(s.quality.size());
  bool any = false;
  for (const auto& head : s.quality) {
    e.heads.push_back(head->SeedOf(min_samples));
    any = any || e.heads.back().has_value();
  }
  if (!any) return;
  std::string key = CalibrationKey(s.tenant, s.config, tokens);
  absl::MutexLock l(&mu_);
  e.used = ++use_clock_;
  entries_[std::move(key)] = std::move(e);
  while (entries_.size() > static_cast<size_t>(max_keys_)) {
    auto oldest = std::min_element(
        entries_.begin(), entries_.end(),
        [](const auto& a, const auto& b) { return a.second.used < b.second.used; });
    entries_.erase(oldest);
  }
}

int CalibrationMemory::Seed(Session& s, int64_t tokens) {
  if (s.quality.empty()) return 0;
  const std::string key = CalibrationKey(s.tenant, s.config, tokens);
  std::vector<std::optional<CalibratorSeed>> heads;
  {
    absl::MutexLock l(&mu_);
    auto it = entries_.find(key);
    if (it == entries_.end() || it->second.heads.size() != s.quality.size()) return 0;
    it->second.used = ++use_clock_;
    heads = it->second.heads;
  }
  int seeded = 0;
  for (size_t i = 0; i < heads.size(); ++i) {
    if (heads[i].has_value() && s.quality[i]->Seed(*heads[i], seeded_warmup_)) ++seeded;
  }
  return seeded;
}

size_t CalibrationMemory::size() const {
  absl::MutexLock l(&mu_);
  return entries_.size();
}

}  // namespace icecache
