// The page-selection interface shared by every selector (mdci, exact,
// exact-mdci, quest, streaming) for one (layer group, KV head).
//
// A selector owns a page LAYOUT (which token sits in which page and slot) and
// a SELECTION policy over it. It does not own the KV bytes: whoever owns the
// frames (a session's pool frames, or OwnedPageKeys in tests and benchmarks)
// writes each token's K and V where the returned Placement says, and gives the
// selector read access to the keys of each page through PageKeys.
//
// Thread safety: Select() is const and safe to call concurrently with other
// Select() calls. Build() and Insert() need exclusive access (the caller
// holds a writer lock), as in FAISS.
#ifndef ICECACHE_SERVER_INDEX_SELECTOR_H_
#define ICECACHE_SERVER_INDEX_SELECTOR_H_

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/dtype.h"
#include "server/index/baseline_params.h"

namespace icecache {

class ByteReader;
class ByteWriter;

// Where one token landed: page id (dense, 0..num_pages()-1, never reused
// within a selector) and slot within that page (0..page_tokens-1).
struct Placement {
  uint32_t page = 0;
  uint32_t slot = 0;
};

// Read access to the keys of a page: page_tokens x head_dim values of the
// configured dtype, row-major, slot-ordered; only the first fill(page) rows
// are meaningful. Implemented by the owner of the frames.
class PageKeys {
 public:
  virtual ~PageKeys() = default;
  virtual const void* page_keys(uint32_t page) const = 0;
};

enum class SelectorKind {
  kMdci,       // DCI-tree semantic layout, tree-guided selection
  kExactMdci,  // mdci layout, exact scores of every page (best on that layout)
  kExact,      // positional pages, exact scores of every page
  kQuest,      // positional pages, per-page min/max bound
  kStreaming,  // positional pages, sinks + recent only
  // Baselines from the literature (docs/architecture.md §3.9), all on
  // positional pages:
  kArkvale,        // per-page bounding box, upper bound of q.k, GQA group score
  kPqcache,        // product-quantised keys, exact rescoring of the best tokens
  kSnapkv,         // observation-window votes with pooling, fixed at prefill
  kOmnikv,         // full attention on a filter layer; other layers reuse it
  kMagicpig,       // SimHash LSH sampling (K x L tables); pages of the samples
  kMdciPublished,  // the published prioritized DCI query, top-k keys to pages
};
std::string_view SelectorKindName(SelectorKind kind);
absl::StatusOr<SelectorKind> ParseSelectorKind(std::string_view name);
// True for the kinds whose pages hold positions in order (token t in page
// t / page_tokens): every kind but mdci and exact-mdci.
bool UsesPositionalLayout(SelectorKind kind);

// Parameters of the multi-level DCI index (docs/architecture.md §3.3).
struct MdciParams {
  int num_composite = 2;  // m
  int num_simple = 7;     // L
  // Nodes kept per level above level 1 while descending (at least; more while
  // they hold fewer than cover_factor x candidate tokens). Wider = more
  // representatives scored, more mass. Tuned on llama3-8b-like, 131072 tokens,
  // 4 heads, page 16, cold step-major queries (docs/bench/README.md): fov 32
  // gives 12x the exact scan's speed at 0.962 of exact-mdci's mass; fov 48,
  // 10.9x at 0.967; fov 96, 9.6x at 0.975.
  int field_of_view = 32;
  // Candidate tokens scored exactly per query, as a multiple of the budget
  // (whole logical nodes, best estimated first). The main time/mass knob:
  // 8 x 256 = 2048 keys = 1.6% of 131072 (see mdci_selector.h for figures).
  float candidate_factor = 8.0f;
  float norm_headroom = 1.5f;  // M = headroom x max prefill key norm
  // Fraction of keys above the norm bound that triggers a rebuild.
  float rebuild_fraction = 0.02f;
  uint64_t seed = 1234;
  // --- DCI-tree knobs added by mdci (see server/index/mdci_selector.h) ---
  int promotion_ratio = 0;  // r; 0 = max(2, page_tokens) (one full page per logical node)
  int route_fov = 3;        // nodes kept per level when routing a key (build, insert)
  // Nodes kept per level when a decode append routes its key (Insert); 0 =
  // route_fov. 1 (greedy) inserts in 0.6x the time (0.8x cold) but loses
  // attention mass on decode-time needles, so it is not the default
  // (docs/bench/greedy54.md).
  int insert_route_fov = 0;
  // > 0: a decode key that fits the nearest recent node with room (squared
  // distance within this factor of the node's spread) joins it without being
  // routed from the top of the tree (DciTreeParams::insert_fit). At 2, 78% of
  // the llama3-8b-like generator's decode keys skip routing: a cold append
  // in 0.8x the time, the same attention mass on every synthetic family
  // (docs/bench/fit56.md). 0: every key routed (what a snapshot written
  // before this option restores to).
  float insert_fit = 2.0f;
  int build_candidates = 8;  // parents considered per key by the capacity-aware bulk build
  int refine_iters = 0;      // bulk build: level-0 re-assignments against full centroids
  // Upper levels keep nodes (beyond field_of_view) until they hold
  // cover_factor x candidate tokens.
  float cover_factor = 2.0f;
  int entry_nodes = 1024;      // descent starts at the lowest level with <= this many nodes
  float spread_weight = 1.0f;  // weight of a node's key spread in its estimated mass
  // true: each query's estimated mass outside the candidates (the rest of
  // its page-score normaliser) is corrected by the estimate's error on the
  // candidates themselves, which are scored exactly anyway: rest x (exact /
  // estimated mass of the returned nodes), a ratio estimator. false: the
  // descent's estimate as it is.
  bool calibrated_rest = true;
  // true: the descent ranks nodes by the sum of each query's estimated
  // softmax share (meant to serve every query head of the group); false: by
  // the loudest query. Off: measured worse (icecache-bench select, 16384
  // tokens, 4 heads, 16 steps: llama3-8b-like mdci mass 0.5404 vs 0.5558,
  // gqa-divergent 0.4804 vs 0.5418), the estimated normalisers mislead.
  bool normalized_descent = false;
  // true: every query of the group gets an equal share of the nodes the
  // descent keeps, from its own ranking (DciDescentParams::query_quotas).
  bool query_quotas = false;
  int spread_rank = 16;  // key subspace in which nodes keep their spread (>= 0)
  // > 0: pages group similar keys only within windows of this many positions.
  int locality_window = 4096;
  bool augmented_routing = false;  // parents by MIPS-augmented (true) or plain L2 distance
  int min_candidate_pages = 32;    // exact-scored pages per query at least (small budgets)
  // Insert (with a locality window): a recent node with room in its last page
  // takes a decode key when its squared distance is within this factor of the
  // nearest node's (larger: fuller pages, looser nodes). >= 1.
  float decode_slack = 1.5f;
  // true: mdci ranks its candidate pages (page granularity) from an int8
  // copy of the keys it keeps itself (PageSketch: d + 4 bytes per token,
  // rebuilt from the frames after a warm restart) instead of the fp16
  // frames: half the bytes per candidate key, approximate page scores. The
  // exact references (exact-mdci, exhaustive selects, ExactPageMasses) and
  // token granularity read the frames as before.
  bool sketch_scoring = false;
  // > 0: mdci keeps a 4-bit product-quantised copy of the keys (PqSketch:
  // the directions' codes and an fp16 norm, head_dim / 8 + 2 bytes per
  // token; head_dim a multiple of 8) and selects by scanning it in full instead of descending the
  // tree: the pages holding the most estimated group mass, pq_factor x budget tokens' worth of
  // them, are scored exactly from the frames and the best taken. The layout (the tree's pages) is
  // unchanged, and so are the exact references and exhaustive selects. 0: off (the tree's descent).
  // The core's default is off; the daemon's sessions get kDefaultPqFactor
  // unless they ask otherwise (types.proto MdciParams.pq_factor).
  float pq_factor = 0.0f;
  // With pq_factor > 0: learn where the queries live (QueryBasis: the top
  // PqSketch::kBasis directions of the queries seen, fitted after the first
  // 8 to 39 selects (QueryBasis: staggered per head) and again when the
  // queries drift) and
  // score the queries' part there exactly in the scan (PqSketch::SetBasis;
  // docs/bench/basis46.md). false: the codes alone.
  bool query_basis = true;
  // Candidate carry-over (SelectParams::carry): a fresh select keeps for
  // the carried selects after it only the best carry_keep_factor x budget
  // tokens' worth of its candidate pages (at least min_candidate_pages), by
  // that select's exact group scores, and the forced pages; the mass of the
  // pages it drops joins each query's rest. A carried select then reads
  // that many pages, whatever width the fresh one scanned at. 0: every
  // candidate is carried. (The best 1024 tokens of a step hold the next
  // step's best 256: docs/bench/carry36.md, docs/bench/trim37.md.)
  float carry_keep_factor = 4.0f;

