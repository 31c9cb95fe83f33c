// Selectors over the positional page layout (docs/architecture.md §3.6): token at
// position p sits in page p / page_tokens, slot p % page_tokens; pages fill in
// order and a new page opens when the last one is full. Build() and Insert()
// are the same append (Build() only on an empty index).
//
//  - kExact: every page is scored by PageMassScore over the exact logits of
//    all its keys (DotRowsMulti: each key row read once for the G queries).
//  - kQuest: each page keeps the elementwise min and max of its keys (fp32,
//    2 x head_dim floats per page, in the index); its bound for a query q is
//    sum_i max(q_i min_i, q_i max_i), scaled by 1/sqrt(head_dim), max over the
//    G queries. With SelectorConfig.quest_rescore_factor F > 0, the
//    ceil(F x budget / page_tokens) best pages by bound are rescored exactly
//    and the selection is taken from them.
//  - kStreaming: sink pages (and recent, if asked), then the most recent pages
//    until the budget is filled; it reads no keys.
//
// Selection.keys_touched counts key-equivalents read: values read / head_dim.
// Exact scoring of a page adds its fill (each row is read once for all G
// queries); a Quest bound adds 2 per page (its min and max rows). Streaming
// touches nothing.
//
// Ownership: the selector keeps a non-owning pointer to the PageKeys, which
// must outlive it. Thread safety as in selector.h: Select() is const and may
// run concurrently; Build()/Insert() need exclusive access.
#ifndef ICECACHE_SERVER_INDEX_POSITIONAL_SELECTOR_H_
#define ICECACHE_SERVER_INDEX_POSITIONAL_SELECTOR_H_

#include <memory>

#include "server/index/selector.h"

namespace icecache {

// For kExact, kQuest and kStreaming with a config Selector::Create() has
// validated (use Create(); this is its dispatch target). InvalidArgument for
// any other kind.
absl::StatusOr<std::unique_ptr<Selector>> NewPositionalSelector(const SelectorConfig& config,
                                                                const PageKeys* keys);

}  // namespace icecache

#endif  // ICECACHE_SERVER_INDEX_POSITIONAL_SELECTOR_H_
