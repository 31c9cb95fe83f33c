#include "tests/bench/peers.h"

#include <algorithm>
#include <cmath>
#include <exception>
#include <utility>

#include "absl/strings/str_format.h"
#include "faiss/IndexFlat.h"
#include "faiss/IndexHNSW.h"
#include "faiss/IndexIVF.h"
#include "faiss/IndexIVFFlat.h"
#include "faiss/IndexIVFPQ.h"
#include "faiss/impl/HNSW.h"
#include "faiss/invlists/InvertedLists.h"
#include "hnswlib/hnswlib.h"

namespace icecache::bench {

std::string_view PeerName(PeerKind kind) {
  switch (kind) {
    case PeerKind::kFaissFlat:
      return "faiss-flat";
    case PeerKind::kFaissHnsw:
      return "faiss-hnsw";
    case PeerKind::kFaissIvf:
      return "faiss-ivf";
    case PeerKind::kFaissIvfPq:
      return "faiss-ivfpq";
    case PeerKind::kHnswlib:
      return "hnswlib";
  }
  return "unknown";
}

namespace {

using idx_t = faiss::Index::idx_t;

absl::Status LibraryError(PeerKind kind, std::string_view op, const std::exception& e) {
  return absl::InternalError(absl::StrFormat("%s %s failed: %s", PeerName(kind), op, e.what()));
}

std::vector<int> PowersUpTo(int lo, int hi) {
  std::vector<int> v;
  for (int x = lo; x < hi; x *= 2) v.push_back(x);
  v.push_back(hi);
  return v;
}

// Common FAISS plumbing: search with optional parameters, collect ids.
class FaissPeer : public TokenIndex {
 public:
  FaissPeer(PeerKind kind, int dim, int64_t capacity, const PeerParams& params)
      : kind_(kind), dim_(dim), capacity_(capacity), params_(params) {}

  PeerKind kind() const override { return kind_; }
  int64_t size() const override { return index_ ? index_->ntotal : 0; }

  absl::Status Build(const float* keys, int64_t n) override {
    if (index_ != nullptr && index_->ntotal > 0) {
      return absl::FailedPreconditionError(
          absl::StrFormat("%s: Build on a non-empty index", PeerName(kind_)));
    }
    if (n < 1 || n > capacity_) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: Build needs 1..%d keys, got %d", PeerName(kind_), capacity_, n));
    }
    try {
      absl::Status s = MakeIndex(n);
      if (!s.ok()) return s;
      if (!index_->is_trained) index_->train(n, keys);
      index_->add(n, keys);
    } catch (const std::exception& e) {
      index_.reset();
      return LibraryError(kind_, "build", e);
    }
    return absl::OkStatus();
  }

  absl::Status Add(const float* keys, int64_t n) override {
    if (index_ == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrFormat("%s: Add before Build", PeerName(kind_)));
    }
    if (n < 1 || index_->ntotal + n > capacity_) {
      return absl::ResourceExhaustedError(
          absl::StrFormat("%s: adding %d keys to %d exceeds capacity %d", PeerName(kind_), n,
                          index_->ntotal, capacity_));
    }
    try {
      index_->add(n, keys);
    } catch (const std::exception& e) {
      return LibraryError(kind_, "add", e);
    }
    return absl::OkStatus();
  }

  absl::Status Search(const float* query, int k, int knob, std::vector<int64_t>* ids,
                      uint64_t* touched) const override {
    if (index_ == nullptr || index_->ntotal == 0) {
      return absl::FailedPreconditionError(
          absl::StrFormat("%s: search of an empty index", PeerName(kind_)));
    }
    if (k < 1) return absl::InvalidArgumentError("search k must be >= 1");
    k = static_cast<int>(std::min<int64_t>(k, index_->ntotal));
    dist_.resize(k);
    labels_.resize(k);
    try {
      *touched += SearchOne(query, k, knob);
    } catch (const std::exception& e) {
      return LibraryError(kind_, "search", e);
    }
    ids->clear();
    for (int i = 0; i < k; ++i) {
      if (labels_[i] >= 0) ids->push_back(labels_[i]);
    }
    return absl::OkStatus();
  }

 protected:
  // Creates index_ for a prefill of n keys.
  virtual absl::Status MakeIndex(int64_t n) = 0;
  // Runs the search into dist_/labels_; returns distance computations.
  virtual uint64_t SearchOne(const float* query, int k, int knob) const = 0;

