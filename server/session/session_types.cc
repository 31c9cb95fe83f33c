#include "server/session/session_types.h"

#include "absl/strings/str_cat.h"

namespace icecache {
namespace {

absl::Status FieldError(const char* field, const std::string& rule, int64_t got) {
  return absl::InvalidArgumentError(
      absl::StrCat("session config: ", field, " must be ", rule, ", got ", got));
}

absl::Status CheckRange(const char* field, int64_t v, int64_t lo, int64_t hi) {
  if (v < lo || v > hi) return FieldError(field, absl::StrCat("in ", lo, "..", hi), v);
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateSessionConfig(const SessionConfig& c, absl::Duration max_ttl) {
  if (absl::Status s = CheckRange("layers", c.layers, 1, 512); !s.ok()) return s;
  if (absl::Status s = CheckRange("kv_heads", c.kv_heads, 1, 256); !s.ok()) return s;
  if (absl::Status s = CheckRange("q_heads", c.q_heads, 1, 4096); !s.ok()) return s;
  if (c.q_heads % c.kv_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("session config: q_heads must be a multiple of kv_heads (", c.kv_heads,
                     "), got ", c.q_heads));
  }
  if (c.q_heads / c.kv_heads > 64) {
    return FieldError("q_heads", absl::StrCat("at most 64 x kv_heads (", c.kv_heads, ")"),
                      c.q_heads);
  }
  if (absl::Status s = CheckRange("head_dim", c.head_dim, 1, 1024); !s.ok()) return s;
  if (c.dtype != DType::kF16 && c.dtype != DType::kBF16 && c.dtype != DType::kF32) {
    return FieldError("dtype", "float16, bfloat16 or float32 (1, 2 or 3)",
                      static_cast<int64_t>(c.dtype));
  }
  if (absl::Status s = CheckRange("page_tokens", c.page_tokens, 1, 256); !s.ok()) return s;
  if (absl::Status s = CheckRange("layer_reuse", c.layer_reuse, 1, c.layers); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "session config: layer_reuse must be in 1..layers (", c.layers, "), got ", c.layer_reuse));
  }
  if (c.ttl != absl::ZeroDuration() && (c.ttl < absl::Seconds(1) || c.ttl > max_ttl)) {
    return absl::InvalidArgumentError(
        absl::StrCat("session config: ttl must be 0 (default) or in 1s..",
                     absl::FormatDuration(max_ttl), ", got ", absl::FormatDuration(c.ttl)));
  }
  if (c.checksums.mode == ChecksumMode::kSampled &&
      !(c.checksums.sample_fraction > 0.0 && c.checksums.sample_fraction <= 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("session config: checksums.sample_fraction must be in (0, 1] with mode "
                     "SAMPLED, got ",
                     c.checksums.sample_fraction));
  }
  switch (c.selector) {
    case SelectorKind::kMdci:
    case SelectorKind::kExactMdci:
    case SelectorKind::kExact:
    case SelectorKind::kQuest:
    case SelectorKind::kStreaming:
    case SelectorKind::kArkvale:
    case SelectorKind::kPqcache:
    case SelectorKind::kSnapkv:
    case SelectorKind::kOmnikv:
    case SelectorKind::kMagicpig:
    case SelectorKind::kMdciPublished:
      break;
    default:
      return FieldError("selector",
                        "one of mdci, exact-mdci, exact, quest, streaming, arkvale, pqcache, "
                        "snapkv, omnikv, magicpig, mdci-published",
                        static_cast<int64_t>(c.selector));
  }
  if (!(c.target_mass_ratio >= 0.0 && c.target_mass_ratio <= 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("session config: target_mass_ratio must be 0 (fixed width) or in (0, 1], got ",
                     c.target_mass_ratio));
  }
  if (c.default_select.budget_tokens < 0) {
    return FieldError("default_select.budget_tokens", ">= 0", c.default_select.budget_tokens);
  }
  if (c.default_select.sink_tokens < -1) {
    return FieldError("default_select.sink_tokens", ">= -1", c.default_select.sink_tokens);
  }
  if (c.default_select.recent_tokens < -1) {
    return FieldError("default_select.recent_tokens", ">= -1", c.default_select.recent_tokens);
  }
  return absl::OkStatus();
}

Granularity CallGranularity(const SessionConfig& config, std::optional<Granularity> call,
                            SelectDestination destination) {
  if (call.has_value()) return *call;
  if (config.granularity.has_value()) return *config.granularity;
  return destination == SelectDestination::kHost ? Granularity::kToken : Granularity::kPage;
}

uint64_t AppendBytes(const SessionConfig& c, int64_t n, LayerRange range) {
  if (n <= 0) return 0;
  const int layers = range.count > 0 ? range.count : c.layers - range.first;
  if (layers <= 0) return 0;
  return 2 * static_cast<uint64_t>(layers) * static_cast<uint64_t>(c.kv_heads) *
         static_cast<uint64_t>(n) * static_cast<uint64_t>(c.head_dim) * DTypeSize(c.dtype);
}

}  // namespace icecache
