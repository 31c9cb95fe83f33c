// The multi-level DCI-tree of one KV head (docs/architecture.md, the index)
// and its page layout. Levels: level 0 holds every key; a key on level l >= 1 is also a
// node whose children live on level l-1 (a key on level l is its own child
// on level l-1); every node below the top level has a parent on level l+1.
// Promotion is deterministic: a new key goes up from level l whenever the
// count on level l reaches r x (count on level l+1 + 1) (the very first key
// always opens level 1), so the tree stays balanced while it grows.
//
// A level-1 node and its children form a logical node, stored in one or more
// pages (DciPageTable). Every node keeps a representative: the centroid of
// the keys below it (and their MIPS coordinate, mean squared norm, count).
// Parents are nearest neighbours in the MIPS-augmented space (mips.h), found
// by descending the tree with a small field of view.
//
// Bulk build (a prefill batch) assigns parents level by level from the top
// with a capacity of r children per node, so logical nodes fill exactly one
// page when r == page_tokens (balanced, full pages), then refines the level-0
// assignment against the full centroids. Insert (decode chunks) routes each
// key to its nearest node and appends it to that node's last page.
//
// Selection support: CollectCandidates() descends with the G queries from an
// entry level, scoring node representatives by their estimated attention
// mass, and returns the most promising logical nodes.
//
// Files: dci_tree.cc (creation, routing, insert), dci_tree_build.cc (bulk
// build: capacity-aware assignment, depth-first renumbering),
// dci_tree_descent.cc (candidate collection), dci_tree_rebuild.cc (rebuild of
// the MIPS bound and representatives); dci_node_reps.h (the representatives
// of a level, shared with the rebuild), dci_key_subspace.h (PCA subspace).
//
// Thread safety: const methods may run concurrently; BulkBuild(), Insert()
// and CommitRebuild() need exclusive access (the selector's writer lock).
#ifndef ICECACHE_SERVER_INDEX_DCI_TREE_H_
#define ICECACHE_SERVER_INDEX_DCI_TREE_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/dtype.h"
#include "server/index/dci_key_subspace.h"
#include "server/index/dci_node_reps.h"
#include "server/index/dci_page_table.h"
#include "server/index/mips.h"
#include "server/index/selector.h"

