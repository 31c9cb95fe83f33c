#include "server/rpc/metrics.h"

#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace icecache::rpc {
namespace {

using ::testing::HasSubstr;

TEST(MetricsTest, CounterAndGaugeRenderWithHelpTypeAndLabels) {
  Registry r;
  auto* c = r.AddCounter("icecache_test_total", "Things done", {"method", "code"});
  c->WithLabels({"Create", "OK"})->Add();
  c->WithLabels({"Create", "OK"})->Add(2);
  c->WithLabels({"Drop", "NOT_FOUND"})->Add();
  c->WithLabels({"Drop", "NOT_FOUND"})->Add(-5);  // ignored: counters only go up
  auto* g = r.AddGauge("icecache_test_bytes", "Bytes", {});
  g->WithLabels({})->Set(1.5);
  g->WithLabels({})->Add(-0.25);
  EXPECT_EQ(r.Render(),
            "# HELP icecache_test_total Things done\n"
            "# TYPE icecache_test_total counter\n"
            "icecache_test_total{method=\"Create\",code=\"OK\"} 3\n"
            "icecache_test_total{method=\"Drop\",code=\"NOT_FOUND\"} 1\n"
            "# HELP icecache_test_bytes Bytes\n"
            "# TYPE icecache_test_bytes gauge\n"
            "icecache_test_bytes 1.25\n");
}

TEST(MetricsTest, HistogramBucketsAreCumulativeWithInfSumAndCount) {
  Registry r;
  auto* h = r.AddHistogram("icecache_lat_seconds", "Latency", {"method"}, {0.001, 0.01, 0.1});
  Histogram* x = h->WithLabels({"Select"});
  x->Observe(0.0005);  // <= 0.001
  x->Observe(0.001);   // bound is inclusive
  x->Observe(0.05);    // <= 0.1
  x->Observe(3);       // +Inf only
  EXPECT_EQ(x->count(), 4u);
  EXPECT_DOUBLE_EQ(x->sum(), 0.0005 + 0.001 + 0.05 + 3);
  const std::string text = r.Render();
  EXPECT_THAT(text, HasSubstr("# TYPE icecache_lat_seconds histogram\n"));
  EXPECT_THAT(text, HasSubstr("icecache_lat_seconds_bucket{method=\"Select\",le=\"0.001\"} 2\n"));
  EXPECT_THAT(text, HasSubstr("icecache_lat_seconds_bucket{method=\"Select\",le=\"0.01\"} 2\n"));
  EXPECT_THAT(text, HasSubstr("icecache_lat_seconds_bucket{method=\"Select\",le=\"0.1\"} 3\n"));
  EXPECT_THAT(text, HasSubstr("icecache_lat_seconds_bucket{method=\"Select\",le=\"+Inf\"} 4\n"));
  EXPECT_THAT(text, HasSubstr("icecache_lat_seconds_count{method=\"Select\"} 4\n"));
  EXPECT_THAT(text, HasSubstr("icecache_lat_seconds_sum{method=\"Select\"} 3.0515\n"));
}

TEST(MetricsTest, LabelValuesAreEscaped) {
  Registry r;
  r.AddCounter("icecache_esc_total", "x", {"tenant"})->WithLabels({"a\"b\\c\nd"})->Add();
  EXPECT_THAT(r.Render(), HasSubstr("icecache_esc_total{tenant=\"a\\\"b\\\\c\\nd\"} 1\n"));
}

TEST(MetricsTest, SnapshotFamiliesAreReplacedByCollectors) {
  Registry r;
  auto* snap = r.AddSnapshot("icecache_tenant_used_bytes", "Used", MetricType::kGauge, {"tenant"});
  int round = 0;
  r.AddCollector([&] {
    ++round;
    if (round == 1) {
      snap->Replace({{{"a"}, 10}, {{"b"}, 20}});
    } else {
      snap->Replace({{{"b"}, 5}});
    }
  });
  const std::string first = r.Render();
  EXPECT_THAT(first, HasSubstr("icecache_tenant_used_bytes{tenant=\"a\"} 10\n"));
  EXPECT_THAT(first, HasSubstr("icecache_tenant_used_bytes{tenant=\"b\"} 20\n"));
  const std::string second = r.Render();
  EXPECT_THAT(second, ::testing::Not(HasSubstr("tenant=\"a\"")));
  EXPECT_THAT(second, HasSubstr("icecache_tenant_used_bytes{tenant=\"b\"} 5\n"));
}

TEST(MetricsTest, ConcurrentUpdatesAreNotLost) {
  Registry r;
  auto* c = r.AddCounter("icecache_conc_total", "x", {"k"});
  auto* h = r.AddHistogram("icecache_conc_seconds", "x", {}, LatencyBucketsSeconds());
  constexpr int kThreads = 4;
  constexpr int kPerThread = 20000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        c->WithLabels({t % 2 == 0 ? "even" : "odd"})->Add();
        h->WithLabels({})->Observe(0.001);
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(c->WithLabels({"even"})->value(), 2.0 * kPerThread);
  EXPECT_EQ(c->WithLabels({"odd"})->value(), 2.0 * kPerThread);
  EXPECT_EQ(h->WithLabels({})->count(), uint64_t{kThreads} * kPerThread);
  EXPECT_NEAR(h->WithLabels({})->sum(), kThreads * kPerThread * 0.001, 1e-6);
}

TEST(MetricsTest, ValueFormatting) {
  EXPECT_EQ(FormatMetricValue(0), "0");
  EXPECT_EQ(FormatMetricValue(4294967296.0), "4294967296");
  EXPECT_EQ(FormatMetricValue(0.1), "0.1");
  EXPECT_EQ(FormatMetricValue(1.0 / 0.0), "+Inf");
  EXPECT_EQ(FormatMetricValue(-1.0 / 0.0), "-Inf");
  EXPECT_EQ(FormatMetricValue(std::nan("")), "NaN");
}

TEST(MetricsDeathTest, DuplicateOrInvalidNamesAbort) {
  EXPECT_DEATH(
      {
        Registry r;
        r.AddCounter("icecache_dup_total", "x");
        r.AddGauge("icecache_dup_total", "y");
      },
      "registered twice");
  EXPECT_DEATH(
      {
        Registry r;
        r.AddCounter("9bad", "x");
      },
      "invalid metric name");
}

}  // namespace
}  // namespace icecache::rpc