  PeerKind kind_;
  int dim_;
  int64_t capacity_;
  PeerParams params_;
  std::unique_ptr<faiss::Index> index_;
  mutable std::vector<float> dist_;
  mutable std::vector<idx_t> labels_;
};

class FaissFlatPeer : public FaissPeer {
 public:
  using FaissPeer::FaissPeer;
  std::string_view knob_name() const override { return ""; }
  std::vector<int> KnobValues() const override { return {0}; }
  size_t index_bytes() const override {
    return index_ ? static_cast<faiss::IndexFlat*>(index_.get())->codes.size() : 0;
  }

 protected:
  absl::Status MakeIndex(int64_t) override {
    index_ = std::make_unique<faiss::IndexFlatIP>(dim_);
    return absl::OkStatus();
  }
  uint64_t SearchOne(const float* query, int k, int) const override {
    index_->search(1, query, k, dist_.data(), labels_.data());
    return static_cast<uint64_t>(index_->ntotal);
  }
};

// FAISS 1.7.3's HNSW search path leaves hnsw_stats.ndis at 0, so distance
// computations are counted by the storage's distance computer instead.
class CountingDistanceComputer : public faiss::DistanceComputer {
 public:
  CountingDistanceComputer(faiss::DistanceComputer* inner, uint64_t* count)
      : inner_(inner), count_(count) {}
  void set_query(const float* x) override { inner_->set_query(x); }
  float operator()(idx_t i) override {
    ++*count_;
    return (*inner_)(i);
  }
  float symmetric_dis(idx_t i, idx_t j) override {
    ++*count_;
    return inner_->symmetric_dis(i, j);
  }

 private:
  std::unique_ptr<faiss::DistanceComputer> inner_;
  uint64_t* count_;
};

// Flat inner-product storage whose distance computers count their calls.
// Searches and adds run on one thread (omp_set_num_threads(1) in the driver).
struct CountingFlatIP : faiss::IndexFlatIP {
  explicit CountingFlatIP(int d) : faiss::IndexFlatIP(d) {}
  faiss::DistanceComputer* get_distance_computer() const override {
    return new CountingDistanceComputer(faiss::IndexFlatIP::get_distance_computer(), &count);
  }
  mutable uint64_t count = 0;
};

class FaissHnswPeer : public FaissPeer {
 public:
  using FaissPeer::FaissPeer;
  std::string_view knob_name() const override { return "efSearch"; }
  std::vector<int> KnobValues() const override { return PowersUpTo(16, 1024); }
  size_t index_bytes() const override {
    if (!index_) return 0;
    const auto* h = static_cast<const faiss::IndexHNSW*>(index_.get());
    const auto* flat = dynamic_cast<const faiss::IndexFlatCodes*>(h->storage);
    size_t bytes = flat ? flat->codes.size() : 0;
    bytes += h->hnsw.neighbors.size() * sizeof(h->hnsw.neighbors[0]);
    bytes += h->hnsw.levels.size() * sizeof(h->hnsw.levels[0]);
    bytes += h->hnsw.offsets.size() * sizeof(h->hnsw.offsets[0]);
    return bytes;
  }

 protected:
  absl::Status MakeIndex(int64_t) override {
    storage_ = new CountingFlatIP(dim_);
    auto idx = std::make_unique<faiss::IndexHNSW>(storage_, params_.hnsw_m);
    idx->own_fields = true;  // deletes storage_
    idx->hnsw.efConstruction = params_.hnsw_ef_construction;
    index_ = std::move(idx);
    return absl::OkStatus();
  }
  uint64_t SearchOne(const float* query, int k, int knob) const override {
    faiss::SearchParametersHNSW sp;
    sp.efSearch = std::max(knob, k);
    storage_->count = 0;
    index_->search(1, query, k, dist_.data(), labels_.data(), &sp);
    return storage_->count;
  }

 private:
  CountingFlatIP* storage_ = nullptr;  // owned by index_
};

class FaissIvfPeer : public FaissPeer {
 public:
  using FaissPeer::FaissPeer;
  std::string_view knob_name() const override { return "nprobe"; }
  std::vector<int> KnobValues() const override { return PowersUpTo(1, std::max(1, nlist_)); }
  size_t index_bytes() const override {
    if (!index_) return 0;
    const auto* ivf = static_cast<const faiss::IndexIVF*>(index_.get());
    size_t bytes = static_cast<size_t>(nlist_) * dim_ * sizeof(float);  // coarse centroids
    bytes += static_cast<size_t>(ivf->ntotal) * (ivf->code_size + sizeof(idx_t));
    if (const auto* pq = dynamic_cast<const faiss::IndexIVFPQ*>(ivf)) {
      bytes += pq->pq.centroids.size() * sizeof(float);
    }
    return bytes;
  }