namespace icecache {

class ByteReader;
class ByteWriter;

struct DciTreeParams {
  int dim = 128;
  int page_tokens = 16;
  int ratio = 0;  // promotion ratio r; 0 = max(2, page_tokens)
  float norm_headroom = 1.5f;
  float rebuild_fraction = 0.02f;
  int route_fov = 3;         // nodes kept per level when routing a key (build, insert)
  int build_candidates = 8;  // parents considered per key by the capacity-aware bulk assignment
  int refine_iters = 0;      // bulk: level-0 re-assignments against full centroids
  // Rank of the global key subspace (PCA of the first batch) in which every
  // node keeps the variance of its keys, for its attention-mass estimate.
  int spread_rank = 16;
  // > 0: a key's logical node is chosen among the level-1 nodes whose key
  // lies in the same window of this many positions (semantic pages that stay
  // local in position); 0: among all (global semantic clustering).
  int locality_window = 4096;
  // true: parents are nearest in the MIPS-augmented space [k, a(k)];
  // false: nearest in plain Euclidean key space (measured to give pages with
  // more attention mass on the synthetic llama3-8b-like data).
  bool augmented_routing = false;
  // Insert with a locality window: a recent node with room takes a key when
  // its squared distance is within this factor of the nearest node's.
  float decode_slack = 1.5f;
  // Nodes kept per level when Insert routes a key (decode appends); 0 =
  // route_fov (the bulk build always keeps route_fov). Not in the index
  // image: a loaded tree inserts with its loader's value (the session's
  // config, which a snapshot keeps).
  int insert_route_fov = 0;
  // > 0 (with a locality window): before routing a decode key from the top,
  // Insert tries the nearest recent node with room; the key joins it without
  // routing when its squared distance to the node's centroid is within this
  // factor of the node's own spread (its members' mean squared distance to
  // the centroid, m2 - c2). 0: every decode key is routed. Not in the index
  // image (like insert_route_fov).
  float insert_fit = 0.0f;
  uint64_t seed = 1234;
};

// Parameters of one candidate descent (see MdciParams for the meaning).
struct DciDescentParams {
  int field_of_view = 8;      // nodes kept per level above level 1 (at least)
  int64_t min_tokens = 1024;  // level-1 nodes are taken until they hold this many tokens
  float cover_factor = 2.0f;  // upper levels keep nodes until they hold cover x min_tokens
  int entry_nodes = 1024;     // descent starts at the lowest level with <= this many nodes
  // Weight of the node's key spread in its mass estimate: a node's keys are
  // modelled as Gaussian around the centroid, so its mass is estimated as
  // count x exp(s q.c + w s^2 q'Sq / 2), with S its covariance (kept in the
  // spread_rank-dim key subspace plus an isotropic residual).
  float spread_weight = 1.0f;
  // true: a node is ranked by the sum over the queries of its estimated
  // share of each query's softmax mass (each query's estimate normalised by
  // its estimated total over the entry level), so every query head of the
  // group is served; false: by the max over the queries of the unnormalised
  // estimate (the loudest query decides).
  bool normalized = false;
  // true: each of the G queries gets an equal share of the nodes kept on
  // every level, taken in turn from its own ranking of the nodes (by its own
  // estimate), so a query that disagrees with the loudest one still gets
  // its best nodes; false: one ranking for the group (see `normalized`).
  bool query_quotas = false;
};

// Reusable per-thread buffers of CollectCandidates (no allocation once warm).
// Per-candidate arrays are indexed by the candidate's place i in `cand`;
// per-query ones by the query j; "nq x nc" arrays hold query j's values for
// every candidate at [j * nc, (j + 1) * nc).
struct DciScratch {
  std::vector<uint32_t> cand;    // candidate node ids on the current level, ascending
  std::vector<uint32_t> next;    // nodes kept on this level, then the next level's candidates
  std::vector<uint32_t> kept;    // kept nodes in node id order (ExpandChildren)
  std::vector<float> dots;       // nq x nc: query . node centroid
  std::vector<float> vars;       // nq x nc: q'(lam)q, logit variance inside the key subspace
  std::vector<float> run_dots;   // one run of sibling rows' dots before they are scattered
  std::vector<float> head_keys;  // plain copy of the scores, for threshold selection
  // The ranked head's selection (RankHead, SortHead): (order key, place)
  // records and their radix sort's second buffer, the places not kept, the
  // result.
  std::vector<uint64_t> head_recs;
  std::vector<uint16_t> head_bucket;  // nc: each score's bucket (RankHead)
  std::vector<uint32_t> head_rest;
  std::vector<std::pair<float, uint32_t>> head_out;
  std::vector<float> node_logc;  // nc: log(node key count)
  std::vector<float> node_res;   // nc: the node's residual variance per dimension
  std::vector<float> est;        // nq x nc: estimated log-mass of each candidate per query
  std::vector<float> best;       // nc: the candidate's rank key (DciDescentParams::normalized)
  std::vector<float> qlog_norm;  // nq: estimated log-mass of all keys per query (entry level;
                                 // DciDescentParams::normalized only)
  std::vector<std::pair<float, uint32_t>> scored;  // (rank key, index into cand), ranked head
  std::vector<float> qnorm2;                       // nq: squared query norm
  std::vector<float> qproj;                        // nq x rank: squared projections of the queries
  std::vector<float> qres;        // nq: squared query norm outside the key subspace
  std::vector<float> taken_mask;  // nc: -inf for the candidates taken, 0 for the others
  std::vector<float> row;         // nc: one query's estimates of the candidates not taken
  // query_quotas: per query, (estimate, candidate index) ranked head; the
  // sorted prefix and cursor of each; candidates taken (by index).
  std::vector<std::vector<std::pair<float, uint32_t>>> qscored;
  std::vector<size_t> qsorted, qcursor, qchunk;
  std::vector<uint8_t> taken_flag;
  // Output, nq: log of the estimated mass, per query, of every key under a
  // node the descent did not take (the mass outside the returned nodes).
  std::vector<float> rest;
  // Output, nq: log of the estimated mass, per query, of the returned nodes
  // (the same estimate; against their exact mass it measures the
  // estimate's error on this step, MdciParams::calibrated_rest).
  std::vector<float> taken_est;
};

// The rebuilt search structure, prepared off the writer lock by
// DciTree::PrepareRebuild and swapped in by CommitRebuild. Opaque to callers.
struct DciTreeRebuild {
  MipsAugmentation mips;
  int64_t num_tokens = 0;
  std::vector<DciNodeReps> levels;  // per level (index 0 unused): the node representatives
};

class DciTree {
 public:
  static constexpr uint32_t kNone = UINT32_MAX;
  struct ChildRun {
    uint32_t first = 0;
    uint32_t count = 0;
  };

