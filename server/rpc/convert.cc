#include "server/rpc/convert.h"

#include <algorithm>
#include <climits>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "common/status_macros.h"

namespace icecache::rpc {
namespace {

constexpr uint32_t kMaxSelectParam = 1u << 30;

absl::Status BadField(absl::string_view field, absl::string_view why) {
  return absl::InvalidArgumentError(absl::StrCat("session config: ", field, " ", why));
}

absl::StatusOr<int> ToInt(uint32_t v, absl::string_view field) {
  if (v > static_cast<uint32_t>(INT_MAX)) return BadField(field, absl::StrCat("is too large: ", v));
  return static_cast<int>(v);
}

int64_t ToUnixMs(absl::Time t) {
  if (t == absl::InfinitePast() || t == absl::UnixEpoch()) return 0;
  return absl::ToUnixMillis(t);
}

}  // namespace

absl::StatusOr<DType> DTypeFromProto(v1::DType dtype, absl::string_view field) {
  switch (dtype) {
    case v1::DTYPE_FLOAT16:
      return DType::kF16;
    case v1::DTYPE_BFLOAT16:
      return DType::kBF16;
    case v1::DTYPE_FLOAT32:
      return DType::kF32;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat(field, " must be DTYPE_FLOAT16, DTYPE_BFLOAT16 or DTYPE_FLOAT32, got ",
                       static_cast<int>(dtype)));
  }
}

