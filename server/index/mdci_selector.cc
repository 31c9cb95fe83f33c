#include "server/index/mdci_selector.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "server/index/kernels.h"
#include "server/index/page_select.h"

namespace icecache {
namespace {

// Per-thread buffers of Select (sized once, reused across calls).
struct SelectScratch {
  DciScratch descent;
  std::vector<uint32_t> nodes, candidates;
  std::vector<float> logits;  // G x fill per scored page, concatenated
  struct Scored {
    uint32_t page;
    uint32_t fill;
    size_t offset;  // into logits
    float lower;    // max logit x scale: PageMassScore >= lower
  };
  std::vector<Scored> pages;
  std::vector<float> lowers;
  std::vector<std::pair<float, uint32_t>> scored;
};

SelectScratch& ThreadScratch() {
  thread_local SelectScratch scratch;
  return scratch;
}

}  // namespace

std::unique_ptr<Selector> NewMdciSelector(const SelectorConfig& config, const PageKeys* keys) {
  auto sel = MdciSelector::Create(config, keys);
  if (!sel.ok()) return nullptr;
  return std::move(sel).value();
}

absl::StatusOr<std::unique_ptr<MdciSelector>> MdciSelector::Create(const SelectorConfig& config,
                                                                   const PageKeys* keys) {
  if (config.kind != SelectorKind::kMdci && config.kind != SelectorKind::kExactMdci) {
    return absl::InvalidArgumentError("MdciSelector serves only the mdci and exact-mdci kinds");
  }
  if (keys == nullptr) return absl::InvalidArgumentError("PageKeys must not be null");
  const MdciParams& m = config.mdci;
  if (!(m.cover_factor > 0.0f) || !std::isfinite(m.cover_factor) || m.entry_nodes < 1 ||
      m.min_candidate_pages < 0 || !(m.decode_slack >= 1.0f) || !std::isfinite(m.decode_slack) ||
      !(m.spread_weight >= 0.0f) || !std::isfinite(m.spread_weight)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "SelectorConfig.mdci needs cover_factor > 0, entry_nodes >= 1, min_candidate_pages >= 0, "
        "decode_slack >= 1 and spread_weight >= 0; got ",
        m.cover_factor, ", ", m.entry_nodes, ", ", m.min_candidate_pages, ", ", m.decode_slack,
        ", ", m.spread_weight));
  }
  DciTreeParams tp;
  tp.dim = config.head_dim;
  tp.page_tokens = config.page_tokens;
  tp.ratio = m.promotion_ratio;
  tp.norm_headroom = m.norm_headroom;
  tp.rebuild_fraction = m.rebuild_fraction;
  tp.route_fov = m.route_fov;
  tp.build_candidates = m.build_candidates;
  tp.refine_iters = m.refine_iters;
  tp.decode_slack = m.decode_slack;
  tp.spread_rank = m.spread_rank;
  tp.locality_window = m.locality_window;
  tp.augmented_routing = m.augmented_routing;
  tp.seed = m.seed;
  ASSIGN_OR_RETURN(std::unique_ptr<DciTree> tree, DciTree::Create(tp));
  return std::unique_ptr<MdciSelector>(new MdciSelector(config, keys, std::move(tree)));
}

absl::Status MdciSelector::Build(const float* keys, int64_t n, std::vector<Placement>* placements) {
  RETURN_IF_ERROR(ValidateKeysToAdd(keys, n, config_.head_dim, num_tokens(), placements));
  if (num_tokens() != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("Build() is for the prefill batch of an empty index; it holds ", num_tokens(),
                     " tokens, use Insert()"));
  }
  return tree_->BulkBuild(keys, n, placements);
}

absl::Status MdciSelector::Insert(const float* keys, int64_t n,
                                  std::vector<Placement>* placements) {
  RETURN_IF_ERROR(ValidateKeysToAdd(keys, n, config_.head_dim, num_tokens(), placements));
  return tree_->Insert(keys, n, placements);
}

