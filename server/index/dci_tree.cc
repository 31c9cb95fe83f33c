#include "server/index/dci_tree.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "common/populate.h"
#include "common/status_macros.h"
#include "server/index/dci_tree_internal.h"
#include "server/index/headroom.h"
#include "server/index/kernels.h"
#include "server/index/prefetch_lines.h"

namespace icecache {

namespace dci_internal {

absl::Status CheckKeys(const float* keys, int64_t n, int dim,
                       const std::vector<Placement>* placements) {
  if (keys == nullptr || placements == nullptr) {
    return absl::InvalidArgumentError("keys and placements must not be null");
  }
  if (n < 1) return absl::InvalidArgumentError(absl::StrCat("key count must be > 0, got ", n));
  // NaN and Inf have every exponent bit set: one branch-free pass (it
  // vectorises) clears the usual all-finite case; the slow loop names the
  // first bad element.
  uint32_t all_ones = 0;
  const uint32_t kExponent = 0x7f800000u;
  const size_t count = static_cast<size_t>(n) * dim;
  for (size_t i = 0; i < count; ++i) {
    uint32_t bits;
    std::memcpy(&bits, keys + i, sizeof(bits));
    all_ones |= (bits & kExponent) == kExponent ? 1u : 0u;
  }
  if (all_ones == 0) return absl::OkStatus();
  for (int64_t i = 0; i < n; ++i) {
    for (int c = 0; c < dim; ++c) {
      if (!std::isfinite(keys[i * dim + c])) {
        return absl::InvalidArgumentError(
            absl::StrCat("key row ", i, " column ", c, " is not finite"));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace dci_internal

using dci_internal::SquaredNorm;

size_t DciTree::Level::bytes(uint32_t nodes_below) const {
  // Every node below has one parent: the children lists hold nodes_below ids
  // in all (counted without walking them, so a stats refresh is O(levels)).
  const size_t child_ids = children.empty() ? 0 : nodes_below;
  return (key.size() + parent.size() + child_ids) * sizeof(uint32_t) + reps.bytes() +
         centroid16.size() * sizeof(uint16_t) + children.size() * sizeof(std::vector<uint32_t>) +
         child_runs.size() * sizeof(ChildRun);
}

void DciTree::SyncChildRun(int level, uint32_t node) {
  Level& L = levels_[level];
  if (L.child_runs.size() < L.children.size()) L.child_runs.resize(L.children.size());
  const std::vector<uint32_t>& ch = L.children[node];
  ChildRun run;
  bool consecutive = !ch.empty();
  for (size_t i = 1; i < ch.size() && consecutive; ++i) consecutive = ch[i] == ch[0] + i;
  if (consecutive) run = {ch[0], static_cast<uint32_t>(ch.size())};
  L.child_runs[node] = run;
}

void DciTree::SyncAllChildRuns() {
  for (int l = 2; l <= top_level(); ++l) {
    levels_[l].child_runs.assign(levels_[l].children.size(), ChildRun{});
    for (uint32_t node = 0; node < levels_[l].size(); ++node) SyncChildRun(l, node);
  }
}

absl::StatusOr<std::unique_ptr<DciTree>> DciTree::Create(const DciTreeParams& params) {
  if (params.dim < 1 || params.dim > 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("DCI-tree dim must be in [1, 1024], got ", params.dim));
  }
  if (params.page_tokens < 1 || params.page_tokens > 256) {
    return absl::InvalidArgumentError(
        absl::StrCat("DCI-tree page_tokens must be in [1, 256], got ", params.page_tokens));
  }
  if (params.ratio < 0 || params.ratio == 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("DCI-tree promotion ratio must be 0 (auto) or >= 2, got ", params.ratio));
  }
  if (params.locality_window < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("DCI-tree locality_window must be >= 0, got ", params.locality_window));
  }
  if (params.spread_rank < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("DCI-tree spread_rank must be >= 0, got ", params.spread_rank));
  }
  if (params.route_fov < 1 || params.build_candidates < 1 || params.refine_iters < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "DCI-tree route_fov and build_candidates must be >= 1 and refine_iters >= 0, got ",
        params.route_fov, ", ", params.build_candidates, ", ", params.refine_iters));
  }
  if (!(params.insert_fit >= 0.0f) || !std::isfinite(params.insert_fit)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "DCI-tree insert_fit must be finite and >= 0 (0: route every decode key), got ",
        params.insert_fit));
  }
  if (params.insert_route_fov < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "DCI-tree insert_route_fov must be >= 0 (0: route_fov), got ", params.insert_route_fov));
  }
  ASSIGN_OR_RETURN(MipsAugmentation mips,
                   MipsAugmentation::FromMaxNorm(1.0f, params.dim, params.norm_headroom,
                                                 params.rebuild_fraction));
  const int ratio = params.ratio > 0 ? params.ratio : std::max(2, params.page_tokens);
  return std::unique_ptr<DciTree>(new DciTree(params, ratio, mips));
}