v1::DType DTypeToProto(DType dtype) {
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

absl::StatusOr<SelectorKind> SelectorKindFromProto(v1::SelectorKind kind) {
  switch (kind) {
    case v1::SELECTOR_KIND_UNSPECIFIED:
    case v1::SELECTOR_KIND_MDCI:
      return SelectorKind::kMdci;
    case v1::SELECTOR_KIND_EXACT_MDCI:
      return SelectorKind::kExactMdci;
    case v1::SELECTOR_KIND_EXACT:
      return SelectorKind::kExact;
    case v1::SELECTOR_KIND_QUEST:
      return SelectorKind::kQuest;
    case v1::SELECTOR_KIND_STREAMING:
      return SelectorKind::kStreaming;
    case v1::SELECTOR_KIND_ARKVALE:
      return SelectorKind::kArkvale;
    case v1::SELECTOR_KIND_PQCACHE:
      return SelectorKind::kPqcache;
    case v1::SELECTOR_KIND_SNAPKV:
      return SelectorKind::kSnapkv;
    case v1::SELECTOR_KIND_OMNIKV:
      return SelectorKind::kOmnikv;
    case v1::SELECTOR_KIND_MAGICPIG:
      return SelectorKind::kMagicpig;
    case v1::SELECTOR_KIND_MDCI_PUBLISHED:
      return SelectorKind::kMdciPublished;
    default:
      return BadField("selector.kind", absl::StrCat("is unknown: ", static_cast<int>(kind)));
  }
}

v1::SelectorKind SelectorKindToProto(SelectorKind kind) {
  switch (kind) {
    case SelectorKind::kMdci:
      return v1::SELECTOR_KIND_MDCI;
    case SelectorKind::kExactMdci:
      return v1::SELECTOR_KIND_EXACT_MDCI;
    case SelectorKind::kExact:
      return v1::SELECTOR_KIND_EXACT;
    case SelectorKind::kQuest:
      return v1::SELECTOR_KIND_QUEST;
    case SelectorKind::kStreaming:
      return v1::SELECTOR_KIND_STREAMING;
    case SelectorKind::kArkvale:
      return v1::SELECTOR_KIND_ARKVALE;
    case SelectorKind::kPqcache:
      return v1::SELECTOR_KIND_PQCACHE;
    case SelectorKind::kSnapkv:
      return v1::SELECTOR_KIND_SNAPKV;
    case SelectorKind::kOmnikv:
      return v1::SELECTOR_KIND_OMNIKV;
    case SelectorKind::kMagicpig:
      return v1::SELECTOR_KIND_MAGICPIG;
    case SelectorKind::kMdciPublished:
      return v1::SELECTOR_KIND_MDCI_PUBLISHED;
  }
  return v1::SELECTOR_KIND_UNSPECIFIED;
}

SelectDefaults SelectDefaultsFromConfig(const v1::IcecachedConfig& config) {
  SelectDefaults d;
  const auto& s = config.sessions();
  if (s.default_budget_tokens() > 0) d.budget_tokens = static_cast<int>(s.default_budget_tokens());
  if (s.has_default_sink_tokens()) d.sink_tokens = static_cast<int>(s.default_sink_tokens());
  if (s.has_default_recent_tokens()) d.recent_tokens = static_cast<int>(s.default_recent_tokens());
  if (config.quality().has_default_target_mass_ratio()) {
    d.target_mass_ratio = config.quality().default_target_mass_ratio();
  }
  return d;
}

namespace {

// SessionConfig.target_mass_ratio: unset = the daemon default for MDCI and
// 0 for the others; explicit values are the caller's to get right.
absl::Status TargetMassRatioFromProto(const v1::SessionConfig& p, const SelectDefaults& defaults,
                                      SessionConfig* c) {
  if (!p.has_target_mass_ratio()) {
    c->target_mass_ratio = c->selector == SelectorKind::kMdci ? defaults.target_mass_ratio : 0.0;
    return absl::OkStatus();
  }
  const double t = p.target_mass_ratio();
  if (!(t >= 0.0 && t <= 1.0)) {
    return BadField("target_mass_ratio",
                    absl::StrCat("must be 0 (fixed width) or in (0, 1], got ", t));
  }
  if (t > 0.0 && c->selector != SelectorKind::kMdci) {
    return BadField("target_mass_ratio",
                    absl::StrCat(t, " calibrates the search width of the MDCI selector; selector ",
                                 std::string(SelectorKindName(c->selector)),
                                 " has no width (leave it unset or 0)"));
  }
  c->target_mass_ratio = t;
  return absl::OkStatus();
}

// checksums.mode and sample_fraction into `c` (the core checks the range).
absl::StatusOr<SessionConfig> ChecksumsFromProto(const v1::PageChecksums& p, SessionConfig c) {
  switch (p.mode()) {
    case v1::CHECKSUM_MODE_UNSPECIFIED:
    case v1::CHECKSUM_MODE_OFF:
      c.checksums.mode = ChecksumMode::kOff;
      break;
    case v1::CHECKSUM_MODE_EVERY_PAGE:
      c.checksums.mode = ChecksumMode::kEveryPage;
      break;
    case v1::CHECKSUM_MODE_SAMPLED:
      c.checksums.mode = ChecksumMode::kSampled;
      if (p.sample_fraction() != 0) c.checksums.sample_fraction = p.sample_fraction();
      break;
    default:
      return BadField("checksums.mode",
                      absl::StrCat("must be OFF, EVERY_PAGE or SAMPLED (1..3), got ",
                                   static_cast<int>(p.mode())));
  }
  if (p.mode() != v1::CHECKSUM_MODE_SAMPLED && p.sample_fraction() != 0) {
    return BadField("checksums.sample_fraction",
                    absl::StrCat("is for mode SAMPLED only, got ", p.sample_fraction()));
  }
  return c;
}

}  // namespace

absl::StatusOr<SessionConfig> SessionConfigFromProto(const v1::SessionConfig& p,
                                                     const SelectDefaults& defaults) {
  if (!p.has_model())
    return BadField("model", "is required (layers, kv_heads, q_heads, head_dim, dtype)");
  SessionConfig c;
  const v1::ModelShape& m = p.model();
  {
    auto v = ToInt(m.layers(), "model.layers");
    if (!v.ok()) return v.status();
    c.layers = *v;
  }
  {
    auto v = ToInt(m.kv_heads(), "model.kv_heads");
    if (!v.ok()) return v.status();
    c.kv_heads = *v;
  }
  {
    auto v = ToInt(m.q_heads(), "model.q_heads");
    if (!v.ok()) return v.status();
    c.q_heads = *v;
  }
  {
    auto v = ToInt(m.head_dim(), "model.head_dim");
    if (!v.ok()) return v.status();
    c.head_dim = *v;
  }
  {
    auto v = DTypeFromProto(m.dtype(), "session config: model.dtype");
    if (!v.ok()) return v.status();
    c.dtype = *v;
  }
  if (p.page_tokens() != 0) {
    auto v = ToInt(p.page_tokens(), "page_tokens");
    if (!v.ok()) return v.status();
    c.page_tokens = *v;
  }
  c.layer_reuse = 1;
  if (p.layer_reuse() != 0) {
    auto v = ToInt(p.layer_reuse(), "layer_reuse");
    if (!v.ok()) return v.status();
    c.layer_reuse = *v;
  }
  if (p.ttl_ms() > uint64_t{100} * 365 * 86'400'000) {
    return BadField("ttl_ms", absl::StrCat("is too large: ", p.ttl_ms()));
  }
  c.ttl = absl::Milliseconds(static_cast<int64_t>(p.ttl_ms()));
  {
    auto v = SelectorKindFromProto(p.selector().kind());
    if (!v.ok()) return v.status();
    c.selector = *v;
  }
  const v1::MdciParams& mp = p.selector().mdci();
  MdciParams& md = c.mdci;
  // Zero = default; upper bounds keep the core's int fields meaningful.
  auto bounded = [](uint32_t v, uint32_t hi, absl::string_view field, int* out) -> absl::Status {
    if (v == 0) return absl::OkStatus();
    if (v > hi) return BadField(field, absl::StrCat("must be 1..", hi, ", got ", v));
    *out = static_cast<int>(v);
    return absl::OkStatus();
  };
  if (auto st = bounded(mp.num_composite(), 16, "selector.mdci.num_composite", &md.num_composite);
      !st.ok())
    return st;
  if (auto st = bounded(mp.num_simple(), 32, "selector.mdci.num_simple", &md.num_simple); !st.ok())
    return st;
  if (auto st = bounded(mp.field_of_view(), 4096, "selector.mdci.field_of_view", &md.field_of_view);
      !st.ok())
    return st;
  auto bounded_f = [](float v, float lo, float hi, absl::string_view field,
                      float* out) -> absl::Status {
    if (v == 0) return absl::OkStatus();
    if (!(v >= lo && v <= hi))
      return BadField(field, absl::StrCat("must be ", lo, "..", hi, ", got ", v));
    *out = v;
    return absl::OkStatus();
  };
  if (auto st = bounded_f(mp.candidate_factor(), 1, 64, "selector.mdci.candidate_factor",
                          &md.candidate_factor);
      !st.ok())
    return st;
  if (auto st =
          bounded_f(mp.norm_headroom(), 1, 16, "selector.mdci.norm_headroom", &md.norm_headroom);
      !st.ok())
    return st;
  if (auto st = bounded_f(mp.rebuild_fraction(), 0, 1, "selector.mdci.rebuild_fraction",
                          &md.rebuild_fraction);
      !st.ok())
    return st;
  if (mp.seed() != 0) md.seed = mp.seed();
  if (mp.has_pq_factor()) {
    // 0: off, as asked (bounded_f leaves the core's 0 for it).
    if (auto st = bounded_f(mp.pq_factor(), 1, 512, "selector.mdci.pq_factor", &md.pq_factor);
        !st.ok())
      return st;
  } else if (c.selector == SelectorKind::kMdci && c.kv_heads > 0) {
    md.pq_factor = MdciParams::DaemonPqFactor(c.head_dim, c.q_heads / c.kv_heads);
  }
  if (mp.has_query_basis()) md.query_basis = mp.query_basis();
  if (mp.has_carry_keep_factor()) {
    // 0: every candidate is carried, as asked.
    md.carry_keep_factor = 0.0f;
    if (auto st = bounded_f(mp.carry_keep_factor(), 1, 512, "selector.mdci.carry_keep_factor",
                            &md.carry_keep_factor);
        !st.ok())
      return st;
  }
  if (mp.has_insert_fit()) {
    // 0: every decode key routed, as asked.
    md.insert_fit = 0.0f;
    if (auto st = bounded_f(mp.insert_fit(), 0, 64, "selector.mdci.insert_fit", &md.insert_fit);
        !st.ok())
      return st;
  }
  if (md.pq_factor > 0 && c.head_dim % 8 != 0) {
    return BadField("selector.mdci.pq_factor",
                    absl::StrCat("needs head_dim a multiple of 8 (the 4-bit codes take 4 "
                                 "dimensions each, two per byte), got head_dim ",
                                 c.head_dim));
  }

  const v1::SelectParams& d = p.defaults();
  c.default_select.budget_tokens = defaults.budget_tokens;
  c.default_select.sink_tokens = defaults.sink_tokens;
  c.default_select.recent_tokens = defaults.recent_tokens;
  // Clamped like the per-call values (types.proto SelectParams).
  const auto clamp = [](uint32_t v) { return static_cast<int>(std::min(v, kMaxSelectParam)); };
  if (d.has_budget_tokens()) {
    if (d.budget_tokens() == 0) {
      return BadField("defaults.budget_tokens", "must be at least 1 when set, got 0");
    }
    c.default_select.budget_tokens = clamp(d.budget_tokens());
  }
  if (d.has_sink_tokens()) c.default_select.sink_tokens = clamp(d.sink_tokens());
  if (d.has_recent_tokens()) c.default_select.recent_tokens = clamp(d.recent_tokens());
  c.default_select.want_positions = d.want_positions();
  const absl::StatusOr<std::optional<Granularity>> granularity =
      GranularityFromProto(d.granularity(), "defaults.granularity");
  if (!granularity.ok()) return granularity.status();
  c.granularity = *granularity;  // unset: by destination (CallGranularity)
  c.pinned = p.pinned();
  if (absl::Status st = TargetMassRatioFromProto(p, defaults, &c); !st.ok()) return st;
  return ChecksumsFromProto(p.checksums(), std::move(c));
}

v1::SessionConfig SessionConfigToProto(const SessionConfig& c) {
  v1::SessionConfig p;
  v1::ModelShape* m = p.mutable_model();
  m->set_layers(c.layers);
  m->set_kv_heads(c.kv_heads);
  m->set_q_heads(c.q_heads);
  m->set_head_dim(c.head_dim);
  m->set_dtype(DTypeToProto(c.dtype));
  p.set_page_tokens(c.page_tokens);
  p.set_layer_reuse(c.layer_reuse);
  p.mutable_selector()->set_kind(SelectorKindToProto(c.selector));
  v1::MdciParams* mp = p.mutable_selector()->mutable_mdci();
  mp->set_num_composite(c.mdci.num_composite);
  mp->set_num_simple(c.mdci.num_simple);
  mp->set_field_of_view(c.mdci.field_of_view);
  mp->set_candidate_factor(c.mdci.candidate_factor);
  mp->set_norm_headroom(c.mdci.norm_headroom);
  mp->set_rebuild_fraction(c.mdci.rebuild_fraction);
  mp->set_seed(c.mdci.seed);
  mp->set_pq_factor(c.mdci.pq_factor);
  mp->set_carry_keep_factor(c.mdci.carry_keep_factor);
  mp->set_query_basis(c.mdci.query_basis);
  mp->set_insert_fit(c.mdci.insert_fit);
  v1::SelectParams* d = p.mutable_defaults();
  d->set_budget_tokens(std::max(0, c.default_select.budget_tokens));
  d->set_sink_tokens(std::max(0, c.default_select.sink_tokens));
  d->set_recent_tokens(std::max(0, c.default_select.recent_tokens));
  d->set_want_positions(c.default_select.want_positions);
  d->set_granularity(c.granularity.has_value() ? GranularityToProto(*c.granularity)
                                               : v1::GRANULARITY_UNSPECIFIED);
  p.set_ttl_ms(static_cast<uint64_t>(absl::ToInt64Milliseconds(c.ttl)));
  p.set_pinned(c.pinned);
  p.set_target_mass_ratio(c.selector == SelectorKind::kMdci ? c.target_mass_ratio : 0.0);
  switch (c.checksums.mode) {
    case ChecksumMode::kOff:
      p.mutable_checksums()->set_mode(v1::CHECKSUM_MODE_OFF);
      break;
    case ChecksumMode::kEveryPage:
      p.mutable_checksums()->set_mode(v1::CHECKSUM_MODE_EVERY_PAGE);
      break;
    case ChecksumMode::kSampled:
      p.mutable_checksums()->set_mode(v1::CHECKSUM_MODE_SAMPLED);
      p.mutable_checksums()->set_sample_fraction(static_cast<float>(c.checksums.sample_fraction));
      break;
  }
  return p;
}

namespace {

void SessionQualityToProto(const SessionQualityInfo& q, v1::SessionQuality* out) {
  out->set_monitored(q.monitored);
  out->set_target_mass_ratio(q.target_mass_ratio);
  out->set_samples(static_cast<uint64_t>(std::max<int64_t>(0, q.samples)));
  out->set_samples_dropped(static_cast<uint64_t>(std::max<int64_t>(0, q.samples_dropped)));
  out->set_samples_stale(static_cast<uint64_t>(std::max<int64_t>(0, q.samples_stale)));
  out->set_mean_mass_ratio(q.mean_mass_ratio);
  out->set_recent_mass_ratio(q.recent_mass_ratio);
  out->set_mean_topk_recall(q.mean_topk_recall);
  out->set_calibration_cpu_ms(static_cast<double>(q.calibration_cpu_ns) / 1e6);
  out->set_selection_ms(static_cast<double>(q.selection_ns) / 1e6);
  out->set_seeded_heads(static_cast<uint32_t>(std::max(0, q.seeded_heads)));
  out->set_pooled_heads(static_cast<uint32_t>(std::max(0, q.pooled_heads)));
  out->set_pool_width(q.pool_width);
  out->set_pool_samples(static_cast<uint64_t>(std::max<int64_t>(0, q.pool_samples)));
  out->set_carried_selections(static_cast<uint64_t>(std::max<int64_t>(0, q.carried_selections)));
  out->set_carry_stopped(q.carry_stopped);
  out->set_carry_pool_steps(static_cast<uint32_t>(std::max(0, q.carry_pool_steps)));
  out->set_carry_shortened(static_cast<uint64_t>(std::max<int64_t>(0, q.carry_shortened)));
  for (const HeadQualityInfo& h : q.heads) {
    v1::HeadQuality* o = out->add_heads();
    o->set_layer_group(static_cast<uint32_t>(h.group));
    o->set_kv_head(static_cast<uint32_t>(h.kv_head));
    o->set_calibrated(h.calibrated);
    o->set_width(h.width);
    o->set_field_of_view(static_cast<uint32_t>(std::max(0, h.field_of_view)));
    o->set_candidate_factor(h.candidate_factor);
    o->set_width_changes(static_cast<uint64_t>(std::max<int64_t>(0, h.width_changes)));
    o->set_samples(static_cast<uint64_t>(std::max<int64_t>(0, h.samples)));
    o->set_mean_mass_ratio(h.mean_mass_ratio);
    o->set_recent_mass_ratio(h.recent_mass_ratio);
    o->set_last_mass_ratio(h.last_mass_ratio);
    o->set_mean_topk_recall(h.mean_topk_recall);
    o->set_exact(h.exact);
    o->set_exact_selections(static_cast<uint64_t>(std::max<int64_t>(0, h.exact_selections)));
    o->set_fallbacks(static_cast<uint64_t>(std::max<int64_t>(0, h.fallbacks)));
    o->set_sample_interval(static_cast<uint64_t>(std::max<int64_t>(0, h.sample_interval)));
    o->set_descent_ranking(h.ranking);
    o->set_ranking_trial_samples(
        static_cast<uint64_t>(std::max<int64_t>(0, h.ranking_trial_samples)));
    o->set_ranking_trial_gain(h.ranking_trial_gain);
    o->set_ranking_switches(static_cast<uint64_t>(std::max<int64_t>(0, h.ranking_switches)));
    o->set_search_method(h.method);
    o->set_method_trials(static_cast<uint64_t>(std::max<int64_t>(0, h.method_trials)));
    o->set_method_switches(static_cast<uint64_t>(std::max<int64_t>(0, h.method_switches)));
    o->set_seeded(h.seeded);
    o->set_pooled(h.pooled);
    o->set_carry_steps(static_cast<uint32_t>(std::max(0, h.carry_steps)));
    o->set_carry_stops(static_cast<uint64_t>(std::max<int64_t>(0, h.carry_stops)));
  }
}

}  // namespace

void SessionInfoToProto(const SessionInfo& info, v1::SessionInfo* out) {
  out->set_session_id(info.id);
  out->set_epoch(info.epoch);
  out->set_tenant(info.tenant);
  *out->mutable_config() = SessionConfigToProto(info.config);
  out->mutable_config()->set_pinned(info.pinned);
  out->set_tokens(static_cast<uint64_t>(std::max<int64_t>(0, info.tokens)));
  out->set_created_unix_ms(ToUnixMs(info.created));
  out->set_last_use_unix_ms(ToUnixMs(info.last_use));
  out->set_expires_unix_ms(ToUnixMs(info.expires));
  out->set_pinned(info.pinned);
  out->set_bytes(info.frame_bytes);
  out->set_pages(info.pages);
  out->set_index_bytes(info.index_bytes);
  out->set_decode_keys(info.decode_keys);
  out->set_decode_keys_unrouted(info.decode_keys_unrouted);
  out->set_in_flight(static_cast<uint32_t>(std::max(0, info.in_flight)));
  out->set_trees_built(static_cast<uint32_t>(std::max(0, info.trees_built)));
  out->set_trees_total(static_cast<uint32_t>(std::max(0, info.trees_total)));
  out->set_next_layer(static_cast<uint32_t>(std::max(0, info.next_layer)));
  SessionQualityToProto(info.quality, out->mutable_quality());
}

absl::StatusOr<LayerRange> LayerRangeFromProto(uint32_t first_layer, uint32_t num_layers) {
  if (first_layer > 4096 || num_layers > 4096) {
    return absl::InvalidArgumentError(absl::StrCat(
        "first_layer (", first_layer, ") and num_layers (", num_layers, ") must be at most 4096"));
  }
  return LayerRange{static_cast<int>(first_layer), static_cast<int>(num_layers)};
}

absl::StatusOr<std::optional<Granularity>> GranularityFromProto(v1::Granularity g,
                                                                absl::string_view field) {
  switch (g) {
    case v1::GRANULARITY_UNSPECIFIED:
      return std::optional<Granularity>();
    case v1::GRANULARITY_PAGE:
      return std::optional<Granularity>(Granularity::kPage);
    case v1::GRANULARITY_TOKEN:
      return std::optional<Granularity>(Granularity::kToken);
    default:
      return BadField(field, absl::StrCat("is unknown: ", static_cast<int>(g),
                                          " (GRANULARITY_PAGE or GRANULARITY_TOKEN)"));
  }
}

v1::Granularity GranularityToProto(Granularity g) {
  return g == Granularity::kToken ? v1::GRANULARITY_TOKEN : v1::GRANULARITY_PAGE;
}

absl::StatusOr<SelectParams> SelectParamsFromProto(const v1::SelectParams& p) {
  SelectParams s;
  s.budget_tokens = 0;
  s.sink_tokens = 0;
  s.recent_tokens = 0;
  // Values above the session's tokens are clamped there (types.proto);
  // clamping at 2^30 first keeps them in an int and changes no selection.
  const auto clamp = [](uint32_t v) { return static_cast<int>(std::min(v, kMaxSelectParam)); };
  if (p.has_budget_tokens()) {
    if (p.budget_tokens() == 0) {
      return absl::InvalidArgumentError(
          "params.budget_tokens must be at least 1 when set (leave it unset for the session's "
          "default)");
    }
    s.budget_tokens = clamp(p.budget_tokens());
  }
  if (p.has_sink_tokens()) s.sink_tokens = p.sink_tokens() == 0 ? -1 : clamp(p.sink_tokens());
  if (p.has_recent_tokens()) {
    s.recent_tokens = p.recent_tokens() == 0 ? -1 : clamp(p.recent_tokens());
  }
  s.want_positions = p.want_positions();
  return s;
}

absl::StatusOr<std::vector<float>> QueriesFromProto(const std::string& bytes, v1::DType dtype,
                                                    bool allow_empty) {
  DType dt = DType::kF32;
  if (dtype != v1::DTYPE_UNSPECIFIED) {
    auto v = DTypeFromProto(dtype, "query_dtype");
    if (!v.ok()) return v.status();
    dt = *v;
  }
  const size_t elem = DTypeSize(dt);
  if (bytes.empty()) {
    if (allow_empty) return std::vector<float>();
    return absl::InvalidArgumentError("queries is empty: want q_heads x head_dim elements");
  }
  if (bytes.size() % elem != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("queries has ", bytes.size(), " bytes, not a multiple of the ",
                     std::string(DTypeName(dt)), " element size ", elem));
  }
  std::vector<float> out(bytes.size() / elem);
  if (dt == DType::kF32) {
    std::memcpy(out.data(), bytes.data(), bytes.size());
  } else {
    ToFloat(dt, bytes.data(), out.data(), out.size());
  }
  return out;
}

