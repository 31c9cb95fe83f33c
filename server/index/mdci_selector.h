// The mdci and exact-mdci selectors (docs/architecture.md §3.3-§3.4): a DCI-tree semantic
// page layout (dci_tree.h) for one (layer group, KV head), with
//  - kMdci: tree-guided selection. The G queries descend the tree scoring
//    node representatives (centroids, by estimated attention mass) and keep
//    `field_of_view` nodes per level (more while they hold fewer than
//    2 x candidate tokens); the best logical nodes holding
//    candidate_factor x budget tokens are scored exactly (DotRowsMulti over
//    each page's contiguous keys read through PageKeys), then TakePages
//    fills the budget with sink/recent pages forced in.
//  - kExactMdci: the same layout, every page scored exactly (the best any
//    selector can do on this layout).
// Page scores (page_select.h, GroupPageScore): the sum over the G queries of
// each query's softmax share of the page. The share needs each query's
// log-normaliser: exact-mdci has it exactly (every page is scored); mdci uses
// the exact mass of the candidate pages it scored plus the descent's estimate
// of the mass under every node it did not take (DciScratch::rest, the same
// Gaussian estimate that ranks the nodes), the best estimate it has without
// reading more keys.
// Node representatives: centroid, count and the keys' spread (variance in a
// 16-dim PCA key subspace plus an isotropic residual); a node's attention
// mass is estimated as log(count) + s q.c + s^2 q'Sq / 2 (Gaussian keys).
//
// Trade-off knobs (MdciParams):
//  - field_of_view: level-2+ nodes kept per level (more = more
//    representatives scored, more mass, more time);
//  - candidate_factor: tokens scored exactly = factor x budget (the main
//    time/mass knob); min_candidate_pages is its floor for small budgets;
//  - locality_window: bulk pages group similar keys within windows of this
//    many positions (0 = global); decode_slack: decode keys may join a
//    recent node with room (page fill vs node tightness);
//  - insert_route_fov: nodes kept per level when a decode key is routed
//    (0 = route_fov; 1 inserts in 0.6x the time but loses decode-time
//    needles, docs/bench/greedy54.md);
//  - insert_fit: a decode key within this factor of the spread of the
//    nearest recent node with room joins it unrouted (docs/bench/fit56.md).
// Measured (build-mdci/m/mdci_measure_tool tokens=131072 kv_heads=8 steps=4,
// llama3-8b-like, budget 256, page 16, G=4, fp16 keys, thread CPU time on a
// shared 2-core machine, defaults: field_of_view 96, candidate_factor 8):
// build 0.60 s/head, index 77.0 B/token (15.0% of the 512 B K+V), page fill
// 1.0; select 210 us against 2114 us for a SIMD fp16 scan of all keys
// (0.099), 3.1% of the keys touched; attention mass 0.4915 against 0.5158 for
// exact-mdci (0.953) and 0.5030 for exact positional pages. More mass for more
// time: candidate_factor 10 -> 0.954 at 0.111, 16 -> 0.964 at 0.147.
// The ratio varies by head (2 heads alone: 0.92), so re-measure on real data.
//
// Ownership: does not own the key bytes; `keys` (the frame owner) must
// outlive the selector and hold each token's key where the returned
// Placement says before Select() reads it.
// Thread safety: Select(), NeedsRebuild(), PrepareRebuild() are const and may
// run concurrently; Build(), Insert(), CommitRebuild() need exclusive access.
#ifndef ICECACHE_SERVER_INDEX_MDCI_SELECTOR_H_
#define ICECACHE_SERVER_INDEX_MDCI_SELECTOR_H_

#include <functional>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "server/index/dci_tree.h"
#include "server/index/page_sketch.h"
#include "server/index/pq_sketch.h"
#include "server/index/query_basis.h"
#include "server/index/selector.h"
#include "server/index/token_select.h"

namespace icecache {

// Called by Selector::Create for kMdci and kExactMdci with a validated
// config. Returns null only for a config it cannot serve (never after
// Selector::Create's validation).
std::unique_ptr<Selector> NewMdciSelector(const SelectorConfig& config, const PageKeys* keys);

class MdciSelector : public Selector {
 public:
  // InvalidArgument for a bad config (as Selector::Create) or null keys.
  static absl::StatusOr<std::unique_ptr<MdciSelector>> Create(const SelectorConfig& config,
                                                              const PageKeys* keys);