 protected:
  absl::Status MakeIndex(int64_t n) override {
    nlist_ = params_.ivf_nlist > 0
                 ? params_.ivf_nlist
                 : std::max(1, static_cast<int>(std::lround(std::sqrt(double(n)))));
    // FAISS warns below 39 training points per centroid; it still trains.
    if (n < nlist_) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: %d keys cannot train %d lists; lower --ivf-nlist", PeerName(kind_), n, nlist_));
    }
    auto quantizer = std::make_unique<faiss::IndexFlatIP>(dim_);
    if (kind_ == PeerKind::kFaissIvfPq) {
      if (params_.pq_m < 1 || dim_ % params_.pq_m != 0) {
        return absl::InvalidArgumentError(
            absl::StrFormat("faiss-ivfpq: --pq-m %d must divide head_dim %d", params_.pq_m, dim_));
      }
      if (n < (int64_t{1} << params_.pq_nbits)) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "faiss-ivfpq: %d keys cannot train 2^%d PQ centroids", n, params_.pq_nbits));
      }
      auto ivf = std::make_unique<faiss::IndexIVFPQ>(quantizer.get(), dim_, nlist_, params_.pq_m,
                                                     params_.pq_nbits, faiss::METRIC_INNER_PRODUCT);
      ivf->own_fields = true;  // the IVF index now deletes the quantizer
      quantizer.release();
      index_ = std::move(ivf);
    } else {
      auto ivf = std::make_unique<faiss::IndexIVFFlat>(quantizer.get(), dim_, nlist_,
                                                       faiss::METRIC_INNER_PRODUCT);
      ivf->own_fields = true;
      quantizer.release();
      index_ = std::move(ivf);
    }
    return absl::OkStatus();
  }
  uint64_t SearchOne(const float* query, int k, int knob) const override {
    faiss::SearchParametersIVF sp;
    sp.nprobe = static_cast<size_t>(std::clamp(knob, 1, nlist_));
    faiss::indexIVF_stats.reset();
    index_->search(1, query, k, dist_.data(), labels_.data(), &sp);
    return static_cast<uint64_t>(nlist_) + faiss::indexIVF_stats.ndis;
  }

 private:
  int nlist_ = 0;
};

// hnswlib inner-product space whose distance function counts its calls.
class CountingIpSpace : public hnswlib::SpaceInterface<float> {
 public:
  explicit CountingIpSpace(size_t dim) : inner_(dim) {
    param_.inner = inner_.get_dist_func();
    param_.inner_param = inner_.get_dist_func_param();
    param_.count = &count_;
  }
  size_t get_data_size() override { return inner_.get_data_size(); }
  hnswlib::DISTFUNC<float> get_dist_func() override { return &CountingDistance; }
  void* get_dist_func_param() override { return &param_; }
  uint64_t count() const { return count_; }
  void reset() { count_ = 0; }

 private:
  struct Param {
    hnswlib::DISTFUNC<float> inner;
    void* inner_param;
    uint64_t* count;
  };
  static float CountingDistance(const void* a, const void* b, const void* param) {
    const auto* p = static_cast<const Param*>(param);
    ++*p->count;
    return p->inner(a, b, p->inner_param);
  }
  hnswlib::InnerProductSpace inner_;
  Param param_;
  uint64_t count_ = 0;
};

class HnswlibPeer : public TokenIndex {
 public:
  HnswlibPeer(int dim, int64_t capacity, const PeerParams& params)
      : dim_(dim), capacity_(capacity), params_(params), space_(dim) {}

  PeerKind kind() const override { return PeerKind::kHnswlib; }
  std::string_view knob_name() const override { return "efSearch"; }
  std::vector<int> KnobValues() const override { return PowersUpTo(16, 1024); }
  int64_t size() const override { return next_id_; }

  absl::Status Build(const float* keys, int64_t n) override {
    if (hnsw_ != nullptr)
      return absl::FailedPreconditionError("hnswlib: Build on a non-empty index");
    if (n < 1 || n > capacity_) {
      return absl::InvalidArgumentError(
          absl::StrFormat("hnswlib: Build needs 1..%d keys, got %d", capacity_, n));
    }
    try {
      hnsw_ = std::make_unique<hnswlib::HierarchicalNSW<float>>(
          &space_, static_cast<size_t>(capacity_), static_cast<size_t>(params_.hnsw_m),
          static_cast<size_t>(params_.hnsw_ef_construction));
    } catch (const std::exception& e) {
      return LibraryError(PeerKind::kHnswlib, "build", e);
    }
    return Add(keys, n);
  }