  // InvalidArgument for dim outside [1, 1024], page_tokens outside [1, 256],
  // ratio < 0, route_fov/build_candidates < 1, refine_iters < 0, or bad MIPS
  // parameters.
  static absl::StatusOr<std::unique_ptr<DciTree>> Create(const DciTreeParams& params);
  ~DciTree();

  // The most pages a BulkBuild of `n` keys can open with these page_tokens
  // and promotion ratio (>= 2): the promotion rule fixes the level-1 nodes
  // n1; each holds its own key and at most ratio - 1 keys assigned with
  // capacity, so ceil(ratio / page_tokens) pages, plus one page per key past
  // the total capacity (n - n1 > n1 x (ratio - 1)). What a prefill reserves
  // before its trees are built (docs/architecture.md §5).
  static uint64_t MaxBulkBuildPages(int64_t n, int page_tokens, int ratio);

  // Bulk build from `n` keys (fp32, n x dim) at positions 0..n-1.
  // FailedPrecondition when the tree is not empty; InvalidArgument for n < 1,
  // null pointers or a non-finite key. Nothing changes on error.
  absl::Status BulkBuild(const float* keys, int64_t n, std::vector<Placement>* placements);
  // Incremental path: keys get positions num_tokens().. in order. An empty
  // tree fixes its MIPS bound from this chunk. InvalidArgument as BulkBuild.
  absl::Status Insert(const float* keys, int64_t n, std::vector<Placement>* placements);

  // Level-1 (logical) nodes for `nq` queries, most promising first, holding
  // together at least min_tokens tokens (all nodes when the tree holds fewer).
  // `touched` is increased by the representatives scored. scratch->rest gets
  // each query's estimated log-mass outside the returned nodes.
  void CollectCandidates(const float* queries, int nq, float scale, const DciDescentParams& params,
                         DciScratch* scratch, std::vector<uint32_t>* nodes,
                         uint64_t* touched) const;

  // Rebuild: recomputes the MIPS bound from every key (read through `keys`
  // in `dtype`) and every representative, without moving any token.
  // PrepareRebuild is const (run it under a reader lock / off the writer
  // lock); CommitRebuild swaps the result in (writer lock) and returns
  // FailedPrecondition, changing nothing, when tokens were added since.
  bool NeedsRebuild() const { return mips_.NeedsRebuild(); }
  absl::StatusOr<std::unique_ptr<DciTreeRebuild>> PrepareRebuild(const PageKeys& keys,
                                                                 DType dtype) const;
  absl::Status CommitRebuild(std::unique_ptr<DciTreeRebuild> rebuild);

  // Index image (docs/architecture.md §5, warm restart; dci_tree_image.cc):
  // the whole tree and its page table as bytes, without the keys (they stay
  // in the frames behind PageKeys). A loaded tree is the saved one: later
  // Inserts place tokens and CollectCandidates ranks nodes exactly as the
  // saved tree would have. kImageAlgorithm names the build and insert
  // algorithm: bump it whenever a change would place a token elsewhere or
  // keep other representatives, so a daemon refuses an image of another
  // algorithm (and replays the appends instead).
  static constexpr uint32_t kImageAlgorithm = 1;
  void SaveImage(ByteWriter* w) const;
  // Reads what SaveImage wrote. FailedPrecondition when the image was made
  // with another algorithm or other parameters than `params`; DataLoss
  // naming the first inconsistency for an image that is truncated or is not
  // a consistent tree (every id, count, page chain and position is checked,
  // sizes against the bytes left before anything is allocated).
  // `tokens`: the count the tree must hold (else DataLoss). Reads the tree's
  // bytes only: what follows (mdci's codes) is the caller's to read, and to
  // refuse if it is not what it expects.
  static absl::StatusOr<std::unique_ptr<DciTree>> LoadImage(const DciTreeParams& params,
                                                            ByteReader* r, int64_t tokens);