void DciTree::ReserveTokens(int64_t tokens) {
  const int64_t n = std::max<int64_t>(1, num_tokens());
  if (tokens <= n) return;
  // Level l holds about n / r^l nodes: scale each by tokens / n, plus slack
  // for the rounding of the promotion rule.
  auto scaled = [&](size_t size) {
    return static_cast<size_t>(static_cast<double>(size) * tokens / n) + 16;
  };
  key_top_.reserve(tokens);
  key_node_.reserve(tokens);
  for (int l = 1; l <= top_level(); ++l) {
    Level& L = levels_[l];
    const size_t cap = scaled(L.size());
    L.key.reserve(cap);
    L.parent.reserve(cap);
    if (l >= 2) {
      L.children.reserve(cap);
      L.child_runs.reserve(cap);
    }
    L.reps.Reserve(static_cast<uint32_t>(cap), params_.dim, subspace_.rank());
    L.centroid16.reserve(cap * params_.dim);
  }
  levels_.reserve(levels_.size() + 2);
  const size_t nodes = top_level() >= 1 ? scaled(levels_[1].size()) : 16;
  nodes_by_key_.reserve(nodes);
  room_by_rank_.reserve(nodes);
  rank_of_node_.reserve(nodes);
  // Decode keys fill the pages of their nodes; a page per node more covers
  // the partly filled last pages.
  pages_.Reserve(nodes, scaled(pages_.num_pages()) + nodes, tokens);
}

void DciTree::ResizeLevel(int level, uint32_t size) {
  levels_[level].reps.Resize(size, params_.dim, subspace_.rank());
}

DciTree::~DciTree() = default;

uint32_t DciTree::level_size(int level) const {
  if (level == 0) return static_cast<uint32_t>(key_top_.size());
  if (level < 1 || level > top_level()) return 0;
  return levels_[level].size();
}

int DciTree::PromotionLevelFor(std::vector<uint32_t>* counts, int ratio) {
  auto& c = *counts;
  ++c[0];
  int l = 0;
  for (;;) {
    const uint64_t above = l + 1 < static_cast<int>(c.size()) ? c[l + 1] : 0;
    const bool bootstrap = l == 0 && above == 0;  // the first key opens level 1
    if (!bootstrap && c[l] < static_cast<uint64_t>(ratio) * (above + 1)) break;
    if (l + 1 == static_cast<int>(c.size())) c.push_back(0);
    ++c[l + 1];
    ++l;
  }
  return l;
}

uint64_t DciTree::MaxBulkBuildPages(int64_t n, int page_tokens, int ratio) {
  // BuildSkeleton's levels: n1 keys open a level-1 node.
  std::vector<uint32_t> counts{0};
  int64_t n1 = 0;
  for (int64_t i = 0; i < n; ++i) n1 += PromotionLevelFor(&counts, ratio) >= 1 ? 1 : 0;
  // Level-0 keys go to nodes with room (AssignWithCapacity, PlaceLeftovers
  // route only through room) while any is left; the rest overflow.
  const int64_t capacity = n1 * (ratio - 1);
  const int64_t overflow = std::max<int64_t>(0, n - n1 - capacity);
  const int64_t per_node = (ratio + page_tokens - 1) / page_tokens;
  return static_cast<uint64_t>(n1 * per_node + overflow);
}

float DciTree::RouteScoreFromDot(int level, uint32_t node, float dot, float a) const {
  const DciNodeReps& R = levels_[level].reps;
  if (!params_.augmented_routing) return dot - 0.5f * R.c2[node];
  return dot + a * R.abar[node] - R.half_sq[node];
}

