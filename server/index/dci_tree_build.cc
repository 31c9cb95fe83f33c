// DciTree bulk build (a prefill batch): levels by the promotion rule,
// capacity-aware parent assignment from the top, optional level-0
// refinement, depth-first renumbering and the page layout.
#include <algorithm>
#include <limits>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "server/index/dci_tree.h"
#include "server/index/dci_tree_internal.h"
#include "server/index/headroom.h"
#include "server/index/kernels.h"

namespace icecache {

using dci_internal::SquaredNorm;
using dci_internal::TopOfScores;

void DciTree::PairWindowCandidates(const std::vector<uint32_t>& items, const float* keys,
                                   const float* aug, std::vector<AssignPair>* pairs,
                                   std::vector<uint32_t>* best) const {
  const int d = params_.dim;
  const size_t C = params_.build_candidates;
  const int64_t window = params_.locality_window;
  const Level& L = levels_[1];
  const std::vector<uint32_t>& level_keys = L.key;  // ascending positions
  std::vector<float> aux(L.size());
  for (uint32_t node = 0; node < L.size(); ++node) {
    aux[node] = params_.augmented_routing ? -L.reps.half_sq[node] : -0.5f * L.reps.c2[node];
  }
  RouteScratch rs;
  std::vector<std::pair<float, uint32_t>> out;
  std::vector<float> batch(static_cast<size_t>(8) * d), dots, scores;
  for (size_t b = 0; b < items.size();) {
    const int64_t w0 = items[b] / window * window;
    size_t e = b;
    while (e < items.size() && e - b < 8 && items[e] / window * window == w0) ++e;
    const uint32_t lo = static_cast<uint32_t>(
        std::lower_bound(level_keys.begin(), level_keys.end(), static_cast<uint32_t>(w0)) -
        level_keys.begin());
    const uint32_t hi = static_cast<uint32_t>(
        std::lower_bound(level_keys.begin(), level_keys.end(),
                         static_cast<uint32_t>(std::min<int64_t>(w0 + window, UINT32_MAX))) -
        level_keys.begin());
    const int nb = static_cast<int>(e - b);
    for (int t = 0; t < nb; ++t) {
      std::copy(keys + static_cast<size_t>(items[b + t]) * d,
                keys + static_cast<size_t>(items[b + t] + 1) * d,
                &batch[static_cast<size_t>(t) * d]);
    }
    const uint32_t nn = hi - lo;
    if (nn > 0) {
      dots.resize(static_cast<size_t>(nn) * nb);
      // Four items per kernel call: its 2-row x 4-query register block
      // reads fewer operands per FMA than 1 x 8 (same sums, bit for bit).
      for (int t0 = 0; t0 < nb; t0 += 4) {
        DotRowsMulti(DType::kF32, &L.reps.centroid[static_cast<size_t>(lo) * d], nn, d,
                     &batch[static_cast<size_t>(t0) * d], std::min(4, nb - t0),
                     &dots[static_cast<size_t>(t0) * nn]);
      }
    }
    for (int t = 0; t < nb; ++t) {
      const size_t idx = b + t;
      const float a = aug[items[idx]];
      const float* row = &dots[static_cast<size_t>(t) * nn];
      scores.resize(nn);
      float* __restrict sc = scores.data();
      const float* __restrict node_aux = &aux[lo];
      for (uint32_t k = 0; k < nn; ++k) sc[k] = row[k] + node_aux[k];
      if (params_.augmented_routing) {
        const float* __restrict abar = &L.reps.abar[lo];
        for (uint32_t k = 0; k < nn; ++k) sc[k] += a * abar[k];
      }
      TopOfScores(scores.data(), nn, lo, C, &out);
      if (out.empty())
        Route(keys + static_cast<size_t>(items[idx]) * d, a, 1, C, params_.route_fov, nullptr,
              false, &rs, &out);
      if (!out.empty()) (*best)[idx] = out[0].second;
      for (const auto& o : out) pairs->push_back({o.first, static_cast<uint32_t>(idx), o.second});
    }
    b = e;
  }
}

void DciTree::PairRoutedCandidates(int level, const std::vector<uint32_t>& items, const float* keys,
                                   const float* aug, std::vector<AssignPair>* pairs,
                                   std::vector<uint32_t>* best) const {
  const int d = params_.dim;
  RouteScratch rs;
  std::vector<std::pair<float, uint32_t>> out;
  for (size_t i = 0; i < items.size(); ++i) {
    Route(keys + static_cast<size_t>(items[i]) * d, aug[items[i]], level, params_.build_candidates,
          params_.route_fov, nullptr, false, &rs, &out);
    if (!out.empty()) (*best)[i] = out[0].second;
    for (const auto& o : out) pairs->push_back({o.first, static_cast<uint32_t>(i), o.second});
  }
}

void DciTree::PlaceLeftovers(int level, const std::vector<uint32_t>& items, const float* keys,
                             const float* aug, int capacity, const std::vector<int32_t>& load,
                             const std::vector<uint32_t>& leftovers,
                             const std::vector<uint32_t>& best,
                             std::vector<uint32_t>* parent_of) const {
  const uint32_t num_nodes = levels_[level].size();
  // Room left under every node of `level` and above.
  std::vector<std::vector<int32_t>> free(levels_.size());
  free[level].resize(num_nodes);
  for (uint32_t i = 0; i < num_nodes; ++i) free[level][i] = capacity - load[i];
  for (int j = level + 1; j <= top_level(); ++j) {
    free[j].assign(levels_[j].size(), 0);
    for (uint32_t node = 0; node < levels_[j].size(); ++node) {
      int64_t f = 0;
      for (uint32_t ch : levels_[j].children[node]) f += std::max(0, free[j - 1][ch]);
      free[j][node] = static_cast<int32_t>(std::min<int64_t>(f, INT32_MAX));
    }
  }
  RouteScratch rs;
  std::vector<std::pair<float, uint32_t>> out;
  for (uint32_t i : leftovers) {
    if ((*parent_of)[i] != kNone) continue;
    Route(keys + static_cast<size_t>(items[i]) * params_.dim, aug[items[i]], level, 1,
          params_.route_fov, &free, false, &rs, &out);
    uint32_t node = out.empty() ? best[i] : out[0].second;
    if (node == kNone) node = 0;
    (*parent_of)[i] = node;
    if (out.empty()) continue;
    for (int j = level; j <= top_level() && node != kNone; ++j) {
      --free[j][node];
      node = levels_[j].parent[node];
    }
  }
}

namespace {

// The bulk build's largest transient buffers (the candidate pairs and the
// sort's scratch: 12 B x build_candidates per key, 3 MiB each at 32768
// keys), kept per thread between builds. Fresh, they cost a page fault per
// 4 KiB every build: glibc hands a freed multi-MiB block back to the kernel
// (munmap, or a trim of the thread's arena), and a demand fault costs 13-14
// us on this kind of host (docs/operations.md), a quarter of a 32768-token
// tree's CPU. Released after a build that grew them past kKeepBytes.
template <typename Pair>
struct AssignScratch {
  static constexpr size_t kKeepBytes = size_t{32} << 20;
  std::vector<Pair> pairs, sort_tmp;
  void Trim() {
    if (pairs.capacity() * sizeof(Pair) > kKeepBytes) std::vector<Pair>().swap(pairs);
    if (sort_tmp.capacity() * sizeof(Pair) > kKeepBytes) std::vector<Pair>().swap(sort_tmp);
  }
};

}  // namespace

void DciTree::AssignWithCapacity(int level, const std::vector<uint32_t>& items, const float* keys,
                                 const float* aug, int capacity, std::vector<uint32_t>* parent_of) {
  thread_local AssignScratch<AssignPair> scratch;
  std::vector<AssignPair>& pairs = scratch.pairs;
  pairs.clear();
  pairs.reserve(items.size() * params_.build_candidates);
  std::vector<uint32_t> best(items.size(), kNone);
  const std::vector<uint32_t>& level_keys = levels_[level].key;
  if (level == 1 && params_.locality_window > 0 &&
      std::is_sorted(level_keys.begin(), level_keys.end())) {
    PairWindowCandidates(items, keys, aug, &pairs, &best);
  } else {
    PairRoutedCandidates(level, items, keys, aug, &pairs, &best);
  }
  // Best pair first (score, then item; an item's candidates come best first,
  // so ties of one item keep their node order).
  dci_internal::SortBestFirst(&pairs, &scratch.sort_tmp);
  // Greedy, best pair first, while the node has room.
  std::vector<int32_t> load(levels_[level].size(), 0);
  parent_of->assign(items.size(), kNone);
  std::vector<uint32_t> leftovers;  // best-first order of the items that may end up without one
  std::vector<uint8_t> seen(items.size(), 0);
  for (const AssignPair& p : pairs) {
    if ((*parent_of)[p.item] != kNone) continue;
    if (load[p.node] < capacity) {
      (*parent_of)[p.item] = p.node;
      ++load[p.node];
    } else if (!seen[p.item]) {
      seen[p.item] = 1;
      leftovers.push_back(p.item);
    }
  }
  scratch.Trim();
  PlaceLeftovers(level, items, keys, aug, capacity, load, leftovers, best, parent_of);
  // Items never paired (cannot happen with a non-empty level; kept safe).
  for (size_t i = 0; i < items.size(); ++i) {
    if ((*parent_of)[i] == kNone) (*parent_of)[i] = best[i] != kNone ? best[i] : 0;
  }
}

void DciTree::RenumberDepthFirst() {
  const int top = top_level();
  const int d = params_.dim;
  std::vector<uint32_t> new_above;  // new id of each old node one level up
  for (int l = top; l >= 1; --l) {
    Level& L = levels_[l];
    const uint32_t sz = L.size();
    std::vector<uint32_t> order(sz);  // order[new id] = old id
    std::iota(order.begin(), order.end(), 0u);
    if (l < top) {
      std::stable_sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) {
        return new_above[L.parent[a]] < new_above[L.parent[b]];
      });
    }
    std::vector<uint32_t> new_of_old(sz);
    for (uint32_t i = 0; i < sz; ++i) new_of_old[order[i]] = i;
    std::vector<uint32_t> old_key = L.key, old_parent = L.parent;
    for (uint32_t i = 0; i < sz; ++i) {
      L.key[i] = old_key[order[i]];
      L.parent[i] = old_parent[order[i]];
    }
    L.reps.Permute(order, d, subspace_.rank());
    if (!L.children.empty()) {
      std::vector<std::vector<uint32_t>> old = std::move(L.children);
      L.children.resize(sz);
      for (uint32_t i = 0; i < sz; ++i) L.children[i] = std::move(old[order[i]]);
    }
    if (l < top) {
      for (auto& p : L.parent) p = new_above[p];
    }
    if (l + 1 <= top) {
      for (auto& ch : levels_[l + 1].children) {
        for (auto& c : ch) c = new_of_old[c];
        std::sort(ch.begin(), ch.end());
      }
    }
    for (int64_t i = 0; i < num_tokens(); ++i) {
      if (key_top_[i] == l || (l == 1 && key_top_[i] == 0)) key_node_[i] = new_of_old[key_node_[i]];
    }
    new_above = std::move(new_of_old);
  }
}