  // Introspection (tests, stats).
  const DciTreeParams& params() const { return params_; }
  int ratio() const { return ratio_; }
  // Decode keys this tree's Insert placed in a recent node without routing
  // them (DciTreeParams::insert_fit), since it was created or loaded.
  uint64_t fit_inserts() const { return fit_inserts_; }
  // Keys Insert placed (after the build), since the tree was created or
  // loaded: what fit_inserts() is a share of.
  uint64_t inserted_keys() const { return inserted_keys_; }
  int64_t num_tokens() const { return static_cast<int64_t>(key_top_.size()); }
  int top_level() const { return static_cast<int>(levels_.size()) - 1; }  // 0 when empty
  uint32_t level_size(int level) const;                                   // level 0: num_tokens()
  uint32_t node_key(int level, uint32_t node) const { return levels_[level].key[node]; }
  // Parent node index on level+1, kNone on the top level.
  uint32_t node_parent(int level, uint32_t node) const { return levels_[level].parent[node]; }
  // Children node indices on level-1 (level >= 2 only; level-1 children are
  // the keys in the node's pages).
  const std::vector<uint32_t>& node_children(int level, uint32_t node) const {
    return levels_[level].children[node];
  }
  // The node's children as the run [first, first + count) (level >= 2), or
  // count 0 when they are not one run of consecutive ids.
  ChildRun node_child_run(int level, uint32_t node) const {
    return levels_[level].child_runs[node];
  }
  uint32_t node_count(int level, uint32_t node) const { return levels_[level].reps.count[node]; }
  const float* node_centroid(int level, uint32_t node) const {
    return &levels_[level].reps.centroid[static_cast<size_t>(node) * params_.dim];
  }
  int key_top_level(int64_t key) const { return key_top_[key]; }
  // Node index of `key` on its top level (top >= 1), or its level-1 parent
  // node (top == 0).
  uint32_t key_node(int64_t key) const { return key_node_[key]; }
  const DciPageTable& page_table() const { return pages_; }
  const MipsAugmentation& mips() const { return mips_; }
  // Bytes held (sizes; the reserved headroom is not counted).
  size_t bytes() const;

 private:
  struct Level {
    std::vector<uint32_t> key;     // per node: the key (position) that is the node
    std::vector<uint32_t> parent;  // per node: parent node on level+1, kNone on the top level
    std::vector<std::vector<uint32_t>> children;  // per node: child nodes on level-1 (level >= 2)
    // Per node (level >= 2): its children as the id run [first, first +
    // count) when they are exactly that (every node of a bulk build, by the
    // depth-first numbering), count 0 otherwise. The descent expands kept
    // nodes from this flat array instead of chasing each children list.
    std::vector<ChildRun> child_runs;
    DciNodeReps reps;  // per node: representative (dci_node_reps.h)
    // fp16 copy of reps.centroid, read by CollectCandidates (half the bytes
    // of the fp32 rows that routing and updates use).
    std::vector<uint16_t> centroid16;
    uint32_t size() const { return static_cast<uint32_t>(key.size()); }
    size_t bytes(uint32_t nodes_below) const;
  };
  // Refreshes the child run of one node / of every node (level >= 2) from
  // its children list; called wherever a children list changes.
  void SyncChildRun(int level, uint32_t node);
  void SyncAllChildRuns();
  struct RouteScratch {
    std::vector<uint32_t> cand, next;
    std::vector<uint32_t> open;  // the candidates scored (room left, or free)
    std::vector<float> dots;     // their dot products with the key
    std::vector<std::pair<float, uint32_t>> scored;
    // NearestRecentNodeWithRoom: where its last window began in
    // nodes_by_key_ (a hint, checked before use).
    size_t window_first = 0;
  };
  // Buffers of Insert, kept between calls so a decode append allocates
  // nothing once warm (Insert has exclusive access).
  struct InsertScratch {
    RouteScratch route;
    std::vector<uint32_t> counts;
    std::vector<std::pair<float, uint32_t>> out;
    std::vector<std::pair<int, uint32_t>> dirty;  // nodes whose centroid changed
    std::vector<float> proj;                      // the key on the subspace
  };
  // One candidate parent of an item in the capacity-aware assignment.
  struct AssignPair {
    float score;
    uint32_t item;
    uint32_t node;
  };

  DciTree(const DciTreeParams& params, int ratio, MipsAugmentation mips)
      : params_(params),
        ratio_(ratio),
        mips_(mips),
        subspace_(params.dim, params.spread_rank, params.seed),
        pages_(params.page_tokens) {}

