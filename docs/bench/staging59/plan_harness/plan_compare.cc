#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "server/session/resident_rows.h"
namespace icecache {
#include "planA.inc"
}
using namespace icecache;
int main() {
  std::mt19937 rng(3);
  double ta = 0, tb = 0;
  size_t mism = 0, cases = 0;
  for (int round = 0; round < 4000; ++round) {
    const int np = std::uniform_int_distribution<int>(0, 300)(rng);
    const int n = std::uniform_int_distribution<int>(1, 300)(rng);
    const int range = round % 3 == 0 ? 40 : 32768;  // small ranges: many duplicates
    std::vector<int32_t> prev(np), cur(n);
    for (auto& x : prev)
      x = std::uniform_int_distribution<int>(round % 7 == 0 ? -1 : 0, range)(rng);
    for (int i = 0; i < n; ++i)
      cur[i] = (i < np && rng() % 4 != 0) ? prev[rng() % np]
                                          : std::uniform_int_distribution<int>(0, range)(rng);
    auto t0 = std::chrono::steady_clock::now();
    InPlacePlan a = PlanA(prev, cur);
    auto t1 = std::chrono::steady_clock::now();
    InPlacePlan b = PlanInPlace(prev, cur);
    auto t2 = std::chrono::steady_clock::now();
    ta += std::chrono::duration<double, std::micro>(t1 - t0).count();
    tb += std::chrono::duration<double, std::micro>(t2 - t1).count();
    ++cases;
    if (a.slots != b.slots || a.copy_index != b.copy_index || a.copy_slot != b.copy_slot) ++mism;
  }
  printf("cases %zu mismatches %zu; A %.2f us B %.2f us per plan\n", cases, mism, ta / cases,
         tb / cases);
}