void DciTree::BuildSkeleton(int64_t n) {
  std::vector<uint32_t> counts{0};
  key_top_.resize(n);
  key_node_.assign(n, kNone);
  levels_.clear();
  levels_.resize(1);
  for (int64_t i = 0; i < n; ++i) {
    const int t = PromotionLevel(&counts);
    key_top_[i] = static_cast<uint8_t>(t);
    if (static_cast<int>(levels_.size()) <= t) levels_.resize(t + 1);
    const uint32_t node = OpenKeyNodes(static_cast<uint32_t>(i), t, false, nullptr, 0, 0, nullptr);
    if (t >= 1) key_node_[i] = node;
  }
  // The level sizes are final: reserve the decode headroom now (the same
  // capacities BulkBuild's last ReserveTokens asks for, so that one finds
  // them), before the representatives are sized. Reserved at the end, every
  // array was allocated again and copied into fresh memory, a page fault per
  // 4 KiB of it on top of the first.
  ReserveTokens(TokensWithHeadroom(n));
  for (int l = 1; l <= top_level(); ++l) {
    ResizeLevel(l, levels_[l].size());
    if (l == 1) levels_[l].children.clear();
  }
}

void DciTree::AssignLevels(const float* keys, int64_t n, const float* aug, const float* proj,
                           const float* sq, std::vector<std::vector<uint32_t>>* members) {
  std::vector<uint32_t> parent_of, items;
  members->assign(levels_[1].size(), {});
  for (int l = top_level() - 1; l >= 0; --l) {
    SetRepsFromKeys(l + 1, keys, aug, nullptr);
    AggregateUp(l + 2);
    items.clear();
    for (int64_t i = 0; i < n; ++i) {
      if (key_top_[i] == l) items.push_back(static_cast<uint32_t>(i));
    }
    if (items.empty()) continue;
    AssignWithCapacity(l + 1, items, keys, aug, ratio_ - 1, &parent_of);
    for (size_t i = 0; i < items.size(); ++i) {
      const uint32_t p = parent_of[i];
      if (l >= 1) {
        const uint32_t idx = key_node_[items[i]];
        levels_[l].parent[idx] = p;
        levels_[l + 1].children[p].push_back(idx);
      } else {
        key_node_[items[i]] = p;
        (*members)[p].push_back(items[i]);
      }
    }
  }
  for (uint32_t node = 0; node < levels_[1].size(); ++node) {
    (*members)[node].push_back(levels_[1].key[node]);
  }
  SetRepsFromKeys(1, keys, aug, members, proj, sq);
  AggregateUp(2);
}

