#include "server/index/selector.h"

#include <cmath>
#include <cstring>
#include <string>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "server/index/baseline_selectors.h"
#include "server/index/byte_image.h"
#include "server/index/mdci_selector.h"
#include "server/index/positional_layout.h"
#include "server/index/positional_selector.h"

namespace icecache {

namespace {

constexpr char kImageMagic[8] = {'I', 'C', 'E', 'I', 'D', 'X', 'I', 'M'};

struct KindName {
  SelectorKind kind;
  const char* name;
};
constexpr KindName kKindNames[] = {
    {SelectorKind::kMdci, "mdci"},
    {SelectorKind::kExactMdci, "exact-mdci"},
    {SelectorKind::kExact, "exact"},
    {SelectorKind::kQuest, "quest"},
    {SelectorKind::kStreaming, "streaming"},
    {SelectorKind::kArkvale, "arkvale"},
    {SelectorKind::kPqcache, "pqcache"},
    {SelectorKind::kSnapkv, "snapkv"},
    {SelectorKind::kOmnikv, "omnikv"},
    {SelectorKind::kMagicpig, "magicpig"},
    {SelectorKind::kMdciPublished, "mdci-published"},
};

absl::Status ValidateMdciParams(const MdciParams& p) {
  if (p.num_composite < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("SelectorConfig.mdci.num_composite must be >= 1, got ", p.num_composite));
  }
  if (p.num_simple < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("SelectorConfig.mdci.num_simple must be >= 1, got ", p.num_simple));
  }
  if (p.field_of_view < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("SelectorConfig.mdci.field_of_view must be >= 1, got ", p.field_of_view));
  }
  if (!(p.candidate_factor > 0.0f) || !std::isfinite(p.candidate_factor)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "SelectorConfig.mdci.candidate_factor must be finite and > 0, got ", p.candidate_factor));
  }
  if (!(p.norm_headroom >= 1.0f) || !std::isfinite(p.norm_headroom)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "SelectorConfig.mdci.norm_headroom must be finite and >= 1, got ", p.norm_headroom));
  }
  if (!(p.rebuild_fraction >= 0.0f && p.rebuild_fraction <= 1.0f)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "SelectorConfig.mdci.rebuild_fraction must be in [0, 1], got ", p.rebuild_fraction));
  }
  return absl::OkStatus();
}

absl::Status ValidateConfig(const SelectorConfig& c) {
  if (c.head_dim < 1 || c.head_dim > 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("SelectorConfig.head_dim must be in [1, 1024], got ", c.head_dim));
  }
  if (c.page_tokens < 1 || c.page_tokens > 256) {
    return absl::InvalidArgumentError(
        absl::StrCat("SelectorConfig.page_tokens must be in [1, 256], got ", c.page_tokens));
  }
  if (c.num_query_heads < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("SelectorConfig.num_query_heads must be >= 1, got ", c.num_query_heads));
  }
  if (c.dtype != DType::kF16 && c.dtype != DType::kBF16 && c.dtype != DType::kF32) {
    return absl::InvalidArgumentError(absl::StrCat(
        "SelectorConfig.dtype is not a known dtype (value ", static_cast<int>(c.dtype), ")"));
  }
  if (!(c.quest_rescore_factor >= 0.0f) || !std::isfinite(c.quest_rescore_factor)) {
    return absl::InvalidArgumentError(
        absl::StrCat("SelectorConfig.quest_rescore_factor must be finite and >= 0, got ",
                     c.quest_rescore_factor));
  }
  if (c.kind == SelectorKind::kMdci || c.kind == SelectorKind::kExactMdci) {
    if (!(c.mdci.pq_factor >= 0.0f) || !std::isfinite(c.mdci.pq_factor)) {
      return absl::InvalidArgumentError(
          absl::StrCat("SelectorConfig.mdci.pq_factor must be finite and >= 0 (0: off), got ",
                       c.mdci.pq_factor));
    }
    if (!(c.mdci.carry_keep_factor >= 0.0f) || !std::isfinite(c.mdci.carry_keep_factor)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "SelectorConfig.mdci.carry_keep_factor must be finite and >= 0 (0: carry every "
          "candidate), got ",
          c.mdci.carry_keep_factor));
    }
    if (c.mdci.pq_factor > 0.0f && !MdciParams::PqFactorSupported(c.head_dim, c.num_query_heads)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "SelectorConfig.mdci.pq_factor > 0 (the product-quantised scan) needs head_dim a "
          "multiple of 8 and at most 64 query heads per KV head; got head_dim ",
          c.head_dim, ", ", c.num_query_heads, " query heads"));
    }
    return ValidateMdciParams(c.mdci);
  }
  return ValidateBaselineParams(c.baseline, std::string(SelectorKindName(c.kind)).c_str(),
                                c.head_dim);
}

}  // namespace

