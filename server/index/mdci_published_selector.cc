// The published M-DCI query (the ICE paper's selection as published,
// docs/architecture.md §3.9), for comparison with the re-engineered mdci:
// keys are MIPS-augmented (mips.h) and indexed by the multi-level
// prioritized DCI of IceFormer's MDCI (dci_multilevel.h: m composite indices
// of L random projections per cell, defaults m = 2, L = 7, 3 levels, field
// of view 10); each query of the group descends it for its top `budget`
// keys, expanding on every level the nodes that hold dci_candidate_factor x
// budget keys; the union of the queries' top keys is scored exactly, ranked
// by the GQA group score and mapped to their positional pages (each page by
// its best key, the budget in tokens).
//
// The index is immutable: keys appended after the last build are a tail
// scored exactly at every query, and it is rebuilt (inside Insert(), under
// the caller's exclusive access) when the tail passes max(1024, 1/8 of the
// indexed keys). The selector keeps an fp32 copy of every key for those
// rebuilds, as the published index holds its points. Cost (keys touched):
// exact distances + tail + union rescored, plus the projections visited
// (counted as 1 / head_dim of a key each).
//
// Index image (docs/architecture.md §5): the parameters, the MIPS bound and
// its counts, the indexed count and the DCI's structure (each point's level
// and parent, the projection directions: MultiLevelDci::Structure). The
// loader reads the keys back through PageKeys (the recovered frames hold
// them as the appends did), augments them with the saved bound and rebuilds
// the cells and sorted projections from the structure: the nearest-neighbour
// search of a build (most of its cost) is not repeated, and the index is the
// one saved.
#include <algorithm>
#include <memory>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "common/status_macros.h"
#include "server/index/baseline_selectors.h"
#include "server/index/byte_image.h"
#include "server/index/dci_multilevel.h"
#include "server/index/mips.h"
#include "server/index/page_select.h"
#include "server/index/positional_layout.h"

namespace icecache {
namespace {

constexpr int64_t kMinTail = 1024;

class MdciPublishedSelector final : public TokenScoringSelector {
 public:
  MdciPublishedSelector(const SelectorConfig& config, const PageKeys* keys)
      : TokenScoringSelector(config, keys) {}

  size_t index_bytes() const override {
    return layout_bytes() + keys_f32_.size() * sizeof(float) + (dci_ ? dci_->bytes() : 0);
  }

  bool has_image() const override { return true; }

 private:
  MultiLevelDciParams DciParams() const {
    MultiLevelDciParams dp;
    dp.num_composite = config_.baseline.dci_num_composite;
    dp.num_simple = config_.baseline.dci_num_simple;
    dp.num_levels = config_.baseline.dci_num_levels;
    dp.seed = config_.baseline.seed;
    return dp;
  }
  void SaveState(ByteWriter* w) const override;
  absl::Status LoadState(ByteReader* r, int64_t n) override;
  // The n keys the frames hold, as fp32 by position.
  absl::Status ReadKeys(int64_t n, std::vector<float>* out) const;

  absl::Status OnAppend(const float* keys, int64_t n, bool) override {
    const int64_t total = num_tokens() + n;
    const int64_t tail = total - indexed_;
    if (dci_ != nullptr && tail < std::max(kMinTail, indexed_ / 8)) {
      keys_f32_.insert(keys_f32_.end(), keys, keys + n * dim_);
      return absl::OkStatus();
    }
    // (Re)build over every key: the new ones joined to the copy.
    std::vector<float> all;
    all.reserve(static_cast<size_t>(total) * dim_);
    all.insert(all.end(), keys_f32_.begin(), keys_f32_.end());
    all.insert(all.end(), keys, keys + n * dim_);
    ASSIGN_OR_RETURN(MipsAugmentation aug,
                     MipsAugmentation::Create(all.data(), total, dim_, 1.0f, 1.0f));
    std::vector<float> points(static_cast<size_t>(total) * (dim_ + 1));
    for (int64_t i = 0; i < total; ++i) {
      aug.AugmentKey(all.data() + i * dim_, points.data() + i * (dim_ + 1));
    }
    ASSIGN_OR_RETURN(std::unique_ptr<MultiLevelDci> dci,
                     MultiLevelDci::Create(points.data(), total, dim_ + 1, DciParams()));
    // Nothing can fail from here on.
    aug_ = aug;
    dci_ = std::move(dci);
    indexed_ = total;
    keys_f32_ = std::move(all);
    return absl::OkStatus();
  }