  SelectorKind kind() const override { return config_.kind; }
  absl::Status Build(const float* keys, int64_t n, std::vector<Placement>* placements) override;
  absl::Status Insert(const float* keys, int64_t n, std::vector<Placement>* placements) override;
  absl::Status Select(const float* queries, int num_queries, const SelectParams& params,
                      Selection* out) const override;
  int64_t num_tokens() const override { return tree_->num_tokens(); }
  uint32_t num_pages() const override { return tree_->page_table().num_pages(); }
  uint32_t fill(uint32_t page) const override { return tree_->page_table().fill(page); }
  const int32_t* positions(uint32_t page) const override {
    return tree_->page_table().positions(page);
  }
  // The tree, the scoring sketch when MdciParams::sketch_scoring, the
  // product-quantised codes when MdciParams::pq_factor > 0.
  size_t index_bytes() const override {
    return tree_->bytes() + (sketch_ != nullptr ? sketch_->bytes() : 0) +
           (pq_ != nullptr ? pq_->bytes() : 0);
  }
  InsertCounts insert_counts() const override {
    return {tree_->inserted_keys(), tree_->fit_inserts()};
  }
  Placement placement_of(int32_t position) const override;
  void placements_of(int32_t first, int32_t count, Placement* out) const override;
  bool has_image() const override { return true; }
  // The image body (after Selector's header) read back; statuses as
  // Selector::LoadImage.
  static absl::StatusOr<std::unique_ptr<MdciSelector>> LoadImage(const SelectorConfig& config,
                                                                 const PageKeys* keys,
                                                                 ByteReader* r, int64_t tokens);

  // Background rebuild of the MIPS bound and representatives (tokens never
  // move): NeedsRebuild() when more than rebuild_fraction of the keys exceed
  // the bound; PrepareRebuild() under a reader lock (reads every key through
  // PageKeys); CommitRebuild() under the writer lock, FailedPrecondition when
  // tokens were added in between (prepare again).
  bool NeedsRebuild() const { return tree_->NeedsRebuild(); }
  absl::StatusOr<std::unique_ptr<DciTreeRebuild>> PrepareRebuild() const;
  absl::Status CommitRebuild(std::unique_ptr<DciTreeRebuild> rebuild);

  // Every page's exact group mass for these queries (sum over the queries of
  // each one's softmax share of the page), indexed by page: the exact
  // reference of the width calibrator (a full scan). InvalidArgument for
  // bad queries (as Select).
  //
  // `yield` (optional) runs between chunks of kScanChunkPages pages, and
  // may let appends in (the caller's locks released and taken again, so
  // the scan never holds them longer than a chunk): the scan covers the
  // pages there were when it started, each chunk as it is when scored (a
  // page's rows are never rewritten, only new ones added). False from it
  // stops the scan (Aborted).
  absl::Status ExactPageMasses(const float* queries, int num_queries, std::vector<float>* mass,
                               const std::function<bool()>& yield = {}) const;

  // Every token's exact group share (sum over the queries of each one's
  // softmax share), indexed by position, for the tokens there were when the
  // scan started: the width calibrator's reference at token granularity
  // (a full scan). InvalidArgument for bad queries; `yield` as above.
  absl::Status ExactTokenShares(const float* queries, int num_queries, std::vector<float>* share,
                                const std::function<bool()>& yield = {}) const;
  // Pages per chunk of the exact scans (between two calls of `yield`).
  static constexpr uint32_t kScanChunkPages = 256;

  const DciTree& tree() const { return *tree_; }
  // The product quantiser (null without one) and its query basis learner
  // (null without one; tests and reports).
  const PqSketch* pq_sketch() const { return pq_.get(); }
  const QueryBasis* query_basis() const { return query_basis_.get(); }
  double mean_page_fill() const { return tree_->page_table().MeanFill(); }

 private:
  MdciSelector(const SelectorConfig& config, const PageKeys* keys, std::unique_ptr<DciTree> tree)
      : Selector(config), keys_(keys), tree_(std::move(tree)) {
    if (config.kind == SelectorKind::kMdci && config.mdci.sketch_scoring) {
      sketch_ = std::make_unique<PageSketch>(config.head_dim, config.page_tokens);
    }
    if (config.kind == SelectorKind::kMdci && config.mdci.pq_factor > 0.0f &&
        PqSketch::Supports(config.head_dim)) {
      pq_ = std::make_unique<PqSketch>(config.head_dim, config.page_tokens);
      if (config.mdci.query_basis) {
        query_basis_ = std::make_unique<QueryBasis>(config.head_dim, PqSketch::kBasis);
      }
    }
  }

