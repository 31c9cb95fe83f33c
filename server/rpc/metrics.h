// A small Prometheus metrics registry: counters, gauges and histograms with
// fixed buckets, each in a family with named labels, rendered in the
// Prometheus text exposition format (version 0.0.4).
//
// Lock-cheapness: updating a metric (Counter::Add, Gauge::Set,
// Histogram::Observe) is a few relaxed atomic operations and takes no lock.
// Looking a child up by label values (Family::WithLabels) takes a reader lock
// on the family (a writer lock the first time a label set is seen); hot paths
// look children up once and keep the pointer. Children live as long as the
// registry. Snapshot families are replaced wholesale at scrape time by a
// collector (for values that come from core stats, such as per-tenant pool
// bytes, where tenants come and go).
//
// Thread safety: everything is thread-safe. The Registry owns its families;
// pointers it returns stay valid for its lifetime.
#ifndef ICECACHE_SERVER_RPC_METRICS_H_
#define ICECACHE_SERVER_RPC_METRICS_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"

namespace icecache::rpc {

class Counter {
 public:
  void Add(double v = 1.0);  // v >= 0; negative values are ignored
  double value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0.0};
};

class Gauge {
 public:
  void Set(double v) { value_.store(v, std::memory_order_relaxed); }
  void Add(double v);
  double value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0.0};
};

class Histogram {
 public:
  // `bounds` are the upper bounds of the buckets, strictly increasing; the
  // +Inf bucket is implicit.
  explicit Histogram(const std::vector<double>* bounds);
  void Observe(double v);
  // Cumulative count per bound, plus the +Inf bucket last.
  std::vector<uint64_t> CumulativeCounts() const;
  uint64_t count() const { return count_.load(std::memory_order_relaxed); }
  double sum() const { return sum_.load(std::memory_order_relaxed); }
  const std::vector<double>& bounds() const { return *bounds_; }

 private:
  const std::vector<double>* bounds_;
  std::unique_ptr<std::atomic<uint64_t>[]> buckets_;  // bounds + 1 (+Inf)
  std::atomic<uint64_t> count_{0};
  std::atomic<double> sum_{0.0};
};

// Latency buckets in seconds, 50 us .. 10 s.
const std::vector<double>& LatencyBucketsSeconds();
// Byte-size buckets, 1 KiB .. 1 GiB in powers of 4.
const std::vector<double>& ByteBuckets();

enum class MetricType { kCounter, kGauge, kHistogram };

template <typename T>
class Family {
 public:
  Family(std::string name, std::string help, std::vector<std::string> label_names,
         std::vector<double> bounds = {})
      : name_(std::move(name)),
        help_(std::move(help)),
        label_names_(std::move(label_names)),
        bounds_(std::move(bounds)) {}

  // The child for these label values (one per label name, in order; missing
  // values are empty, extra ones ignored). Created on first use.
  T* WithLabels(std::initializer_list<absl::string_view> values) ABSL_LOCKS_EXCLUDED(mu_);
  T* WithLabels(const std::vector<std::string>& values) ABSL_LOCKS_EXCLUDED(mu_);

  const std::string& name() const { return name_; }
  const std::string& help() const { return help_; }
  const std::vector<std::string>& label_names() const { return label_names_; }

  // Calls `fn(label_values, child)` for each child in label order.
  void ForEach(const std::function<void(const std::vector<std::string>&, const T&)>& fn) const
      ABSL_LOCKS_EXCLUDED(mu_);

 private:
  const std::string name_;
  const std::string help_;
  const std::vector<std::string> label_names_;
  const std::vector<double> bounds_;  // histograms only
  mutable absl::Mutex mu_;
  std::map<std::vector<std::string>, std::unique_ptr<T>> children_ ABSL_GUARDED_BY(mu_);
};

// A family whose samples are replaced as a whole (by a scrape-time collector).
class SnapshotFamily {
 public:
  struct Sample {
    std::vector<std::string> labels;
    double value = 0;
  };
  SnapshotFamily(std::string name, std::string help, MetricType type,
                 std::vector<std::string> label_names)
      : name_(std::move(name)),
        help_(std::move(help)),
        type_(type),
        label_names_(std::move(label_names)) {}
  void Replace(std::vector<Sample> samples) ABSL_LOCKS_EXCLUDED(mu_);
  std::vector<Sample> samples() const ABSL_LOCKS_EXCLUDED(mu_);
  const std::string& name() const { return name_; }
  const std::string& help() const { return help_; }
  MetricType type() const { return type_; }
  const std::vector<std::string>& label_names() const { return label_names_; }

 private:
  const std::string name_;
  const std::string help_;
  const MetricType type_;
  const std::vector<std::string> label_names_;
  mutable absl::Mutex mu_;
  std::vector<Sample> samples_ ABSL_GUARDED_BY(mu_);
};

class Registry {
 public:
  Registry() = default;
  Registry(const Registry&) = delete;
  Registry& operator=(const Registry&) = delete;

  // Names must be valid Prometheus names ([a-zA-Z_:][a-zA-Z0-9_:]*) and
  // unique in the registry; a duplicate or invalid name is a programming
  // error and aborts (families are created once at start-up).
  Family<Counter>* AddCounter(std::string name, std::string help,
                              std::vector<std::string> label_names = {});
  Family<Gauge>* AddGauge(std::string name, std::string help,
                          std::vector<std::string> label_names = {});
  Family<Histogram>* AddHistogram(std::string name, std::string help,
                                  std::vector<std::string> label_names, std::vector<double> bounds);
  SnapshotFamily* AddSnapshot(std::string name, std::string help, MetricType type,
                              std::vector<std::string> label_names);
  // Collectors run (in registration order) at the start of each Render.
  void AddCollector(std::function<void()> collector);

  // Prometheus text format, families in registration order.
  std::string Render() const;

 private:
  struct Entry {
    MetricType type;
    Family<Counter>* counter = nullptr;
    Family<Gauge>* gauge = nullptr;
    Family<Histogram>* histogram = nullptr;
    SnapshotFamily* snapshot = nullptr;
  };
  void CheckNewName(const std::string& name) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  mutable absl::Mutex mu_;
  std::vector<Entry> entries_ ABSL_GUARDED_BY(mu_);
  std::vector<std::unique_ptr<Family<Counter>>> counters_ ABSL_GUARDED_BY(mu_);
  std::vector<std::unique_ptr<Family<Gauge>>> gauges_ ABSL_GUARDED_BY(mu_);
  std::vector<std::unique_ptr<Family<Histogram>>> histograms_ ABSL_GUARDED_BY(mu_);
  std::vector<std::unique_ptr<SnapshotFamily>> snapshots_ ABSL_GUARDED_BY(mu_);
  std::vector<std::function<void()>> collectors_ ABSL_GUARDED_BY(mu_);
};

// Escapes a label value for the text format (\\, \", \n).
std::string EscapeLabelValue(absl::string_view v);
// Formats a sample value: integers without exponent, +Inf/-Inf/NaN spelled
// as Prometheus expects.
std::string FormatMetricValue(double v);

}  // namespace icecache::rpc

#endif  // ICECACHE_SERVER_RPC_METRICS_H_
