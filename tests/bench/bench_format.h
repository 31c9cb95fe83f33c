#ifndef ICECACHE_TESTS_BENCH_BENCH_FORMAT_H_
#define ICECACHE_TESTS_BENCH_BENCH_FORMAT_H_

// Small formatting helpers the select reports share (one definition, so the
// benchmark sources can be compiled as one unity batch).

#include <cmath>
#include <limits>
#include <string>

#include "absl/strings/str_format.h"

namespace icecache::bench {

// a / b, NaN when b is not positive (a ratio with nothing to compare to).
inline double Ratio(double a, double b) {
  return b > 0 ? a / b : std::numeric_limits<double>::quiet_NaN();
}

// v printed with the printf format f, "-" when v is not finite. `f` is
// checked against a double at compile time where the compiler can (clang),
// so it must be a literal.
inline std::string Fmt(double v, const absl::FormatSpec<double>& f) {
  return std::isfinite(v) ? absl::StrFormat(f, v) : std::string("-");
}

}  // namespace icecache::bench

#endif  // ICECACHE_TESTS_BENCH_BENCH_FORMAT_H_