  void SaveImageBody(ByteWriter* w) const override;
  // The tree parameters of a validated config.
  static DciTreeParams TreeParams(const SelectorConfig& config);
  // Per-thread scratch: the descent's candidate pages (mdci), ascending ids.
  void CollectCandidatePages(const float* queries, int num_queries, const SelectParams& params,
                             uint64_t* touched) const;
  // MdciParams::pq_factor: the candidate pages from a full scan of the
  // product-quantised codes (the best pq_factor x budget tokens' worth of
  // pages by estimated group mass, and the `forced` pages; ascending ids)
  // and each query's estimated
  // rest and candidates' mass (as the descent's), into the thread's scratch.
  void CollectPqCandidatePages(const float* queries, int num_queries, const SelectParams& params,
                               const std::vector<uint32_t>& forced, uint64_t* touched) const;
  // MdciParams::calibrated_rest: the descent's rest per query, corrected by
  // its error on the scored candidates, into the thread's scratch.
  void CalibrateRest(int num_queries) const;
  // Candidate carry-over (SelectParams::carry): the fresh select's
  // candidates and rest into `carry`; or, when `carry` was recorded for
  // these parameters and may still be reused, its candidates (with the
  // forced pages of now when the scan collected them) and rest into the
  // scratch, returning true.
  void Record(const SelectParams& params, int num_queries, bool scan, CandidateCarry* carry) const;
  bool TakeCarried(const SelectParams& params, int num_queries, bool scan,
                   const std::vector<uint32_t>& forced, CandidateCarry* carry) const;
  // After a fresh select recorded into `carry`, scored its candidates (the
  // scratch's scored pages, log-masses and normalisers; `rest` the rest it
  // used, per query) and took `taken`: keeps only the forced pages, the
  // pages of taken's tokens (token granularity) and the best others up to
  // MdciParams::carry_keep_factor x budget tokens' worth of pages, by group
  // share (page granularity, `bound` null) or by `bound` (per scored page:
  // token granularity's bound). The dropped pages' exact mass moves into
  // the carried rest; the carried estimate becomes the kept pages' exact
  // mass.
  void TrimCarry(const SelectParams& params, int num_queries, const float* rest,
                 const std::vector<uint32_t>& forced, const float* bound, const Selection& taken,
                 CandidateCarry* carry) const;
  // The exact scans' pass: ScorePages over pages [0, pages) in chunks of
  // kScanChunkPages, `yield` between them; `keep` as ScorePages'.
  absl::Status ScanAllPages(const float* queries, int num_queries, TokenCandidates* keep,
                            uint32_t pages, const std::function<bool()>& yield) const;
  // Exact per-query log-mass of `pages` into the per-thread scratch; with
  // `keep`, each page's logits are kept there too (ExactTokenShares); with
  // `sketch`, from the scoring sketch (approximate; not with `keep`); with
  // `max_logits`, each scored page's largest scaled logit per query too (the
  // bound of token granularity, TakeTokensBounded).
  void ScorePages(const uint32_t* pages, size_t n, const float* queries, int num_queries,
                  bool sketch, uint64_t* touched, TokenCandidates* keep,
                  bool max_logits = false) const;

  const PageKeys* keys_;
  std::unique_ptr<DciTree> tree_;
  std::unique_ptr<PageSketch> sketch_;  // MdciParams::sketch_scoring (kMdci only)
  std::unique_ptr<PqSketch> pq_;        // MdciParams::pq_factor > 0 (kMdci only)
  // With pq_ and MdciParams::query_basis: learns the sketch's query basis
  // from the queries Select sees.
  std::unique_ptr<QueryBasis> query_basis_;
  // Fits and installs the query basis when one is due: from a Select (a
  // reader: the frames stay put), one at a time (a select that finds
  // another installing goes on without waiting); PqSketch::SetBasis
  // publishes it whole to the scans running beside it.
  void InstallQueryBasis() const;
  void InstallQueryBasisLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(install_mu_);
  mutable absl::Mutex install_mu_;
};

}  // namespace icecache

#endif  // ICECACHE_SERVER_INDEX_MDCI_SELECTOR_H_
