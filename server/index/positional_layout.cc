#include "server/index/positional_layout.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "server/index/byte_image.h"
#include "server/index/headroom.h"
#include "server/index/kernels.h"
#include "server/index/page_select.h"

namespace icecache {

PositionalLayoutSelector::PositionalLayoutSelector(const SelectorConfig& config,
                                                   const PageKeys* keys)
    : Selector(config),
      keys_(keys),
      page_tokens_(config.page_tokens),
      dim_(config.head_dim),
      scale_(1.0f / std::sqrt(static_cast<float>(config.head_dim))) {}

absl::Status PositionalLayoutSelector::Build(const float* keys, int64_t n,
                                             std::vector<Placement>* placements) {
  if (num_tokens_ != 0) {
    return absl::FailedPreconditionError(absl::StrCat("Build() on an index that already holds ",
                                                      num_tokens_,
                                                      " tokens; use Insert() for more keys"));
  }
  return Append(keys, n, placements, /*bulk=*/true);
}

absl::Status PositionalLayoutSelector::Insert(const float* keys, int64_t n,
                                              std::vector<Placement>* placements) {
  return Append(keys, n, placements, /*bulk=*/false);
}

absl::Status PositionalLayoutSelector::Append(const float* keys, int64_t n,
                                              std::vector<Placement>* placements, bool bulk) {
  RETURN_IF_ERROR(ValidateKeysToAdd(keys, n, dim_, num_tokens_, placements, !keys_prechecked()));
  RETURN_IF_ERROR(OnAppend(keys, n, bulk));
  placements->resize(n);
  if (bulk) {
    positions_.reserve(TokensWithHeadroom(n));  // room for the decode tokens (headroom.h)
  } else {
    ReserveGeometric(&positions_, num_tokens_ + n);
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t pos = num_tokens_ + i;
    (*placements)[i] = Placement{static_cast<uint32_t>(pos / page_tokens_),
                                 static_cast<uint32_t>(pos % page_tokens_)};
    positions_.push_back(static_cast<int32_t>(pos));
  }
  num_tokens_ += n;
  return absl::OkStatus();
}

void PositionalLayoutSelector::SaveImageBody(ByteWriter* w) const {
  w->Put<int64_t>(num_tokens_);
  SaveState(w);
}

absl::Status PositionalLayoutSelector::LoadState(ByteReader* /*r*/, int64_t /*n*/) {
  return absl::UnimplementedError(
      absl::StrCat("selector ", std::string(SelectorKindName(kind())), " keeps no index image"));
}

absl::Status PositionalLayoutSelector::LoadImageBody(ByteReader* r, int64_t tokens) {
  if (num_tokens_ != 0) return absl::FailedPreconditionError("an image loads into an empty index");
  int64_t n = 0;
  if (!r->Get(&n) || n != tokens || n < 1 || n > std::numeric_limits<int32_t>::max()) {
    return absl::DataLossError("index image: bad token count");
  }
  RETURN_IF_ERROR(LoadState(r, n));
  if (!r->ok() || r->remaining() != 0) {
    return absl::DataLossError("index image: truncated, or bytes past its end");
  }
  positions_.reserve(TokensWithHeadroom(n));
  for (int64_t p = 0; p < n; ++p) positions_.push_back(static_cast<int32_t>(p));
  num_tokens_ = n;
  return absl::OkStatus();
}

uint32_t PositionalLayoutSelector::fill(uint32_t page) const {
  const int64_t begin = static_cast<int64_t>(page) * page_tokens_;
  if (begin >= num_tokens_) return 0;
  return static_cast<uint32_t>(std::min<int64_t>(page_tokens_, num_tokens_ - begin));
}

const int32_t* PositionalLayoutSelector::positions(uint32_t page) const {
  const int64_t begin = static_cast<int64_t>(page) * page_tokens_;
  if (begin >= num_tokens_) return nullptr;
  return positions_.data() + begin;
}

std::vector<uint32_t> PositionalLayoutSelector::Forced(const SelectParams& params) const {
  const int64_t t = page_tokens_;
  return ForcedPages(num_tokens_, params,
                     [t](int64_t pos) { return static_cast<uint32_t>(pos / t); });
}

absl::StatusOr<const void*> PositionalLayoutSelector::KeyRow(int64_t position) const {
  const uint32_t page = static_cast<uint32_t>(position / page_tokens_);
  const void* rows = keys_->page_keys(page);
  if (rows == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("PageKeys has no keys for page ", page, " of ", num_pages(),
                     "; were the placements of every Build()/Insert() applied to the frames?"));
  }
  const size_t row_bytes = static_cast<size_t>(dim_) * DTypeSize(config_.dtype);
  return static_cast<const char*>(rows) + (position % page_tokens_) * row_bytes;
}

absl::Status PositionalLayoutSelector::TokenLogits(const int32_t* positions, int64_t count,
                                                   const float* queries, int nq,
                                                   float* logits) const {
  float one[64];
  for (int64_t i = 0; i < count; ++i) {
    ASSIGN_OR_RETURN(const void* row, KeyRow(positions[i]));
    float* dst = nq <= 64 ? one : nullptr;
    if (dst == nullptr) {
      for (int j = 0; j < nq; ++j) {
        DotRows(config_.dtype, row, 1, dim_, queries + static_cast<int64_t>(j) * dim_,
                &logits[j * count + i]);
      }
      continue;
    }
    DotRowsMulti(config_.dtype, row, 1, dim_, queries, nq, dst);
    for (int j = 0; j < nq; ++j) logits[j * count + i] = dst[j];
  }
  return absl::OkStatus();
}

