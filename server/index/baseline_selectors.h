// Factories of the baseline selectors (docs/architecture.md §3.9). Each is a
// PositionalLayoutSelector (positional_layout.h); the token-level ones also
// implement TokenRanker. Use Selector::Create(), which validates the config
// and dispatches here.
#ifndef ICECACHE_SERVER_INDEX_BASELINE_SELECTORS_H_
#define ICECACHE_SERVER_INDEX_BASELINE_SELECTORS_H_

#include <memory>

#include "absl/status/statusor.h"
#include "server/index/selector.h"

namespace icecache {

// For kArkvale, kPqcache, kSnapkv, kOmnikv, kMagicpig and kMdciPublished
// with a validated config. InvalidArgument for any other kind.
absl::StatusOr<std::unique_ptr<Selector>> NewBaselineSelector(const SelectorConfig& config,
                                                              const PageKeys* keys);

// One per kind (defined in each selector's file).
std::unique_ptr<Selector> NewArkvaleSelector(const SelectorConfig& config, const PageKeys* keys);
std::unique_ptr<Selector> NewPqcacheSelector(const SelectorConfig& config, const PageKeys* keys);
std::unique_ptr<Selector> NewSnapkvSelector(const SelectorConfig& config, const PageKeys* keys);
std::unique_ptr<Selector> NewOmnikvSelector(const SelectorConfig& config, const PageKeys* keys);
std::unique_ptr<Selector> NewMagicpigSelector(const SelectorConfig& config, const PageKeys* keys);
std::unique_ptr<Selector> NewMdciPublishedSelector(const SelectorConfig& config,
                                                   const PageKeys* keys);

}  // namespace icecache

#endif  // ICECACHE_SERVER_INDEX_BASELINE_SELECTORS_H_
