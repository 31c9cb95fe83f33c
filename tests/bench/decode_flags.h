// The command line of `icecache-bench decode` (decode_bench.h): CLI11 flags
// with their defaults in --help, and the checks one flag alone cannot make.
#ifndef ICECACHE_TESTS_BENCH_DECODE_FLAGS_H_
#define ICECACHE_TESTS_BENCH_DECODE_FLAGS_H_

#include <string>

#include "absl/status/statusor.h"
#include "common/cli.h"
#include "tests/bench/decode_bench.h"

namespace icecache::bench {

class DecodeFlags {
 public:
  // Registers the flags on `app` (not owned; must outlive this object).
  explicit DecodeFlags(CLI::App* app);
  // The options after parsing. InvalidArgument naming the flag: a context
  // like "12x", a policy the benchmark cannot parse, a batch size < 1,
  // --mode other than socket/in-process, --spawn with in-process.
  absl::StatusOr<DecodeBenchOptions> Options() const;

 private:
  DecodeBenchOptions o_;
  std::string contexts_ = "32768", batch_ = "1", policies_;
};

// "8k,16k,32768" -> {8192, 16384, 32768} (k = 1024).
absl::StatusOr<std::vector<int64_t>> ParseContexts(const std::string& text);

}  // namespace icecache::bench

#endif  // ICECACHE_TESTS_BENCH_DECODE_FLAGS_H_