void DciTree::Route(const float* x, float a, int target, int keep, int fov,
                    const std::vector<std::vector<int32_t>>* free, bool insert, RouteScratch* s,
                    std::vector<std::pair<float, uint32_t>>* out) const {
  out->clear();
  const int top = top_level();
  s->cand.resize(levels_[top].size());
  std::iota(s->cand.begin(), s->cand.end(), 0u);
  for (int j = top;; --j) {
    s->scored.clear();
    const std::vector<uint32_t>* ids = &s->cand;
    if (free != nullptr) {
      s->open.clear();
      for (uint32_t node : s->cand) {
        if ((*free)[j][node] > 0) s->open.push_back(node);
      }
      ids = &s->open;
    }
    // An insert finds the tree cold: the scores' per-node terms are fetched
    // while the rows stream in below (a bulk build's are in cache).
    const DciNodeReps& R = levels_[j].reps;
    for (size_t i = 0; insert && i < ids->size(); ++i) {
      const uint32_t node = (*ids)[i];
      if (params_.augmented_routing) {
        __builtin_prefetch(&R.abar[node]);
        __builtin_prefetch(&R.half_sq[node]);
      } else {
        __builtin_prefetch(&R.c2[node]);
      }
    }
    // One batched call for the level's dot products: a bulk build's over the
    // fp32 centroids (DotF32's bits), an insert's over their fp16 mirror
    // (half the cold bytes; synced after every inserted key).
    s->dots.resize(ids->size());
    if (insert) {
      DotF16Rows(x, levels_[j].centroid16.data(), ids->data(), static_cast<int64_t>(ids->size()),
                 params_.dim, s->dots.data());
    } else {
      DotF32Rows(x, R.centroid.data(), ids->data(), static_cast<int64_t>(ids->size()), params_.dim,
                 s->dots.data());
    }
    for (size_t i = 0; i < ids->size(); ++i) {
      const uint32_t node = (*ids)[i];
      s->scored.push_back({RouteScoreFromDot(j, node, s->dots[i], a), node});
    }
    if (j == target) {
      const size_t k = std::min<size_t>(keep, s->scored.size());
      std::partial_sort(s->scored.begin(), s->scored.begin() + k, s->scored.end(),
                        dci_internal::BetterOrder());
      out->assign(s->scored.begin(), s->scored.begin() + k);
      return;
    }
    const size_t k = std::min<size_t>(fov, s->scored.size());
    std::partial_sort(s->scored.begin(), s->scored.begin() + k, s->scored.end(),
                      dci_internal::BetterOrder());
    s->next.clear();
    const Level& L = levels_[j];
    for (size_t i = 0; i < k; ++i) {
      // A child run names the children without reading their list (one
      // dependent cold line less per kept node); the same ids in the same
      // order.
      const uint32_t node = s->scored[i].second;
      const ChildRun run = insert && node < L.child_runs.size() ? L.child_runs[node] : ChildRun{};
      if (run.count > 0) {
        const size_t at = s->next.size();
        s->next.resize(at + run.count);
        std::iota(s->next.begin() + at, s->next.end(), run.first);
      } else {
        const auto& ch = L.children[node];
        s->next.insert(s->next.end(), ch.begin(), ch.end());
      }
    }
    s->cand.swap(s->next);
  }
}

void DciTree::SetRepsFromKeys(int level, const float* keys, const float* aug,
                              const std::vector<std::vector<uint32_t>>* members,
                              const float* proj_all, const float* sq_all) {
  DciNodeReps& R = levels_[level].reps;
  const int d = params_.dim, r = subspace_.rank();
  DciRepSums sums;
  std::vector<float> proj(r);
  for (uint32_t node = 0; node < levels_[level].size(); ++node) {
    if (members == nullptr) {
      const float* x = keys + static_cast<size_t>(levels_[level].key[node]) * d;
      R.Init(node, x, aug[levels_[level].key[node]], SquaredNorm(x, d), subspace_);
      continue;
    }
    sums.Reset(d, r);
    for (uint32_t key : (*members)[node]) {
      const float* x = keys + static_cast<size_t>(key) * d;
      const float* p = proj.data();
      if (proj_all != nullptr) {
        p = proj_all + static_cast<size_t>(key) * r;
      } else {
        subspace_.Project(x, proj.data());
      }
      sums.AddKey(x, d, aug[key], sq_all != nullptr ? sq_all[key] : SquaredNorm(x, d), p, r);
    }
    R.SetFromSums(node, sums, subspace_);
  }
}

