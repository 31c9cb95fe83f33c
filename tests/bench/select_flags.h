// The command line of `icecache-bench select`, on CLI11 (common/cli.h).
#ifndef ICECACHE_TESTS_BENCH_SELECT_FLAGS_H_
#define ICECACHE_TESTS_BENCH_SELECT_FLAGS_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "tests/bench/select_bench.h"

namespace CLI {
class App;
}  // namespace CLI

namespace icecache::bench {

// Registers the flags of `icecache-bench select` on `app` (the subcommand)
// and holds their values; Options() validates them once `app` has parsed.
// Holds pointers into itself: neither copyable nor movable.
class SelectFlags {
 public:
  explicit SelectFlags(CLI::App* app);
  SelectFlags(const SelectFlags&) = delete;
  SelectFlags& operator=(const SelectFlags&) = delete;

  // InvalidArgument naming the flag for malformed lists, unknown selectors
  // or dtypes and out-of-range settings. Page sizes come back sorted and
  // deduplicated; an empty --selectors means every method.
  absl::StatusOr<SelectBenchOptions> Options() const;

 private:
  SelectBenchOptions o_;
  std::string page_tokens_ = "16";
  std::string selectors_;
  std::string granularity_ = "page";
  std::string kv_dtype_ = "f16";
  std::string families_;
  std::string widths_;
};

// Parses the arguments after "select" (for tests): InvalidArgument naming the
// flag for unknown flags, missing or malformed values and out-of-range
// settings.
absl::StatusOr<SelectBenchOptions> ParseSelectArgs(const std::vector<std::string>& args);

}  // namespace icecache::bench

#endif  // ICECACHE_TESTS_BENCH_SELECT_FLAGS_H_