std::string_view SelectorKindName(SelectorKind kind) {
  for (const KindName& k : kKindNames) {
    if (k.kind == kind) return k.name;
  }
  return "unknown";
}

absl::StatusOr<SelectorKind> ParseSelectorKind(std::string_view name) {
  std::string n = absl::AsciiStrToLower(std::string(name));
  for (char& ch : n) {
    if (ch == '_') ch = '-';
  }
  for (const KindName& k : kKindNames) {
    if (n == k.name) return k.kind;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown selector kind '", std::string(name),
                   "'; expected one of mdci, exact-mdci, exact, quest, streaming, arkvale, "
                   "pqcache, snapkv, omnikv, magicpig, mdci-published"));
}

bool UsesPositionalLayout(SelectorKind kind) {
  return kind != SelectorKind::kMdci && kind != SelectorKind::kExactMdci;
}

int64_t Selection::tokens() const {
  int64_t t = 0;
  for (uint32_t f : fills) t += f;
  return t;
}

void Selection::Clear() {
  pages.clear();
  fills.clear();
  scores.clear();
  positions.clear();
  token_refs.clear();
  keys_touched = 0;
  carried = false;
  carry_age = 0;
  upkeep_cpu_ns = 0;
}

std::string_view DescentRankingName(DescentRanking r) {
  switch (r) {
    case DescentRanking::kLoudest:
      return "loudest";
    case DescentRanking::kNormalized:
      return "normalized";
    case DescentRanking::kSelector:
      break;
  }
  return "selector";
}

std::string_view SearchMethodName(SearchMethod m) {
  switch (m) {
    case SearchMethod::kTree:
      return "tree";
    case SearchMethod::kScan:
      return "scan";
    case SearchMethod::kSelector:
      break;
  }
  return "selector";
}

std::string_view GranularityName(Granularity granularity) {
  return granularity == Granularity::kToken ? "token" : "page";
}

absl::StatusOr<Granularity> ParseGranularity(std::string_view name) {
  const std::string lower = absl::AsciiStrToLower(std::string(name));
  if (lower == "page") return Granularity::kPage;
  if (lower == "token") return Granularity::kToken;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown selection granularity '", std::string(name), "' (page or token)"));
}

Placement Selector::placement_of(int32_t position) const {
  const uint32_t pages = num_pages();
  for (uint32_t page = 0; page < pages; ++page) {
    const int32_t* pos = positions(page);
    const uint32_t f = fill(page);
    for (uint32_t slot = 0; slot < f; ++slot) {
      if (pos[slot] == position) return Placement{page, slot};
    }
  }
  return Placement{};
}

void Selector::placements_of(int32_t first, int32_t count, Placement* out) const {
  for (int32_t i = 0; i < count; ++i) out[i] = placement_of(first + i);
}

void Selector::SaveImageBody(ByteWriter* /*w*/) const {}