void DciTree::AggregateUp(int from_level) {
  const int d = params_.dim, r = subspace_.rank();
  DciRepSums sums;
  for (int j = std::max(2, from_level); j <= top_level(); ++j) {
    for (uint32_t node = 0; node < levels_[j].size(); ++node) {
      sums.Reset(d, r);
      for (uint32_t ch : levels_[j].children[node]) sums.AddNode(levels_[j - 1].reps, ch, d, r);
      levels_[j].reps.SetFromSums(node, sums, subspace_);
    }
  }
}

void DciTree::SyncMirror(int level, uint32_t node) {
  Level& L = levels_[level];
  const size_t d = params_.dim;
  if (L.centroid16.size() < L.reps.centroid.size()) L.centroid16.resize(L.reps.centroid.size());
  FloatToHalf(&L.reps.centroid[node * d], &L.centroid16[node * d], d);
}

void DciTree::SyncAllMirrors() {
  for (int l = 1; l <= top_level(); ++l) {
    Level& L = levels_[l];
    ResizePopulated(&L.centroid16, L.reps.centroid.size(), uint16_t{0});
    FloatToHalf(L.reps.centroid.data(), L.centroid16.data(), L.reps.centroid.size());
  }
}

bool DciTree::NodeHasRoom(uint32_t node) const {
  const uint32_t tokens = pages_.node_tokens(node);
  return tokens == 0 || tokens % static_cast<uint32_t>(params_.page_tokens) != 0;
}

void DciTree::SyncRoomByRank() {
  room_by_rank_.resize(nodes_by_key_.size());
  rank_of_node_.resize(nodes_by_key_.size());
  for (size_t i = 0; i < nodes_by_key_.size(); ++i) {
    room_by_rank_[i] = NodeHasRoom(nodes_by_key_[i]) ? 1 : 0;
    rank_of_node_[nodes_by_key_[i]] = static_cast<uint32_t>(i);
  }
}

uint32_t DciTree::NearestRecentNodeWithRoom(const float* x, float a, int64_t pos, RouteScratch* s,
                                            float* score) const {
  // Decode keys join the nearest logical node of the last locality_window
  // positions that still has room in its last page, as the bulk build fills
  // whole pages per window; every r-th key opens a new node, so room is
  // replenished at the rate keys arrive.
  const Level& L = levels_[1];
  const int64_t from = pos - params_.locality_window;
  // The window's first node: the last call's, moved on (windows only move
  // forward between decode inserts), unless nodes_by_key_ changed under it;
  // a cold binary search would read two random lines per step.
  const size_t n = nodes_by_key_.size();
  auto before = [&](size_t i) { return L.key[nodes_by_key_[i]] < from; };
  size_t first = std::min(s->window_first, n);
  bool found = first == 0 || !before(first - 1);
  if (found) {
    for (int steps = 0; first < n && before(first); ++first) {
      if (++steps > 8) {
        found = false;  // far behind (the first insert after a build): search
        break;
      }
    }
  }
  if (!found) {
    first = std::lower_bound(nodes_by_key_.begin(), nodes_by_key_.end(), from,
                             [&](uint32_t node, int64_t p) { return L.key[node] < p; }) -
            nodes_by_key_.begin();
  }
  s->window_first = first;
  s->open.clear();
  for (size_t i = first; i < n; ++i) {
    if (room_by_rank_[i] != 0) s->open.push_back(nodes_by_key_[i]);
  }
  s->dots.resize(s->open.size());
  DotF16Rows(x, L.centroid16.data(), s->open.data(), static_cast<int64_t>(s->open.size()),
             params_.dim, s->dots.data());
  uint32_t best = kNone;
  float best_score = -std::numeric_limits<float>::infinity();
  for (size_t i = 0; i < s->open.size(); ++i) {  // position order: the first of equals wins
    const float sc = RouteScoreFromDot(1, s->open[i], s->dots[i], a);
    if (sc > best_score) {
      best_score = sc;
      best = s->open[i];
    }
  }
  *score = best_score;
  return best;
}