  // --- dci_tree.cc: routing and insert ---
  // Routing score of node (level, i) for augmented key [x, a], given dot =
  // DotF32(x, its centroid) (batched by DotF32Rows): higher is nearer (minus
  // half the squared augmented distance, up to a constant).
  float RouteScoreFromDot(int level, uint32_t node, float dot, float a) const;
  // Descends from the top to `target` keeping `fov` nodes per level and
  // writes the best `keep` nodes of `target` (score, node), best first.
  // With `free` set, skips nodes whose free[level][node] is 0.
  // insert: called by Insert, so the child runs match the children lists
  // (a bulk build routes while it is still building them) and a node's run
  // may stand for its list; the tree is likely cold, so the scores' terms
  // are prefetched.
  void Route(const float* x, float a, int target, int keep, int fov,
             const std::vector<std::vector<int32_t>>* free, bool insert, RouteScratch* s,
             std::vector<std::pair<float, uint32_t>>* out) const;
  // Level 1's representatives from `members` keys (members == nullptr: every
  // node of `level` from its own key alone); AggregateUp: every level from
  // from_level up from its children. `proj` and `sq` (optional, with
  // members): every key's subspace projection, rank() per key (ProjectF32,
  // the same bits as projecting key by key), and its SquaredNorm.
  void SetRepsFromKeys(int level, const float* keys, const float* aug,
                       const std::vector<std::vector<uint32_t>>* members,
                       const float* proj = nullptr, const float* sq = nullptr);
  void AggregateUp(int from_level);
  // Refreshes the fp16 centroid copy of one node / of every node.
  void SyncMirror(int level, uint32_t node);
  void SyncAllMirrors();
  // Room in every per-token and per-node array for `tokens` tokens, levels
  // scaled from their present sizes (headroom.h).
  void ReserveTokens(int64_t tokens);
  int PromotionLevel(std::vector<uint32_t>* counts) const {
    return PromotionLevelFor(counts, ratio_);
  }
  // The level a new key reaches under the promotion rule with `ratio`,
  // counting it in (counts[l] = keys on level l so far).
  static int PromotionLevelFor(std::vector<uint32_t>* counts, int ratio);
  void ResizeLevel(int level, uint32_t size);
  // Opens the nodes of a key promoted to level t (levels 1..t, each the own
  // child of the next); returns its level-t node (kNone for t == 0).
  uint32_t OpenKeyNodes(uint32_t pos, int t, bool with_reps, const float* x, float a, float sq,
                        std::vector<std::pair<int, uint32_t>>* dirty);
  // Insert path: the level-(t+1) parent of a key at level t, and its
  // representatives updated up to the top.
  uint32_t ChooseInsertParent(const float* x, float a, float sq, int32_t pos, int t,
                              RouteScratch* rs, std::vector<std::pair<float, uint32_t>>* out);
  // Insert path: asks for the lines the key's parent p (on level t + 1)
  // and its ancestors are written through (representatives, mirrors, for
  // t = 0 the page table), so their misses overlap rather than follow one
  // another up the tree.
  void PrefetchInsertPath(uint32_t p, int t) const;
  uint32_t Level1NodeOfUpperKey(int64_t key) const;
  // Insert path with a locality window: kNone when no recent node has room.
  uint32_t NearestRecentNodeWithRoom(const float* x, float a, int64_t pos, RouteScratch* s,
                                     float* score) const;
  bool NodeHasRoom(uint32_t node) const;  // its last page has a free slot
  // room_by_rank_ and rank_of_node_ from nodes_by_key_ and the page table.
  void SyncRoomByRank();