absl::Status CheckDecodeBatchRequest(const v1::DecodeStepRequest& req) {
  if (req.batch_size() > kMaxDecodeBatch) {
    return absl::InvalidArgumentError(
        absl::StrCat("batch lists ", req.batch_size(), " entries; at most ", kMaxDecodeBatch));
  }
  if (!req.session_id().empty() || !req.queries().empty() || req.offset() != 0 ||
      req.reuse_group_selection() || req.prefetch_group() || req.in_place()) {
    return absl::InvalidArgumentError(
        "a request with batch entries sets session_id, queries, offset, "
        "reuse_group_selection, prefetch_group and in_place in each entry, not in the request "
        "itself");
  }
  if (req.block_ids_size() > 0 || !req.wait_event().empty() || !req.done_event().empty()) {
    return absl::InvalidArgumentError(
        "block_ids, wait_event and done_event are not supported with batch entries; send one "
        "DecodeStep request per session to scatter into a paged KV cache");
  }
  return absl::OkStatus();
}

namespace {

absl::Status EntryError(int index, absl::string_view session_id, const absl::Status& s) {
  return absl::Status(
      s.code(), absl::StrCat("batch entry ", index, " (session ", session_id, "): ", s.message()));
}

}  // namespace

absl::StatusOr<DecodeBatchEntry> DecodeBatchEntryFromProto(const v1::DecodeStepRequest& req,
                                                           int index,
                                                           const DecodeBatchEntry& shared,
                                                           absl::string_view stream_buffer_id) {
  const v1::DecodeBatchEntry& in = req.batch(index);
  DecodeBatchEntry e = shared;
  e.session_id = in.session_id();
  e.buffer_id = in.buffer_id().empty() ? std::string(stream_buffer_id) : in.buffer_id();
  e.offset = in.offset();
  e.select.reuse_group_selection = in.reuse_group_selection();
  e.prefetch_group = in.prefetch_group();
  e.in_place = in.in_place();
  if (e.session_id.empty() || e.session_id.size() > 256) {
    return EntryError(index, e.session_id,
                      absl::InvalidArgumentError("session_id must be 1..256 bytes"));
  }
  if (e.buffer_id.empty() || e.buffer_id.size() > 256) {
    return EntryError(index, e.session_id,
                      absl::InvalidArgumentError(
                          "buffer_id must be 1..256 bytes (in the entry, the request or an "
                          "earlier request of the stream)"));
  }
  auto queries = QueriesFromProto(in.queries(), req.query_dtype(), in.reuse_group_selection());
  if (!queries.ok()) return EntryError(index, e.session_id, queries.status());
  e.select.queries = *std::move(queries);
  return e;
}

