// The DCI-tree's index image (docs/architecture.md §5, warm restart): what a
// drain for upgrade writes so that the next daemon loads the tree instead of
// replaying every append into a fresh one.
//
// Layout (ByteWriter, little endian), after the algorithm version and the
// parameters (checked equal to the loader's):
//   i64 tokens, i32 top level, MIPS (bound, keys seen, over bound),
//   the subspace basis, per key its top level and node,
//   per level 1..top: size, key and parent of every node, children lists
//   (level >= 2: offsets + ids), the representatives (count, centroid, abar,
//   m2, half_sq, c2, pm2, lam, res),
//   the level-1 nodes by key, the page table.
// Not in it: the keys (in the frames behind PageKeys), and what is a pure
// function of the rest and recomputed on load: the fp16 centroid copies,
// the child runs, the level-1 nodes' room flags and the reserved headroom.
//
// The loader trusts nothing: every count is checked against the bytes left
// (ByteReader) and against the counts already read, and the loaded tree is
// checked for every property a later Select or Insert relies on (ids in
// range, promotion levels as the rule gives them, each node below the top in
// its parent's children exactly once, page chains without cycles, each
// position in exactly one slot, finite representatives).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <iterator>
#include <limits>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "server/index/byte_image.h"
#include "server/index/dci_tree.h"
#include "server/index/headroom.h"

