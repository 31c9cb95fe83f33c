// The page table of the mdci layout (docs/architecture.md §3.3): every level-1 node of
// the DCI-tree and its children form a logical node, stored in one or more
// physical pages of `page_tokens` slots. The table maps
//   logical node -> its pages, in order (the last one is the one appended to),
//   page -> (node, fill, token positions of its slots),
//   token position -> page.
// Page ids are dense and never reused. A page only ever grows (tokens are
// never moved), so placements handed out stay valid.
//
// Thread safety: const methods may run concurrently; mutation needs exclusive
// access. Bad ids are the caller's bug: accessors check them only in debug.
#ifndef ICECACHE_SERVER_INDEX_DCI_PAGE_TABLE_H_
#define ICECACHE_SERVER_INDEX_DCI_PAGE_TABLE_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "server/index/prefetch_lines.h"
#include "server/index/selector.h"

namespace icecache {

class ByteReader;
class ByteWriter;

class DciPageTable {
 public:
  static constexpr uint32_t kNone = UINT32_MAX;

  explicit DciPageTable(int page_tokens) : page_tokens_(page_tokens) {}

  int page_tokens() const { return page_tokens_; }
  uint32_t num_nodes() const { return static_cast<uint32_t>(node_first_.size()); }
  uint32_t num_pages() const { return static_cast<uint32_t>(page_fill_.size()); }
  int64_t num_tokens() const { return static_cast<int64_t>(page_of_position_.size()); }

  // A new logical node with no page yet; returns its id (dense).
  uint32_t AddNode();
  // Appends token `position` (must be num_tokens(): positions arrive in
  // order) to `node`'s last page, or to a new page when that one is full.
  Placement Append(uint32_t node, int32_t position);
  // Asks for the node's lines Append(node) reads first (cold on a decode
  // insert).
  void PrefetchForAppend(uint32_t node) const {
    PrefetchLine(&node_last_[node]);
    PrefetchLine(&node_tokens_[node]);
  }
  // Bulk path: appends `count` positions to `node` in the given order (any
  // positions; page_of_position is filled by FinishBulk()).
  void AppendBulk(uint32_t node, const int32_t* positions, int count);
  // Fills page_of_position for the positions appended by AppendBulk (they
  // must be exactly 0..n-1) and their placements. Returns false when they
  // are not a permutation.
  bool FinishBulk(int64_t n, std::vector<Placement>* placements);

  uint32_t fill(uint32_t page) const { return page_fill_[page]; }
  // Every page's fill, indexed by page (num_pages() of them).
  const uint32_t* fills() const { return page_fill_.data(); }
  uint32_t node_of_page(uint32_t page) const { return page_node_[page]; }
  const int32_t* positions(uint32_t page) const {
    return &positions_[static_cast<size_t>(page) * page_tokens_];
  }
  uint32_t page_of_position(int64_t position) const { return page_of_position_[position]; }
  // Pages of a node: first_page(node), then next_page(page) until kNone.
  uint32_t first_page(uint32_t node) const { return node_first_[node]; }
  uint32_t next_page(uint32_t page) const { return page_next_[page]; }
  uint32_t node_pages(uint32_t node) const { return node_num_pages_[node]; }
  // Tokens in all pages of the node.
  uint32_t node_tokens(uint32_t node) const { return node_tokens_[node]; }
  const uint32_t& node_tokens_ref(uint32_t node) const { return node_tokens_[node]; }

  // Room for `nodes` logical nodes, `pages` pages and `tokens` positions in
  // all, so appends up to there reallocate nothing (headroom.h).
  void Reserve(size_t nodes, size_t pages, size_t tokens);

  // Index image (dci_tree_image.cc): the whole table. LoadImage reads a
  // table of `nodes` nodes and `tokens` positions into this empty one and
  // returns "" when it is consistent (every node's page chain, fill,
  // position and page_of_position checked), else what is wrong.
  void SaveImage(ByteWriter* w) const;
  std::string LoadImage(ByteReader* r, uint32_t nodes, int64_t tokens);

  // Mean fill of all pages as a fraction of page_tokens (0 when empty).
  double MeanFill() const;
  // Bytes held (sizes, not reserved capacity).
  size_t bytes() const;

 private:
  uint32_t NewPage(uint32_t node);

  int page_tokens_;
  std::vector<uint32_t> node_first_, node_last_, node_num_pages_, node_tokens_;
  std::vector<uint32_t> page_fill_, page_node_, page_next_;
  std::vector<int32_t> positions_;  // num_pages x page_tokens
  std::vector<uint32_t> page_of_position_;
};

}  // namespace icecache

#endif  // ICECACHE_SERVER_INDEX_DCI_PAGE_TABLE_H_
