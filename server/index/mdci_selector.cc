#include "server/index/mdci_selector.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "common/thread_cpu.h"
#include "server/index/byte_image.h"
#include "server/index/kernels.h"
#include "server/index/page_select.h"
#include "server/index/prefetch_lines.h"
#include "server/index/token_select.h"
#include "server/index/top_scores.h"

namespace icecache {
namespace {

// out[j] += v[p * nq + j] for p < n, in page order per query (doubles).
void ColumnSums(const float* v, uint32_t n, int nq, double* out) {
  if (nq % 4 == 0) {  // four queries per register; each query's sum in the same order
    for (int j0 = 0; j0 < nq; j0 += 4) {
      __m256d acc = _mm256_loadu_pd(out + j0);
      for (uint32_t p = 0; p < n; ++p) {
        acc =
            _mm256_add_pd(acc, _mm256_cvtps_pd(_mm_loadu_ps(v + static_cast<size_t>(p) * nq + j0)));
      }
      _mm256_storeu_pd(out + j0, acc);
    }
    return;
  }
  for (int j = 0; j < nq; ++j) {
    double acc = out[j];
    for (uint32_t p = 0; p < n; ++p) acc += v[static_cast<size_t>(p) * nq + j];
    out[j] = acc;
  }
}

// Each page's estimated group mass: g[p] = sum over the queries of its
// estimated mass times 1 / the query's total (m is pages x nq, query inner).
// The queries in order from 0, as one sum per page. kQ > 0: nq is kQ, known
// to the compiler (GQA groups of 4 and 8); 0: nq as given.
template <int kQ>
void GroupShares(const float* __restrict m, const float* __restrict t, int nq, uint32_t pages,
                 float* __restrict g) {
  const int q = kQ > 0 ? kQ : nq;
  for (uint32_t p = 0; p < pages; ++p) {
    float acc = 0.0f;
    for (int j = 0; j < q; ++j) acc += m[static_cast<size_t>(p) * q + j] * t[j];
    g[p] = acc;
  }
}

// Per-thread buffers of Select (sized once, reused across calls).
struct SelectScratch {
  DciScratch descent;
  std::vector<uint32_t> nodes;         // level-1 nodes of the descent, best first
  std::vector<uint32_t> candidates;    // their pages
  std::vector<float> logits;           // G x fill of the page being scored
  std::vector<uint32_t> scored_pages;  // pages scored, in order
  std::vector<float> lse;              // G per scored page: the page's log-mass per query
  std::vector<float> max_logit;        // G per scored page: its largest scaled logit per query
  std::vector<float> log_norm;         // G: each query's log-normaliser
  std::vector<float> rest, column;     // CalibrateRest: G corrected rests; one query's lse
  std::vector<std::pair<float, uint32_t>> scored;
  std::vector<float> bound;            // token granularity: each scored page's token bound
  TokenCandidates tokens;              // token granularity: the scored pages' logits, kept
  std::vector<float> shifted;          // TrimCarry: the dropped pages' log-masses of one query
  std::vector<float> page_share;       // ExactTokenShares: one page's token shares
  std::vector<uint64_t> page_bits;     // one bit per page id; all zero between selects
  std::vector<const void*> rows;       // ScorePages: each page's frame (or sketch codes)
  std::vector<float> pq_mass, pq_ref;  // pq_factor: each page's estimated mass per query
  std::vector<float> pq_bulk;          // pq_factor: each page's fill x e^mean per query
  std::vector<double> pq_all;          // pq_factor: each query's total of pq_bulk
  std::vector<float> pq_score;         // pq_factor: each page's estimated group mass
  TopScoresScratch top;                // pq_factor: the candidates' select (top_scores.h)
  std::vector<std::pair<float, uint32_t>> trim_rank;  // TrimCarry: (exact group share, index)
  std::vector<uint8_t> trim_keep;                     // TrimCarry: per scored page, kept
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

DciTreeParams MdciSelector::TreeParams(const SelectorConfig& config) {
  const MdciParams& m = config.mdci;
  DciTreeParams tp;
  tp.dim = config.head_dim;
  tp.page_tokens = config.page_tokens;
  tp.ratio = m.promotion_ratio;
  tp.norm_headroom = m.norm_headroom;
  tp.rebuild_fraction = m.rebuild_fraction;
  tp.route_fov = m.route_fov;
  tp.insert_route_fov = m.insert_route_fov;
  tp.insert_fit = m.insert_fit;
  tp.build_candidates = m.build_candidates;
  tp.refine_iters = m.refine_iters;
  tp.decode_slack = m.decode_slack;
  tp.spread_rank = m.spread_rank;
  tp.locality_window = m.locality_window;
  tp.augmented_routing = m.augmented_routing;
  tp.seed = m.seed;
  return tp;
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
  ASSIGN_OR_RETURN(std::unique_ptr<DciTree> tree, DciTree::Create(TreeParams(config)));
  return std::unique_ptr<MdciSelector>(new MdciSelector(config, keys, std::move(tree)));
}

namespace {
// Marks the product-quantised codes' section after the tree in an image
// ("PQS1"); an image without it (a daemon before the codes were saved) has
// its codes rebuilt from the frames.
constexpr uint32_t kPqImageTag = 0x31535150u;
// The same section with the query basis after the codes ("PQS2").
constexpr uint32_t kPqBasisImageTag = 0x32535150u;
}  // namespace

void MdciSelector::SaveImageBody(ByteWriter* w) const {
  tree_->SaveImage(w);
  if (pq_ != nullptr) {
    w->Put<uint32_t>(kPqBasisImageTag);
    pq_->SaveImage(w);
  }
}

absl::StatusOr<std::unique_ptr<MdciSelector>> MdciSelector::LoadImage(const SelectorConfig& config,
                                                                      const PageKeys* keys,
                                                                      ByteReader* r,
                                                                      int64_t tokens) {
  // Create validates the config exactly as for a fresh selector.
  ASSIGN_OR_RETURN(std::unique_ptr<MdciSelector> sel, Create(config, keys));
  ASSIGN_OR_RETURN(sel->tree_, DciTree::LoadImage(TreeParams(config), r, tokens));
  if (sel->sketch_ != nullptr) {
    // Not in the image: derived from the frames, which hold the keys again.
    const DciPageTable& pt = sel->tree_->page_table();
    RETURN_IF_ERROR(sel->sketch_->Rebuild(*keys, config.dtype, pt.num_pages(),
                                          [&pt](uint32_t page) { return pt.fill(page); }));
  }
  if (sel->pq_ != nullptr) {
    const DciPageTable& pt = sel->tree_->page_table();
    uint32_t tag = 0;
    if (r->remaining() != 0) {
      if (!r->Get(&tag) || (tag != kPqImageTag && tag != kPqBasisImageTag)) {
        return absl::DataLossError("index image: bytes after the tree that are not mdci's codes");
      }
      // The codes as they were: the same selections after the restart.
      RETURN_IF_ERROR(sel->pq_->LoadImage(
          r, static_cast<uint64_t>(pt.num_pages()) * static_cast<uint64_t>(config.page_tokens),
          tag == kPqBasisImageTag));
      sel->pq_->CoverPages(pt.num_pages());
      if (sel->query_basis_ != nullptr && sel->pq_->has_basis()) {
        sel->query_basis_->Adopt(sel->pq_->basis());
      }
    } else {
      // An image without them: trained and encoded from the frames (near the
      // selections before, not equal: the sample comes in page order).
      RETURN_IF_ERROR(sel->pq_->Rebuild(*keys, config.dtype, pt.num_pages(),
                                        [&pt](uint32_t page) { return pt.fill(page); }));
    }
  }
  if (r->remaining() != 0) {
    return absl::DataLossError(absl::StrCat("index image: ", r->remaining(),
                                            " bytes past the end of the tree and its codes"));
  }
  return sel;
}

absl::Status MdciSelector::Build(const float* keys, int64_t n, std::vector<Placement>* placements) {
  RETURN_IF_ERROR(
      ValidateKeysToAdd(keys, n, config_.head_dim, num_tokens(), placements, !keys_prechecked()));
  if (num_tokens() != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("Build() is for the prefill batch of an empty index; it holds ", num_tokens(),
                     " tokens, use Insert()"));
  }
  RETURN_IF_ERROR(tree_->BulkBuild(keys, n, placements));
  if (sketch_ != nullptr) {
    sketch_->Write(*placements, keys, config_.dtype);
    sketch_->CoverPages(tree_->page_table().num_pages());
  }
  if (pq_ != nullptr) {
    pq_->Train(keys, n);
    pq_->Write(*placements, keys, config_.dtype);
    pq_->CoverPages(tree_->page_table().num_pages());
  }
  return absl::OkStatus();
}

absl::Status MdciSelector::Insert(const float* keys, int64_t n,
                                  std::vector<Placement>* placements) {
  RETURN_IF_ERROR(
      ValidateKeysToAdd(keys, n, config_.head_dim, num_tokens(), placements, !keys_prechecked()));
  if (pq_ != nullptr && pq_->trained() && pq_->trained_rows() < PqSketch::kMaxTrainRows &&
      num_tokens() >= 4 * pq_->trained_rows()) {
    // Codebooks fitted on a small first append: refit on every key placed
    // so far (the frames hold them: each append writes its rows before the
    // next Insert) and re-encode them, each time the context has grown 4x,
    // until the sample is full (amortised O(1) per token). A missing frame
    // leaves the codebooks as they were (Rebuild changes nothing then).
    const DciPageTable& pt = tree_->page_table();
    pq_->Rebuild(*keys_, config_.dtype, pt.num_pages(),
                 [&pt](uint32_t page) { return pt.fill(page); })
        .IgnoreError();
  }
  RETURN_IF_ERROR(tree_->Insert(keys, n, placements));
  if (sketch_ != nullptr) {
    sketch_->Write(*placements, keys, config_.dtype);
    sketch_->CoverPages(tree_->page_table().num_pages());
  }
  if (pq_ != nullptr) {
    // An index built empty (no prefill) is trained on its first keys (and
    // refitted as the context grows, above).
    if (!pq_->trained()) pq_->Train(keys, n);
    pq_->Write(*placements, keys, config_.dtype);
    pq_->CoverPages(tree_->page_table().num_pages());
  }
  return absl::OkStatus();
}

void MdciSelector::InstallQueryBasis() const {
  if (!install_mu_.TryLock()) return;
  InstallQueryBasisLocked();
  install_mu_.Unlock();
}

void MdciSelector::InstallQueryBasisLocked() const {
  std::vector<float> basis;
  if (!query_basis_->due() || !pq_->trained() || !query_basis_->Fit(&basis)) return;
  const DciPageTable& pt = tree_->page_table();
  // A missing frame leaves the sketch without a basis (SetBasis restores
  // the one before); selection is as without it.
  pq_->SetBasis(basis.data(), *keys_, config_.dtype, pt.num_pages(),
                [&pt](uint32_t page) { return pt.fill(page); })
      .IgnoreError();
}

void MdciSelector::ScorePages(const uint32_t* pages, size_t n, const float* queries,
                              int num_queries, bool sketch, uint64_t* touched,
                              TokenCandidates* keep, bool max_logits) const {
  sketch = sketch && sketch_ != nullptr && keep == nullptr;
  SelectScratch& s = ThreadScratch();
  const DciPageTable& pt = tree_->page_table();
  const float scale = 1.0f / std::sqrt(static_cast<float>(config_.head_dim));
  const size_t row_bytes = sketch
                               ? static_cast<size_t>(config_.head_dim)
                               : static_cast<size_t>(config_.head_dim) * DTypeSize(config_.dtype);
  // Each page's rows looked up once (the frame is a virtual call), with one
  // real load per frame: it starts every page's first line at once.
  s.rows.resize(n);
  unsigned sink = 0;
  for (size_t i = 0; i < n; ++i) {
    const void* p =
        sketch ? static_cast<const void*>(sketch_->codes(pages[i])) : keys_->page_keys(pages[i]);
    s.rows[i] = p;
    if (p != nullptr) sink += *static_cast<const volatile unsigned char*>(p);
  }
  asm volatile("" : : "r"(sink));
  // The frames are separate 4 KiB-ish blocks read cold, and the hardware
  // prefetcher stops at each boundary: their rows are asked for ahead.
  auto prefetch = [&](size_t i) {
    PrefetchBytes(s.rows[i], pt.fill(pages[i]) * row_bytes);
    if (sketch) PrefetchLine(sketch_->scales(pages[i]));
  };
  const size_t page_floats = static_cast<size_t>(num_queries) * config_.page_tokens;
  if (keep == nullptr && s.logits.size() < page_floats) s.logits.resize(page_floats);
  // Room for every page's G log-masses; pages without tokens are dropped.
  const size_t base = s.lse.size();
  s.lse.resize(base + n * num_queries);
  float* lse = s.lse.data() + base;
  if (max_logits) s.max_logit.resize(base + n * num_queries);
  float* max = max_logits ? s.max_logit.data() + base : nullptr;
  // The pages are scattered frames read cold: keep several in flight ahead
  // of the one being scored (memory-level parallelism).
  constexpr size_t kPagesAhead = 8;
  const bool fused = !sketch && num_queries == 4;
  for (size_t i = 0; i < std::min(n, kPagesAhead); ++i) prefetch(i);
  for (size_t i = 0; i < n; ++i) {
    if (i + kPagesAhead < n) prefetch(i + kPagesAhead);
    const uint32_t fill = pt.fill(pages[i]);
    if (fill == 0) continue;
    *touched += fill;
    s.scored_pages.push_back(pages[i]);
    // A full 16-token page of a 4-query group: one fused pass (kernels.h).
    // With `keep`, its logits are written where keep holds them.
    float* logits = keep != nullptr ? keep->Add(pages[i], num_queries, fill) : s.logits.data();
    if (fused && fill == 16 &&
        PageLogMass16x4(config_.dtype, s.rows[i], config_.head_dim, queries, scale, lse, max,
                        keep != nullptr ? logits : nullptr)) {
      lse += num_queries;
      if (max != nullptr) max += num_queries;
      continue;
    }
    if (sketch) {
      DotRowsMultiI8(static_cast<const int8_t*>(s.rows[i]), sketch_->scales(pages[i]), fill,
                     config_.head_dim, queries, num_queries, logits);
    } else {
      DotRowsMulti(config_.dtype, s.rows[i], fill, config_.head_dim, queries, num_queries, logits);
    }
    PageQueryLogMass(logits, num_queries, static_cast<int>(fill), static_cast<int>(fill), scale,
                     lse);
    lse += num_queries;
    if (max == nullptr) continue;
    for (int j = 0; j < num_queries; ++j, ++max) {
      *max = -std::numeric_limits<float>::infinity();
      for (uint32_t t = 0; t < fill; ++t) *max = std::max(*max, logits[j * fill + t] * scale);
    }
  }
  s.lse.resize(static_cast<size_t>(lse - s.lse.data()));
  if (max_logits) s.max_logit.resize(s.lse.size());
}

void MdciSelector::CollectCandidatePages(const float* queries, int num_queries,
                                         const SelectParams& params, uint64_t* touched) const {
  SelectScratch& s = ThreadScratch();
  const DciPageTable& pt = tree_->page_table();
  DciDescentParams dp;
  dp.field_of_view = params.field_of_view > 0 ? params.field_of_view : config_.mdci.field_of_view;
  const float factor =
      params.candidate_factor > 0.0f ? params.candidate_factor : config_.mdci.candidate_factor;
  // At least min_candidate_pages pages, so small budgets still look around.
  dp.min_tokens = std::max<int64_t>(
      static_cast<int64_t>(config_.mdci.min_candidate_pages) * config_.page_tokens,
      static_cast<int64_t>(std::ceil(factor * static_cast<double>(params.budget_tokens))));
  dp.cover_factor = config_.mdci.cover_factor;
  dp.entry_nodes = config_.mdci.entry_nodes;
  dp.spread_weight = config_.mdci.spread_weight;
  dp.normalized = params.ranking == DescentRanking::kSelector
                      ? config_.mdci.normalized_descent
                      : params.ranking == DescentRanking::kNormalized;
  dp.query_quotas = config_.mdci.query_quotas;
  const float scale = 1.0f / std::sqrt(static_cast<float>(config_.head_dim));
  tree_->CollectCandidates(queries, num_queries, scale, dp, &s.descent, &s.nodes, touched);
  // Scored in page id order, not the descent's rank order (the set is the
  // same, and every page's score is exact either way): siblings' pages have
  // consecutive ids, and frames opened in page order usually sit in
  // ascending addresses (a bulk build's pages), so the reads come in
  // ascending runs the hardware prefetcher can follow. The nodes' pages (a
  // page belongs to one node) go into a page-id bitmap, read back in
  // ascending order: a scan of num_pages / 64 words instead of a sort of
  // the ids. Every word read is cleared, so the bitmap is zero again for the
  // next select.
  const size_t words = (static_cast<size_t>(pt.num_pages()) + 63) / 64;
  if (s.page_bits.size() < words) s.page_bits.resize(words, 0);
  uint64_t* bits = s.page_bits.data();
  for (uint32_t node : s.nodes) {
    for (uint32_t page = pt.first_page(node); page != DciPageTable::kNone;
         page = pt.next_page(page)) {
      bits[page >> 6] |= uint64_t{1} << (page & 63);
    }
  }
  s.candidates.clear();
  for (size_t w = 0; w < words; ++w) {
    uint64_t b = bits[w];
    if (b == 0) continue;
    bits[w] = 0;
    const uint32_t base = static_cast<uint32_t>(w * 64);
    do {
      s.candidates.push_back(base + static_cast<uint32_t>(__builtin_ctzll(b)));
      b &= b - 1;
    } while (b != 0);
  }
}

void MdciSelector::CollectPqCandidatePages(const float* queries, int num_queries,
                                           const SelectParams& params,
                                           const std::vector<uint32_t>& forced,
                                           uint64_t* touched) const {
  SelectScratch& s = ThreadScratch();
  const DciPageTable& pt = tree_->page_table();
  const uint32_t pages = std::min(pt.num_pages(), pq_->num_pages());
  const float scale = 1.0f / std::sqrt(static_cast<float>(config_.head_dim));
  s.pq_mass.resize(static_cast<size_t>(pages) * num_queries);
  s.pq_ref.resize(num_queries);
  s.pq_bulk.resize(s.pq_mass.size());
  pq_->EstimatePageMass(queries, num_queries, scale, pages, pt.fills(), s.pq_mass.data(),
                        s.pq_ref.data(), s.pq_bulk.data());
  // Each query's normaliser from the pages' bulk estimate (fill x e^mean):
  // the max term, noisy upwards, inflates the flat queries' totals and
  // under-weights them (measured on four KV dumps, pq_factor 8: mass /
  // exact-mdci 0.877 -> 0.947 baseline, 0.824 -> 0.862 shifted-queries,
  // 0.925 -> 0.966 rare-needles, 0.949 -> 0.917 gqa-divergent). The pages
  // are ranked by e^max + (fill - 1) e^mean, so a lone needle still counts.
  const std::vector<float>& norm_mass = s.pq_bulk;
  // The codes and norms read, in key equivalents (head_dim / 8 + 2 bytes
  // per token against head_dim x the dtype's size).
  *touched += static_cast<uint64_t>(pages) * config_.page_tokens * (config_.head_dim / 8 + 2) /
              (static_cast<uint64_t>(config_.head_dim) * DTypeSize(config_.dtype));
  // Each query's estimated total, then each page's group mass: the sum over
  // the queries of its estimated share.
  std::vector<double>& all = s.pq_all;
  all.assign(num_queries, 0.0);
  ColumnSums(norm_mass.data(), pages, num_queries, all.data());
  std::vector<float>& total = s.column;  // 1 / each query's total
  total.resize(num_queries);
  for (int j = 0; j < num_queries; ++j) {
    total[j] = all[j] > 0.0 ? static_cast<float>(1.0 / all[j]) : 0.0f;
  }
  s.pq_score.resize(pages);
  auto* shares = num_queries == 4   ? GroupShares<4>
                 : num_queries == 8 ? GroupShares<8>
                                    : GroupShares<0>;
  shares(s.pq_mass.data(), total.data(), num_queries, pages, s.pq_score.data());
  const float factor = params.pq_factor > 0.0f ? params.pq_factor : config_.mdci.pq_factor;
  const size_t want = static_cast<size_t>(std::max<int64_t>(
      config_.mdci.min_candidate_pages,
      static_cast<int64_t>(
          std::ceil(factor * static_cast<double>(params.budget_tokens) / config_.page_tokens))));
  s.candidates.clear();
  TopPositiveScores(s.pq_score.data(), pages, want, &s.top, &s.candidates);
  // The forced pages (sinks, recent) are scored exactly too: a sink's key is
  // an outlier the codebooks fit worst, and its mass is most of some
  // queries' normaliser.
  for (uint32_t page : forced) {
    if (page < pages) s.candidates.push_back(page);
  }
  std::sort(s.candidates.begin(), s.candidates.end());  // frames in ascending order
  s.candidates.erase(std::unique(s.candidates.begin(), s.candidates.end()), s.candidates.end());
  // The rest (what the candidates leave) and the candidates' mass, per query
  // and as logs in the frames' logit domain, as the descent gives them:
  // CalibrateRest corrects the rest by the candidates' exact / estimated mass.
  s.descent.rest.assign(num_queries, -std::numeric_limits<float>::infinity());
  s.descent.taken_est.assign(num_queries, -std::numeric_limits<float>::infinity());
  for (int j = 0; j < num_queries; ++j) {
    double taken = 0.0;
    for (uint32_t p : s.candidates) taken += norm_mass[static_cast<size_t>(p) * num_queries + j];
    const double rest = all[j] - taken;
    if (taken > 0.0) s.descent.taken_est[j] = s.pq_ref[j] + static_cast<float>(std::log(taken));
    if (rest > 0.0) s.descent.rest[j] = s.pq_ref[j] + static_cast<float>(std::log(rest));
  }
}

namespace {

bool CarryMatches(const CandidateCarry& c, const void* selector, const SelectParams& params,
                  int num_queries, bool scan) {
  return c.valid && c.selector == selector && c.num_queries == num_queries &&
         c.budget_tokens == params.budget_tokens && c.field_of_view == params.field_of_view &&
         c.candidate_factor == params.candidate_factor && c.pq_factor == params.pq_factor &&
         c.ranking == static_cast<uint8_t>(params.ranking) &&
         c.method == static_cast<uint8_t>(params.method) && c.scan == scan;
}

}  // namespace

void MdciSelector::Record(const SelectParams& params, int num_queries, bool scan,
                          CandidateCarry* carry) const {
  const SelectScratch& s = ThreadScratch();
  carry->selector = this;
  carry->num_queries = num_queries;
  carry->budget_tokens = params.budget_tokens;
  carry->field_of_view = params.field_of_view;
  carry->candidate_factor = params.candidate_factor;
  carry->pq_factor = params.pq_factor;
  carry->ranking = static_cast<uint8_t>(params.ranking);
  carry->method = static_cast<uint8_t>(params.method);
  carry->scan = scan;
  carry->candidates.assign(s.candidates.begin(), s.candidates.end());
  carry->rest.assign(s.descent.rest.begin(), s.descent.rest.end());
  carry->taken_est.assign(s.descent.taken_est.begin(), s.descent.taken_est.end());
  carry->age = 0;
  carry->valid = true;
}

bool MdciSelector::TakeCarried(const SelectParams& params, int num_queries, bool scan,
                               const std::vector<uint32_t>& forced, CandidateCarry* carry) const {
  const int64_t turn = (carry->selects++ + carry->phase) % (int64_t{params.carry_steps} + 1);
  if (turn == 0 || carry->age >= params.carry_steps ||
      !CarryMatches(*carry, this, params, num_queries, scan) ||
      carry->rest.size() != static_cast<size_t>(num_queries) ||
      carry->taken_est.size() != static_cast<size_t>(num_queries)) {
    return false;
  }
  SelectScratch& s = ThreadScratch();
  // Pages are never moved or dropped (a rebuild keeps every token where it
  // is), so the recorded ids still name the same pages; the forced ones of
  // now join them as a fresh scan would have added them. (An id past the
  // table, from a state recorded by another selector that had this one's
  // address, is dropped rather than read.)
  const uint32_t pages = tree_->page_table().num_pages();
  s.candidates.clear();
  for (uint32_t page : carry->candidates) {
    if (page < pages) s.candidates.push_back(page);
  }
  if (scan && !forced.empty()) {
    for (uint32_t page : forced) {
      if (page < pages) s.candidates.push_back(page);
    }
    std::sort(s.candidates.begin(), s.candidates.end());
    s.candidates.erase(std::unique(s.candidates.begin(), s.candidates.end()), s.candidates.end());
  }
  s.descent.rest.assign(carry->rest.begin(), carry->rest.end());
  s.descent.taken_est.assign(carry->taken_est.begin(), carry->taken_est.end());
  ++carry->age;
  return true;
}

void MdciSelector::TrimCarry(const SelectParams& params, int num_queries, const float* rest,
                             const std::vector<uint32_t>& forced, const float* bound,
                             const Selection& taken, CandidateCarry* carry) const {
  const float keep = config_.mdci.carry_keep_factor;
  if (!(keep > 0.0f) || rest == nullptr || !carry->valid ||
      carry->rest.size() != static_cast<size_t>(num_queries) ||
      carry->taken_est.size() != static_cast<size_t>(num_queries)) {
    return;
  }
  const size_t want = static_cast<size_t>(std::max<int64_t>(
      config_.mdci.min_candidate_pages,
      static_cast<int64_t>(
          std::ceil(static_cast<double>(keep) * params.budget_tokens / config_.page_tokens))));
  if (carry->candidates.size() <= want) return;
  SelectScratch& s = ThreadScratch();
  const size_t n = s.scored_pages.size();
  // Kept whatever they score: the forced pages (a carried select scores the
  // forced pages of its own step anyway) and, at token granularity, every
  // page this select took a token from (a weak page can hold one strong
  // token). The others are ranked by the page's group share (page
  // granularity) or its token bound (token granularity).
  const uint32_t pages = tree_->page_table().num_pages();
  const size_t words = (static_cast<size_t>(pages) + 63) / 64;
  if (s.page_bits.size() < words) s.page_bits.resize(words, 0);
  uint64_t* bits = s.page_bits.data();
  auto mark = [&](uint32_t page) {
    if (page < pages) bits[page >> 6] |= uint64_t{1} << (page & 63);
  };
  for (uint32_t page : forced) mark(page);
  for (const Placement& ref : taken.token_refs) mark(ref.page);
  s.trim_keep.assign(n, 0);
  s.trim_rank.clear();
  size_t kept_taken = 0;
  for (size_t i = 0; i < n; ++i) {
    const uint32_t page = s.scored_pages[i];
    if ((bits[page >> 6] >> (page & 63)) & 1) {
      s.trim_keep[i] = 1;
      if (std::find(forced.begin(), forced.end(), page) == forced.end()) ++kept_taken;
      continue;
    }
    // (The log of the group's share ranks the pages as the share does.)
    const float g = bound != nullptr
                        ? bound[i]
                        : GroupPageScore(&s.lse[i * num_queries], s.log_norm.data(), num_queries);
    s.trim_rank.push_back(
        {std::isnan(g) ? std::numeric_limits<float>::infinity() : g, static_cast<uint32_t>(i)});
  }
  for (uint32_t page : forced) {
    if (page < pages) bits[page >> 6] = 0;
  }
  for (const Placement& ref : taken.token_refs) {
    if (ref.page < pages) bits[ref.page >> 6] = 0;
  }
  const size_t room = want > kept_taken ? want - kept_taken : 0;
  if (s.trim_rank.size() > room) {
    std::nth_element(s.trim_rank.begin(), s.trim_rank.begin() + room, s.trim_rank.end(),
                     [](const auto& a, const auto& b) { return a.first > b.first; });
    s.trim_rank.resize(room);
  }
  for (const auto& [share, i] : s.trim_rank) s.trim_keep[i] = 1;
  carry->candidates.clear();
  for (size_t i = 0; i < n; ++i) {
    if (s.trim_keep[i] != 0) carry->candidates.push_back(s.scored_pages[i]);
  }
  std::sort(carry->candidates.begin(), carry->candidates.end());
  // Per query: the kept pages' exact mass is what the carried selects'
  // exact mass is compared with (CalibrateRest); the dropped pages' joins
  // the rest, which the next steps scale by the kept pages' change.
  for (int j = 0; j < num_queries; ++j) {
    s.column.clear();   // the kept pages' log-masses
    s.shifted.clear();  // the dropped pages'
    for (size_t i = 0; i < n; ++i) {
      (s.trim_keep[i] != 0 ? s.column : s.shifted).push_back(s.lse[i * num_queries + j]);
    }
    carry->taken_est[j] = LogSumExp(s.column.data(), s.column.size());
    const float rest_and_dropped[2] = {rest[j], LogSumExp(s.shifted.data(), s.shifted.size())};
    carry->rest[j] = LogSumExp(rest_and_dropped, 2);
  }
}

void MdciSelector::CalibrateRest(int num_queries) const {
  SelectScratch& s = ThreadScratch();
  const size_t pages = s.scored_pages.size();
  s.rest.resize(num_queries);
  for (int j = 0; j < num_queries; ++j) {
    float rest = s.descent.rest[j];
    const float est = s.descent.taken_est[j];
    if (std::isfinite(rest) && std::isfinite(est) && pages > 0) {
      s.column.resize(pages);
      for (size_t p = 0; p < pages; ++p) s.column[p] = s.lse[p * num_queries + j];
      const float exact = LogSumExp(s.column.data(), pages);
      if (std::isfinite(exact)) rest += exact - est;
    }
    s.rest[j] = rest;
  }
}

absl::Status MdciSelector::Select(const float* queries, int num_queries, const SelectParams& params,
                                  Selection* out) const {
  RETURN_IF_ERROR(ValidateSelect(*this, queries, num_queries, params, out));
  const DciPageTable& pt = tree_->page_table();
  SelectScratch& s = ThreadScratch();
  uint64_t touched = 0;
  out->carried = false;
  out->carry_age = 0;
  out->upkeep_cpu_ns = 0;
  s.scored_pages.clear();
  s.lse.clear();
  const float* rest = nullptr;  // log of the mass outside the scored pages, per query
  const bool every_page = config_.kind == SelectorKind::kExactMdci || params.exhaustive;
  const bool by_token = params.granularity == Granularity::kToken;
  // The sketch ranks pages only: the exact references and token granularity
  // (which keeps the logits) read the frames.
  // A sketch that does not cover every page (never, as Build, Insert and
  // LoadImage keep it) falls back on the frames rather than read past it.
  const bool sketch =
      sketch_ != nullptr && !every_page && !by_token && sketch_->num_pages() >= pt.num_pages();
  const std::vector<uint32_t> forced =
      ForcedPages(num_tokens(), params, [&](int64_t pos) { return pt.page_of_position(pos); });
  const bool scan = pq_ != nullptr && pq_->trained() && num_queries <= PqSketch::kMaxQueries &&
                    params.method != SearchMethod::kTree;
  if (query_basis_ != nullptr && !every_page) {
    query_basis_->Observe(queries, num_queries);
    if (query_basis_->due()) {
      const int64_t t0 = ThreadCpuNanos();
      InstallQueryBasis();
      out->upkeep_cpu_ns = ThreadCpuNanos() - t0;
    }
  }
  // (More queries than a config allows can come only from a direct caller;
  // the tree serves them.)
  CandidateCarry* carry = every_page ? nullptr : params.carry;
  CandidateCarry* recorded = nullptr;  // a fresh select's record, trimmed once scored
  if (every_page) {
    s.candidates.resize(pt.num_pages());
    std::iota(s.candidates.begin(), s.candidates.end(), 0u);
  } else if (carry != nullptr && params.carry_steps > 0 &&
             TakeCarried(params, num_queries, scan, forced, carry)) {
    rest = s.descent.rest.data();
    out->carried = true;
    out->carry_age = carry->age;
  } else {
    if (scan) {
      CollectPqCandidatePages(queries, num_queries, params, forced, &touched);
    } else {
      CollectCandidatePages(queries, num_queries, params, &touched);
    }
    rest = s.descent.rest.data();
    if (carry != nullptr) {
      Record(params, num_queries, scan, carry);
      recorded = carry;
    }
  }
  if (by_token && !every_page) {
    // The forced tokens' pages are candidates too: the layout put similar
    // keys next to the sinks (often more sink-like tokens).
    for (uint32_t page : forced) {
      if (std::find(s.candidates.begin(), s.candidates.end(), page) == s.candidates.end()) {
        s.candidates.push_back(page);
      }
    }
  }
  // Token granularity keeps every scored page's logits (the fused pass
  // writes them out) and scores only the tokens of the pages that can hold
  // one of the best (TakeTokensBounded).
  s.tokens.Clear();
  ScorePages(s.candidates.data(), s.candidates.size(), queries, num_queries, sketch, &touched,
             by_token ? &s.tokens : nullptr, /*max_logits=*/by_token);
  // Each query's normaliser: exact over every page (exact-mdci); for mdci the
  // candidates' exact mass plus the descent's estimate of the rest.
  if (rest != nullptr && config_.mdci.calibrated_rest) {
    CalibrateRest(num_queries);
    rest = s.rest.data();
  }
  s.log_norm.resize(num_queries);
  QueryLogNorms(s.lse.data(), s.scored_pages.size(), num_queries, rest, s.log_norm.data());
  if (by_token) {
    // A token's score is the sum over the queries of exp(its scaled logit -
    // the query's log-normaliser), at most the same sum over the page's
    // largest logits.
    s.bound.clear();
    for (size_t i = 0; i < s.scored_pages.size(); ++i) {
      float b = 0.0f;
      for (int j = 0; j < num_queries; ++j) {
        b += std::exp(s.max_logit[i * num_queries + j] - s.log_norm[j]);
      }
      s.bound.push_back(b);
    }
    // (s.tokens holds the scored pages, in the order of s.lse and the bounds.)
    TakeTokensBounded(*this, s.tokens, s.bound.data(), s.log_norm.data(), num_queries,
                      1.0f / std::sqrt(static_cast<float>(config_.head_dim)), params, out);
    if (recorded != nullptr) {
      TrimCarry(params, num_queries, rest, forced, s.bound.data(), *out, recorded);
    }
    out->keys_touched = touched;
    return absl::OkStatus();
  }
  s.scored.clear();
  for (size_t i = 0; i < s.scored_pages.size(); ++i) {
    s.scored.push_back({GroupPageScore(&s.lse[i * num_queries], s.log_norm.data(), num_queries),
                        s.scored_pages[i]});
  }
  TakePages(*this, forced, &s.scored, params, out);
  if (recorded != nullptr) TrimCarry(params, num_queries, rest, forced, nullptr, *out, recorded);
  out->keys_touched = touched;
  return absl::OkStatus();
}

absl::Status MdciSelector::ScanAllPages(const float* queries, int num_queries,
                                        TokenCandidates* keep, uint32_t pages,
                                        const std::function<bool()>& yield) const {
  SelectScratch& s = ThreadScratch();
  s.scored_pages.clear();
  s.lse.clear();
  if (keep != nullptr) keep->Clear();
  std::vector<uint32_t> all(pages);
  std::iota(all.begin(), all.end(), 0u);
  uint64_t touched = 0;
  for (uint32_t begin = 0; begin < pages; begin += kScanChunkPages) {
    if (begin > 0 && yield && !yield()) {
      return absl::AbortedError("exact scan stopped by its caller");
    }
    // Each chunk appends its pages' log-masses (and logits) to the scratch.
    ScorePages(all.data() + begin, std::min(kScanChunkPages, pages - begin), queries, num_queries,
               /*sketch=*/false, &touched, keep);
  }
  return absl::OkStatus();
}

absl::Status MdciSelector::ExactPageMasses(const float* queries, int num_queries,
                                           std::vector<float>* mass,
                                           const std::function<bool()>& yield) const {
  if (mass == nullptr) return absl::InvalidArgumentError("mass must not be null");
  SelectParams probe;
  probe.budget_tokens = 1;
  Selection unused;
  RETURN_IF_ERROR(ValidateSelect(*this, queries, num_queries, probe, &unused));
  SelectScratch& s = ThreadScratch();
  const uint32_t pages = tree_->page_table().num_pages();
  RETURN_IF_ERROR(ScanAllPages(queries, num_queries, nullptr, pages, yield));
  s.log_norm.resize(num_queries);
  QueryLogNorms(s.lse.data(), s.scored_pages.size(), num_queries, nullptr, s.log_norm.data());
  mass->assign(pages, 0.0f);
  for (size_t i = 0; i < s.scored_pages.size(); ++i) {
    (*mass)[s.scored_pages[i]] =
        std::exp(GroupPageScore(&s.lse[i * num_queries], s.log_norm.data(), num_queries)) /
        static_cast<float>(num_queries);
  }
  return absl::OkStatus();
}

absl::Status MdciSelector::ExactTokenShares(const float* queries, int num_queries,
                                            std::vector<float>* share,
                                            const std::function<bool()>& yield) const {
  if (share == nullptr) return absl::InvalidArgumentError("share must not be null");
  SelectParams probe;
  probe.budget_tokens = 1;
  Selection unused;
  RETURN_IF_ERROR(ValidateSelect(*this, queries, num_queries, probe, &unused));
  SelectScratch& s = ThreadScratch();
  const DciPageTable& pt = tree_->page_table();
  const uint32_t pages = pt.num_pages();
  const int64_t tokens = num_tokens();  // positions past it arrive during a yield
  RETURN_IF_ERROR(ScanAllPages(queries, num_queries, &s.tokens, pages, yield));
  s.log_norm.resize(num_queries);
  QueryLogNorms(s.lse.data(), s.scored_pages.size(), num_queries, nullptr, s.log_norm.data());
  const float scale = 1.0f / std::sqrt(static_cast<float>(config_.head_dim));
  share->assign(static_cast<size_t>(tokens), 0.0f);
  for (size_t i = 0; i < s.tokens.pages.size(); ++i) {
    const uint32_t page = s.tokens.pages[i];
    // The fill the page had when its chunk was scored (its logits' count).
    const size_t end =
        i + 1 < s.tokens.offsets.size() ? s.tokens.offsets[i + 1] : s.tokens.logits.size();
    const uint32_t fill = static_cast<uint32_t>((end - s.tokens.offsets[i]) / num_queries);
    const float* logits = s.tokens.logits.data() + s.tokens.offsets[i];
    const int32_t* pos = pt.positions(page);
    // The SIMD exp of TakeTokens (TokenShares), so the reference scores
    // tokens as an exhaustive token selection does; a scalar std::exp per
    // token and query was a third of this scan.
    s.page_share.resize(fill);
    TokenShares(logits, fill, s.log_norm.data(), num_queries, scale, s.page_share.data());
    for (uint32_t t = 0; t < fill; ++t) {
      if (pos[t] < tokens) (*share)[pos[t]] += s.page_share[t];
    }
  }
  return absl::OkStatus();
}

namespace {

// The slot of `position` in `page`, which the page table maps it to (0,
// unreachable, if the page does not hold it).
uint32_t SlotOf(const DciPageTable& pt, uint32_t page, int32_t position) {
  const int32_t* pos = pt.positions(page);
  const uint32_t fill = pt.fill(page);
  for (uint32_t slot = 0; slot < fill; ++slot) {
    if (pos[slot] == position) return slot;
  }
  return 0;
}

}  // namespace

Placement MdciSelector::placement_of(int32_t position) const {
  const DciPageTable& pt = tree_->page_table();
  const uint32_t page = pt.page_of_position(position);
  return Placement{page, SlotOf(pt, page, position)};
}

void MdciSelector::placements_of(int32_t first, int32_t count, Placement* out) const {
  const DciPageTable& pt = tree_->page_table();
  const uint32_t* fills = pt.fills();
  // Every token's page first, its positions line and fill asked for, then
  // the slots: the recent tokens sit in pages spread over the whole table
  // (each went to its node's last page), so each lookup is a cold line, and
  // one miss after another was most of a selection's forced tokens.
  for (int32_t i = 0; i < count; ++i) {
    const uint32_t page = pt.page_of_position(first + i);
    out[i].page = page;
    PrefetchLine(pt.positions(page));
    PrefetchLine(fills + page);
  }
  for (int32_t i = 0; i < count; ++i) out[i].slot = SlotOf(pt, out[i].page, first + i);
}

absl::StatusOr<std::unique_ptr<DciTreeRebuild>> MdciSelector::PrepareRebuild() const {
  return tree_->PrepareRebuild(*keys_, config_.dtype);
}

absl::Status MdciSelector::CommitRebuild(std::unique_ptr<DciTreeRebuild> rebuild) {
  return tree_->CommitRebuild(std::move(rebuild));
}

}  // namespace icecache