absl::Status Selector::SaveImage(std::string* out) const {
  if (!has_image()) {
    return absl::UnimplementedError(
        absl::StrCat("selector ", std::string(SelectorKindName(kind())), " keeps no index image"));
  }
  if (num_tokens() == 0) return absl::FailedPreconditionError("an empty index has no image");
  ByteWriter w(out);
  w.PutBytes(kImageMagic, sizeof(kImageMagic));
  w.Put<uint32_t>(kImageFormat);
  w.Put<uint32_t>(static_cast<uint32_t>(kind()));
  SaveImageBody(&w);
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Selector>> Selector::LoadImage(const SelectorConfig& config,
                                                              const PageKeys* keys,
                                                              std::string_view image,
                                                              int64_t tokens) {
  if (keys == nullptr) return absl::InvalidArgumentError("PageKeys must not be null");
  RETURN_IF_ERROR(ValidateConfig(config));
  ByteReader r(image);
  char magic[sizeof(kImageMagic)];
  uint32_t format = 0, kind = 0;
  if (!r.GetBytes(magic, sizeof(magic)) || std::memcmp(magic, kImageMagic, sizeof(magic)) != 0 ||
      !r.Get(&format) || !r.Get(&kind)) {
    return absl::DataLossError("not an index image (bad magic or truncated header)");
  }
  if (format != kImageFormat || kind != static_cast<uint32_t>(config.kind)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "index image of format ", format, " and selector kind ", kind, "; expected format ",
        kImageFormat, " and kind ", static_cast<int>(config.kind), " (",
        std::string(SelectorKindName(config.kind)), ")"));
  }
  if (config.kind == SelectorKind::kMdci || config.kind == SelectorKind::kExactMdci) {
    ASSIGN_OR_RETURN(std::unique_ptr<MdciSelector> sel,
                     MdciSelector::LoadImage(config, keys, &r, tokens));
    return std::unique_ptr<Selector>(std::move(sel));
  }
  if (config.kind == SelectorKind::kPqcache || config.kind == SelectorKind::kMagicpig ||
      config.kind == SelectorKind::kSnapkv || config.kind == SelectorKind::kMdciPublished) {
    // Baselines on the positional layout (baseline_selectors.h).
    ASSIGN_OR_RETURN(std::unique_ptr<Selector> sel, Create(config, keys));
    RETURN_IF_ERROR(static_cast<PositionalLayoutSelector&>(*sel).LoadImageBody(&r, tokens));
    return sel;
  }
  return absl::UnimplementedError(absl::StrCat(
      "selector ", std::string(SelectorKindName(config.kind)), " keeps no index image"));
}

absl::StatusOr<std::unique_ptr<Selector>> Selector::Create(const SelectorConfig& config,
                                                           const PageKeys* keys) {
  if (keys == nullptr) {
    return absl::InvalidArgumentError(
        "PageKeys must not be null: the selector reads page keys through it");
  }
  RETURN_IF_ERROR(ValidateConfig(config));
  switch (config.kind) {
    case SelectorKind::kMdci:
    case SelectorKind::kExactMdci: {
      // MdciSelector::Create (what NewMdciSelector wraps) keeps the precise
      // status for the mdci-specific knobs.
      ASSIGN_OR_RETURN(std::unique_ptr<MdciSelector> sel, MdciSelector::Create(config, keys));
      return std::unique_ptr<Selector>(std::move(sel));
    }
    case SelectorKind::kExact:
    case SelectorKind::kQuest:
    case SelectorKind::kStreaming:
      return NewPositionalSelector(config, keys);
    case SelectorKind::kArkvale:
    case SelectorKind::kPqcache:
    case SelectorKind::kSnapkv:
    case SelectorKind::kOmnikv:
    case SelectorKind::kMagicpig:
    case SelectorKind::kMdciPublished:
      return NewBaselineSelector(config, keys);
  }
  return absl::InvalidArgumentError(absl::StrCat("SelectorConfig.kind is not a known kind (value ",
                                                 static_cast<int>(config.kind), ")"));
}

}  // namespace icecache