void DecodeBatchResultToProto(int index, const DecodeBatchEntry& entry,
                              const absl::StatusOr<DecodeStepResult>& result,
                              v1::DecodeBatchResult* out, bool positions_as_bytes) {
  out->set_session_id(entry.session_id);
  if (!result.ok()) {
    const absl::Status s = EntryError(index, entry.session_id, result.status());
    out->set_code(static_cast<int32_t>(s.code()));
    out->set_message(std::string(s.message()));
    return;
  }
  for (size_t h = 0; h < result->selection.heads.size(); ++h) {
    SelectionToProto(result->selection.heads[h], static_cast<int>(h), out->add_heads(),
                     positions_as_bytes);
  }
  out->set_reused(result->selection.reused);
  out->set_prefetching(result->prefetching);
  out->set_prefetched(result->prefetched);
  FetchLayoutToProto(result->layout, entry.buffer_id, out->mutable_layout(), positions_as_bytes);
}

namespace {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "positions_le is the int32 array's bytes as they lie in memory");

// Token positions into a message's repeated field or, as little-endian
// int32s, its bytes field.
template <typename M>
void PositionsToProto(const std::vector<int32_t>& positions, bool as_bytes, M* out) {
  if (as_bytes) {
    out->set_positions_le(reinterpret_cast<const char*>(positions.data()),
                          positions.size() * sizeof(int32_t));
  } else {
    out->mutable_positions()->Add(positions.begin(), positions.end());
  }
}

}  // namespace