uint32_t DciTree::Level1NodeOfUpperKey(int64_t key) const {
  // Walk the own-child chain down from the key's top node.
  uint32_t node = key_node_[key];
  for (int l = key_top_[key]; l > 1; --l) {
    uint32_t own = kNone;
    for (uint32_t c : levels_[l].children[node]) {
      if (levels_[l - 1].key[c] == static_cast<uint32_t>(key)) {
        own = c;
        break;
      }
    }
    node = own;
  }
  return node;
}

uint32_t DciTree::OpenKeyNodes(uint32_t pos, int t, bool with_reps, const float* x, float a,
                               float sq, std::vector<std::pair<int, uint32_t>>* dirty) {
  uint32_t below = kNone;
  for (int l = 1; l <= t; ++l) {
    Level& L = levels_[l];
    const uint32_t idx = L.size();
    L.key.push_back(pos);
    L.parent.push_back(kNone);
    if (with_reps) ResizeLevel(l, idx + 1);
    if (l >= 2) {
      L.children.emplace_back();
      L.children.back().push_back(below);  // its own child
      SyncChildRun(l, idx);
      levels_[l - 1].parent[below] = idx;
    }
    if (with_reps) {
      L.reps.Init(idx, x, a, sq, subspace_);
      dirty->push_back({l, idx});
    }
    below = idx;
  }
  return below;
}

void DciTree::PrefetchInsertPath(uint32_t p, int t) const {
  if (t == 0) pages_.PrefetchForAppend(p);
  const size_t d = params_.dim;
  uint32_t node = p;
  for (int j = t + 1; j <= top_level() && node != kNone; ++j) {
    const Level& L = levels_[j];
    L.reps.PrefetchForUpdate(node, params_.dim, subspace_.rank());
    PrefetchBytes(&L.centroid16[node * d], d * sizeof(uint16_t));
    node = L.parent[node];
  }
}

uint32_t DciTree::ChooseInsertParent(const float* x, float a, float sq, int32_t pos, int t,
                                     RouteScratch* rs,
                                     std::vector<std::pair<float, uint32_t>>* out) {
  const bool window = t == 0 && params_.locality_window > 0;
  const float base = params_.augmented_routing ? 0.5f * (sq + a * a) : 0.5f * sq;
  float score_w = 0.0f;
  uint32_t w = kNone;
  if (window && params_.insert_fit > 0.0f) {
    // A key that fits the nearest recent node with room as well as its
    // members do (half its squared distance to the centroid within
    // insert_fit x half their mean one, m2 - c2: plain key space, the
    // augmentation's own spread left out) joins it without being routed
    // from the top: the window's few nodes with room instead of ~130 cold
    // centroids. A node of one key has no spread, so its next keys are
    // routed; a key far from every recent node (a needle) is routed.
    w = NearestRecentNodeWithRoom(x, a, pos, rs, &score_w);
    if (w != kNone) {
      const DciNodeReps& R = levels_[1].reps;
      const float spread = 0.5f * std::max(0.0f, R.m2[w] - R.c2[w]);
      if (base - score_w <= params_.insert_fit * spread) {
        ++fit_inserts_;
        return w;
      }
    }
  }
  const int fov = params_.insert_route_fov > 0 ? params_.insert_route_fov : params_.route_fov;
  Route(x, a, t + 1, 1, fov, nullptr, /*insert=*/true, rs, out);
  uint32_t p = (*out)[0].second;
  if (window && !NodeHasRoom(p)) {
    // The nearest node's last page is full: a recent node with room takes
    // the key instead when it is nearly as near (squared distance within
    // decode_slack of the nearest), so decode pages stay full without
    // mixing unrelated keys.
    if (params_.insert_fit <= 0.0f) w = NearestRecentNodeWithRoom(x, a, pos, rs, &score_w);
    const float dist_g = base - (*out)[0].first, dist_w = base - score_w;  // half squared
    if (w != kNone && dist_w <= params_.decode_slack * dist_g) p = w;
  }
  return p;
}

