// Shared fixture pieces of the session tests: a small pool, a buffer
// registry, a controllable clock and deterministic KV bytes.
#ifndef ICECACHE_TESTS_UNIT_SESSION_SESSION_TEST_UTIL_H_
#define ICECACHE_TESTS_UNIT_SESSION_SESSION_TEST_UTIL_H_

#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/synchronization/notification.h"
#include "common/dtype.h"
#include "common/shm_file.h"
#include "gtest/gtest.h"
#include "server/session/session_manager.h"
#include "tests/support/status_matchers.h"

namespace icecache::testing {

inline std::string UniqueName(const std::string& label) {
  static std::atomic<int> counter{0};
  return "icecache-stest-" + std::to_string(getpid()) + "-" + std::to_string(counter++) + "-" +
         label;
}

// A FakeClock whose next Now() call, once armed, blocks until Release():
// it keeps a request in flight at a known point.
class GateClock : public Clock {
 public:
  absl::Time Now() const override {
    if (armed_.exchange(false)) {
      entered_.Notify();
      release_.WaitForNotification();
    }
    return fake_.Now();
  }
  void Arm() { armed_.store(true); }
  void WaitUntilBlocked() { entered_.WaitForNotification(); }
  void Release() { release_.Notify(); }
  void Advance(absl::Duration d) { fake_.Advance(d); }

 private:
  FakeClock fake_;
  mutable std::atomic<bool> armed_{false};
  mutable absl::Notification entered_;
  absl::Notification release_;
};

inline SessionConfig SmallConfig(SelectorKind kind = SelectorKind::kExact) {
  SessionConfig c;
  c.layers = 4;
  c.kv_heads = 2;
  c.q_heads = 4;
  c.head_dim = 16;
  c.dtype = DType::kF16;
  c.page_tokens = 4;
  c.layer_reuse = 2;
  c.selector = kind;
  c.ttl = absl::Seconds(10);
  c.mdci.seed = 7;
  return c;
}

// Deterministic KV bytes for tokens [first, first + n) in the AppendKv layout.
// Element value depends on (kv, layer, head, position, dim) so that every
// row is distinguishable.
inline std::vector<uint8_t> MakeKv(const SessionConfig& c, int64_t first, int64_t n,
                                   uint64_t seed = 1) {
  const size_t es = DTypeSize(c.dtype);
  std::vector<uint8_t> out(AppendBytes(c, n));
  std::vector<float> row(c.head_dim);
  size_t off = 0;
  for (int kv = 0; kv < 2; ++kv) {
    for (int l = 0; l < c.layers; ++l) {
      for (int h = 0; h < c.kv_heads; ++h) {
        for (int64_t t = 0; t < n; ++t) {
          std::mt19937 rng(static_cast<uint32_t>(seed * 1000003 + kv * 7919 + l * 131 + h * 17 +
                                                 (first + t) * 1000));
          std::normal_distribution<float> nd(0.0f, 1.0f);
          for (int d = 0; d < c.head_dim; ++d) row[d] = nd(rng);
          FromFloat(c.dtype, row.data(), out.data() + off, c.head_dim);
          off += c.head_dim * es;
        }
      }
    }
  }
  return out;
}

inline std::vector<float> MakeQueries(const SessionConfig& c, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> q(static_cast<size_t>(c.q_heads) * c.head_dim);
  for (float& x : q) x = nd(rng);
  return q;
}

struct Env {
  std::unique_ptr<PagePool> pool;
  std::unique_ptr<BufferRegistry> buffers;
  std::unique_ptr<SessionManager> manager;
};

inline Env MakeEnv(Clock* clock, uint64_t capacity = uint64_t{64} << 20,
                   double high_watermark = 0.9, absl::Duration reaper = absl::ZeroDuration()) {
  Env env;
  PagePoolOptions po;
  po.capacity_bytes = capacity;
  po.use_huge_pages = false;
  auto pool = PagePool::Create(po);
  EXPECT_TRUE(pool.ok()) << pool.status();
  env.pool = std::move(pool).value();
  BufferRegistryOptions bo;
  bo.idle_ttl = absl::Seconds(60);
  auto reg = BufferRegistry::Create(bo);
  EXPECT_TRUE(reg.ok()) << reg.status();
  env.buffers = std::move(reg).value();
  SessionManagerOptions mo;
  mo.pool = env.pool.get();
  mo.buffers = env.buffers.get();
  mo.clock = clock;
  mo.high_watermark = high_watermark;
  mo.reaper_interval = reaper;
  mo.build_threads = 2;
  auto m = SessionManager::Create(mo);
  EXPECT_TRUE(m.ok()) << m.status();
  env.manager = std::move(m).value();
  return env;
}

}  // namespace icecache::testing

#endif  // ICECACHE_TESTS_UNIT_SESSION_SESSION_TEST_UTIL_H_