void SelectionToProto(const Selection& s, int kv_head, v1::HeadSelection* out,
                      bool positions_as_bytes) {
  out->set_kv_head(kv_head);
  out->mutable_pages()->Add(s.pages.begin(), s.pages.end());
  out->mutable_fills()->Add(s.fills.begin(), s.fills.end());
  out->mutable_scores()->Add(s.scores.begin(), s.scores.end());
  PositionsToProto(s.positions, positions_as_bytes, out);
  out->set_keys_touched(s.keys_touched);
}

void FetchLayoutToProto(const FetchLayout& l, absl::string_view buffer_id, v1::FetchLayout* out,
                        bool positions_as_bytes) {
  out->set_buffer_id(std::string(buffer_id));
  out->set_offset(l.buffer_offset);
  out->set_total_bytes(l.total_bytes);
  out->set_page_bytes(l.frame_bytes);
  out->set_first_layer(l.first_layer);
  out->set_num_layers(l.num_layers);
  out->set_layer_stride_bytes(l.layer_stride_bytes);
  out->set_page_tokens(l.page_tokens);
  out->set_head_dim(l.head_dim);
  out->set_dtype(DTypeToProto(l.dtype));
  out->set_rows_copied(l.rows_copied);
  out->set_rows_kept(l.rows_kept);
  for (const FetchHeadLayout& h : l.heads) {
    v1::HeadLayout* ph = out->add_heads();
    ph->set_kv_head(h.kv_head);
    for (const FetchSlot& s : h.slots) {
      ph->add_pages(s.page);
      ph->add_slots(s.slot);
      ph->add_fills(s.fill);
      ph->add_byte_offsets(s.byte_offset);
    }
    PositionsToProto(h.positions, positions_as_bytes, ph);
  }
}