namespace icecache {
namespace {

constexpr int kMaxLevels = 64;  // the promotion rule gives log_r(n) levels

void PutParams(ByteWriter* w, const DciTreeParams& p) {
  w->Put<int32_t>(p.dim);
  w->Put<int32_t>(p.page_tokens);
  w->Put<int32_t>(p.ratio);
  w->Put<float>(p.norm_headroom);
  w->Put<float>(p.rebuild_fraction);
  w->Put<int32_t>(p.route_fov);
  w->Put<int32_t>(p.build_candidates);
  w->Put<int32_t>(p.refine_iters);
  w->Put<int32_t>(p.spread_rank);
  w->Put<int32_t>(p.locality_window);
  w->Put<uint8_t>(p.augmented_routing ? 1 : 0);
  w->Put<float>(p.decode_slack);
  w->Put<uint64_t>(p.seed);
}

// "" when the image's parameters are `p`'s (floats bit for bit), else the
// first that differs.
std::string CompareParams(ByteReader* r, const DciTreeParams& p) {
  std::string mine, theirs;
  ByteWriter w(&mine);
  PutParams(&w, p);
  theirs.resize(mine.size());
  if (!r->GetBytes(theirs.data(), theirs.size())) return "";  // r->ok() tells
  if (mine == theirs) return "";
  static constexpr const char* kNames[] = {"dim",
                                           "page_tokens",
                                           "promotion_ratio",
                                           "norm_headroom",
                                           "rebuild_fraction",
                                           "route_fov",
                                           "build_candidates",
                                           "refine_iters",
                                           "spread_rank",
                                           "locality_window",
                                           "augmented_routing",
                                           "decode_slack",
                                           "seed"};
  static constexpr size_t kSizes[] = {4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 1, 4, 8};
  size_t at = 0;
  for (size_t i = 0; i < std::size(kSizes); ++i) {
    if (std::memcmp(mine.data() + at, theirs.data() + at, kSizes[i]) != 0) return kNames[i];
    at += kSizes[i];
  }
  return "parameters";
}

template <typename T>
bool AllFinite(const std::vector<T>& v) {
  for (T x : v) {
    if (!std::isfinite(x)) return false;
  }
  return true;
}

}  // namespace

void DciPageTable::SaveImage(ByteWriter* w) const {
  w->PutArray(node_first_);
  w->PutArray(node_last_);
  w->PutArray(node_num_pages_);
  w->PutArray(node_tokens_);
  w->Put<uint32_t>(num_pages());
  w->PutArray(page_fill_);
  w->PutArray(page_node_);
  w->PutArray(page_next_);
  w->PutArray(positions_);
  w->PutArray(page_of_position_);
}

std::string DciPageTable::LoadImage(ByteReader* r, uint32_t nodes, int64_t tokens) {
  const uint64_t P = static_cast<uint64_t>(page_tokens_);
  uint32_t pages = 0;
  if (!r->GetArray(&node_first_, nodes) || !r->GetArray(&node_last_, nodes) ||
      !r->GetArray(&node_num_pages_, nodes) || !r->GetArray(&node_tokens_, nodes) ||
      !r->Get(&pages) || pages > static_cast<uint64_t>(tokens) ||
      !r->GetArray(&page_fill_, pages) || !r->GetArray(&page_node_, pages) ||
      !r->GetArray(&page_next_, pages) || !r->GetArray(&positions_, uint64_t{pages} * P) ||
      !r->GetArray(&page_of_position_, static_cast<uint64_t>(tokens))) {
    return "the page table is truncated or its counts disagree";
  }
  // Every node's chain: its own pages, each once, num_pages long, ending at
  // its last page; together they cover every page.
  std::vector<uint8_t> seen_page(pages, 0);
  uint64_t chained = 0;
  for (uint32_t node = 0; node < nodes; ++node) {
    uint32_t page = node_first_[node], last = kNone;
    uint64_t held = 0;
    for (uint32_t k = 0; k < node_num_pages_[node]; ++k) {
      if (page >= pages || seen_page[page] || page_node_[page] != node) {
        return absl::StrCat("logical node ", node, "'s page chain is broken");
      }
      seen_page[page] = 1;
      if (page_fill_[page] < 1 || page_fill_[page] > P) {
        return absl::StrCat("page ", page, " has fill ", page_fill_[page]);
      }
      held += page_fill_[page];
      last = page;
      page = page_next_[page];
    }
    if (page != kNone || last != node_last_[node] || node_num_pages_[node] == 0 ||
        held != node_tokens_[node]) {
      return absl::StrCat("logical node ", node, "'s pages do not add up");
    }
    chained += node_num_pages_[node];
  }
  if (chained != pages) return "a page belongs to no logical node";
  // Every position in exactly one filled slot, and mapped to that page.
  std::vector<uint8_t> seen_pos(static_cast<size_t>(tokens), 0);
  for (uint32_t page = 0; page < pages; ++page) {
    const int32_t* pos = &positions_[page * P];
    for (uint64_t s = 0; s < P; ++s) {
      if (s >= page_fill_[page]) {
        if (pos[s] != -1) return absl::StrCat("page ", page, " has a position past its fill");
        continue;
      }
      if (pos[s] < 0 || pos[s] >= tokens || seen_pos[pos[s]] || page_of_position_[pos[s]] != page) {
        return absl::StrCat("page ", page, " slot ", s, " holds a bad position");
      }
      seen_pos[pos[s]] = 1;
    }
  }
  if (std::find(seen_pos.begin(), seen_pos.end(), 0) != seen_pos.end()) {
    return "a position is in no page";
  }
  return "";
}

void DciTree::SaveImage(ByteWriter* w) const {
  w->Put<uint32_t>(kImageAlgorithm);
  PutParams(w, params_);
  const int64_t n = num_tokens();
  const int top = top_level();
  w->Put<int64_t>(n);
  w->Put<int32_t>(top);
  w->Put<float>(mips_.bound());
  w->Put<int64_t>(mips_.keys_seen());
  w->Put<int64_t>(mips_.over_bound());
  w->PutArray(subspace_.basis());
  w->PutArray(key_top_);
  w->PutArray(key_node_);
  for (int l = 1; l <= top; ++l) {
    const Level& L = levels_[l];
    w->Put<uint32_t>(L.size());
    w->PutArray(L.key);
    w->PutArray(L.parent);
    if (l >= 2) {
      std::vector<uint32_t> offsets{0}, ids;
      for (const std::vector<uint32_t>& ch : L.children) {
        ids.insert(ids.end(), ch.begin(), ch.end());
        offsets.push_back(static_cast<uint32_t>(ids.size()));
      }
      w->PutArray(offsets);
      w->PutArray(ids);
    }
    const DciNodeReps& R = L.reps;
    for (const auto* v : {&R.centroid, &R.abar, &R.m2, &R.half_sq, &R.c2, &R.pm2, &R.lam, &R.res}) {
      w->PutArray(*v);
    }
    w->PutArray(R.count);
  }
  w->PutArray(nodes_by_key_);
  pages_.SaveImage(w);
}

bool DciTree::LoadLevels(ByteReader* r, int top, int64_t n) {
  const uint64_t d = params_.dim, rank = subspace_.rank();
  levels_.resize(top + 1);
  uint32_t below = static_cast<uint32_t>(n);
  for (int l = 1; l <= top; ++l) {
    Level& L = levels_[l];
    uint32_t size = 0;
    if (!r->Get(&size) || size > below || size == 0) return false;
    if (!r->GetArray(&L.key, size) || !r->GetArray(&L.parent, size)) return false;
    if (l >= 2) {
      std::vector<uint32_t> offsets, ids;
      if (!r->GetArray(&offsets, uint64_t{size} + 1) || !r->GetArray(&ids, below)) return false;
      if (offsets[0] != 0 || offsets[size] != below) return false;
      L.children.resize(size);
      for (uint32_t i = 0; i < size; ++i) {
        if (offsets[i + 1] < offsets[i] || offsets[i + 1] > below) return false;
        L.children[i].assign(ids.begin() + offsets[i], ids.begin() + offsets[i + 1]);
      }
    }
    DciNodeReps& R = L.reps;
    if (!r->GetArray(&R.centroid, size * d) || !r->GetArray(&R.abar, size) ||
        !r->GetArray(&R.m2, size) || !r->GetArray(&R.half_sq, size) || !r->GetArray(&R.c2, size) ||
        !r->GetArray(&R.pm2, size * rank) || !r->GetArray(&R.lam, size * rank) ||
        !r->GetArray(&R.res, size) || !r->GetArray(&R.count, size)) {
      return false;
    }
    below = size;
  }
  return true;
}

absl::StatusOr<std::unique_ptr<DciTree>> DciTree::LoadImage(const DciTreeParams& params,
                                                            ByteReader* r, int64_t tokens) {
  uint32_t algorithm = 0;
  if (!r->Get(&algorithm)) return absl::DataLossError("DCI-tree image: truncated header");
  if (algorithm != kImageAlgorithm) {
    return absl::FailedPreconditionError(absl::StrCat(
        "DCI-tree image of tree algorithm ", algorithm, "; this daemon builds ", kImageAlgorithm));
  }
  const std::string differs = CompareParams(r, params);
  if (!r->ok()) return absl::DataLossError("DCI-tree image: truncated parameters");
  if (!differs.empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat("DCI-tree image built with another ", differs));
  }
  ASSIGN_OR_RETURN(std::unique_ptr<DciTree> t, Create(params));
  const auto lost = [](const std::string& why) {
    return absl::DataLossError(absl::StrCat("DCI-tree image: ", why));
  };
  int64_t n = 0, seen = 0, over = 0;
  int32_t top = 0;
  float bound = 0.0f;
  if (!r->Get(&n) || !r->Get(&top) || !r->Get(&bound) || !r->Get(&seen) || !r->Get(&over)) {
    return lost("truncated header");
  }
  if (n != tokens || n < 1 || n > std::numeric_limits<int32_t>::max() || top < 1 ||
      top > kMaxLevels) {
    return lost(absl::StrCat(n, " tokens on ", top, " levels"));
  }
  absl::StatusOr<MipsAugmentation> mips =
      MipsAugmentation::FromState(bound, params.dim, params.rebuild_fraction, seen, over);
  if (!mips.ok()) return lost(std::string(mips.status().message()));
  t->mips_ = *mips;
  std::vector<float> basis;
  if (!r->GetArray(&basis, static_cast<uint64_t>(t->subspace_.rank()) * params.dim) ||
      !t->subspace_.SetBasis(std::move(basis))) {
    return lost("bad key subspace");
  }
  if (!r->GetArray(&t->key_top_, n) || !r->GetArray(&t->key_node_, n) ||
      !t->LoadLevels(r, top, n) || !r->GetArray(&t->nodes_by_key_, t->levels_[1].size())) {
    return lost("truncated, or its counts disagree");
  }
  if (std::string why = t->pages_.LoadImage(r, t->levels_[1].size(), n); !why.empty()) {
    return lost(why);
  }
  std::string why = t->CheckPromotion();
  for (int l = 1; why.empty() && l <= top; ++l) why = t->CheckLevel(l);
  if (why.empty()) why = t->CheckKeysAndPages();
  if (!why.empty()) return lost(why);
  t->SyncAllChildRuns();
  t->SyncAllMirrors();
  t->SyncRoomByRank();
  t->ReserveTokens(TokensWithHeadroom(n));
  return t;
}