  // The daemon's pq_factor for an MDCI session that leaves it unset, where
  // PqFactorSupported (docs/bench/pq34_default.md: at 32768 tokens x 32
  // layers with the quality monitor, the duel against the tree alone).
  static constexpr float kDefaultPqFactor = 8.0f;
  // What the codes can take (ValidateConfig refuses pq_factor > 0 outside
  // it): PqSketch::Supports' head dims (a positive multiple of 8) and at
  // most PqSketch::kMaxQueries query heads per KV head.
  static bool PqFactorSupported(int head_dim, int query_heads_per_kv_head) {
    return head_dim >= 8 && head_dim % 8 == 0 && query_heads_per_kv_head <= 64;
  }
  // The pq_factor the daemon gives an MDCI session of this shape that
  // leaves it unset: kDefaultPqFactor where supported, else 0.
  static float DaemonPqFactor(int head_dim, int query_heads_per_kv_head) {
    return PqFactorSupported(head_dim, query_heads_per_kv_head) ? kDefaultPqFactor : 0.0f;
  }
};

struct SelectorConfig {
  SelectorKind kind = SelectorKind::kMdci;
  int head_dim = 128;
  DType dtype = DType::kF16;  // dtype of the keys behind PageKeys
  int page_tokens = 16;       // >= 1, <= 256
  int num_query_heads = 4;    // G query heads per KV head (GQA)
  MdciParams mdci;
  // kQuest only: 0 = plain Quest (pages ranked by their min/max bound). F > 0:
  // the top F x budget tokens' worth of pages by bound are rescored exactly
  // (PageMassScore) and the selection is taken from them. >= 0, finite.
  float quest_rescore_factor = 0.0f;
  // The baselines' knobs (baseline_params.h); each kind reads its own.
  BaselineParams baseline;
};

// Unit of selection (docs/architecture.md §3.6). kPage: whole pages of the
// layout, as a page-based engine consumes them. kToken: the layout's pages
// are only candidates; their keys are scored per token and the budget is
// filled with the best tokens, packed in order into slots of page_tokens.
enum class Granularity {
  kPage,
  kToken,
};
std::string_view GranularityName(Granularity granularity);
// "page" or "token"; InvalidArgument naming the value otherwise.
absl::StatusOr<Granularity> ParseGranularity(std::string_view name);

// Per-call selection parameters.
// How the mdci descent ranks the tree's nodes for a group of queries
// (MdciParams::normalized_descent): kSelector = as the selector was
// configured; kLoudest = by the query with the largest estimated logit;
// kNormalized = by the sum of each query's estimated softmax share. Neither
// is best on every head (docs/bench/front7_descent_rankings_131072.md), so
// the width calibrator can try the other one on its sampled steps.
enum class DescentRanking : uint8_t { kSelector = 0, kLoudest = 1, kNormalized = 2 };

// "selector", "loudest", "normalized".
std::string_view DescentRankingName(DescentRanking r);

// How mdci finds its candidate pages for one call: the selector's own way
// (the scan when MdciParams::pq_factor > 0, else the tree), the tree's
// descent, or the product-quantised scan (the tree when the selector keeps
// no codes). The width calibrator's method duel sets it per head.
enum class SearchMethod : uint8_t { kSelector = 0, kTree = 1, kScan = 2 };

// "selector", "tree", "scan".
std::string_view SearchMethodName(SearchMethod m);

// Candidate carry-over across decode steps (mdci; docs/architecture.md
// §3.4). A head's query moves little from one decode step to the next (the
// exact best 2048 tokens of step t hold the best 256 of step t + 1:
// docs/bench/carry36.md), so the pages a fresh select found worth scoring
// exactly are still the pages to score at the next steps. A fresh select
// (the PQ scan or the tree's descent) records its candidate pages and its
// estimate of each query's mass outside them here; up to
// SelectParams::carry_steps selects after it score those pages (and the
// forced ones of now) exactly for their own queries, skipping the scan or
// the descent, and take the budget from them. Each query's mass outside is
// carried as its ratio to the candidates' mass (CalibrateRest). The owner
// (one per head and caller, e.g. Session) keeps it between calls and must
// not share it between concurrent selects.
struct CandidateCarry {
  // What the candidates were collected for; a select with other parameters
  // (the calibrator changed the width or the method), queries or selector
  // collects afresh.
  const void* selector = nullptr;
  int num_queries = 0;
  int budget_tokens = 0;
  int field_of_view = 0;
  float candidate_factor = 0.0f;
  float pq_factor = 0.0f;
  uint8_t ranking = 0;
  uint8_t method = 0;
  bool scan = false;  // collected by the PQ scan (which scores the forced pages too)
  bool valid = false;
  int age = 0;  // selects that reused them since the fresh one
  // The stagger: the owner's fresh selects fall where (selects + phase) %
  // (carry_steps + 1) == 0 (a record's end comes sooner; a width change
  // still collects afresh at once), so heads given phases 0, 1, .. in turn
  // are not all fresh on one step. In phase, a layer's heads cost twice as
  // much on every other step at carry_steps 1, its wall time is that of
  // the fresh steps, and the carry saves next to nothing of a decode step
  // (docs/bench/stagger38.md).
  int phase = 0;
  int64_t selects = 0;  // selects offered this carry (fresh or carried)
  std::vector<uint32_t> candidates;
  std::vector<float> rest, taken_est;  // per query: log mass outside / estimated inside