absl::Status MdciSelector::Select(const float* queries, int num_queries, const SelectParams& params,
                                  Selection* out) const {
  RETURN_IF_ERROR(ValidateSelect(*this, queries, num_queries, params, out));
  const int d = config_.head_dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const DciPageTable& pt = tree_->page_table();
  SelectScratch& s = ThreadScratch();
  s.scored.clear();
  uint64_t touched = 0;
  s.logits.clear();
  s.pages.clear();
  // Exact logits of a page, kept with the lower bound of its score (the
  // page's best logit); PageMassScore is only computed where it can matter.
  const size_t row_bytes = static_cast<size_t>(d) * DTypeSize(config_.dtype);
  auto prefetch_page = [&](uint32_t page) {
    // Frames are separate 4 KiB-ish blocks: the hardware prefetcher stops at
    // each boundary, so ask for the next candidate's keys ahead of time.
    const char* p = static_cast<const char*>(keys_->page_keys(page));
    const size_t bytes = static_cast<size_t>(pt.fill(page)) * row_bytes;
    for (size_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off);
  };
  auto score_page = [&](uint32_t page) {
    const uint32_t fill = pt.fill(page);
    if (fill == 0) return;
    const size_t off = s.logits.size();
    s.logits.resize(off + static_cast<size_t>(num_queries) * fill);
    DotRowsMulti(config_.dtype, keys_->page_keys(page), fill, d, queries, num_queries,
                 &s.logits[off]);
    touched += fill;
    float m = -std::numeric_limits<float>::infinity();
    for (size_t k = off; k < s.logits.size(); ++k) m = std::max(m, s.logits[k]);
    s.pages.push_back({page, fill, off, m * scale});
  };
  if (config_.kind == SelectorKind::kExactMdci) {
    for (uint32_t page = 0; page < pt.num_pages(); ++page) {
      if (page + 1 < pt.num_pages()) prefetch_page(page + 1);
      score_page(page);
    }
  } else {
    DciDescentParams dp;
    dp.field_of_view = config_.mdci.field_of_view;
    // At least min_candidate_pages pages, so small budgets still look around.
    dp.min_tokens = std::max<int64_t>(
        static_cast<int64_t>(config_.mdci.min_candidate_pages) * config_.page_tokens,
        static_cast<int64_t>(
            std::ceil(config_.mdci.candidate_factor * static_cast<double>(params.budget_tokens))));
    dp.cover_factor = config_.mdci.cover_factor;
    dp.entry_nodes = config_.mdci.entry_nodes;
    dp.spread_weight = config_.mdci.spread_weight;
    tree_->CollectCandidates(queries, num_queries, scale, dp, &s.descent, &s.nodes, &touched);
    s.candidates.clear();
    for (uint32_t node : s.nodes) {
      for (uint32_t page = pt.first_page(node); page != DciPageTable::kNone;
           page = pt.next_page(page)) {
        s.candidates.push_back(page);
      }
    }
    // The candidate pages are scattered frames read cold: keep several of
    // them in flight ahead of the one being scored (memory-level
    // parallelism), the first ones before any is scored.
    constexpr size_t kPagesAhead = 8;
    const size_t nc = s.candidates.size();
    {
      // A software prefetch into a page whose translation is not cached may
      // be dropped; one real load per frame starts every page walk at once.
      unsigned sink = 0;
      for (size_t i = 0; i < nc; ++i) {
        const void* p = keys_->page_keys(s.candidates[i]);
        if (p != nullptr) sink += *static_cast<const volatile unsigned char*>(p);
      }
      asm volatile("" : : "r"(sink));
    }
    for (size_t i = 0; i < std::min(nc, kPagesAhead); ++i) prefetch_page(s.candidates[i]);
    for (size_t i = 0; i < nc; ++i) {
      if (i + kPagesAhead < nc) prefetch_page(s.candidates[i + kPagesAhead]);
      score_page(s.candidates[i]);
    }
  }
  const std::vector<uint32_t> forced =
      ForcedPages(num_tokens(), params, [&](int64_t pos) { return pt.page_of_position(pos); });
  // Pruning: a page's score lies in [lower, lower + log(fill)]. Non-forced
  // pages whose lower bounds alone fill the budget set a threshold; a page
  // whose upper bound is below it can never be taken, so its exact score is
  // not needed (the selection is the same as scoring every page).
  float threshold = -std::numeric_limits<float>::infinity();
  {
    s.scored.clear();
    for (const auto& p : s.pages) {
      if (!std::binary_search(forced.begin(), forced.end(), p.page)) {
        s.scored.push_back({p.lower, p.fill});
      }
    }
    std::sort(s.scored.begin(), s.scored.end(),
              [](const auto& a, const auto& b) { return a.first > b.first; });
    int64_t tokens = 0;
    for (const auto& e : s.scored) {
      tokens += e.second;
      if (tokens >= params.budget_tokens) {
        threshold = e.first;
        break;
      }
    }
  }
  s.scored.clear();
  for (const auto& p : s.pages) {
    if (p.lower + std::log(static_cast<float>(p.fill)) < threshold) continue;
    s.scored.push_back({PageMassScore(&s.logits[p.offset], num_queries, static_cast<int>(p.fill),
                                      static_cast<int>(p.fill), scale),
                        p.page});
  }
  TakePages(*this, forced, &s.scored, params, out);
  out->keys_touched = touched;
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<DciTreeRebuild>> MdciSelector::PrepareRebuild() const {
  return tree_->PrepareRebuild(*keys_, config_.dtype);
}

absl::Status MdciSelector::CommitRebuild(std::unique_ptr<DciTreeRebuild> rebuild) {
  return tree_->CommitRebuild(std::move(rebuild));
}

}  // namespace icecache