void DciTree::RefineLevel0(const float* keys, int64_t n, const float* aug, const float* proj,
                           const float* sq, std::vector<std::vector<uint32_t>>* members) {
  std::vector<uint32_t> items, parent_of;
  for (int64_t i = 0; i < n; ++i) {
    if (key_top_[i] == 0) items.push_back(static_cast<uint32_t>(i));
  }
  for (int it = 0; it < params_.refine_iters && !items.empty(); ++it) {
    AssignWithCapacity(1, items, keys, aug, ratio_ - 1, &parent_of);
    for (auto& m : *members) m.clear();
    for (uint32_t node = 0; node < levels_[1].size(); ++node) {
      (*members)[node].push_back(levels_[1].key[node]);
    }
    for (size_t i = 0; i < items.size(); ++i) {
      key_node_[items[i]] = parent_of[i];
      (*members)[parent_of[i]].push_back(items[i]);
    }
    SetRepsFromKeys(1, keys, aug, members, proj, sq);
    AggregateUp(2);
  }
}

absl::Status DciTree::LayOutPages(int64_t n, std::vector<std::vector<uint32_t>>* members,
                                  std::vector<Placement>* placements) {
  for (auto& m : *members) m.clear();
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t node = key_top_[i] == 0 ? key_node_[i] : Level1NodeOfUpperKey(i);
    (*members)[node].push_back(static_cast<uint32_t>(i));
  }
  pages_ = DciPageTable(params_.page_tokens);
  for (uint32_t node = 0; node < levels_[1].size(); ++node) {
    auto& m = (*members)[node];
    std::sort(m.begin(), m.end());
    pages_.AddNode();
    std::vector<int32_t> pos(m.begin(), m.end());
    pages_.AppendBulk(node, pos.data(), static_cast<int>(pos.size()));
  }
  if (!pages_.FinishBulk(n, placements)) {
    return absl::InternalError("DCI-tree bulk build lost or duplicated a token");
  }
  return absl::OkStatus();
}