absl::StatusOr<std::vector<std::vector<uint32_t>>> FetchPagesFromProto(
    const google::protobuf::RepeatedPtrField<v1::HeadPages>& heads) {
  std::vector<std::vector<uint32_t>> pages;
  pages.reserve(heads.size());
  for (int i = 0; i < heads.size(); ++i) {
    if (heads[i].kv_head() != static_cast<uint32_t>(i)) {
      return absl::InvalidArgumentError(
          absl::StrCat("heads[", i, "].kv_head = ", heads[i].kv_head(),
                       ": heads must list every KV head once, in order 0..kv_heads-1"));
    }
    pages.emplace_back(heads[i].pages().begin(), heads[i].pages().end());
  }
  return pages;
}

absl::StatusOr<std::vector<std::vector<int32_t>>> FetchTokensFromProto(
    const google::protobuf::RepeatedPtrField<v1::HeadPages>& heads) {
  std::vector<std::vector<int32_t>> tokens;
  int with_tokens = 0;
  for (const v1::HeadPages& h : heads) with_tokens += h.tokens_size() > 0 ? 1 : 0;
  if (with_tokens == 0) return tokens;
  for (int i = 0; i < heads.size(); ++i) {
    if (heads[i].tokens_size() == 0 || heads[i].pages_size() > 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "heads[", i, "] (kv_head ", heads[i].kv_head(), ") lists ", heads[i].pages_size(),
          " pages and ", heads[i].tokens_size(), " tokens: a fetch lists tokens for every head (",
          with_tokens, " of ", heads.size(), " do) and no pages, or pages only"));
    }
    tokens.emplace_back(heads[i].tokens().begin(), heads[i].tokens().end());
  }
  return tokens;
}

