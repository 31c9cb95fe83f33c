#include "server/rpc/metrics.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace icecache::rpc {
namespace {

void AtomicAdd(std::atomic<double>* a, double v) {
  double cur = a->load(std::memory_order_relaxed);
  while (!a->compare_exchange_weak(cur, cur + v, std::memory_order_relaxed)) {
  }
}

bool ValidName(absl::string_view n) {
  if (n.empty()) return false;
  for (size_t i = 0; i < n.size(); ++i) {
    const char c = n[i];
    const bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':';
    if (!alpha && !(i > 0 && c >= '0' && c <= '9')) return false;
  }
  return true;
}

void AppendLabels(std::string* out, const std::vector<std::string>& names,
                  const std::vector<std::string>& values, absl::string_view extra_name = {},
                  absl::string_view extra_value = {}) {
  if (names.empty() && extra_name.empty()) return;
  out->push_back('{');
  bool first = true;
  for (size_t i = 0; i < names.size(); ++i) {
    if (!first) out->push_back(',');
    first = false;
    absl::StrAppend(out, names[i], "=\"", EscapeLabelValue(i < values.size() ? values[i] : ""),
                    "\"");
  }
  if (!extra_name.empty()) {
    if (!first) out->push_back(',');
    absl::StrAppend(out, extra_name, "=\"", EscapeLabelValue(extra_value), "\"");
  }
  out->push_back('}');
}

void AppendHeader(std::string* out, const std::string& name, const std::string& help,
                  absl::string_view type) {
  std::string h;
  for (char c : help) {
    if (c == '\\')
      h += "\\\\";
    else if (c == '\n')
      h += "\\n";
    else
      h.push_back(c);
  }
  absl::StrAppend(out, "# HELP ", name, " ", h, "\n# TYPE ", name, " ", type, "\n");
}

std::vector<std::string> NormaliseLabels(size_t n, std::vector<std::string> v) {
  v.resize(n);
  return v;
}

}  // namespace

void Counter::Add(double v) {
  if (!(v >= 0)) return;  // also rejects NaN
  AtomicAdd(&value_, v);
}

void Gauge::Add(double v) { AtomicAdd(&value_, v); }

Histogram::Histogram(const std::vector<double>* bounds)
    : bounds_(bounds), buckets_(new std::atomic<uint64_t>[bounds->size() + 1]) {
  for (size_t i = 0; i <= bounds->size(); ++i) buckets_[i].store(0, std::memory_order_relaxed);
}

void Histogram::Observe(double v) {
  if (std::isnan(v)) return;
  // Bounds are few (<= ~20): a linear scan beats a binary search here.
  size_t i = 0;
  const size_t n = bounds_->size();
  while (i < n && v > (*bounds_)[i]) ++i;
  buckets_[i].fetch_add(1, std::memory_order_relaxed);
  count_.fetch_add(1, std::memory_order_relaxed);
  AtomicAdd(&sum_, v);
}

std::vector<uint64_t> Histogram::CumulativeCounts() const {
  std::vector<uint64_t> out(bounds_->size() + 1);
  uint64_t acc = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    acc += buckets_[i].load(std::memory_order_relaxed);
    out[i] = acc;
  }
  return out;
}

const std::vector<double>& LatencyBucketsSeconds() {
  static const std::vector<double>* const kBuckets =
      new std::vector<double>{50e-6, 100e-6, 250e-6, 500e-6, 1e-3,   2.5e-3, 5e-3, 10e-3,
                              25e-3, 50e-3,  100e-3, 250e-3, 500e-3, 1.0,    2.5,  10.0};
  return *kBuckets;
}

const std::vector<double>& ByteBuckets() {
  static const std::vector<double>* const kBuckets = [] {
    auto* v = new std::vector<double>;
    for (double b = 1024; b <= double(1 << 30); b *= 4) v->push_back(b);
    return v;
  }();
  return *kBuckets;
}