  absl::Status RankTokens(const float* queries, int nq, const SelectParams& params,
                          std::vector<ScoredToken>* tokens, uint64_t* touched) const override;

  MipsAugmentation aug_ = *MipsAugmentation::FromMaxNorm(1.0f, 1, 1.0f, 1.0f);
  std::unique_ptr<MultiLevelDci> dci_;
  int64_t indexed_ = 0;          // keys in dci_ (positions [0, indexed_))
  std::vector<float> keys_f32_;  // every key, fp32, by position
};

// Bump when a build's structure or the augmentation changes.
constexpr uint32_t kMdciPublishedImageAlgorithm = 1;

void MdciPublishedSelector::SaveState(ByteWriter* w) const {
  const MultiLevelDciParams dp = DciParams();
  w->Put<uint32_t>(kMdciPublishedImageAlgorithm);
  w->Put<int32_t>(dp.num_composite);
  w->Put<int32_t>(dp.num_simple);
  w->Put<int32_t>(dp.num_levels);
  w->Put<uint64_t>(dp.seed);
  w->Put<float>(aug_.bound());
  w->Put<int64_t>(aug_.keys_seen());
  w->Put<int64_t>(aug_.over_bound());
  w->Put<int64_t>(indexed_);
  const MultiLevelDci::Structure st = dci_->structure();  // an image needs tokens: built
  w->PutArray(st.levels);
  w->PutArray(st.parents);
  w->PutArray(st.directions);
}

absl::Status MdciPublishedSelector::ReadKeys(int64_t n, std::vector<float>* out) const {
  out->resize(static_cast<size_t>(n) * dim_);
  for (int64_t p = 0; p < n; ++p) {
    ASSIGN_OR_RETURN(const void* row, KeyRow(p));
    ToFloat(config_.dtype, row, out->data() + p * dim_, dim_);
  }
  return absl::OkStatus();
}

absl::Status MdciPublishedSelector::LoadState(ByteReader* r, int64_t n) {
  const MultiLevelDciParams dp = DciParams();
  uint32_t algorithm = 0;
  int32_t m = 0, L = 0, levels = 0;
  uint64_t seed = 0;
  float bound = 0.0f;
  int64_t seen = 0, over = 0, indexed = 0;
  if (!r->Get(&algorithm) || !r->Get(&m) || !r->Get(&L) || !r->Get(&levels) || !r->Get(&seed) ||
      !r->Get(&bound) || !r->Get(&seen) || !r->Get(&over) || !r->Get(&indexed)) {
    return absl::DataLossError("mdci-published image: truncated header");
  }
  if (algorithm != kMdciPublishedImageAlgorithm || m != dp.num_composite || L != dp.num_simple ||
      levels != dp.num_levels || seed != dp.seed) {
    return absl::FailedPreconditionError(
        "mdci-published image of another algorithm or other parameters (composite and simple "
        "indices, levels, seed)");
  }
  if (indexed < 1 || indexed > n) {
    return absl::DataLossError(
        absl::StrCat("mdci-published image: ", indexed, " keys indexed of ", n));
  }
  MultiLevelDci::Structure st;
  const uint64_t dirs = static_cast<uint64_t>(m) * L * (dim_ + 1);
  if (!r->GetArray(&st.levels, indexed) || !r->GetArray(&st.parents, indexed) ||
      !r->GetArray(&st.directions, dirs)) {
    return absl::DataLossError("mdci-published image: truncated, or its counts disagree");
  }
  absl::StatusOr<MipsAugmentation> aug = MipsAugmentation::FromState(bound, dim_, 1.0f, seen, over);
  if (!aug.ok())
    return absl::DataLossError(absl::StrCat("mdci-published image: ", aug.status().message()));
  std::vector<float> keys;
  RETURN_IF_ERROR(ReadKeys(n, &keys));
  std::vector<float> points(static_cast<size_t>(indexed) * (dim_ + 1));
  for (int64_t i = 0; i < indexed; ++i) {
    aug->AugmentKey(keys.data() + i * dim_, points.data() + i * (dim_ + 1));
  }
  absl::StatusOr<std::unique_ptr<MultiLevelDci>> dci =
      MultiLevelDci::FromStructure(points.data(), indexed, dim_ + 1, dp, std::move(st));
  if (!dci.ok()) {
    return absl::DataLossError(absl::StrCat("mdci-published image: ", dci.status().message()));
  }
  aug_ = *aug;
  dci_ = std::move(dci).value();
  indexed_ = indexed;
  keys_f32_ = std::move(keys);
  return absl::OkStatus();
}

absl::Status MdciPublishedSelector::RankTokens(const float* queries, int nq,
                                               const SelectParams& params,
                                               std::vector<ScoredToken>* tokens,
                                               uint64_t* touched) const {
  const int64_t n = num_tokens();
  thread_local std::vector<int32_t> cand;
  thread_local std::vector<float> qa;
  thread_local std::vector<std::pair<float, uint32_t>> hits;
  cand.clear();
  qa.resize(dim_ + 1);
  MultiLevelDciQuery qp;
  qp.k = static_cast<int>(std::min<int64_t>(params.budget_tokens, indexed_));
  qp.field_of_view = config_.baseline.dci_field_of_view;
  qp.cover = static_cast<int64_t>(std::min<double>(
      indexed_, static_cast<double>(config_.baseline.dci_candidate_factor) * std::max(qp.k, 1)));
  int64_t visited_total = 0, distances = 0;
  for (int j = 0; j < nq && dci_ != nullptr && qp.k >= 1; ++j) {
    aug_.AugmentQuery(queries + static_cast<int64_t>(j) * dim_, qa.data());
    MultiLevelDci::Stats stats;
    RETURN_IF_ERROR(dci_->Query(qa.data(), qp, &hits, &stats));
    visited_total += stats.projections;
    distances += stats.distances;
    for (const auto& h : hits) cand.push_back(static_cast<int32_t>(h.second));
  }
  for (int64_t i = indexed_; i < n; ++i) cand.push_back(static_cast<int32_t>(i));
  std::sort(cand.begin(), cand.end());
  cand.erase(std::unique(cand.begin(), cand.end()), cand.end());
  const int64_t c = static_cast<int64_t>(cand.size());
  thread_local std::vector<float> logits;
  thread_local std::vector<float> scores;
  logits.resize(static_cast<size_t>(nq) * c);
  scores.resize(c);
  RETURN_IF_ERROR(TokenLogits(cand.data(), c, queries, nq, logits.data()));
  TokenGroupScores(logits.data(), nq, c, scale_, scores.data());
  tokens->resize(c);
  for (int64_t i = 0; i < c; ++i) (*tokens)[i] = {scores[i], cand[i]};
  *touched = static_cast<uint64_t>(distances + c + visited_total / dim_);
  return absl::OkStatus();
}

}  // namespace

std::unique_ptr<Selector> NewMdciPublishedSelector(const SelectorConfig& config,
                                                   const PageKeys* keys) {
  return std::make_unique<MdciPublishedSelector>(config, keys);
}

}  // namespace icecache