std::string DciTree::CheckPromotion() const {
  // The promotion rule alone fixes every key's top level and the level
  // sizes; a later Insert counts on them.
  std::vector<uint32_t> counts{0};
  for (int64_t k = 0; k < num_tokens(); ++k) {
    if (PromotionLevelFor(&counts, ratio_) != key_top_[k]) {
      return absl::StrCat("key ", k, " is on the wrong level");
    }
  }
  if (static_cast<int>(counts.size()) != top_level() + 1) return "the tree has the wrong height";
  for (int l = 1; l <= top_level(); ++l) {
    if (counts[l] != levels_[l].size()) return absl::StrCat("level ", l, " has the wrong size");
  }
  return "";
}

std::string DciTree::CheckLevel(int l) const {
  const Level& L = levels_[l];
  const int64_t n = num_tokens();
  const auto bad = [l](const char* what, uint32_t node) {
    return absl::StrCat("level ", l, " node ", node, ": ", what);
  };
  std::vector<uint8_t> key_seen(static_cast<size_t>(n), 0);
  for (uint32_t i = 0; i < L.size(); ++i) {
    if (L.key[i] >= n || key_top_[L.key[i]] < l || key_seen[L.key[i]]) return bad("bad key", i);
    key_seen[L.key[i]] = 1;
    const bool top = l == top_level();
    if (top ? L.parent[i] != kNone : L.parent[i] >= levels_[l + 1].size()) {
      return bad("bad parent", i);
    }
  }
  const DciNodeReps& R = L.reps;
  if (!AllFinite(R.centroid) || !AllFinite(R.abar) || !AllFinite(R.m2) || !AllFinite(R.half_sq) ||
      !AllFinite(R.c2) || !AllFinite(R.pm2) || !AllFinite(R.lam) || !AllFinite(R.res)) {
    return absl::StrCat("level ", l, " has a non-finite representative");
  }
  if (l == 1) return "";
  // Each node below is in its parent's children exactly once; each node
  // has its own key among its children; counts add up.
  const Level& B = levels_[l - 1];
  std::vector<uint8_t> child_seen(B.size(), 0);
  for (uint32_t i = 0; i < L.size(); ++i) {
    bool own = false;
    uint64_t count = 0;
    for (uint32_t c : L.children[i]) {
      if (c >= B.size() || child_seen[c] || B.parent[c] != i) return bad("bad child", i);
      child_seen[c] = 1;
      own |= B.key[c] == L.key[i];
      count += B.reps.count[c];
    }
    if (!own || count != R.count[i]) return bad("children do not add up", i);
  }
  return "";
}

