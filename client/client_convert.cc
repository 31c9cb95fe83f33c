// The C++ client's conversions: gRPC status to absl::Status, selector names,
// and the client types to and from their v1 protos (client_internal.h).
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/client_internal.h"

namespace icecache {
namespace {

absl::string_view Sv(std::string_view s) { return absl::string_view(s.data(), s.size()); }

}  // namespace

absl::Time FromUnixMs(int64_t ms) {
  return ms == 0 ? absl::InfinitePast() : absl::FromUnixMillis(ms);
}

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
  out->mutable_selector()->mutable_mdci()->set_field_of_view(spec.mdci_field_of_view);
  out->mutable_selector()->mutable_mdci()->set_candidate_factor(spec.mdci_candidate_factor);
  if (spec.mdci_pq_factor)
    out->mutable_selector()->mutable_mdci()->set_pq_factor(*spec.mdci_pq_factor);
  if (spec.mdci_carry_keep_factor) {
    out->mutable_selector()->mutable_mdci()->set_carry_keep_factor(*spec.mdci_carry_keep_factor);
  }
  if (spec.mdci_insert_fit) {
    out->mutable_selector()->mutable_mdci()->set_insert_fit(*spec.mdci_insert_fit);
  }
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
  s.seeded_heads = q.seeded_heads();
  s.pooled_heads = q.pooled_heads();
  s.pool_width = q.pool_width();
  s.pool_samples = q.pool_samples();
  s.carried_selections = q.carried_selections();
  s.carry_stopped = q.carry_stopped();
  s.carry_pool_steps = q.carry_pool_steps();
  s.carry_shortened = q.carry_shortened();
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
    o.exact = h.exact();
    o.exact_selections = h.exact_selections();
    o.fallbacks = h.fallbacks();
    o.sample_interval = h.sample_interval();
    o.descent_ranking = h.descent_ranking();
    o.ranking_trial_samples = h.ranking_trial_samples();
    o.ranking_trial_gain = h.ranking_trial_gain();
    o.ranking_switches = h.ranking_switches();
    o.seeded = h.seeded();
    o.search_method = h.search_method();
    o.method_trials = h.method_trials();
    o.method_switches = h.method_switches();
    o.pooled = h.pooled();
    o.carry_steps = h.carry_steps();
    o.carry_stops = h.carry_stops();
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
  s.spec.mdci_field_of_view = c.selector().mdci().field_of_view();
  s.spec.mdci_candidate_factor = c.selector().mdci().candidate_factor();
  if (c.selector().mdci().has_pq_factor()) s.spec.mdci_pq_factor = c.selector().mdci().pq_factor();
  if (c.selector().mdci().has_carry_keep_factor()) {
    s.spec.mdci_carry_keep_factor = c.selector().mdci().carry_keep_factor();
  }
  if (c.selector().mdci().has_insert_fit()) {
    s.spec.mdci_insert_fit = c.selector().mdci().insert_fit();
  }
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
  s.decode_keys = info.decode_keys();
  s.decode_keys_unrouted = info.decode_keys_unrouted();
  s.in_flight = info.in_flight();
  s.trees_built = info.trees_built();
  s.trees_total = info.trees_total();
  s.next_layer = info.next_layer();
  s.quality = QualityFromProto(info.quality());
  return s;
}

namespace {

// The positions of a HeadSelection or HeadLayout: the repeated field, or
// positions_le (DecodeStepRequest.positions_as_bytes; a trailing partial
// int32 is dropped).
template <typename M>
void PositionsFromProto(const M& m, std::vector<int32_t>* out) {
  if (m.positions_le().empty()) {
    out->assign(m.positions().begin(), m.positions().end());
    return;
  }
  static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "positions_le is little-endian");
  out->resize(m.positions_le().size() / sizeof(int32_t));
  std::memcpy(out->data(), m.positions_le().data(), out->size() * sizeof(int32_t));
}

}  // namespace

HeadSelection FromProto(const v1::HeadSelection& head) {
  HeadSelection h;
  h.kv_head = head.kv_head();
  h.pages.assign(head.pages().begin(), head.pages().end());
  h.fills.assign(head.fills().begin(), head.fills().end());
  h.scores.assign(head.scores().begin(), head.scores().end());
  PositionsFromProto(head, &h.positions);
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
  l.rows_copied = layout.rows_copied();
  l.rows_kept = layout.rows_kept();
  for (const auto& h : layout.heads()) {
    HeadLayout hl;
    hl.kv_head = h.kv_head();
    hl.pages.assign(h.pages().begin(), h.pages().end());
    hl.slots.assign(h.slots().begin(), h.slots().end());
    hl.fills.assign(h.fills().begin(), h.fills().end());
    hl.byte_offsets.assign(h.byte_offsets().begin(), h.byte_offsets().end());
    PositionsFromProto(h, &hl.positions);
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

}  // namespace icecache