  void Clear() {
    valid = false;
    age = 0;
  }
};

struct SelectParams {
  int budget_tokens = 256;  // > 0; pages are taken until this many tokens
  int sink_tokens = 4;      // pages holding positions [0, sink) always included
  int recent_tokens = 0;    // pages holding the last `recent` positions always included
  bool want_positions = false;
  // mdci width for this call (the width calibrator's overrides); 0 = the
  // selector's MdciParams. >= 0.
  int field_of_view = 0;
  float candidate_factor = 0.0f;
  Granularity granularity = Granularity::kPage;
  // mdci: score every page exactly instead of descending the tree (the
  // width calibrator's exact fallback: what exact-mdci selects, on this
  // selector's layout); the width fields are then unused. Other selectors
  // ignore it.
  bool exhaustive = false;
  // mdci: the descent's ranking for this call (the width calibrator's
  // choice); other selectors ignore it.
  DescentRanking ranking = DescentRanking::kSelector;
  // mdci with MdciParams::pq_factor > 0: the factor for this call (0 = the
  // selector's). >= 0. Other selectors ignore it.
  float pq_factor = 0.0f;
  // mdci: the tree or the scan for this call (the width calibrator's method
  // duel); other selectors ignore it.
  SearchMethod method = SearchMethod::kSelector;
  // mdci: the head's candidate carry-over (null: every select collects its
  // candidates afresh) and how many selects may reuse one fresh select's
  // candidates before the next fresh one (0: none). Exhaustive selects
  // neither use nor record it. Other selectors ignore both.
  CandidateCarry* carry = nullptr;
  int carry_steps = 0;
};

// Result of one selection, in descending score order (sink/recent pages
// included; their score is +inf when they were forced in).
//
// Token granularity: `pages` is empty; `token_refs` lists the selected tokens
// (forced ones first, ascending position, then by descending score), at most
// one per position, min(budget, tokens) of them unless the forced ones alone
// exceed the budget; they are packed in that order into slots of page_tokens
// rows: fills[i] tokens in slot i (all full but the last). `scores` has one
// entry per token (the sum over the queries of each one's softmax share;
// +inf when forced) and `positions` always holds each token's position.
struct Selection {
  std::vector<uint32_t> pages;
  std::vector<uint32_t> fills;
  std::vector<float> scores;
  // When requested (always at token granularity): fills[i] positions per
  // page (slot), concatenated in page (slot) order.
  std::vector<int32_t> positions;
  std::vector<Placement> token_refs;  // token granularity only (else empty)
  // Cost: exact dot products plus projections/representatives visited.
  uint64_t keys_touched = 0;
  // mdci: the candidates came from SelectParams::carry, not a fresh scan or
  // descent; carry_age: the how-manieth select reusing them (0: fresh).
  bool carried = false;
  int carry_age = 0;
  // Thread CPU this select spent on index upkeep that the selects after it
  // do not pay (mdci: fitting and installing a query basis, 1-5 ms per head).
  // Callers that time selects for the width calibrator leave it out, so
  // that one install does not decide a duel or a width's cost.
  int64_t upkeep_cpu_ns = 0;
  int64_t tokens() const;
  void Clear();
};

class Selector {
 public:
  virtual ~Selector() = default;

