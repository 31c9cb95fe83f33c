// `icecache-bench select --diagnose`: where mdci's descent loses mass, per
// synthetic family (docs/architecture.md §10). For every family of
// --families (default: all), KV head and step, against the exact page
// reference on mdci's own layout (the calibrator's reference: the best
// pages by exact group mass, sinks forced):
//  - at each width of --widths (default: the configured one), the mass ratio
//    and where the reference's missing mass went: pages whose level-2
//    ancestor the descent did not keep (unreached), pages whose logical node
//    was reached but not taken at level 1 (cut), pages scored exactly but
//    ranked out (the normalisers the descent estimates for the page scores);
//    the mass of non-reference pages taken instead; per query of the GQA
//    group, the worst and best query's own ratio (its softmax shares);
//  - the width the tree's ranking would need: the level-2 nodes kept, in the
//    descent's order, until they hold 0.95 of the reference's mass, and the
//    level-1 tokens taken in its order over every node (level 2 exhaustive)
//    until the candidates do, as a multiple of the budget.
// The tree is bulk-built over the whole context (no decode inserts), so the
// layout is the prefill's. Prints one table; no JSON.
#ifndef ICECACHE_TESTS_BENCH_SELECT_DIAGNOSE_H_
#define ICECACHE_TESTS_BENCH_SELECT_DIAGNOSE_H_

#include "absl/status/status.h"
#include "tests/bench/select_bench.h"

namespace icecache::bench {

// InvalidArgument for a bad family or width (as --matrix); errors of the
// generator or the selector as they come.
absl::Status RunSelectDiagnose(const SelectBenchOptions& options);

}  // namespace icecache::bench

#endif  // ICECACHE_TESTS_BENCH_SELECT_DIAGNOSE_H_