uint64_t QuotaFromProto(uint64_t q) { return q == 0 ? kUnlimitedQuota : q; }
uint64_t QuotaToProto(uint64_t q) { return q == kUnlimitedQuota ? 0 : q; }

void TenantInfoToProto(const TenantInfo& t, v1::TenantInfo* out) {
  out->set_tenant(t.tenant);
  out->set_bytes_used(t.used_bytes);
  out->set_quota_bytes(QuotaToProto(t.quota_bytes));
  out->set_sessions(static_cast<uint32_t>(std::max(0, t.sessions)));
  out->set_buffers(static_cast<uint32_t>(std::max(0, t.buffers)));
}

void StatsToProto(const ManagerStats& s, const std::vector<TenantInfo>& tenants,
                  int64_t start_unix_ms, v1::GetStatsResponse* out) {
  out->set_epoch(s.epoch);
  out->set_start_unix_ms(start_unix_ms);
  out->set_capacity_bytes(s.pool.capacity_bytes);
  out->set_bytes_reserved(s.pool.reserved_bytes);
  out->set_bytes_used(s.pool.used_bytes);
  out->set_sessions(static_cast<uint32_t>(std::max(0, s.sessions)));
  out->set_buffers(static_cast<uint32_t>(std::max(0, s.buffers)));
  out->set_evictions(s.sessions_evicted);
  out->set_expirations(s.sessions_expired);
  out->set_in_flight(static_cast<uint32_t>(std::max(0, s.in_flight)));
  out->set_draining(s.draining);
  out->set_sessions_created(s.sessions_created);
  out->set_sessions_dropped(s.sessions_dropped);
  out->set_admissions_rejected(s.admissions_rejected);
  out->set_frames_used(s.pool.frames_used);
  out->set_frames_free(s.pool.frames_free);
  out->set_huge_pages(s.pool.huge_pages);
  out->set_pages_verified(s.pages_verified);
  out->set_checksum_failures(s.checksum_failures);
  out->set_pool_pinned_bytes(s.pool_pinned_bytes);
  out->set_gpu_pushes_in_place(s.gpu_pushes_in_place);
  out->set_gpu_pushes_staged(s.gpu_pushes_staged);
  for (const SizeClassStats& c : s.pool.classes) {
    v1::SizeClassStats* pc = out->add_size_classes();
    pc->set_frame_bytes(c.frame_bytes);
    pc->set_frames_used(c.frames_used);
    pc->set_frames_free(c.frames_free);
    pc->set_bytes_reserved(c.slabs * 2 * 1024 * 1024);
  }
  for (const TenantInfo& t : tenants) TenantInfoToProto(t, out->add_tenants());
}