  // Returns InvalidArgument for a bad config (head_dim < 1 or > 1024,
  // page_tokens < 1 or > 256, num_query_heads < 1, unknown dtype).
  static absl::StatusOr<std::unique_ptr<Selector>> Create(const SelectorConfig& config,
                                                          const PageKeys* keys);

  virtual SelectorKind kind() const = 0;
  const SelectorConfig& config() const { return config_; }

  // Lays out `n` new keys (fp32, n x head_dim, row-major) with positions
  // [num_tokens(), num_tokens()+n). Build() is the bulk path for a prefill
  // batch (only valid while num_tokens() == 0); Insert() the incremental
  // path for decode chunks. On success `placements` holds n entries.
  // InvalidArgument on NaN/Inf or n <= 0; FailedPrecondition for Build() on
  // a non-empty index. On error nothing changes.
  virtual absl::Status Build(const float* keys, int64_t n, std::vector<Placement>* placements) = 0;
  virtual absl::Status Insert(const float* keys, int64_t n, std::vector<Placement>* placements) = 0;
  // For a caller that refuses non-finite keys before they reach the index
  // (the session's append checks the raw bytes, all of them, before it
  // converts a key: docs/architecture.md §5): Build and Insert then skip
  // their own scan of the fp32 keys for NaN/Inf, 4-5 ms of a 32768-token
  // tree. Every other check stays. Off by default.
  void set_keys_prechecked(bool on) { keys_prechecked_ = on; }
  bool keys_prechecked() const { return keys_prechecked_; }