std::string DciTree::CheckKeysAndPages() const {
  const Level& L1 = levels_[1];
  for (int64_t k = 0; k < num_tokens(); ++k) {
    const int t = key_top_[k];
    const uint32_t node = key_node_[k];
    const bool ok =
        t >= 1 ? node < levels_[t].size() && levels_[t].key[node] == k
               : node < L1.size() && pages_.node_of_page(pages_.page_of_position(k)) == node;
    if (!ok) return absl::StrCat("key ", k, " names the wrong node");
  }
  std::vector<uint8_t> seen(L1.size(), 0);
  for (size_t i = 0; i < nodes_by_key_.size(); ++i) {
    const uint32_t node = nodes_by_key_[i];
    if (node >= L1.size() || seen[node] ||
        (i > 0 && L1.key[nodes_by_key_[i - 1]] >= L1.key[node])) {
      return "the level-1 nodes by key are not in key order";
    }
    seen[node] = 1;
  }
  for (uint32_t node = 0; node < L1.size(); ++node) {
    if (pages_.node_tokens(node) != L1.reps.count[node] ||
        pages_.node_of_page(pages_.page_of_position(L1.key[node])) != node) {
      return absl::StrCat("logical node ", node, " does not hold its keys");
    }
  }
  return "";
}

}  // namespace icecache