  absl::Status Add(const float* keys, int64_t n) override {
    if (hnsw_ == nullptr) return absl::FailedPreconditionError("hnswlib: Add before Build");
    if (n < 1 || next_id_ + n > capacity_) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "hnswlib: adding %d keys to %d exceeds capacity %d", n, next_id_, capacity_));
    }
    try {
      for (int64_t i = 0; i < n; ++i) {
        hnsw_->addPoint(keys + i * dim_, static_cast<hnswlib::labeltype>(next_id_ + i));
      }
    } catch (const std::exception& e) {
      return LibraryError(PeerKind::kHnswlib, "add", e);
    }
    next_id_ += n;
    return absl::OkStatus();
  }

  absl::Status Search(const float* query, int k, int knob, std::vector<int64_t>* ids,
                      uint64_t* touched) const override {
    if (hnsw_ == nullptr || next_id_ == 0) {
      return absl::FailedPreconditionError("hnswlib: search of an empty index");
    }
    if (k < 1) return absl::InvalidArgumentError("search k must be >= 1");
    k = static_cast<int>(std::min<int64_t>(k, next_id_));
    ids->clear();
    try {
      hnsw_->setEf(static_cast<size_t>(std::max(knob, k)));
      space_.reset();
      auto result = hnsw_->searchKnn(query, static_cast<size_t>(k));
      *touched += space_.count();
      ids->resize(result.size());
      // The queue pops the farthest first; fill from the back.
      for (size_t i = result.size(); i-- > 0;) {
        (*ids)[i] = static_cast<int64_t>(result.top().second);
        result.pop();
      }
    } catch (const std::exception& e) {
      return LibraryError(PeerKind::kHnswlib, "search", e);
    }
    return absl::OkStatus();
  }

  size_t index_bytes() const override {
    if (!hnsw_) return 0;
    size_t bytes = hnsw_->max_elements_ * hnsw_->size_data_per_element_;
    for (size_t i = 0; i < hnsw_->cur_element_count; ++i) {
      bytes += static_cast<size_t>(hnsw_->element_levels_[i]) * hnsw_->size_links_per_element_;
    }
    return bytes;
  }

 private:
  int dim_;
  int64_t capacity_;
  PeerParams params_;
  // setEf and the distance counter mutate; searches run on one thread.
  mutable CountingIpSpace space_;
  std::unique_ptr<hnswlib::HierarchicalNSW<float>> hnsw_;
  int64_t next_id_ = 0;
};

}  // namespace

absl::StatusOr<std::unique_ptr<TokenIndex>> TokenIndex::Create(PeerKind kind, int dim,
                                                               int64_t capacity,
                                                               const PeerParams& params) {
  if (dim < 1 || dim > 4096) {
    return absl::InvalidArgumentError(
        absl::StrFormat("peer dim must be in [1, 4096], got %d", dim));
  }
  if (capacity < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("peer capacity must be >= 1, got %d", capacity));
  }
  if (params.hnsw_m < 2 || params.hnsw_ef_construction < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("hnsw M must be >= 2 and efConstruction >= 1 (got %d, %d)", params.hnsw_m,
                        params.hnsw_ef_construction));
  }
  if (params.pq_nbits < 1 || params.pq_nbits > 16) {
    return absl::InvalidArgumentError(
        absl::StrFormat("--pq-nbits must be in [1, 16], got %d", params.pq_nbits));
  }
  switch (kind) {
    case PeerKind::kFaissFlat:
      return std::unique_ptr<TokenIndex>(new FaissFlatPeer(kind, dim, capacity, params));
    case PeerKind::kFaissHnsw:
      return std::unique_ptr<TokenIndex>(new FaissHnswPeer(kind, dim, capacity, params));
    case PeerKind::kFaissIvf:
    case PeerKind::kFaissIvfPq:
      return std::unique_ptr<TokenIndex>(new FaissIvfPeer(kind, dim, capacity, params));
    case PeerKind::kHnswlib:
      return std::unique_ptr<TokenIndex>(new HnswlibPeer(dim, capacity, params));
  }
  return absl::InvalidArgumentError("unknown peer kind");
}

}  // namespace icecache::bench