  // --- dci_tree_build.cc: bulk build ---
  // Capacity-aware assignment of `items` (keys with top == level-1, given as
  // their key ids) to nodes on `level`; writes the parent node of each item.
  void AssignWithCapacity(int level, const std::vector<uint32_t>& items, const float* keys,
                          const float* aug, int capacity, std::vector<uint32_t>* parent_of);
  // Candidate parents of level-0 items among the level-1 nodes of their
  // locality window (a contiguous id range), 8 items per kernel call.
  void PairWindowCandidates(const std::vector<uint32_t>& items, const float* keys, const float* aug,
                            std::vector<AssignPair>* pairs, std::vector<uint32_t>* best) const;
  // Candidate parents of every item by routing from the top.
  void PairRoutedCandidates(int level, const std::vector<uint32_t>& items, const float* keys,
                            const float* aug, std::vector<AssignPair>* pairs,
                            std::vector<uint32_t>* best) const;
  // Items whose candidates all filled up: routed again only through nodes
  // with room left (load is each node's count of assigned items).
  void PlaceLeftovers(int level, const std::vector<uint32_t>& items, const float* keys,
                      const float* aug, int capacity, const std::vector<int32_t>& load,
                      const std::vector<uint32_t>& leftovers, const std::vector<uint32_t>& best,
                      std::vector<uint32_t>* parent_of) const;
  // Levels of every key by the promotion rule, nodes without parents.
  void BuildSkeleton(int64_t n);
  // Parents level by level from the top; members[node] = level-1 node's keys.
  // `proj`, `sq`: every key's subspace projection and squared norm
  // (SetRepsFromKeys).
  void AssignLevels(const float* keys, int64_t n, const float* aug, const float* proj,
                    const float* sq, std::vector<std::vector<uint32_t>>* members);
  void RefineLevel0(const float* keys, int64_t n, const float* aug, const float* proj,
                    const float* sq, std::vector<std::vector<uint32_t>>* members);
  // Renumbers every level depth-first (siblings get consecutive ids).
  void RenumberDepthFirst();
  // Pages: each logical node's keys in position order.
  absl::Status LayOutPages(int64_t n, std::vector<std::vector<uint32_t>>* members,
                           std::vector<Placement>* placements);

  // --- dci_tree_image.cc: the image's parts and its consistency checks ---
  bool LoadLevels(ByteReader* r, int top, int64_t n);
  // "" when the loaded tree is consistent, else what is wrong.
  std::string CheckPromotion() const;
  std::string CheckLevel(int level) const;
  std::string CheckKeysAndPages() const;

  // --- dci_tree_descent.cc: candidate collection ---
  int EntryLevel(int entry_nodes) const;
  void PrepareQueries(const float* queries, int nq, DciScratch* s) const;
  // s->est = every candidate's estimated log-mass per query on `level`;
  // s->best = its rank key. At the entry level (`entry`) of a normalized
  // descent also each query's estimated total, s->qlog_norm.
  void ScoreCandidates(int level, bool entry, const float* queries, int nq, float scale,
                       float half_s2, bool normalized, DciScratch* s) const;
  // Takes the best candidates until they hold enough tokens (and at least
  // field_of_view nodes above level 1): into `nodes` on level 1, s->next above.
  // Returns how many were taken (the head of s->scored, which it lays out:
  // (rank key, index into cand), ranked in growing chunks).
  size_t TakeBest(int level, const DciDescentParams& params, DciScratch* s,
                  std::vector<uint32_t>* nodes) const;
  // TakeBest with per-query quotas (DciDescentParams::query_quotas): the
  // queries take nodes in turn, each its best not yet taken by its own
  // estimate, until the same stop; s->scored then starts with the taken nodes.
  size_t TakeBestPerQuery(int level, const DciDescentParams& params, int nq, DciScratch* s,
                          std::vector<uint32_t>* nodes) const;
  // Adds the estimated mass of the candidates not taken to s->rest.
  void AccumulateRest(int nq, size_t taken, DciScratch* s) const;
  // s->taken_est: the estimated mass of the `taken` candidates at the head
  // of s->scored (level 1: the returned nodes).
  void EstimateTaken(int nq, size_t taken, DciScratch* s) const;
  // s->cand = the children of the nodes in s->next, ascending.
  void ExpandChildren(int level, DciScratch* s) const;

  DciTreeParams params_;
  int ratio_;
  MipsAugmentation mips_;
  DciKeySubspace subspace_;             // rank = spread_rank clamped to dim
  std::vector<Level> levels_;           // levels_[0] unused (level 0 = the keys)
  std::vector<uint8_t> key_top_;        // per key: its top level
  std::vector<uint32_t> key_node_;      // per key: key_node() below
  std::vector<uint32_t> nodes_by_key_;  // level-1 node ids by ascending key position
  // Derived from the page table (SyncRoomByRank), for the decode insert's
  // scan of its locality window: NodeHasRoom(nodes_by_key_[i]) at i, read
  // in position order instead of one random line per node; and each level-1
  // node's place in nodes_by_key_.
  std::vector<uint8_t> room_by_rank_;
  std::vector<uint32_t> rank_of_node_;
  DciPageTable pages_;
  InsertScratch insert_scratch_;
  uint64_t fit_inserts_ = 0;    // fit_inserts()
  uint64_t inserted_keys_ = 0;  // inserted_keys()
};

}  // namespace icecache

#endif  // ICECACHE_SERVER_INDEX_DCI_TREE_H_