  // Selects pages for `num_queries` queries (fp32, num_queries x head_dim),
  // normally the G query heads of this KV head; a page's score is the sum over
  // the queries of each one's softmax share of the page (GroupPageScore in
  // page_select.h; quest and streaming keep their own bounds). InvalidArgument on NaN/Inf queries,
  // num_queries < 1, budget <= 0 or budget > num_tokens(); FailedPrecondition on an empty index.
  virtual absl::Status Select(const float* queries, int num_queries, const SelectParams& params,
                              Selection* out) const = 0;

  virtual int64_t num_tokens() const = 0;
  virtual uint32_t num_pages() const = 0;
  virtual uint32_t fill(uint32_t page) const = 0;
  // Positions of the first fill(page) slots of `page`.
  virtual const int32_t* positions(uint32_t page) const = 0;
  // Where the token at `position` (0 <= position < num_tokens()) sits. The
  // default scans every page; layouts with a position map override it.
  virtual Placement placement_of(int32_t position) const;
  // placement_of for positions first..first + count - 1, into out[0, count).
  // The default asks placement_of for each; a layout whose lookups miss the
  // cache overrides it to overlap them (a selection's forced tokens).
  virtual void placements_of(int32_t first, int32_t count, Placement* out) const;
  // Bytes held by the index structures (excluding the KV bytes behind PageKeys).
  virtual size_t index_bytes() const = 0;
  // Decode keys a tree placed one at a time (after its build) and, of them,
  // those that joined a recent node without being routed from the top
  // (MdciParams::insert_fit), since the selector was built or loaded. Zeros
  // for the kinds without a tree.
  struct InsertCounts {
    uint64_t inserted = 0;
    uint64_t unrouted = 0;
  };
  virtual InsertCounts insert_counts() const { return {}; }

  // Index image (docs/architecture.md §5, warm restart): the selector's
  // whole state as bytes (not the keys: they stay behind PageKeys), so a
  // restarted daemon loads it instead of replaying every append. Header:
  // "ICEIDXIM", u32 kImageFormat, u32 kind, then the kind's own body (mdci,
  // exact-mdci: DciTree::SaveImage, with its algorithm version and build
  // parameters). Appends to `out`. Unimplemented for the kinds that keep no
  // image (has_image() false); FailedPrecondition for an empty index.
  static constexpr uint32_t kImageFormat = 1;
  virtual bool has_image() const { return false; }
  absl::Status SaveImage(std::string* out) const;
  // The selector an image holds, reading its keys through `keys` (the
  // frames the saved one read); it must hold exactly `tokens` tokens (the
  // caller knows: a snapshot records them), checked before anything is
  // sized by the image's count. InvalidArgument for a bad config (as
  // Create); FailedPrecondition when the image is of another format, kind,
  // algorithm or parameters than `config`; DataLoss naming what is wrong
  // when it is truncated or inconsistent (any bytes are survived: sizes are
  // checked before any allocation); Unimplemented for a kind without images.
  static absl::StatusOr<std::unique_ptr<Selector>> LoadImage(const SelectorConfig& config,
                                                             const PageKeys* keys,
                                                             std::string_view image,
                                                             int64_t tokens);

 protected:
  explicit Selector(const SelectorConfig& config) : config_(config) {}
  // The kind's body of the image (called only when has_image()).
  virtual void SaveImageBody(ByteWriter* w) const;
  SelectorConfig config_;
  bool keys_prechecked_ = false;
};

}  // namespace icecache

#endif  // ICECACHE_SERVER_INDEX_SELECTOR_H_