template <typename T>
T* Family<T>::WithLabels(std::initializer_list<absl::string_view> values) {
  std::vector<std::string> v;
  v.reserve(values.size());
  for (absl::string_view s : values) v.emplace_back(s);
  return WithLabels(v);
}

template <typename T>
T* Family<T>::WithLabels(const std::vector<std::string>& values) {
  std::vector<std::string> key = NormaliseLabels(label_names_.size(), values);
  {
    absl::ReaderMutexLock lock(&mu_);
    auto it = children_.find(key);
    if (it != children_.end()) return it->second.get();
  }
  absl::MutexLock lock(&mu_);
  auto& slot = children_[key];
  if (!slot) {
    if constexpr (std::is_same_v<T, Histogram>) {
      slot = std::make_unique<Histogram>(&bounds_);
    } else {
      slot = std::make_unique<T>();
    }
  }
  return slot.get();
}

template <typename T>
void Family<T>::ForEach(
    const std::function<void(const std::vector<std::string>&, const T&)>& fn) const {
  absl::ReaderMutexLock lock(&mu_);
  for (const auto& [labels, child] : children_) fn(labels, *child);
}

template class Family<Counter>;
template class Family<Gauge>;
template class Family<Histogram>;

void SnapshotFamily::Replace(std::vector<Sample> samples) {
  for (Sample& s : samples) s.labels = NormaliseLabels(label_names_.size(), std::move(s.labels));
  absl::MutexLock lock(&mu_);
  samples_ = std::move(samples);
}

std::vector<SnapshotFamily::Sample> SnapshotFamily::samples() const {
  absl::MutexLock lock(&mu_);
  return samples_;
}

void Registry::CheckNewName(const std::string& name) {
  auto fail = [&](const char* why) {
    std::fprintf(stderr, "metrics: family \"%s\": %s\n", name.c_str(), why);
    std::abort();
  };
  if (!ValidName(name)) fail("invalid metric name");
  for (const Entry& e : entries_) {
    const std::string* n = e.counter     ? &e.counter->name()
                           : e.gauge     ? &e.gauge->name()
                           : e.histogram ? &e.histogram->name()
                                         : &e.snapshot->name();
    if (*n == name) fail("registered twice");
  }
}

Family<Counter>* Registry::AddCounter(std::string name, std::string help,
                                      std::vector<std::string> label_names) {
  absl::MutexLock lock(&mu_);
  CheckNewName(name);
  counters_.push_back(
      std::make_unique<Family<Counter>>(std::move(name), std::move(help), std::move(label_names)));
  entries_.push_back(Entry{MetricType::kCounter, counters_.back().get()});
  return counters_.back().get();
}

Family<Gauge>* Registry::AddGauge(std::string name, std::string help,
                                  std::vector<std::string> label_names) {
  absl::MutexLock lock(&mu_);
  CheckNewName(name);
  gauges_.push_back(
      std::make_unique<Family<Gauge>>(std::move(name), std::move(help), std::move(label_names)));
  Entry e{MetricType::kGauge};
  e.gauge = gauges_.back().get();
  entries_.push_back(e);
  return gauges_.back().get();
}

Family<Histogram>* Registry::AddHistogram(std::string name, std::string help,
                                          std::vector<std::string> label_names,
                                          std::vector<double> bounds) {
  absl::MutexLock lock(&mu_);
  CheckNewName(name);
  for (size_t i = 1; i < bounds.size(); ++i) {
    if (!(bounds[i] > bounds[i - 1])) {
      std::fprintf(stderr, "metrics: histogram \"%s\": bounds not increasing\n", name.c_str());
      std::abort();
    }
  }
  histograms_.push_back(std::make_unique<Family<Histogram>>(
      std::move(name), std::move(help), std::move(label_names), std::move(bounds)));
  Entry e{MetricType::kHistogram};
  e.histogram = histograms_.back().get();
  entries_.push_back(e);
  return histograms_.back().get();
}

