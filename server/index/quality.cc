#include "server/index/quality.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "server/index/kernels.h"
#include "server/index/page_select.h"

namespace icecache {
namespace {

// Marks the selected positions in a bitmap of size n (deduplicating them).
absl::StatusOr<std::vector<char>> Mark(const ExactAttention& exact,
                                       absl::Span<const int32_t> selected) {
  std::vector<char> in(static_cast<size_t>(exact.n), 0);
  for (size_t i = 0; i < selected.size(); ++i) {
    const int32_t p = selected[i];
    if (p < 0 || p >= exact.n) {
      return absl::InvalidArgumentError(
          absl::StrCat("selected position ", p, " (entry ", i, ") is outside [0, ", exact.n, ")"));
    }
    in[p] = 1;
  }
  return in;
}

absl::Status CheckExact(const ExactAttention& exact) {
  if (exact.n < 1 || exact.num_queries < 1 ||
      exact.probs.size() != static_cast<size_t>(exact.n) * exact.num_queries) {
    return absl::InvalidArgumentError(
        "ExactAttention is empty or inconsistent: make it with ComputeExactAttention()");
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ExactAttention> ComputeExactAttention(const float* keys, const float* values,
                                                     int64_t n, int head_dim, const float* queries,
                                                     int num_queries) {
  if (keys == nullptr || queries == nullptr) {
    return absl::InvalidArgumentError("keys and queries must not be null");
  }
  if (n < 1 || head_dim < 1 || num_queries < 1) {
    return absl::InvalidArgumentError(absl::StrCat("n (", n, "), head_dim (", head_dim,
                                                   ") and num_queries (", num_queries,
                                                   ") must all be >= 1"));
  }
  RETURN_IF_ERROR(CheckFinite(keys, n, head_dim, "key"));
  RETURN_IF_ERROR(CheckFinite(queries, num_queries, head_dim, "query"));
  if (values != nullptr) RETURN_IF_ERROR(CheckFinite(values, n, head_dim, "value"));

  ExactAttention ex;
  ex.n = n;
  ex.head_dim = head_dim;
  ex.num_queries = num_queries;
  ex.logits.resize(static_cast<size_t>(n) * num_queries);
  DotRowsMulti(DType::kF32, keys, n, head_dim, queries, num_queries, ex.logits.data());
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  for (float& l : ex.logits) l *= scale;

  ex.probs.resize(ex.logits.size());
  for (int j = 0; j < num_queries; ++j) {
    const float* l = ex.logits.data() + static_cast<size_t>(j) * n;
    double* p = ex.probs.data() + static_cast<size_t>(j) * n;
    const double m = *std::max_element(l, l + n);
    double sum = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      p[i] = std::exp(static_cast<double>(l[i]) - m);
      sum += p[i];
    }
    for (int64_t i = 0; i < n; ++i) p[i] /= sum;
  }
  if (values != nullptr) {
    ex.output.assign(static_cast<size_t>(num_queries) * head_dim, 0.0);
    for (int j = 0; j < num_queries; ++j) {
      const double* p = ex.probs.data() + static_cast<size_t>(j) * n;
      double* o = ex.output.data() + static_cast<size_t>(j) * head_dim;
      for (int64_t i = 0; i < n; ++i) {
        const float* v = values + i * head_dim;
        for (int d = 0; d < head_dim; ++d) o[d] += p[i] * v[d];
      }
    }
  }
  return ex;
}

absl::StatusOr<double> TopKRecall(const ExactAttention& exact, absl::Span<const int32_t> selected,
                                  int64_t k) {
  RETURN_IF_ERROR(CheckExact(exact));
  if (k < 1) return absl::InvalidArgumentError(absl::StrCat("k must be >= 1, got ", k));
  ASSIGN_OR_RETURN(const std::vector<char> in, Mark(exact, selected));
  k = std::min(k, exact.n);
  std::vector<int32_t> order(static_cast<size_t>(exact.n));
  double total = 0.0;
  for (int j = 0; j < exact.num_queries; ++j) {
    const float* l = exact.logits.data() + static_cast<size_t>(j) * exact.n;
    std::iota(order.begin(), order.end(), 0);
    std::nth_element(order.begin(), order.begin() + (k - 1), order.end(),
                     [l](int32_t a, int32_t b) { return l[a] > l[b] || (l[a] == l[b] && a < b); });
    int64_t hits = 0;
    for (int64_t i = 0; i < k; ++i) hits += in[order[i]];
    total += static_cast<double>(hits) / static_cast<double>(k);
  }
  return total / exact.num_queries;
}

absl::StatusOr<double> MassRecall(const ExactAttention& exact, absl::Span<const int32_t> selected) {
  RETURN_IF_ERROR(CheckExact(exact));
  ASSIGN_OR_RETURN(const std::vector<char> in, Mark(exact, selected));
  double total = 0.0;
  for (int j = 0; j < exact.num_queries; ++j) {
    const double* p = exact.probs.data() + static_cast<size_t>(j) * exact.n;
    double mass = 0.0;
    for (int64_t i = 0; i < exact.n; ++i) {
      if (in[i]) mass += p[i];
    }
    total += mass;
  }
  return total / exact.num_queries;
}

absl::StatusOr<double> OutputRelError(const ExactAttention& exact, const float* values,
                                      absl::Span<const int32_t> selected) {
  RETURN_IF_ERROR(CheckExact(exact));
  if (exact.output.empty()) {
    return absl::FailedPreconditionError(
        "ExactAttention was computed without values; pass values to ComputeExactAttention()");
  }
  if (values == nullptr) return absl::InvalidArgumentError("values must not be null");
  ASSIGN_OR_RETURN(const std::vector<char> in, Mark(exact, selected));
  const int d = exact.head_dim;
  std::vector<double> os(static_cast<size_t>(d));
  double total = 0.0;
  for (int j = 0; j < exact.num_queries; ++j) {
    const double* p = exact.probs.data() + static_cast<size_t>(j) * exact.n;
    const double* o = exact.output.data() + static_cast<size_t>(j) * d;
    std::fill(os.begin(), os.end(), 0.0);
    double mass = 0.0;
    for (int64_t i = 0; i < exact.n; ++i) {
      if (!in[i]) continue;
      mass += p[i];
      const float* v = values + i * d;
      for (int c = 0; c < d; ++c) os[c] += p[i] * v[c];
    }
    double diff2 = 0.0, norm2 = 0.0;
    for (int c = 0; c < d; ++c) {
      const double s = mass > 0.0 ? os[c] / mass : 0.0;
      diff2 += (s - o[c]) * (s - o[c]);
      norm2 += o[c] * o[c];
    }
    total += norm2 > 0.0 ? std::sqrt(diff2 / norm2) : std::sqrt(diff2);
  }
  return total / exact.num_queries;
}

absl::StatusOr<std::vector<int32_t>> OracleTokens(const ExactAttention& exact, int64_t budget,
                                                  int sink_tokens) {
  RETURN_IF_ERROR(CheckExact(exact));
  if (budget < 1 || budget > exact.n) {
    return absl::InvalidArgumentError(
        absl::StrCat("budget must be in [1, ", exact.n, "], got ", budget));
  }
  if (sink_tokens < 0) {
    return absl::InvalidArgumentError(absl::StrCat("sink_tokens must be >= 0, got ", sink_tokens));
  }
  const int64_t sinks = std::min<int64_t>({sink_tokens, budget, exact.n});
  std::vector<int32_t> out;
  out.reserve(budget);
  for (int64_t i = 0; i < sinks; ++i) out.push_back(static_cast<int32_t>(i));
  const int64_t rest = budget - sinks;
  if (rest > 0) {
    std::vector<double> score(static_cast<size_t>(exact.n), 0.0);
    for (int j = 0; j < exact.num_queries; ++j) {
      const double* p = exact.probs.data() + static_cast<size_t>(j) * exact.n;
      for (int64_t i = 0; i < exact.n; ++i) score[i] += p[i];
    }
    std::vector<int32_t> order;
    order.reserve(exact.n - sinks);
    for (int64_t i = sinks; i < exact.n; ++i) order.push_back(static_cast<int32_t>(i));
    std::nth_element(order.begin(), order.begin() + (rest - 1), order.end(),
                     [&score](int32_t a, int32_t b) {
                       return score[a] > score[b] || (score[a] == score[b] && a < b);
                     });
    out.insert(out.end(), order.begin(), order.begin() + rest);
  }
  std::sort(out.begin(), out.end());
  return out;
}

absl::StatusOr<Selection> OraclePages(const ExactAttention& exact, const Selector& selector,
                                      const SelectParams& params) {
  RETURN_IF_ERROR(CheckExact(exact));
  if (selector.num_tokens() != exact.n) {
    return absl::InvalidArgumentError(absl::StrCat("the selector holds ", selector.num_tokens(),
                                                   " tokens but the exact attention covers ",
                                                   exact.n));
  }
  if (params.budget_tokens <= 0 || params.budget_tokens > exact.n || params.sink_tokens < 0 ||
      params.recent_tokens < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "budget_tokens must be in [1, ", exact.n, "] and sink/recent >= 0; got budget ",
        params.budget_tokens, ", sink ", params.sink_tokens, ", recent ", params.recent_tokens));
  }
  const uint32_t pages = selector.num_pages();
  std::vector<uint32_t> page_of(static_cast<size_t>(exact.n));
  std::vector<std::pair<float, uint32_t>> scored;
  scored.reserve(pages);
  for (uint32_t p = 0; p < pages; ++p) {
    const int32_t* pos = selector.positions(p);
    double mass = 0.0;
    for (uint32_t s = 0; s < selector.fill(p); ++s) {
      page_of[pos[s]] = p;
      for (int j = 0; j < exact.num_queries; ++j) {
        mass += exact.probs[static_cast<size_t>(j) * exact.n + pos[s]];
      }
    }
    scored.emplace_back(static_cast<float>(mass / exact.num_queries), p);
  }
  const std::vector<uint32_t> forced =
      ForcedPages(exact.n, params, [&page_of](int64_t pos) { return page_of[pos]; });
  Selection out;
  TakePages(selector, forced, &scored, params, &out);
  return out;
}

absl::StatusOr<QualityReport> EvaluatePositions(const ExactAttention& exact, const float* values,
                                                absl::Span<const int32_t> selected, int64_t k) {
  QualityReport r;
  ASSIGN_OR_RETURN(r.topk_recall, TopKRecall(exact, selected, k));
  ASSIGN_OR_RETURN(r.mass_recall, MassRecall(exact, selected));
  if (values != nullptr) {
    ASSIGN_OR_RETURN(r.output_rel_error, OutputRelError(exact, values, selected));
  } else {
    r.output_rel_error = std::numeric_limits<double>::quiet_NaN();
  }
  ASSIGN_OR_RETURN(const std::vector<char> in, Mark(exact, selected));
  r.selected_tokens = std::count(in.begin(), in.end(), 1);
  return r;
}

absl::StatusOr<std::vector<int32_t>> SelectionPositions(const Selector& selector,
                                                        const Selection& selection) {
  if (selection.fills.size() != selection.pages.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "selection has ", selection.pages.size(), " pages but ", selection.fills.size(), " fills"));
  }
  if (!selection.positions.empty()) {
    if (static_cast<int64_t>(selection.positions.size()) != selection.tokens()) {
      return absl::InvalidArgumentError(
          absl::StrCat("selection carries ", selection.positions.size(),
                       " positions but its fills sum to ", selection.tokens()));
    }
    return selection.positions;
  }
  std::vector<int32_t> out;
  out.reserve(static_cast<size_t>(selection.tokens()));
  for (size_t i = 0; i < selection.pages.size(); ++i) {
    const uint32_t page = selection.pages[i];
    if (page >= selector.num_pages() || selector.fill(page) != selection.fills[i]) {
      return absl::InvalidArgumentError(
          absl::StrCat("selection page ", page, " (fill ", selection.fills[i],
                       ") does not match the selector (", selector.num_pages(), " pages)"));
    }
    const int32_t* pos = selector.positions(page);
    out.insert(out.end(), pos, pos + selection.fills[i]);
  }
  return out;
}

absl::StatusOr<QualityReport> EvaluateSelection(const ExactAttention& exact, const float* values,
                                                const Selector& selector,
                                                const Selection& selection, int64_t k) {
  ASSIGN_OR_RETURN(const std::vector<int32_t> positions, SelectionPositions(selector, selection));
  return EvaluatePositions(exact, values, positions, k);
}

}  // namespace icecache