absl::Status PositionalLayoutSelector::AllLogits(const float* queries, int nq,
                                                 float* logits) const {
  const int64_t n = num_tokens_;
  thread_local std::vector<float> page_logits;
  page_logits.resize(static_cast<size_t>(nq) * page_tokens_);
  for (uint32_t p = 0; p < num_pages(); ++p) {
    const void* rows = keys_->page_keys(p);
    if (rows == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat("PageKeys has no keys for page ", p, " of ", num_pages(),
                       "; were the placements of every Build()/Insert() applied to the frames?"));
    }
    const int f = static_cast<int>(fill(p));
    DotRowsMulti(config_.dtype, rows, f, dim_, queries, nq, page_logits.data());
    const int64_t base = static_cast<int64_t>(p) * page_tokens_;
    for (int j = 0; j < nq; ++j) {
      std::copy(page_logits.begin() + static_cast<size_t>(j) * f,
                page_logits.begin() + static_cast<size_t>(j) * f + f, logits + j * n + base);
    }
  }
  return absl::OkStatus();
}

void PositionalLayoutSelector::TakeTokenPages(const std::vector<ScoredToken>& tokens,
                                              const SelectParams& params, Selection* out) const {
  thread_local std::vector<std::pair<float, uint32_t>> scored;
  const uint32_t pages = num_pages();
  scored.assign(pages, {-std::numeric_limits<float>::infinity(), 0});
  for (uint32_t p = 0; p < pages; ++p) scored[p].second = p;
  for (const ScoredToken& t : tokens) {
    float& s = scored[static_cast<uint32_t>(t.second / page_tokens_)].first;
    if (!(t.first <= s)) s = t.first;  // a NaN never wins
  }
  TakePages(*this, Forced(params), &scored, params, out);
}

void PositionalLayoutSelector::TakeTopTokens(std::vector<ScoredToken>* tokens,
                                             const SelectParams& params,
                                             std::vector<int32_t>* positions) const {
  positions->clear();
  const int64_t n = num_tokens_;
  std::vector<uint8_t> taken(n, 0);
  auto take = [&](int64_t pos) {
    if (taken[pos]) return;
    taken[pos] = 1;
    positions->push_back(static_cast<int32_t>(pos));
  };
  for (int64_t p = 0; p < std::min<int64_t>(params.sink_tokens, n); ++p) take(p);
  for (int64_t p = std::max<int64_t>(0, n - params.recent_tokens); p < n; ++p) take(p);
  auto better = [](const ScoredToken& a, const ScoredToken& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  // Only the head is needed: the budget plus the forced positions it may repeat.
  const size_t head = std::min(tokens->size(), static_cast<size_t>(params.budget_tokens) +
                                                   static_cast<size_t>(positions->size()));
  std::partial_sort(tokens->begin(), tokens->begin() + head, tokens->end(), better);
  tokens->resize(head);
  for (const ScoredToken& t : *tokens) {
    if (static_cast<int64_t>(positions->size()) >= params.budget_tokens) break;
    take(t.second);
  }
}

void TokenGroupScores(const float* logits, int nq, int64_t n, float scale, float* out) {
  thread_local std::vector<float> row;
  thread_local std::vector<float> norms;
  row.resize(n);
  norms.resize(nq);
  for (int j = 0; j < nq; ++j) {
    const float* l = logits + j * n;
    for (int64_t i = 0; i < n; ++i) row[i] = l[i] * scale;
    norms[j] = LogSumExp(row.data(), n);
  }
  for (int64_t i = 0; i < n; ++i) {
    float m = -std::numeric_limits<float>::infinity();
    for (int j = 0; j < nq; ++j) m = std::max(m, logits[j * n + i] * scale - norms[j]);
    if (!std::isfinite(m)) {
      out[i] = m;
      continue;
    }
    float s = 0.0f;
    for (int j = 0; j < nq; ++j) s += std::exp(logits[j * n + i] * scale - norms[j] - m);
    out[i] = m + std::log(s);
  }
}

absl::Status TokenScoringSelector::Select(const float* queries, int num_queries,
                                          const SelectParams& params, Selection* out) const {
  RETURN_IF_ERROR(ValidateSelect(*this, queries, num_queries, params, out));
  thread_local std::vector<ScoredToken> tokens;
  tokens.clear();
  uint64_t touched = 0;
  RETURN_IF_ERROR(RankTokens(queries, num_queries, params, &tokens, &touched));
  TakeTokenPages(tokens, params, out);
  out->keys_touched = touched;
  return absl::OkStatus();
}

absl::Status TokenScoringSelector::SelectTokens(const float* queries, int num_queries,
                                                const SelectParams& params,
                                                std::vector<int32_t>* positions) const {
  Selection probe;
  RETURN_IF_ERROR(ValidateSelect(*this, queries, num_queries, params, &probe));
  std::vector<ScoredToken> tokens;
  uint64_t touched = 0;
  RETURN_IF_ERROR(RankTokens(queries, num_queries, params, &tokens, &touched));
  TakeTopTokens(&tokens, params, positions);
  return absl::OkStatus();
}

}  // namespace icecache