SnapshotFamily* Registry::AddSnapshot(std::string name, std::string help, MetricType type,
                                      std::vector<std::string> label_names) {
  absl::MutexLock lock(&mu_);
  CheckNewName(name);
  snapshots_.push_back(std::make_unique<SnapshotFamily>(std::move(name), std::move(help), type,
                                                        std::move(label_names)));
  Entry e{type};
  e.snapshot = snapshots_.back().get();
  entries_.push_back(e);
  return snapshots_.back().get();
}

void Registry::AddCollector(std::function<void()> collector) {
  absl::MutexLock lock(&mu_);
  collectors_.push_back(std::move(collector));
}

std::string Registry::Render() const {
  std::vector<std::function<void()>> collectors;
  std::vector<Entry> entries;
  {
    absl::MutexLock lock(&mu_);
    collectors = collectors_;
    entries = entries_;
  }
  for (const auto& c : collectors) c();
  std::string out;
  out.reserve(4096);
  for (const Entry& e : entries) {
    if (e.counter) {
      AppendHeader(&out, e.counter->name(), e.counter->help(), "counter");
      e.counter->ForEach([&](const std::vector<std::string>& labels, const Counter& c) {
        out += e.counter->name();
        AppendLabels(&out, e.counter->label_names(), labels);
        absl::StrAppend(&out, " ", FormatMetricValue(c.value()), "\n");
      });
    } else if (e.gauge) {
      AppendHeader(&out, e.gauge->name(), e.gauge->help(), "gauge");
      e.gauge->ForEach([&](const std::vector<std::string>& labels, const Gauge& g) {
        out += e.gauge->name();
        AppendLabels(&out, e.gauge->label_names(), labels);
        absl::StrAppend(&out, " ", FormatMetricValue(g.value()), "\n");
      });
    } else if (e.histogram) {
      const Family<Histogram>& f = *e.histogram;
      AppendHeader(&out, f.name(), f.help(), "histogram");
      f.ForEach([&](const std::vector<std::string>& labels, const Histogram& h) {
        const std::vector<uint64_t> cum = h.CumulativeCounts();
        for (size_t i = 0; i < cum.size(); ++i) {
          const std::string le = i < h.bounds().size() ? FormatMetricValue(h.bounds()[i]) : "+Inf";
          out += f.name() + "_bucket";
          AppendLabels(&out, f.label_names(), labels, "le", le);
          absl::StrAppend(&out, " ", cum[i], "\n");
        }
        out += f.name() + "_sum";
        AppendLabels(&out, f.label_names(), labels);
        absl::StrAppend(&out, " ", FormatMetricValue(h.sum()), "\n");
        out += f.name() + "_count";
        AppendLabels(&out, f.label_names(), labels);
        absl::StrAppend(&out, " ", cum.back(), "\n");
      });
    } else if (e.snapshot) {
      const SnapshotFamily& f = *e.snapshot;
      AppendHeader(&out, f.name(), f.help(),
                   f.type() == MetricType::kCounter ? "counter" : "gauge");
      for (const SnapshotFamily::Sample& s : f.samples()) {
        out += f.name();
        AppendLabels(&out, f.label_names(), s.labels);
        absl::StrAppend(&out, " ", FormatMetricValue(s.value), "\n");
      }
    }
  }
  return out;
}

std::string EscapeLabelValue(absl::string_view v) {
  std::string out;
  out.reserve(v.size());
  for (char c : v) {
    if (c == '\\')
      out += "\\\\";
    else if (c == '"')
      out += "\\\"";
    else if (c == '\n')
      out += "\\n";
    else
      out.push_back(c);
  }
  return out;
}

std::string FormatMetricValue(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  if (v == std::floor(v) && std::fabs(v) < 1e15) return absl::StrFormat("%.0f", v);
  // Shortest representation that reads back as the same double.
  for (int precision = 6; precision < 17; ++precision) {
    std::string s = absl::StrFormat("%.*g", precision, v);
    if (std::strtod(s.c_str(), nullptr) == v) return s;
  }
  return absl::StrFormat("%.17g", v);
}

}  // namespace icecache::rpc
