#include "common/random_id.h"

#include "absl/random/random.h"
#include "absl/strings/str_format.h"

namespace icecache {
namespace {

absl::BitGen& Gen() {
  thread_local absl::BitGen gen;
  return gen;
}

}  // namespace

std::string RandomHexId() {
  absl::BitGen& gen = Gen();
  const uint64_t hi = absl::Uniform<uint64_t>(gen);
  const uint64_t lo = absl::Uniform<uint64_t>(gen);
  return absl::StrFormat("%016x%016x", hi, lo);
}

uint64_t RandomNonZero64() {
  uint64_t v = 0;
  while (v == 0) v = absl::Uniform<uint64_t>(Gen());
  return v;
}

}  // namespace icecache