absl::Status DciTree::BulkBuild(const float* keys, int64_t n, std::vector<Placement>* placements) {
  RETURN_IF_ERROR(dci_internal::CheckKeys(keys, n, params_.dim, placements));
  if (num_tokens() != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("bulk build needs an empty tree; it holds ", num_tokens(), " tokens"));
  }
  if (n > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError(absl::StrCat("too many keys for one tree: ", n));
  }
  const int d = params_.dim;
  ASSIGN_OR_RETURN(
      MipsAugmentation mips,
      MipsAugmentation::Create(keys, n, d, params_.norm_headroom, params_.rebuild_fraction));
  mips_ = mips;
  mips_.Count(n, 0);
  subspace_.Fit(keys, n);
  // Every key's squared norm once: its MIPS coordinate and, later, its
  // representative's sums use the same value (computed twice before).
  // Per-thread scratch like `proj` below; every element is written.
  thread_local std::vector<float> sq, aug;
  sq.resize(n);
  aug.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    sq[i] = SquaredNorm(keys + i * d, d);
    aug[i] = mips_.AugmentSquaredNorm(sq[i]);
  }

  // Every key's subspace projection at once (the representatives' spread
  // sums need them): one blocked kernel call instead of a call per key,
  // the same bits. Per-thread scratch, kept between builds (2 MiB at 32768
  // keys of rank 16; see AssignScratch).
  thread_local std::vector<float> proj;
  const size_t proj_size = static_cast<size_t>(n) * subspace_.rank();
  if (proj.size() < proj_size) proj.resize(proj_size);
  ProjectF32(keys, n, subspace_.basis().data(), subspace_.rank(), d, proj.data());

  BuildSkeleton(n);  // levels by the promotion rule, exactly as n Inserts would assign them
  std::vector<std::vector<uint32_t>> members;
  AssignLevels(keys, n, aug.data(), proj.data(), sq.data(), &members);  // parents, r children
  RefineLevel0(keys, n, aug.data(), proj.data(), sq.data(), &members);
  for (std::vector<float>* v : {&proj, &sq, &aug}) {
    if (v->capacity() * sizeof(float) > (size_t{32} << 20)) std::vector<float>().swap(*v);
  }
  // Siblings get consecutive ids (their representatives are scored as one block).
  RenumberDepthFirst();
  SyncAllChildRuns();
  SyncAllMirrors();
  nodes_by_key_.resize(levels_[1].size());
  std::iota(nodes_by_key_.begin(), nodes_by_key_.end(), 0u);
  std::sort(nodes_by_key_.begin(), nodes_by_key_.end(),
            [&](uint32_t a, uint32_t b) { return levels_[1].key[a] < levels_[1].key[b]; });
  RETURN_IF_ERROR(LayOutPages(n, &members, placements));
  SyncRoomByRank();
  // Room for the decode keys that follow: their inserts must not reallocate
  // the arrays the build left at exact size.
  ReserveTokens(TokensWithHeadroom(n));
  return absl::OkStatus();
}

}  // namespace icecache
