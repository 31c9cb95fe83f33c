// The DCI-tree's structural invariants (docs/architecture.md §3.3), shared
// by the tree's tests and the index image's tests.
#ifndef ICECACHE_TESTS_UNIT_INDEX_DCI_TREE_INVARIANTS_H_
#define ICECACHE_TESTS_UNIT_INDEX_DCI_TREE_INVARIANTS_H_

#include <algorithm>
#include <cstdint>
#include <vector>

#include "gtest/gtest.h"
#include "server/index/dci_tree.h"

namespace icecache::mdci_test {

// Structural invariants of the tree and its page table. Has ASSERTs: call
// through ASSERT_NO_FATAL_FAILURE.
inline void CheckInvariants(const DciTree& t) {
  const int64_t n = t.num_tokens();
  const int top = t.top_level();
  ASSERT_GE(top, 1);
  // Promotion counts follow the ratio: |level l+1| ~ |level l| / r.
  for (int l = 0; l < top; ++l) {
    const double expect = static_cast<double>(t.level_size(l)) / t.ratio();
    EXPECT_LE(t.level_size(l + 1), expect + 1.0) << "level " << l + 1;
    EXPECT_GE(t.level_size(l + 1), expect - 1.0) << "level " << l + 1;
  }
  EXPECT_LT(t.level_size(top), static_cast<uint32_t>(t.ratio()) + 1);
  for (int l = 1; l <= top; ++l) {
    for (uint32_t i = 0; i < t.level_size(l); ++i) {
      const uint32_t key = t.node_key(l, i);
      ASSERT_LT(key, n);
      EXPECT_GE(t.key_top_level(key), l);
      const uint32_t parent = t.node_parent(l, i);
      if (l == top) {
        EXPECT_EQ(parent, DciTree::kNone);
      } else {
        ASSERT_LT(parent, t.level_size(l + 1)) << "level " << l << " node " << i;
        const auto& ch = t.node_children(l + 1, parent);
        EXPECT_NE(std::find(ch.begin(), ch.end(), i), ch.end());
      }
      if (l >= 2) {
        // Its own child: one child on level l-1 is the same key.
        bool own = false;
        for (uint32_t c : t.node_children(l, i)) own |= t.node_key(l - 1, c) == key;
        EXPECT_TRUE(own) << "level " << l << " node " << i;
        uint32_t sum = 0;
        for (uint32_t c : t.node_children(l, i)) sum += t.node_count(l - 1, c);
        EXPECT_EQ(sum, t.node_count(l, i));
        // The flat child run the descent expands from says exactly what the
        // children list holds: the run when it is one, nothing otherwise.
        const auto& ch = t.node_children(l, i);
        bool consecutive = !ch.empty();
        for (size_t k = 1; k < ch.size(); ++k) consecutive &= ch[k] == ch[0] + k;
        const DciTree::ChildRun run = t.node_child_run(l, i);
        if (consecutive) {
          EXPECT_EQ(run.first, ch[0]) << "level " << l << " node " << i;
          EXPECT_EQ(run.count, ch.size()) << "level " << l << " node " << i;
        } else {
          EXPECT_EQ(run.count, 0u) << "level " << l << " node " << i;
        }
      }
    }
  }
  // Page table: every token in exactly one page, fills within bounds, node
  // -> pages consistent, each level-1 node holds its own key.
  const DciPageTable& pt = t.page_table();
  EXPECT_EQ(pt.num_nodes(), t.level_size(1));
  std::vector<int> seen(n, 0);
  uint32_t pages_via_nodes = 0;
  for (uint32_t node = 0; node < pt.num_nodes(); ++node) {
    uint32_t tokens = 0;
    bool own = false;
    for (uint32_t page = pt.first_page(node); page != DciPageTable::kNone;
         page = pt.next_page(page)) {
      ++pages_via_nodes;
      EXPECT_EQ(pt.node_of_page(page), node);
      EXPECT_GE(pt.fill(page), 1u);
      EXPECT_LE(pt.fill(page), static_cast<uint32_t>(pt.page_tokens()));
      for (uint32_t s = 0; s < pt.fill(page); ++s) {
        const int32_t pos = pt.positions(page)[s];
        ASSERT_GE(pos, 0);
        ASSERT_LT(pos, n);
        ++seen[pos];
        EXPECT_EQ(pt.page_of_position(pos), page);
        own |= static_cast<uint32_t>(pos) == t.node_key(1, node);
        if (t.key_top_level(pos) == 0) {
          EXPECT_EQ(t.key_node(pos), node);
        }
      }
      tokens += pt.fill(page);
    }
    EXPECT_TRUE(own) << "node " << node;
    EXPECT_EQ(tokens, pt.node_tokens(node));
    EXPECT_EQ(tokens, t.node_count(1, node));
  }
  EXPECT_EQ(pages_via_nodes, pt.num_pages());
  for (int64_t p = 0; p < n; ++p) EXPECT_EQ(seen[p], 1) << "position " << p;
}

}  // namespace icecache::mdci_test

#endif  // ICECACHE_TESTS_UNIT_INDEX_DCI_TREE_INVARIANTS_H_