void BufferInfoToProto(const BufferInfo& info, v1::RegisterBufferResponse* out) {
  out->set_buffer_id(info.id);
  out->set_kind(info.kind == BufferKind::kCudaIpc ? v1::BUFFER_KIND_CUDA_IPC
                                                  : v1::BUFFER_KIND_HOST_SHM);
  out->set_size(info.size);
  out->set_paged_kv(info.paged_kv);
}

absl::StatusOr<PagedKvLayout> PagedKvFromProto(const v1::PagedKvCache& m) {
  PagedKvLayout l;
  switch (m.format()) {
    case v1::PAGED_KV_FORMAT_VLLM_FLASH:
      l.format = PagedKvFormat::kVllmFlash;
      break;
    case v1::PAGED_KV_FORMAT_FLASHINFER_NHD:
      l.format = PagedKvFormat::kFlashInferNhd;
      break;
    case v1::PAGED_KV_FORMAT_FLASHINFER_HND:
      l.format = PagedKvFormat::kFlashInferHnd;
      break;
    case v1::PAGED_KV_FORMAT_CUSTOM:
      l.format = PagedKvFormat::kCustom;
      break;
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          "cuda_ipc.paged_kv.format must be VLLM_FLASH, FLASHINFER_NHD, FLASHINFER_HND or "
          "CUSTOM, got ",
          static_cast<int>(m.format())));
  }
  ASSIGN_OR_RETURN(l.dtype, DTypeFromProto(m.dtype(), "cuda_ipc.paged_kv.dtype"));
  // uint32 fields above int range become negative here and are refused by
  // the range checks with the value the caller sent.
  l.first_layer = static_cast<int>(std::min<uint32_t>(m.first_layer(), 1u << 30));
  l.num_layers = static_cast<int>(std::min<uint32_t>(m.num_layers(), 1u << 30));
  l.num_blocks = m.num_blocks();
  l.block_tokens = static_cast<int>(std::min<uint32_t>(m.block_tokens(), 1u << 30));
  l.kv_heads = static_cast<int>(std::min<uint32_t>(m.kv_heads(), 1u << 30));
  l.head_dim = static_cast<int>(std::min<uint32_t>(m.head_dim(), 1u << 30));
  l.layer_offsets_bytes.assign(m.layer_offsets_bytes().begin(), m.layer_offsets_bytes().end());
  l.base_offset_bytes = m.base_offset_bytes();
  l.layer_stride = m.layer_stride();
  l.kv_stride = m.kv_stride();
  l.block_stride = m.block_stride();
  l.token_stride = m.token_stride();
  l.head_stride = m.head_stride();
  return l;
}

}  // namespace icecache::rpc
