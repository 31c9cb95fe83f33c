#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <vector>

#include "server/session/resident_rows.h"
using namespace icecache;
int main() {
  std::mt19937 rng(1);
  const int n = 256, H = 8, steps = 2000;
  // previous selection and the next: 78% overlap, clustered positions
  std::vector<std::vector<int32_t>> prev(H), cur(H);
  auto make = [&](std::vector<int32_t>& v, int base) {
    v.clear();
    for (int i = 0; i < 4; ++i) v.push_back(i);
    for (int i = 0; i < 64; ++i) v.push_back(32768 - 64 + i);
    while ((int)v.size() < n) {
      int p = std::uniform_int_distribution<int>(4, 32700)(rng) / 16 * 16;
      for (int k = 0; k < 16 && (int)v.size() < n; ++k) v.push_back(p + k);
    }
  };
  for (int h = 0; h < H; ++h) make(prev[h], 0);
  double total = 0;
  size_t copies = 0;
  for (int s = 0; s < steps; ++s) {
    for (int h = 0; h < H; ++h) {
      cur[h] = prev[h];
      // replace ~22% with new tokens, shuffle order
      for (int k = 0; k < n / 5; ++k)
        cur[h][68 + std::uniform_int_distribution<int>(0, n - 69)(rng)] =
            std::uniform_int_distribution<int>(4, 32700)(rng);
      std::shuffle(cur[h].begin(), cur[h].end(), rng);
    }
    auto t0 = std::chrono::steady_clock::now();
    for (int h = 0; h < H; ++h) {
      InPlacePlan p = PlanInPlace(prev[h], cur[h]);
      copies += p.copy_index.size();
      prev[h] = std::move(p.slots);
    }
    total +=
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
  }
  printf("PlanInPlace: %.2f us per 8 heads (copies/head %.1f)\n", total / steps,
         double(copies) / steps / H);
}