absl::Status DciTree::Insert(const float* keys, int64_t n, std::vector<Placement>* placements) {
  RETURN_IF_ERROR(dci_internal::CheckKeys(keys, n, params_.dim, placements));
  if (n > std::numeric_limits<int32_t>::max() - num_tokens()) {
    return absl::InvalidArgumentError(absl::StrCat("too many keys for one tree: ", n));
  }
  const int d = params_.dim;
  if (num_tokens() == 0) {
    ASSIGN_OR_RETURN(
        MipsAugmentation mips,
        MipsAugmentation::Create(keys, n, d, params_.norm_headroom, params_.rebuild_fraction));
    mips_ = mips;
    levels_.resize(1);
    subspace_.Fit(keys, n);
  }
  placements->clear();
  placements->reserve(n);
  inserted_keys_ += static_cast<uint64_t>(n);
  InsertScratch& is = insert_scratch_;
  std::vector<uint32_t>& counts = is.counts;
  counts.assign(levels_.size(), 0);
  counts[0] = static_cast<uint32_t>(num_tokens());
  for (size_t l = 1; l < levels_.size(); ++l) counts[l] = levels_[l].size();
  RouteScratch& rs = is.route;
  std::vector<std::pair<float, uint32_t>>& out = is.out;
  std::vector<std::pair<int, uint32_t>>& dirty = is.dirty;
  dirty.clear();
  bool all_dirty = false;
  for (int64_t i = 0; i < n; ++i) {
    const float* x = keys + i * d;
    const int32_t pos = static_cast<int32_t>(num_tokens());
    const float sq = SquaredNorm(x, d);
    const float a = mips_.Augment(x);
    const int old_top = top_level();
    const int t = PromotionLevel(&counts);
    if (static_cast<int>(levels_.size()) <= t) levels_.resize(t + 1);
    // New nodes of this key on levels 1..t, each its own child below.
    const uint32_t below = OpenKeyNodes(static_cast<uint32_t>(pos), t, true, x, a, sq, &dirty);
    uint32_t level1_node = kNone;
    if (t >= 1) {
      level1_node = pages_.AddNode();
      rank_of_node_.push_back(static_cast<uint32_t>(nodes_by_key_.size()));  // node ids are dense
      nodes_by_key_.push_back(level1_node);  // keys arrive in position order
      room_by_rank_.push_back(1);
    }
    if (t > old_top && old_top >= 1) {
      // A new top level: the old top nodes become children of this key.
      Level& T = levels_[t];
      for (uint32_t node = 0; node + 1 < levels_[old_top].size(); ++node) {
        levels_[old_top].parent[node] = below;  // (the last one is this key's own node)
        T.children[below].push_back(node);
      }
      SyncChildRun(t, below);
      AggregateUp(t);
      all_dirty = true;
    } else if (t < top_level()) {
      const uint32_t p = ChooseInsertParent(x, a, sq, pos, t, &rs, &out);
      PrefetchInsertPath(p, t);
      if (t >= 1) {
        levels_[t].parent[below] = p;
        levels_[t + 1].children[p].push_back(below);
        SyncChildRun(t + 1, p);
      } else {
        level1_node = p;
      }
      uint32_t node = p;
      is.proj.resize(subspace_.rank());
      subspace_.Project(x, is.proj.data());
      for (int j = t + 1; j <= top_level() && node != kNone; ++j) {
        levels_[j].reps.Update(node, x, a, sq, is.proj.data(), subspace_);
        dirty.push_back({j, node});
        node = levels_[j].parent[node];
      }
    }
    if (t == 0 && t >= top_level()) level1_node = 0;  // unreachable: level 1 always exists
    placements->push_back(pages_.Append(level1_node, pos));
    room_by_rank_[rank_of_node_[level1_node]] = NodeHasRoom(level1_node) ? 1 : 0;
    key_top_.push_back(static_cast<uint8_t>(t));
    key_node_.push_back(t >= 1 ? below : level1_node);
    // The next key routes over the fp16 mirrors: they follow every key.
    if (all_dirty) {
      SyncAllMirrors();
    } else {
      for (const auto& [level, node] : dirty) SyncMirror(level, node);
    }
    dirty.clear();
    all_dirty = false;
  }
  return absl::OkStatus();
}

size_t DciTree::bytes() const {
  size_t b = key_top_.size() + room_by_rank_.size() +
             (key_node_.size() + nodes_by_key_.size() + rank_of_node_.size()) * sizeof(uint32_t) +
             pages_.bytes();
  for (int l = 1; l <= top_level(); ++l) b += levels_[l].bytes(level_size(l - 1));
  return b;
}

}  // namespace icecache
