#include "server/index/pq_sketch.h"

// GCC 12's AVX-512 headers trip -Wuninitialized on their own _mm512_undefined_*
// placeholders (GCC bug 105593), as in kernels.cc.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <type_traits>

#include "absl/strings/str_cat.h"
#include "common/populate.h"
#include "server/index/kernels.h"
#include "server/index/prefetch_lines.h"
#include "server/index/simd_avx2.h"

// Unroll hints for the scans' loops over queries: their accumulator arrays
// stay in registers only when these loops are unrolled (without them GCC 12
// stored every AVX-512 accumulator to the stack on every step, a third of
// the scan's time). Left out of the sanitizer trees, as in kernels.cc.
#if defined(ICECACHE_SANITIZER_BUILD)
#define ICECACHE_PQ_UNROLL
#else
#define ICECACHE_PQ_UNROLL _Pragma("GCC unroll 8")
#endif

namespace icecache {
namespace {

// The nearest centroid of 8 points at once (point j's coordinate d at
// x[d * 8 + j]; `cent` [centroid][dimension]): the centroid of the least
// squared distance (FMAs in dimension order from 0), the first on a tie, with the points in the
// lanes instead of the centroids, so no horizontal minimum (which was most of an encode) and no
// chain from one point to the next. A NaN distance never wins.
inline __m256i PqNearest8(const float* x, const float* cent) {
  static_assert(PqSketch::kSubDims == 4, "four coordinate vectors");
  const __m256 x0 = _mm256_loadu_ps(x);
  const __m256 x1 = _mm256_loadu_ps(x + 8);
  const __m256 x2 = _mm256_loadu_ps(x + 16);
  const __m256 x3 = _mm256_loadu_ps(x + 24);
  const auto dist = [&](const float* c) {
    const __m256 t0 = _mm256_sub_ps(x0, _mm256_broadcast_ss(c));
    const __m256 t1 = _mm256_sub_ps(x1, _mm256_broadcast_ss(c + 1));
    const __m256 t2 = _mm256_sub_ps(x2, _mm256_broadcast_ss(c + 2));
    const __m256 t3 = _mm256_sub_ps(x3, _mm256_broadcast_ss(c + 3));
    __m256 a = _mm256_fmadd_ps(t0, t0, _mm256_setzero_ps());
    a = _mm256_fmadd_ps(t1, t1, a);
    a = _mm256_fmadd_ps(t2, t2, a);
    return _mm256_fmadd_ps(t3, t3, a);
  };
  // A tournament, not a scan: a scan's compare-and-blend chain through 15
  // centroids made it latency-bound. Each merge keeps the left (lower
  // numbered) side unless the right is strictly nearer, so ties go to the
  // lowest number, as a scan's would.
  struct Best {
    __m256 d, i;  // distance, centroid number (as a float: exact)
  };
  const auto merge = [](Best a, Best b) {
    const __m256 lt = _mm256_cmp_ps(b.d, a.d, _CMP_LT_OQ);
    return Best{_mm256_blendv_ps(a.d, b.d, lt), _mm256_blendv_ps(a.i, b.i, lt)};
  };
  const auto leaf = [&](int c) {
    return Best{dist(cent + c * PqSketch::kSubDims), _mm256_set1_ps(static_cast<float>(c))};
  };
  const auto eight = [&](int c0) {
    const Best a = merge(merge(leaf(c0), leaf(c0 + 1)), merge(leaf(c0 + 2), leaf(c0 + 3)));
    const Best b = merge(merge(leaf(c0 + 4), leaf(c0 + 5)), merge(leaf(c0 + 6), leaf(c0 + 7)));
    return merge(a, b);
  };
  static_assert(PqSketch::kCentroids == 16, "two tournaments of eight");
  const __m256 besti = merge(eight(0), eight(8)).i;
  return _mm256_cvttps_epi32(besti);
}

// PqNearest8's choice for one point (x: its 4 coordinates; `lanes` a
// sub-space's centroids as [dimension][centroid]), bit for bit: each
// centroid's distance by the same operations in the same order, with the
// centroids in the lanes instead of the points, and the same tournament
// (the lower number on a tie; a NaN distance wins nothing it did not
// there). A decode insert encodes one key: 8 points' lanes with 7 empty
// cost about 5x the operations.
inline int PqNearest1(const float* x, const float* lanes) {
  static_assert(PqSketch::kSubDims == 4 && PqSketch::kCentroids == 16, "two registers of 8");
  alignas(32) float d[16];
  for (int h = 0; h < 2; ++h) {
    const float* c = lanes + h * 8;
    const __m256 t0 = _mm256_sub_ps(_mm256_set1_ps(x[0]), _mm256_loadu_ps(c));
    const __m256 t1 = _mm256_sub_ps(_mm256_set1_ps(x[1]), _mm256_loadu_ps(c + 16));
    const __m256 t2 = _mm256_sub_ps(_mm256_set1_ps(x[2]), _mm256_loadu_ps(c + 32));
    const __m256 t3 = _mm256_sub_ps(_mm256_set1_ps(x[3]), _mm256_loadu_ps(c + 48));
    __m256 a = _mm256_fmadd_ps(t0, t0, _mm256_setzero_ps());
    a = _mm256_fmadd_ps(t1, t1, a);
    a = _mm256_fmadd_ps(t2, t2, a);
    _mm256_store_ps(d + h * 8, _mm256_fmadd_ps(t3, t3, a));
  }
  const auto merge = [&d](int a, int b) { return d[b] < d[a] ? b : a; };
  const auto eight = [&](int c0) {
    const int a = merge(merge(c0, c0 + 1), merge(c0 + 2, c0 + 3));
    const int b = merge(merge(c0 + 4, c0 + 5), merge(c0 + 6, c0 + 7));
    return merge(a, b);
  };
  return merge(eight(0), eight(8));
}

// Rows [0, 8) of `in` (row stride in_stride floats), columns [0, 8), into
// out[column * 8 + row].
inline void Transpose8x8(const float* in, size_t in_stride, float* out) {
  __m256 r[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(in + i * in_stride);
  __m256 t[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  __m256 u[8];
  for (int i = 0; i < 2; ++i) {
    u[4 * i + 0] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xee);
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xee);
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(out + i * 8, _mm256_permute2f128_ps(u[i], u[4 + i], 0x20));
    _mm256_storeu_ps(out + (i + 4) * 8, _mm256_permute2f128_ps(u[i], u[4 + i], 0x31));
  }
}

// A query's basis coefficients as the scan uses them (EstimatePageMass):
// four signed bytes c8_r = round(c_r / step) in [-63, 63] packed in cw,
// corr = -128 sum_r c8_r, and gamma = step / 127, so a row's basis term is
// gamma x sum_r c8_r x p8_r ~ sum_r c_r x projection_r.
struct BasisCoef {
  int32_t cw = 0;
  int32_t corr = 0;
  float gamma = 0.0f;
};

// Per-thread scratch of EstimatePageMass (no allocation once warm).
struct PqScanScratch {
  std::vector<uint8_t> luts;    // per query: subspaces / 2 lines of 32 bytes
  std::vector<float> offset;    // per query: scale x q.mean
  std::vector<float> base;      // per query: scale x the sum of the sub-space minima
  std::vector<float> step;      // per query: scale x the table step
  std::vector<uint16_t> sums;   // one group: 32 sums per query
  std::vector<float> pmax;      // per page per query
  std::vector<float> psum;      // per page per query
  std::vector<uint32_t> fills;  // per page
  std::vector<float> table;     // one query's float tables
  std::vector<float> a, b, w;   // per cell: max - ref, mean - ref, fill - 1 (-1: empty)
  std::vector<float> ref;       // per query: log_ref
  std::vector<BasisCoef> coef;  // per query (with a basis)
  std::vector<float> rest;      // one query less its part in the basis
};

// out[j] = the largest of v[p * nq + j] over p < n (-inf when n is 0).
void ColumnMax(const float* v, uint32_t n, int nq, float* out) {
  for (int j = 0; j < nq; ++j) out[j] = -std::numeric_limits<float>::infinity();
  if (8 % nq == 0) {  // lane k of a register holds query k % nq, every row alike
    const size_t cells = static_cast<size_t>(n) * nq;
    __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    size_t i = 0;
    for (; i + 8 <= cells; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(v + i));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, m);
    for (int k = 0; k < 8; ++k) out[k % nq] = std::max(out[k % nq], lanes[k]);
    for (; i < cells; ++i) out[i % nq] = std::max(out[i % nq], v[i]);
    return;
  }
  for (uint32_t p = 0; p < n; ++p) {
    for (int j = 0; j < nq; ++j) out[j] = std::max(out[j], v[static_cast<size_t>(p) * nq + j]);
  }
}

// a . b over n floats (the query basis' projections; n a multiple of 8).
float DotF(const float* a, const float* b, int n) {
  __m256 acc = _mm256_setzero_ps();
  int i = 0;
  for (; i + 8 <= n; i += 8)
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = simd::HSum256(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// out[r] = x . u_r for the 4 rows of u (each n floats; n a multiple of 8),
// one pass over x.
void Dot4(const float* x, const float* u, int n, float* out) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                   _mm256_setzero_ps()};
  for (int i = 0; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    for (int r = 0; r < 4; ++r) {
      acc[r] = _mm256_fmadd_ps(v, _mm256_loadu_ps(u + static_cast<size_t>(r) * n + i), acc[r]);
    }
  }
  for (int r = 0; r < 4; ++r) out[r] = simd::HSum256(acc[r]);
}

// A projection in [-1, 1] as the byte kept: round(127 v) + 128, in [1, 255]
// (offset binary: the unsigned operand of the scan's byte dot products).
uint8_t QuantiseProjection(float v) {
  const float c = std::isfinite(v) ? std::clamp(v, -1.0f, 1.0f) : 0.0f;
  return static_cast<uint8_t>(std::lrint(c * 127.0f) + 128);
}

PqScanScratch& PqScratch() {
  thread_local PqScanScratch s;
  return s;
}

// Per-thread scratch of Train, kept between trees: fresh, its 2 MiB of
// directions were faulted in again by every build (glibc hands such blocks
// back to the kernel), a few ms of a tree where a fault costs 13 us.
struct PqTrainScratch {
  std::vector<float> dirs;     // the sample's directions, rows x dim
  std::vector<float> sub;      // one sub-space of them, 8-row blocks
  std::vector<float> rowwise;  // the same sub-space, rows x kSubDims
  std::vector<int> assign;     // each row's centroid in the last iteration
};

PqTrainScratch& TrainScratch() {
  thread_local PqTrainScratch s;
  return s;
}

}  // namespace

PqSketch::PqSketch(int dim, int page_tokens)
    : dim_(dim),
      page_tokens_(page_tokens),
      subspaces_(dim / kSubDims),
      code_bytes_(static_cast<size_t>(dim / kSubDims / 2) * 32),
      group_bytes_(code_bytes_ + kGroup * sizeof(uint16_t)),
      mean_(dim, 0.0f),
      centroids_(static_cast<size_t>(dim / kSubDims) * kCentroids * kSubDims, 0.0f),
      centroid_lanes_(centroids_.size(), 0.0f),
      row_(dim),
      raw_(static_cast<size_t>(dim) * sizeof(float)) {}

void PqSketch::LaneCentroids() {
  for (int sub = 0; sub < subspaces_; ++sub) {
    for (int c = 0; c < kCentroids; ++c) {
      for (int d = 0; d < kSubDims; ++d) {
        centroid_lanes_[(static_cast<size_t>(sub) * kSubDims + d) * kCentroids + c] =
            centroids_[(static_cast<size_t>(sub) * kCentroids + c) * kSubDims + d];
      }
    }
  }
}

void PqSketch::Train(const float* keys, int64_t n) {
  TrainCentroids(keys, n);
  LaneCentroids();
}

void PqSketch::TrainCentroids(const float* keys, int64_t n) {
  std::fill(mean_.begin(), mean_.end(), 0.0f);
  std::fill(centroids_.begin(), centroids_.end(), 0.0f);
  trained_ = n > 0;
  trained_rows_ = 0;
  if (n <= 0) return;
  const int64_t stride = std::max<int64_t>(1, n / kMaxTrainRows);
  const int64_t rows = (n + stride - 1) / stride;
  trained_rows_ = rows;
  std::vector<double> mean(dim_, 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    const float* k = keys + r * stride * dim_;
    for (int d = 0; d < dim_; ++d) mean[d] += k[d];
  }
  for (int d = 0; d < dim_; ++d) mean_[d] = static_cast<float>(mean[d] / static_cast<double>(rows));
  // The sample's directions: centred keys over their norms.
  PqTrainScratch& scratch = TrainScratch();
  std::vector<float>& dirs = scratch.dirs;
  dirs.resize(static_cast<size_t>(rows) * dim_);
  for (int64_t r = 0; r < rows; ++r) {
    Direction(keys + r * stride * dim_, &dirs[r * dim_]);
  }
  // One sub-space of the directions, 8 rows per block, dimension-major in
  // a block (sub[(r / 8) * 32 + d * 8 + r % 8]), as PqNearest8 reads them;
  // the last block's missing rows zero (their choices are not used).
  const int64_t blocks = (rows + 7) / 8;
  std::vector<float>& sub = scratch.sub;
  sub.assign(static_cast<size_t>(blocks) * 8 * kSubDims, 0.0f);
  const auto at = [&sub](int64_t r, int d) -> float& {
    return sub[(r / 8) * 8 * kSubDims + d * 8 + r % 8];
  };
  std::vector<float>& rowwise = scratch.rowwise;  // the same, row-major
  rowwise.resize(static_cast<size_t>(rows) * kSubDims);
  std::vector<float> sums(kCentroids * kSubDims);
  std::vector<int> counts(kCentroids);
  std::vector<int>& assign = scratch.assign;
  assign.resize(rows);
  alignas(32) int32_t best8[8];
  for (int s = 0; s < subspaces_; ++s) {
    const int d0 = s * kSubDims;
    for (int64_t r = 0; r < rows; ++r) {
      const float* u = &dirs[r * dim_ + d0];
      for (int d = 0; d < kSubDims; ++d) at(r, d) = u[d];
      std::memcpy(&rowwise[r * kSubDims], u, kSubDims * sizeof(float));
    }
    float* cent = centroids_.data() + static_cast<size_t>(s) * kCentroids * kSubDims;
    // Seeds: distinct rows drawn at random (a fixed seed: deterministic).
    // Not rows spread evenly over the positions: measured on a KV dump, that
    // seeding (which starts a centroid on the sink, position 0) lost a tenth
    // of the page oracle's mass at pq_factor 8.
    std::mt19937 rng(static_cast<uint32_t>(0x9e3779b9u + s));
    for (int c = 0; c < kCentroids; ++c) {
      const int64_t r = rows <= kCentroids
                            ? std::min<int64_t>(c, rows - 1)
                            : std::uniform_int_distribution<int64_t>(0, rows - 1)(rng);
      for (int d = 0; d < kSubDims; ++d) cent[c * kSubDims + d] = at(r, d);
    }
    std::fill(assign.begin(), assign.end(), -1);
    for (int it = 0; it < kTrainIterations; ++it) {
      std::fill(sums.begin(), sums.end(), 0.0f);
      std::fill(counts.begin(), counts.end(), 0);
      bool changed = false;
      for (int64_t b = 0; b < blocks; ++b) {
        _mm256_store_si256(reinterpret_cast<__m256i*>(best8),
                           PqNearest8(&sub[b * 8 * kSubDims], cent));
        const int64_t r0 = b * 8;
        const int lanes = static_cast<int>(std::min<int64_t>(8, rows - r0));
        for (int j = 0; j < lanes; ++j) {
          const int best = best8[j];
          changed |= assign[r0 + j] != best;
          assign[r0 + j] = best;
          ++counts[best];
          // Row order, as one row at a time: the same sums (one 4-lane add
          // from the row-major copy: four scalar adds through memory were a
          // chain wherever consecutive rows share a centroid).
          _mm_storeu_ps(&sums[best * kSubDims],
                        _mm_add_ps(_mm_loadu_ps(&sums[best * kSubDims]),
                                   _mm_loadu_ps(&rowwise[(r0 + j) * kSubDims])));
        }
      }
      // Converged: the same assignment gives the same centroids (the same
      // sums in the same order), so every later iteration would too.
      if (!changed) break;
      for (int c = 0; c < kCentroids; ++c) {
        if (counts[c] == 0) continue;  // an empty cell keeps its centroid
        for (int d = 0; d < kSubDims; ++d) {
          cent[c * kSubDims + d] = sums[c * kSubDims + d] / static_cast<float>(counts[c]);
        }
      }
    }
  }
}

void PqSketch::EnsureSlots(uint64_t slots) {
  const uint64_t groups = (slots + kGroup - 1) / kGroup;
  while (static_cast<uint64_t>(blocks_.size()) * kGroupsPerBlock < groups) {
    // Fresh memory: faulted in ahead of the zero fill (common/populate.h).
    const size_t bytes = group_bytes_ * kGroupsPerBlock;
    std::unique_ptr<uint8_t[]> block(new uint8_t[bytes]);
    PopulateForWrite(block.get(), bytes);
    std::memset(block.get(), 0, bytes);
    blocks_.push_back(std::move(block));
  }
  if (const std::shared_ptr<BasisState> st = std::atomic_load(&basis_state_)) {
    EnsureProjBlocks(st.get());
  }
  slots_ = std::max(slots_, slots);
}

void PqSketch::EnsureProjBlocks(BasisState* st) const {
  while (st->blocks.size() < blocks_.size()) {
    const size_t n = static_cast<size_t>(kBasis) * kGroup * kGroupsPerBlock;
    std::unique_ptr<uint8_t[]> block(new uint8_t[n]);
    PopulateForWrite(block.get(), n);
    std::memset(block.get(), 128, n);  // projection 0
    st->blocks.push_back(std::move(block));
  }
}

float PqSketch::Direction(const float* row, float* dir) const {
  // The squared norm in doubles, four lanes at a time (a single sequential
  // chain of 128 dependent double adds was half of an Encode).
  __m256d acc0 = _mm256_setzero_pd();
  __m256d acc1 = _mm256_setzero_pd();
  int d = 0;
  for (; d + 8 <= dim_; d += 8) {
    const __m256 v = _mm256_sub_ps(_mm256_loadu_ps(row + d), _mm256_loadu_ps(mean_.data() + d));
    _mm256_storeu_ps(dir + d, v);
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
    const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    acc0 = _mm256_add_pd(acc0, _mm256_mul_pd(lo, lo));
    acc1 = _mm256_add_pd(acc1, _mm256_mul_pd(hi, hi));
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, _mm256_add_pd(acc0, acc1));
  double n2 = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  for (; d < dim_; ++d) {  // dim_ is a multiple of 8 (Supports): not reached
    dir[d] = row[d] - mean_[d];
    n2 += static_cast<double>(dir[d]) * dir[d];
  }
  const float n = static_cast<float>(std::sqrt(n2));
  const float inv = n > 0.0f && std::isfinite(n) ? 1.0f / n : 0.0f;
  const __m256 vinv = _mm256_set1_ps(inv);
  for (d = 0; d + 8 <= dim_; d += 8) {
    _mm256_storeu_ps(dir + d, _mm256_mul_ps(_mm256_loadu_ps(dir + d), vinv));
  }
  for (; d < dim_; ++d) dir[d] *= inv;
  return inv > 0.0f ? n : 0.0f;
}

int PqSketch::NormIndex(int t) {
  const int r = t % 16;
  return (t / 16) * 16 + (r % 2) * 8 + r / 2;
}

void PqSketch::EncodeBlock(const float* const* rows, const uint64_t* slots, int count) {
  // The directions of up to 8 rows (the rest zero), then dimension-major:
  // dir_t_[d * 8 + j] is coordinate d of row j, a sub-space's 4 x 8 block
  // in a row, as PqNearest8 reads it.
  if (count == 1) {
    dir_.resize(static_cast<size_t>(8) * dim_);  // row 0 only (PqNearest1)
  } else {
    dir_.assign(static_cast<size_t>(8) * dim_, 0.0f);
  }
  float norms[8] = {};
  const std::shared_ptr<BasisState> st = std::atomic_load(&basis_state_);
  for (int j = 0; j < count; ++j)
    norms[j] = Direction(rows[j], &dir_[static_cast<size_t>(j) * dim_]);
  for (int j = 0; j < count; ++j) {
    uint16_t h = 0;
    FromFloat(DType::kF16, &norms[j], &h, 1);
    const int t = static_cast<int>(slots[j] % kGroup);
    std::memcpy(group(slots[j] / kGroup) + code_bytes_ + NormIndex(t) * sizeof(uint16_t), &h,
                sizeof(h));
    if (st != nullptr) {
      // The direction's projection on each basis vector (a zero direction:
      // 0), in the norms' order.
      const float* dir = &dir_[static_cast<size_t>(j) * dim_];
      uint8_t* pg = st->group(slots[j] / kGroup) + NormIndex(t) * kBasis;
      for (int r = 0; r < kBasis; ++r) {
        pg[r] = QuantiseProjection(DotF(dir, &st->basis[static_cast<size_t>(r) * dim_], dim_));
      }
    }
  }
  const auto put = [&](int j, int s, int code) {
    const int t = static_cast<int>(slots[j] % kGroup);
    uint8_t& b = group(slots[j] / kGroup)[(s / 2) * 32 + (s % 2) * 16 + t % 16];
    b = t >= 16 ? static_cast<uint8_t>((b & 0x0f) | (code << 4))
                : static_cast<uint8_t>((b & 0xf0) | code);
  };
  if (count == 1) {
    for (int s = 0; s < subspaces_; ++s) {
      put(0, s,
          PqNearest1(&dir_[static_cast<size_t>(s) * kSubDims],
                     centroid_lanes_.data() + static_cast<size_t>(s) * kSubDims * kCentroids));
    }
    return;
  }
  dir_t_.resize(static_cast<size_t>(8) * dim_);
  for (int d = 0; d < dim_; d += 8)
    Transpose8x8(&dir_[d], dim_, &dir_t_[static_cast<size_t>(d) * 8]);
  alignas(32) int32_t best[8];
  for (int s = 0; s < subspaces_; ++s) {
    _mm256_store_si256(
        reinterpret_cast<__m256i*>(best),
        PqNearest8(&dir_t_[static_cast<size_t>(s) * kSubDims * 8],
                   centroids_.data() + static_cast<size_t>(s) * kCentroids * kSubDims));
    for (int j = 0; j < count; ++j) put(j, s, best[j]);
  }
}

int PqSketch::code(uint64_t slot, int sub) const {
  const uint8_t* g = group(slot / kGroup);
  const int t = static_cast<int>(slot % kGroup);
  const uint8_t b = g[(sub / 2) * 32 + (sub % 2) * 16 + t % 16];
  return t >= 16 ? b >> 4 : b & 0x0f;
}

float PqSketch::norm(uint64_t slot) const {
  uint16_t h;
  std::memcpy(&h,
              group(slot / kGroup) + code_bytes_ +
                  NormIndex(static_cast<int>(slot % kGroup)) * sizeof(uint16_t),
              sizeof(h));
  return HalfToFloat(h);
}

std::vector<float> PqSketch::basis() const {
  const std::shared_ptr<BasisState> st = std::atomic_load(&basis_state_);
  return st != nullptr ? st->basis : std::vector<float>(static_cast<size_t>(kBasis) * dim_, 0.0f);
}

float PqSketch::projection(uint64_t slot, int r) const {
  const std::shared_ptr<BasisState> st = std::atomic_load(&basis_state_);
  if (st == nullptr || r < 0 || r >= kBasis) return 0.0f;
  return (static_cast<float>(
              st->group(slot / kGroup)[NormIndex(static_cast<int>(slot % kGroup)) * kBasis + r]) -
          128.0f) /
         127.0f;
}

float PqSketch::ApproxDot(const float* q, uint64_t slot) const {
  std::vector<float> rest(q, q + dim_);
  float s = 0.0f;
  if (const std::shared_ptr<BasisState> st = std::atomic_load(&basis_state_)) {
    for (int r = 0; r < kBasis; ++r) {
      const float* u = &st->basis[static_cast<size_t>(r) * dim_];
      const float qu = DotF(q, u, dim_);
      for (int d = 0; d < dim_; ++d) rest[d] -= qu * u[d];
      s += qu * projection(slot, r);
    }
  }
  for (int sub = 0; sub < subspaces_; ++sub) {
    const float* c =
        centroids_.data() + (static_cast<size_t>(sub) * kCentroids + code(slot, sub)) * kSubDims;
    for (int d = 0; d < kSubDims; ++d) s += rest[sub * kSubDims + d] * c[d];
  }
  return norm(slot) * s;
}

absl::Status PqSketch::SetBasis(const float* basis, const PageKeys& keys, DType dtype,
                                uint32_t num_pages, absl::FunctionRef<uint32_t(uint32_t)> fill) {
  const size_t n = static_cast<size_t>(kBasis) * dim_;
  for (size_t i = 0; i < n; ++i) {
    if (!std::isfinite(basis[i])) {
      return absl::InvalidArgumentError("query basis: a non-finite coordinate");
    }
  }
  static_assert(kBasis == 4, "Dot4 and the byte dot products take four projections per row");
  if (!trained_) return absl::OkStatus();
  num_pages = std::min(num_pages, this->num_pages());
  auto st = std::make_shared<BasisState>();
  st->basis.assign(basis, basis + n);
  EnsureProjBlocks(st.get());
  // Each row's projections from its frame: (k . u_r - mean . u_r) / the
  // norm kept (|k - mean| in fp16: within a part in 2^11 of EncodeBlock's,
  // far below the byte's step), one pass over the row for the four dots
  // (a pass over every key: a few ms at 131072 tokens).
  const size_t row_bytes = static_cast<size_t>(dim_) * DTypeSize(dtype);
  std::vector<float> row(dim_);
  float mu[kBasis];
  for (int b = 0; b < kBasis; ++b) {
    mu[b] = DotF(mean_.data(), &st->basis[static_cast<size_t>(b) * dim_], dim_);
  }
  for (uint32_t page = 0; page < num_pages; ++page) {
    const uint32_t rows = std::min<uint32_t>(fill(page), static_cast<uint32_t>(page_tokens_));
    if (rows == 0) continue;
    const auto* frame = static_cast<const uint8_t*>(keys.page_keys(page));
    if (frame == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat("page ", page, " holds ", rows, " keys but has no frame to read"));
    }
    for (uint32_t r = 0; r < rows; ++r) {
      ToFloat(dtype, frame + r * row_bytes, row.data(), dim_);
      const uint64_t slot = static_cast<uint64_t>(page) * page_tokens_ + r;
      const float n = norm(slot);
      const float inv = n > 0.0f && std::isfinite(n) ? 1.0f / n : 0.0f;
      float dots[kBasis];
      Dot4(row.data(), st->basis.data(), dim_, dots);
      uint8_t* pg = st->group(slot / kGroup) + NormIndex(static_cast<int>(slot % kGroup)) * kBasis;
      for (int b = 0; b < kBasis; ++b) pg[b] = QuantiseProjection((dots[b] - mu[b]) * inv);
    }
  }
  std::atomic_store(&basis_state_, std::shared_ptr<BasisState>(std::move(st)));
  return absl::OkStatus();
}

void PqSketch::Write(const std::vector<Placement>& placements, const float* keys, DType dtype) {
  uint64_t need = slots_;
  for (const Placement& p : placements) {
    need = std::max<uint64_t>(need, (static_cast<uint64_t>(p.page) + 1) * page_tokens_);
  }
  EnsureSlots(need);
  row_.resize(static_cast<size_t>(8) * dim_);
  const float* rows[8];
  uint64_t slots[8];
  for (size_t i0 = 0; i0 < placements.size(); i0 += 8) {
    const int count = static_cast<int>(std::min<size_t>(8, placements.size() - i0));
    for (int j = 0; j < count; ++j) {
      const size_t i = i0 + j;
      // The value the frame holds.
      rows[j] = RoundThrough(dtype, keys + i * static_cast<size_t>(dim_), raw_.data(),
                             &row_[static_cast<size_t>(j) * dim_], dim_);
      slots[j] = static_cast<uint64_t>(placements[i].page) * page_tokens_ + placements[i].slot;
    }
    EncodeBlock(rows, slots, count);
  }
}

absl::Status PqSketch::Rebuild(const PageKeys& keys, DType dtype, uint32_t num_pages,
                               absl::FunctionRef<uint32_t(uint32_t)> fill) {
  EnsureSlots(static_cast<uint64_t>(num_pages) * page_tokens_);
  const size_t row_bytes = static_cast<size_t>(dim_) * DTypeSize(dtype);
  std::vector<float> all;
  std::vector<uint64_t> slots;
  for (uint32_t page = 0; page < num_pages; ++page) {
    const uint32_t rows = fill(page);
    if (rows == 0) continue;
    const auto* frame = static_cast<const uint8_t*>(keys.page_keys(page));
    if (frame == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat("page ", page, " holds ", rows, " keys but has no frame to read"));
    }
    for (uint32_t r = 0; r < rows; ++r) {
      all.resize(all.size() + dim_);
      ToFloat(dtype, frame + r * row_bytes, all.data() + all.size() - dim_, dim_);
      slots.push_back(static_cast<uint64_t>(page) * page_tokens_ + r);
    }
  }
  Train(all.data(), static_cast<int64_t>(slots.size()));
  const float* rows[8];
  for (size_t i0 = 0; i0 < slots.size(); i0 += 8) {
    const int count = static_cast<int>(std::min<size_t>(8, slots.size() - i0));
    for (int j = 0; j < count; ++j) rows[j] = all.data() + (i0 + j) * dim_;
    EncodeBlock(rows, &slots[i0], count);
  }
  return absl::OkStatus();
}

void PqSketch::SaveImage(ByteWriter* w) const {
  w->Put<uint32_t>(static_cast<uint32_t>(dim_));
  w->Put<uint32_t>(static_cast<uint32_t>(page_tokens_));
  w->Put<uint8_t>(trained_ ? 1 : 0);
  w->Put<int64_t>(trained_rows_);
  w->PutArray(mean_);
  w->PutArray(centroids_);
  w->Put<uint64_t>(slots_);
  const uint64_t groups = (slots_ + kGroup - 1) / kGroup;
  for (uint64_t g = 0; g < groups; ++g) w->PutBytes(group(g), group_bytes_);
  const std::shared_ptr<BasisState> st = std::atomic_load(&basis_state_);
  w->Put<uint8_t>(st != nullptr ? 1 : 0);
  if (st != nullptr) {
    w->PutArray(st->basis);
    for (uint64_t g = 0; g < groups; ++g) {
      w->PutBytes(st->group(g), static_cast<size_t>(kBasis) * kGroup);
    }
  }
}

absl::Status PqSketch::LoadImage(ByteReader* r, uint64_t max_slots, bool with_basis) {
  uint32_t dim = 0, page_tokens = 0;
  uint8_t trained = 0;
  int64_t trained_rows = 0;
  uint64_t slots = 0;
  std::vector<float> mean, centroids;
  r->Get(&dim);
  r->Get(&page_tokens);
  r->Get(&trained);
  r->Get(&trained_rows);
  r->GetArray(&mean, mean_.size());
  r->GetArray(&centroids, centroids_.size());
  r->Get(&slots);
  const uint64_t groups = (slots + kGroup - 1) / kGroup;
  if (!r->ok() || dim != static_cast<uint32_t>(dim_) ||
      page_tokens != static_cast<uint32_t>(page_tokens_) || trained > 1 || trained_rows < 0 ||
      slots > max_slots || groups > r->remaining() / group_bytes_) {
    return absl::DataLossError(absl::StrCat(
        "product-quantised codes section of the index image does not fit this index (dim ", dim,
        ", page_tokens ", page_tokens, ", ", slots, " slots; expected dim ", dim_, ", page_tokens ",
        page_tokens_, ", at most ", max_slots, " slots)"));
  }
  for (const float v : mean) {
    if (!std::isfinite(v)) return absl::DataLossError("codes section: a non-finite mean");
  }
  for (const float v : centroids) {
    if (!std::isfinite(v)) return absl::DataLossError("codes section: a non-finite centroid");
  }
  // The codes and norms, then (with_basis) the basis and its projections,
  // read into new blocks: the sketch stays as it was on a short or bad
  // section.
  const size_t proj_bytes = static_cast<size_t>(kBasis) * kGroup;
  std::vector<uint8_t> codes(groups * group_bytes_);
  for (uint64_t g = 0; g < groups; ++g) r->GetBytes(&codes[g * group_bytes_], group_bytes_);
  uint8_t has_basis = 0;
  std::vector<float> basis;
  std::vector<uint8_t> proj;
  if (with_basis) {
    r->Get(&has_basis);
    if (has_basis == 1) {
      r->GetArray(&basis, static_cast<size_t>(kBasis) * dim_);
      if (r->ok() && groups <= r->remaining() / proj_bytes) {
        proj.resize(groups * proj_bytes);
        for (uint64_t g = 0; g < groups; ++g) r->GetBytes(&proj[g * proj_bytes], proj_bytes);
      }
    }
    if (!r->ok() || has_basis > 1 || (has_basis == 1 && proj.size() != groups * proj_bytes)) {
      return absl::DataLossError("codes section: a query basis that is cut short or malformed");
    }
    for (const float v : basis) {
      if (!std::isfinite(v)) return absl::DataLossError("codes section: a non-finite query basis");
    }
  }
  if (!r->ok()) return absl::DataLossError("codes section: cut short");
  std::shared_ptr<BasisState> st;
  if (has_basis == 1) {
    st = std::make_shared<BasisState>();
    st->basis = std::move(basis);
  }
  std::atomic_store(&basis_state_, st);
  EnsureSlots(slots);  // with st's blocks
  for (uint64_t g = 0; g < groups; ++g) {
    std::memcpy(group(g), &codes[g * group_bytes_], group_bytes_);
  }
  if (st != nullptr) {
    for (uint64_t g = 0; g < groups; ++g) {
      std::memcpy(st->group(g), &proj[g * proj_bytes], proj_bytes);
    }
  }
  trained_ = trained == 1;
  trained_rows_ = trained_rows;
  mean_ = std::move(mean);
  centroids_ = std::move(centroids);
  LaneCentroids();
  return absl::OkStatus();
}

namespace {

// One group's sums for one query: slots 0, 2, .., 14 in lo_even, 1, 3, ..,
// 15 in lo_odd, 16 + the same in hi_even / hi_odd: 8 uint16 each from the
// shuffle scans (GroupSums), 8 int32 each from the byte-lookup scan
// (GroupSums32). The same integers either way.
struct GroupSums {
  __m128i lo_even, lo_odd, hi_even, hi_odd;
};
struct GroupSums32 {
  __m256i lo_even, lo_odd, hi_even, hi_odd;
};

// Eight sums as floats (exact: integers far below 2^24).
inline __m256 SumsToFloat(__m128i s) { return _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(s)); }
inline __m256 SumsToFloat(__m256i s) { return _mm256_cvtepi32_ps(s); }

#define ICECACHE_PQ_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define ICECACHE_PQ_VBMI \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni,avx2,fma,f16c")))

// The scan's accumulators into a group's sums. a: the table bytes added as
// uint16 (even byte + 256 x odd byte, wrapping); b: the odd bytes alone. The
// even bytes' sum is a - 256 b; the two 128-bit halves hold the even and the
// odd sub-spaces, so they are added.
inline void FinishSums(__m256i a_lo, __m256i b_lo, __m256i a_hi, __m256i b_hi, GroupSums* out) {
  const __m256i e_lo = _mm256_sub_epi16(a_lo, _mm256_slli_epi16(b_lo, 8));
  const __m256i e_hi = _mm256_sub_epi16(a_hi, _mm256_slli_epi16(b_hi, 8));
  out->lo_even = _mm_add_epi16(_mm256_castsi256_si128(e_lo), _mm256_extracti128_si256(e_lo, 1));
  out->lo_odd = _mm_add_epi16(_mm256_castsi256_si128(b_lo), _mm256_extracti128_si256(b_lo, 1));
  out->hi_even = _mm_add_epi16(_mm256_castsi256_si128(e_hi), _mm256_extracti128_si256(e_hi, 1));
  out->hi_odd = _mm_add_epi16(_mm256_castsi256_si128(b_hi), _mm256_extracti128_si256(b_hi, 1));
}

// `nq` (1 or 2) queries over one group's `lines` code lines: the nibbles
// are split once for both.
template <int kQ>
inline void ScanLines(const uint8_t* codes, const uint8_t* luts, size_t lut_stride, int lines,
                      GroupSums* out) {
  const __m256i mask = _mm256_set1_epi8(0x0f);
  // a: the bytes as uint16 (even byte + 256 x odd byte, wrapping); b: the
  // odd bytes. The even bytes' sum is a - 256 b.
  __m256i a_lo[kQ], b_lo[kQ], a_hi[kQ], b_hi[kQ];
  ICECACHE_PQ_UNROLL
  for (int q = 0; q < kQ; ++q) {
    a_lo[q] = b_lo[q] = a_hi[q] = b_hi[q] = _mm256_setzero_si256();
  }
  for (int p = 0; p < lines; ++p) {
    const __m256i cv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + p * 32));
    const __m256i nib_lo = _mm256_and_si256(cv, mask);
    const __m256i nib_hi = _mm256_and_si256(_mm256_srli_epi16(cv, 4), mask);
    ICECACHE_PQ_UNROLL
    for (int q = 0; q < kQ; ++q) {
      const __m256i lv =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(luts + q * lut_stride + p * 32));
      const __m256i lo = _mm256_shuffle_epi8(lv, nib_lo);
      const __m256i hi = _mm256_shuffle_epi8(lv, nib_hi);
      a_lo[q] = _mm256_add_epi16(a_lo[q], lo);
      b_lo[q] = _mm256_add_epi16(b_lo[q], _mm256_srli_epi16(lo, 8));
      a_hi[q] = _mm256_add_epi16(a_hi[q], hi);
      b_hi[q] = _mm256_add_epi16(b_hi[q], _mm256_srli_epi16(hi, 8));
    }
  }
  ICECACHE_PQ_UNROLL
  for (int q = 0; q < kQ; ++q) FinishSums(a_lo[q], b_lo[q], a_hi[q], b_hi[q], &out[q]);
}

// One step of ScanLinesAvx512: two lines' codes `cv` against each query's
// tables (`lut` + q x lut_stride; `line_mask` bytes of them read).
template <int kQ>
ICECACHE_PQ_AVX512 inline void ScanStepAvx512(__m512i cv, const uint8_t* lut, size_t lut_stride,
                                              __mmask64 line_mask, __m512i* a_lo, __m512i* b_lo,
                                              __m512i* a_hi, __m512i* b_hi) {
  const __m512i mask = _mm512_set1_epi8(0x0f);
  const __m512i nib_lo = _mm512_and_si512(cv, mask);
  const __m512i nib_hi = _mm512_and_si512(_mm512_srli_epi16(cv, 4), mask);
  ICECACHE_PQ_UNROLL
  for (int q = 0; q < kQ; ++q) {
    const __m512i lv = _mm512_maskz_loadu_epi8(line_mask, lut + q * lut_stride);
    const __m512i lo = _mm512_shuffle_epi8(lv, nib_lo);
    const __m512i hi = _mm512_shuffle_epi8(lv, nib_hi);
    a_lo[q] = _mm512_add_epi16(a_lo[q], lo);
    b_lo[q] = _mm512_add_epi16(b_lo[q], _mm512_srli_epi16(lo, 8));
    a_hi[q] = _mm512_add_epi16(a_hi[q], hi);
    b_hi[q] = _mm512_add_epi16(b_hi[q], _mm512_srli_epi16(hi, 8));
  }
}

ICECACHE_PQ_AVX512 inline __m256i FoldLanes(__m512i v) {
  return _mm256_add_epi16(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
}

// ScanLines on AVX-512 (docs/architecture.md §3.4): two code lines (four
// sub-spaces) per shuffle, the lanes then folded into ScanLines' two.
// Integer sums, so the same sums bit for bit; chosen where KernelIsa() is
// "avx512".
template <int kQ>
ICECACHE_PQ_AVX512 inline void ScanLinesAvx512(const uint8_t* codes, const uint8_t* luts,
                                               size_t lut_stride, int lines, GroupSums* out) {
  __m512i a_lo[kQ], b_lo[kQ], a_hi[kQ], b_hi[kQ];
  ICECACHE_PQ_UNROLL
  for (int q = 0; q < kQ; ++q) {
    a_lo[q] = b_lo[q] = a_hi[q] = b_hi[q] = _mm512_setzero_si512();
  }
  constexpr __mmask64 kTwoLines = ~__mmask64{0};
  constexpr __mmask64 kOneLine = 0xffffffffull;  // an odd last line: the rest read as 0
  int p = 0;
  for (; p + 2 <= lines; p += 2) {
    ScanStepAvx512<kQ>(_mm512_loadu_si512(codes + p * 32), luts + p * 32, lut_stride, kTwoLines,
                       a_lo, b_lo, a_hi, b_hi);
  }
  if (p < lines) {
    ScanStepAvx512<kQ>(_mm512_maskz_loadu_epi8(kOneLine, codes + p * 32), luts + p * 32, lut_stride,
                       kOneLine, a_lo, b_lo, a_hi, b_hi);
  }
  ICECACHE_PQ_UNROLL
  for (int q = 0; q < kQ; ++q) {
    FinishSums(FoldLanes(a_lo[q]), FoldLanes(b_lo[q]), FoldLanes(a_hi[q]), FoldLanes(b_hi[q]),
               &out[q]);
  }
}

// The byte-lookup scan (docs/architecture.md §3.4), where the CPU has
// AVX-512 VBMI and VNNI: the same two-line loads as ScanLinesAvx512, but the
// codes are first moved (one byte permute, shared by the queries) from
// sub-space order (byte 16 s + i: sub-space s, slot i) to slot order (byte
// 4 L + s: the slot of lane L, sub-space s). Each query then looks its four
// tables up with one 64-entry byte permute per nibble (the index: the code
// plus 16 s) and adds each slot's four bytes into its int32 lane with one
// VNNI dot product against ones: two operations per 64 codes, where the
// shuffle scans take four (a shuffle, a shift and two 16-bit adds). Lane
// L holds slot 2 L for L < 8 and 2 (L - 8) + 1 after, the shuffle scans'
// even / odd order, so the consumers and their rounding are unchanged.
// Integer sums: the same estimates bit for bit.
struct SlotOrder {
  alignas(64) uint8_t perm[64];    // byte 4 L + s <- byte 16 s + slot(L)
  alignas(64) uint8_t offset[64];  // 16 x (k % 4): the sub-space's table
  constexpr SlotOrder() : perm(), offset() {
    for (int l = 0; l < 16; ++l) {
      const int slot = l < 8 ? 2 * l : 2 * (l - 8) + 1;
      for (int sub = 0; sub < 4; ++sub) {
        perm[4 * l + sub] = static_cast<uint8_t>(16 * sub + slot);
        offset[4 * l + sub] = static_cast<uint8_t>(16 * sub);
      }
    }
  }
};
constexpr SlotOrder kSlotOrder;

template <int kQ>
ICECACHE_PQ_VBMI inline void ScanLinesVbmi(const uint8_t* codes, const uint8_t* luts,
                                           size_t lut_stride, int lines, GroupSums32* out) {
  const __m512i perm = _mm512_load_si512(kSlotOrder.perm);
  const __m512i offset = _mm512_load_si512(kSlotOrder.offset);
  const __m512i nibble = _mm512_set1_epi8(0x0f);
  const __m512i ones = _mm512_set1_epi8(1);
  constexpr int kAndOr = 0xea;  // (a & b) | c
  __m512i lo[kQ], hi[kQ];       // slots 0-15 (low nibbles), 16-31 (high)
  ICECACHE_PQ_UNROLL
  for (int q = 0; q < kQ; ++q) lo[q] = hi[q] = _mm512_setzero_si512();
  for (int p = 0; p < lines; p += 2) {
    // Two lines (four sub-spaces); an odd last line reads its other half as
    // codes 0 of zero tables.
    const __mmask64 mask = p + 2 <= lines ? ~__mmask64{0} : __mmask64{0xffffffffull};
    const __m512i cv = p + 2 <= lines ? _mm512_loadu_si512(codes + p * 32)
                                      : _mm512_maskz_loadu_epi8(mask, codes + p * 32);
    const __m512i t = _mm512_permutexvar_epi8(perm, cv);
    const __m512i idx_lo = _mm512_ternarylogic_epi32(t, nibble, offset, kAndOr);
    const __m512i idx_hi =
        _mm512_ternarylogic_epi32(_mm512_srli_epi16(t, 4), nibble, offset, kAndOr);
    ICECACHE_PQ_UNROLL
    for (int q = 0; q < kQ; ++q) {
      const uint8_t* lut = luts + q * lut_stride + p * 32;
      const __m512i lv =
          p + 2 <= lines ? _mm512_loadu_si512(lut) : _mm512_maskz_loadu_epi8(mask, lut);
      lo[q] = _mm512_dpbusd_epi32(lo[q], _mm512_permutexvar_epi8(idx_lo, lv), ones);
      hi[q] = _mm512_dpbusd_epi32(hi[q], _mm512_permutexvar_epi8(idx_hi, lv), ones);
    }
  }
  ICECACHE_PQ_UNROLL
  for (int q = 0; q < kQ; ++q) {
    out[q].lo_even = _mm512_castsi512_si256(lo[q]);
    out[q].lo_odd = _mm512_extracti64x4_epi64(lo[q], 1);
    out[q].hi_even = _mm512_castsi512_si256(hi[q]);
    out[q].hi_odd = _mm512_extracti64x4_epi64(hi[q], 1);
  }
}

// A half group's 16 rows' logits n x (a + b x sum), from two registers of 8
// sums (uint16 or int32) and their 16 fp16 norms (in the same order), folded pairwise
// into 8 lanes: their maxima and their sums (FoldHalf's and FoldHalves4'
// first step).
inline __m256 LoadHalf8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Eight rows' basis dot products: row i's four projection bytes
// (p[4i + r], offset binary) against the query's four signed coefficient
// bytes `cw`, less the offset's share `corr`: sum_r c8_r x p8_r, exactly.
// The AVX2 form (maddubs pairs stay within int16: 255 x 63 x 2 < 2^15) and
// the VNNI form give the same integers.
inline __m256i ProjDot8(const uint8_t* p, __m256i cw, __m256i corr) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i pairs = _mm256_maddubs_epi16(v, cw);
  return _mm256_add_epi32(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)), corr);
}
ICECACHE_PQ_VBMI inline __m256i ProjDot8Vnni(const uint8_t* p, __m256i cw, __m256i corr) {
  return _mm256_dpbusd_epi32(corr, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), cw);
}

// With a query basis (kProj): n x (a + b x sum + gamma x dot), dot the
// rows' basis dot products (`p8`: the half's 16 rows' projection bytes, the
// even rows' 32 then the odd rows'; `coef` the query's). kVnni: the VNNI
// dot products (the byte-lookup kernel; the same integers).
template <bool kProj, bool kVnni, typename V>
inline void HalfTerms(V s0, V s1, const uint16_t* norms, __m256 a, __m256 b, const uint8_t* p8,
                      const BasisCoef* coef, __m256* mx, __m256* sum) {
  const __m256 n0 = LoadHalf8(norms);
  const __m256 n1 = LoadHalf8(norms + 8);
  __m256 t0 = _mm256_fmadd_ps(b, SumsToFloat(s0), a);
  __m256 t1 = _mm256_fmadd_ps(b, SumsToFloat(s1), a);
  if constexpr (kProj) {
    const __m256i cw = _mm256_set1_epi32(coef->cw), corr = _mm256_set1_epi32(coef->corr);
    const __m256 g = _mm256_set1_ps(coef->gamma);
    __m256i d0, d1;
    if constexpr (kVnni) {
      d0 = ProjDot8Vnni(p8, cw, corr);
      d1 = ProjDot8Vnni(p8 + 32, cw, corr);
    } else {
      d0 = ProjDot8(p8, cw, corr);
      d1 = ProjDot8(p8 + 32, cw, corr);
    }
    t0 = _mm256_fmadd_ps(g, _mm256_cvtepi32_ps(d0), t0);
    t1 = _mm256_fmadd_ps(g, _mm256_cvtepi32_ps(d1), t1);
  }
  const __m256 v0 = _mm256_mul_ps(n0, t0);
  const __m256 v1 = _mm256_mul_ps(n1, t1);
  *mx = _mm256_max_ps(v0, v1);
  *sum = _mm256_add_ps(v0, v1);
}

// The same folded into the page's largest and total.
template <bool kProj, bool kVnni, typename V>
inline void FoldHalf(V s0, V s1, const uint16_t* norms, __m256 a, __m256 b, const uint8_t* p8,
                     const BasisCoef* coef, float* mx, float* sum) {
  __m256 vmax, vsum;
  HalfTerms<kProj, kVnni>(s0, s1, norms, a, b, p8, coef, &vmax, &vsum);
  *mx = std::max(*mx, simd::HMax256(vmax));
  *sum += simd::HSum256(vsum);
}

// simd::HMax256 / HSum256 (`kMax`) of eight vectors at once, each with
// exactly that function's operations in its order (lo op hi, then the
// pairs, then the last two), so each result has the same bits: lane i < 4
// of the result reduces v[2i], lane 4 + i reduces v[2i + 1]. One transpose
// instead of eight horizontal chains, whose shuffles and scalar stores were
// most of the scan's time after the table lookups.
template <bool kMax>
inline __m256 Reduce8(const __m256* v) {
  auto op = [](__m256 x, __m256 y) { return kMax ? _mm256_max_ps(x, y) : _mm256_add_ps(x, y); };
  __m256 w[4];
  for (int k = 0; k < 4; ++k) {
    w[k] = op(_mm256_permute2f128_ps(v[2 * k], v[2 * k + 1], 0x20),
              _mm256_permute2f128_ps(v[2 * k], v[2 * k + 1], 0x31));
  }
  const __m256 z01 = op(_mm256_shuffle_ps(w[0], w[1], _MM_SHUFFLE(1, 0, 1, 0)),
                        _mm256_shuffle_ps(w[0], w[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m256 z23 = op(_mm256_shuffle_ps(w[2], w[3], _MM_SHUFFLE(1, 0, 1, 0)),
                        _mm256_shuffle_ps(w[2], w[3], _MM_SHUFFLE(3, 2, 3, 2)));
  return op(_mm256_shuffle_ps(z01, z23, _MM_SHUFFLE(2, 0, 2, 0)),
            _mm256_shuffle_ps(z01, z23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// Four queries' FoldHalf into both halves' cells at once: `r` the four
// queries' sums, a / b / cells from query q0. The cells get exactly
// FoldHalf's values (std::max(cell, x) is max_ps(x, cell) lane by lane,
// NaNs and signed zeros included); the low half's cells first, as
// FoldHalf's calls, so a page holding both halves folds them in order.
// `p8`: the group's projection bytes (kProj), `coef` the four queries'.
template <bool kProj, bool kVnni, typename Sums>
inline void FoldHalves4(const Sums* r, const uint16_t* norms, const float* a, const float* b,
                        const uint8_t* p8, const BasisCoef* coef, float* pmax_lo, float* psum_lo,
                        float* pmax_hi, float* psum_hi) {
  __m256 mx[8], sm[8];
  for (int k = 0; k < 4; ++k) {
    const __m256 av = _mm256_set1_ps(a[k]), bv = _mm256_set1_ps(b[k]);
    const BasisCoef* ck = kProj ? coef + k : nullptr;
    HalfTerms<kProj, kVnni>(r[k].lo_even, r[k].lo_odd, norms, av, bv, p8, ck, &mx[2 * k],
                            &sm[2 * k]);
    HalfTerms<kProj, kVnni>(r[k].hi_even, r[k].hi_odd, norms + 16, av, bv,
                            kProj ? p8 + 16 * PqSketch::kBasis : nullptr, ck, &mx[2 * k + 1],
                            &sm[2 * k + 1]);
  }
  const __m256 hm = Reduce8<true>(mx);
  const __m256 hs = Reduce8<false>(sm);
  _mm_storeu_ps(pmax_lo, _mm_max_ps(_mm256_castps256_ps128(hm), _mm_loadu_ps(pmax_lo)));
  _mm_storeu_ps(psum_lo, _mm_add_ps(_mm_loadu_ps(psum_lo), _mm256_castps256_ps128(hs)));
  _mm_storeu_ps(pmax_hi, _mm_max_ps(_mm256_extractf128_ps(hm, 1), _mm_loadu_ps(pmax_hi)));
  _mm_storeu_ps(psum_hi, _mm_add_ps(_mm_loadu_ps(psum_hi), _mm256_extractf128_ps(hs, 1)));
}

}  // namespace

void PqSketch::ScanGroup(uint64_t g, const uint8_t* luts, int num_queries, uint16_t* sums) const {
  const uint8_t* c = group(g);
  const int lines = subspaces_ / 2;
  const size_t stride = static_cast<size_t>(lines) * 32;
  for (int q = 0; q < num_queries; ++q) {
    GroupSums r;
    ScanLines<1>(c, luts + q * stride, stride, lines, &r);
    uint16_t* o = sums + q * kGroup;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o), _mm_unpacklo_epi16(r.lo_even, r.lo_odd));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 8), _mm_unpackhi_epi16(r.lo_even, r.lo_odd));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 16), _mm_unpacklo_epi16(r.hi_even, r.hi_odd));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 24), _mm_unpackhi_epi16(r.hi_even, r.hi_odd));
  }
}

namespace {

// ScanGroupHalves' body over each scan: the group's codes `c`, its norms.
// `p8`, `coef`: the group's projection bytes and the queries' coefficients
// (kProj only).
template <PqSketch::ScanKernelId kKernel, bool kProj>
__attribute__((always_inline)) inline void ScanHalves(const uint8_t* c, const uint16_t* norms,
                                                      int lines, const uint8_t* luts,
                                                      int num_queries, const float* a,
                                                      const float* b, const uint8_t* p8,
                                                      const BasisCoef* coef, size_t cell_lo,
                                                      size_t cell_hi, float* pmax, float* psum) {
  constexpr bool kVnni = kKernel == PqSketch::ScanKernelId::kByteLookup;
  const auto half = [&](int h) -> const uint8_t* {
    return kProj ? p8 + 16 * PqSketch::kBasis * h : nullptr;
  };
  const auto qc = [&](int q) -> const BasisCoef* { return kProj ? coef + q : nullptr; };
  using Kernel = PqSketch::ScanKernelId;
  using Sums = std::conditional_t<kKernel == Kernel::kByteLookup, GroupSums32, GroupSums>;
  // `n` (1, 2 or 4) queries from q on.
  const size_t stride = static_cast<size_t>(lines) * 32;
  const auto scan = [&](auto n, int q, Sums* r) {
    constexpr int kN = decltype(n)::value;
    if constexpr (kKernel == Kernel::kByteLookup) {
      ScanLinesVbmi<kN>(c, luts + q * stride, stride, lines, r);
    } else if constexpr (kKernel == Kernel::kAvx512) {
      ScanLinesAvx512<kN>(c, luts + q * stride, stride, lines, r);
    } else if constexpr (kN == 4) {
      ScanLines<2>(c, luts + q * stride, stride, lines, r);
      ScanLines<2>(c, luts + (q + 2) * stride, stride, lines, r + 2);
    } else {
      ScanLines<kN>(c, luts + q * stride, stride, lines, r);
    }
  };
  int q = 0;
  for (; q + 4 <= num_queries; q += 4) {  // a GQA group of 4 or 8: FoldHalves4
    Sums r4[4];
    scan(std::integral_constant<int, 4>(), q, r4);
    FoldHalves4<kProj, kVnni>(r4, norms, a + q, b + q, p8, qc(q), pmax + cell_lo + q,
                              psum + cell_lo + q, pmax + cell_hi + q, psum + cell_hi + q);
  }
  Sums r[2];
  for (; q + 2 <= num_queries; q += 2) {
    scan(std::integral_constant<int, 2>(), q, r);
    for (int k = 0; k < 2; ++k) {
      const __m256 av = _mm256_set1_ps(a[q + k]), bv = _mm256_set1_ps(b[q + k]);
      FoldHalf<kProj, kVnni>(r[k].lo_even, r[k].lo_odd, norms, av, bv, half(0), qc(q + k),
                             &pmax[cell_lo + q + k], &psum[cell_lo + q + k]);
      FoldHalf<kProj, kVnni>(r[k].hi_even, r[k].hi_odd, norms + 16, av, bv, half(1), qc(q + k),
                             &pmax[cell_hi + q + k], &psum[cell_hi + q + k]);
    }
  }
  for (; q < num_queries; ++q) {
    scan(std::integral_constant<int, 1>(), q, r);
    const __m256 av = _mm256_set1_ps(a[q]), bv = _mm256_set1_ps(b[q]);
    FoldHalf<kProj, kVnni>(r[0].lo_even, r[0].lo_odd, norms, av, bv, half(0), qc(q),
                           &pmax[cell_lo + q], &psum[cell_lo + q]);
    FoldHalf<kProj, kVnni>(r[0].hi_even, r[0].hi_odd, norms + 16, av, bv, half(1), qc(q),
                           &pmax[cell_hi + q], &psum[cell_hi + q]);
  }
}

// The AVX-512 scans' bodies: a GQA group of 4 or 8 queries is scanned here,
// four at a time, and the queries left over take ScanHalves. Called from
// the functions of each kernel's target below, which are flattened: from
// ScanHalves' lambda (a function of the default target) GCC would not
// inline the line scan, and its sums came back through the stack.
template <PqSketch::ScanKernelId kKernel, bool kProj>
__attribute__((always_inline)) inline void ScanHalvesWide(
    const uint8_t* c, const uint16_t* norms, int lines, const uint8_t* luts, int num_queries,
    const float* a, const float* b, const uint8_t* p8, const BasisCoef* coef, size_t cell_lo,
    size_t cell_hi, float* pmax, float* psum) {
  constexpr bool kVnni = kKernel == PqSketch::ScanKernelId::kByteLookup;
  const size_t stride = static_cast<size_t>(lines) * 32;
  int q = 0;
  for (; q + 4 <= num_queries; q += 4) {
    const BasisCoef* cq = kProj ? coef + q : nullptr;
    if constexpr (kKernel == PqSketch::ScanKernelId::kByteLookup) {
      GroupSums32 r4[4];
      ScanLinesVbmi<4>(c, luts + q * stride, stride, lines, r4);
      FoldHalves4<kProj, kVnni>(r4, norms, a + q, b + q, p8, cq, pmax + cell_lo + q,
                                psum + cell_lo + q, pmax + cell_hi + q, psum + cell_hi + q);
    } else {
      GroupSums r4[4];
      ScanLinesAvx512<4>(c, luts + q * stride, stride, lines, r4);
      FoldHalves4<kProj, kVnni>(r4, norms, a + q, b + q, p8, cq, pmax + cell_lo + q,
                                psum + cell_lo + q, pmax + cell_hi + q, psum + cell_hi + q);
    }
  }
  if (q < num_queries) {
    ScanHalves<kKernel, kProj>(c, norms, lines, luts + q * stride, num_queries - q, a + q, b + q,
                               p8, kProj ? coef + q : nullptr, cell_lo + q, cell_hi + q, pmax,
                               psum);
  }
}

template <bool kProj>
ICECACHE_PQ_AVX512 __attribute__((flatten)) void ScanHalvesAvx512(
    const uint8_t* c, const uint16_t* norms, int lines, const uint8_t* luts, int num_queries,
    const float* a, const float* b, const uint8_t* p8, const BasisCoef* coef, size_t cell_lo,
    size_t cell_hi, float* pmax, float* psum) {
  ScanHalvesWide<PqSketch::ScanKernelId::kAvx512, kProj>(c, norms, lines, luts, num_queries, a, b,
                                                         p8, coef, cell_lo, cell_hi, pmax, psum);
}

template <bool kProj>
ICECACHE_PQ_VBMI __attribute__((flatten)) void ScanHalvesVbmi(
    const uint8_t* c, const uint16_t* norms, int lines, const uint8_t* luts, int num_queries,
    const float* a, const float* b, const uint8_t* p8, const BasisCoef* coef, size_t cell_lo,
    size_t cell_hi, float* pmax, float* psum) {
  ScanHalvesWide<PqSketch::ScanKernelId::kByteLookup, kProj>(
      c, norms, lines, luts, num_queries, a, b, p8, coef, cell_lo, cell_hi, pmax, psum);
}

bool CpuHasByteLookupScan() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi") &&
         __builtin_cpu_supports("avx512vnni");
}

std::atomic<bool>& ByteLookupAllowed() {
  static std::atomic<bool> allowed{true};
  return allowed;
}

}  // namespace

PqSketch::ScanKernelId PqSketch::ActiveScanKernel() {
  static const bool has_byte_lookup = CpuHasByteLookupScan();
  if (std::strcmp(KernelIsa(), "avx512") != 0) return ScanKernelId::kAvx2;
  return has_byte_lookup && ByteLookupAllowed().load(std::memory_order_relaxed)
             ? ScanKernelId::kByteLookup
             : ScanKernelId::kAvx512;
}

const char* PqSketch::ScanKernel() {
  switch (ActiveScanKernel()) {
    case ScanKernelId::kAvx2:
      return "avx2";
    case ScanKernelId::kAvx512:
      return "avx512";
    case ScanKernelId::kByteLookup:
      return "avx512-vbmi";
  }
  return "avx2";
}

namespace {
std::atomic<int>& ScanPrefetchSetting() {
  static std::atomic<int> groups{PqSketch::kScanPrefetchGroups};
  return groups;
}
}  // namespace

int PqSketch::SetScanPrefetch(int groups) {
  return ScanPrefetchSetting().exchange(std::clamp(groups, 0, 64), std::memory_order_relaxed);
}

uint64_t PqSketch::ScanPrefetchGroups() {
  return static_cast<uint64_t>(ScanPrefetchSetting().load(std::memory_order_relaxed));
}

bool PqSketch::AllowByteLookupScan(bool allow) {
  ByteLookupAllowed().store(allow, std::memory_order_relaxed);
  return CpuHasByteLookupScan();
}

void PqSketch::ScanGroupHalves(uint64_t g, const uint8_t* luts, int num_queries, const float* a,
                               const float* b, const BasisState* basis, const void* pc,
                               size_t cell_lo, size_t cell_hi, float* pmax, float* psum,
                               ScanKernelId kernel) const {
  const uint8_t* c = group(g);
  uint16_t norms[kGroup];
  std::memcpy(norms, c + code_bytes_, sizeof(norms));
  const int lines = subspaces_ / 2;
  if (basis != nullptr) {
    const uint8_t* p8 = basis->group(g);
    const auto* coef = static_cast<const BasisCoef*>(pc);
    switch (kernel) {
      case ScanKernelId::kByteLookup:
        ScanHalvesVbmi<true>(c, norms, lines, luts, num_queries, a, b, p8, coef, cell_lo, cell_hi,
                             pmax, psum);
        break;
      case ScanKernelId::kAvx512:
        ScanHalvesAvx512<true>(c, norms, lines, luts, num_queries, a, b, p8, coef, cell_lo, cell_hi,
                               pmax, psum);
        break;
      case ScanKernelId::kAvx2:
        ScanHalves<ScanKernelId::kAvx2, true>(c, norms, lines, luts, num_queries, a, b, p8, coef,
                                              cell_lo, cell_hi, pmax, psum);
        break;
    }
    return;
  }
  switch (kernel) {
    case ScanKernelId::kByteLookup:
      ScanHalvesVbmi<false>(c, norms, lines, luts, num_queries, a, b, nullptr, nullptr, cell_lo,
                            cell_hi, pmax, psum);
      break;
    case ScanKernelId::kAvx512:
      ScanHalvesAvx512<false>(c, norms, lines, luts, num_queries, a, b, nullptr, nullptr, cell_lo,
                              cell_hi, pmax, psum);
      break;
    case ScanKernelId::kAvx2:
      ScanHalves<ScanKernelId::kAvx2, false>(c, norms, lines, luts, num_queries, a, b, nullptr,
                                             nullptr, cell_lo, cell_hi, pmax, psum);
      break;
  }
}

void PqSketch::PrefetchGroup(uint64_t g, const BasisState* basis) const {
  PrefetchBytes(group(g), group_bytes_);
  if (basis != nullptr) PrefetchBytes(basis->group(g), kBasis * kGroup);
}

void PqSketch::EstimatePageMass(const float* queries, int num_queries, float scale,
                                uint32_t num_pages, const uint32_t* fill, float* mass,
                                float* log_ref, float* bulk) const {
  num_queries = std::clamp(num_queries, 1, kMaxQueries);
  num_pages = std::min(num_pages, this->num_pages());
  PqScanScratch& s = PqScratch();
  const int lines = subspaces_ / 2;
  s.luts.assign(static_cast<size_t>(num_queries) * lines * 32, 0);
  s.offset.assign(num_queries, 0.0f);
  s.base.assign(num_queries, 0.0f);
  s.step.assign(num_queries, 0.0f);
  s.ref.resize(num_queries);
  s.table.resize(static_cast<size_t>(subspaces_) * kCentroids);
  // The basis as published when this scan starts (SetBasis may publish
  // another meanwhile).
  const std::shared_ptr<BasisState> basis_state = std::atomic_load(&basis_state_);
  const BasisState* bs = basis_state.get();
  if (bs != nullptr) {
    s.coef.resize(num_queries);
    s.rest.resize(dim_);
  }
  for (int j = 0; j < num_queries; ++j) {
    const float* full = queries + static_cast<size_t>(j) * dim_;
    const float* q = full;
    if (bs != nullptr) {
      // The part in the basis is scored exactly (the projections); the
      // tables quantise the rest.
      std::copy(full, full + dim_, s.rest.begin());
      float cr[kBasis];
      float cmax = 0.0f;
      for (int r = 0; r < kBasis; ++r) {
        const float* u = &bs->basis[static_cast<size_t>(r) * dim_];
        const float qu = DotF(full, u, dim_);
        cr[r] = scale * qu;
        cmax = std::max(cmax, std::abs(cr[r]));
        for (int d = 0; d < dim_; ++d) s.rest[d] -= qu * u[d];
      }
      // Signed bytes in [-63, 63] (BasisCoef).
      const float cstep = cmax > 0.0f && std::isfinite(cmax) ? cmax / 63.0f : 1.0f;
      uint32_t cw = 0;
      int32_t csum = 0;
      for (int r = 0; r < kBasis; ++r) {
        const int32_t c8 =
            std::isfinite(cr[r]) ? std::clamp<int32_t>(std::lrint(cr[r] / cstep), -63, 63) : 0;
        csum += c8;
        cw |= static_cast<uint32_t>(static_cast<uint8_t>(static_cast<int8_t>(c8))) << (8 * r);
      }
      BasisCoef& bc = s.coef[j];
      bc.cw = static_cast<int32_t>(cw);
      bc.corr = -128 * csum;
      bc.gamma = cstep / 127.0f;
      q = s.rest.data();
    }
    // Each sub-space's 16 inner products in two registers, lane c the
    // centroid c, from the centroids by dimension (centroid_lanes_): per
    // lane the one-centroid loop's FMAs in its order (from 0, dimension 0
    // first), so the same tables; its sequential minimum and maximum as
    // register reductions, equal but for the sign of a zero, which no table
    // byte, base or step depends on.
    float range = 0.0f;
    double base = 0.0;
    for (int sub = 0; sub < subspaces_; ++sub) {
      const float* cl = centroid_lanes_.data() + static_cast<size_t>(sub) * kSubDims * kCentroids;
      __m256 v0 = _mm256_setzero_ps(), v1 = _mm256_setzero_ps();
      for (int d = 0; d < kSubDims; ++d) {
        const __m256 qd = _mm256_set1_ps(q[sub * kSubDims + d]);
        v0 = _mm256_fmadd_ps(_mm256_loadu_ps(cl + d * kCentroids), qd, v0);
        v1 = _mm256_fmadd_ps(_mm256_loadu_ps(cl + d * kCentroids + 8), qd, v1);
      }
      const float lo = simd::HMin256(_mm256_min_ps(v0, v1));
      const float hi = simd::HMax256(_mm256_max_ps(v0, v1));
      range = std::max(range, hi - lo);
      base += lo;
      const __m256 lov = _mm256_set1_ps(lo);
      _mm256_storeu_ps(&s.table[sub * kCentroids], _mm256_sub_ps(v0, lov));
      _mm256_storeu_ps(&s.table[sub * kCentroids + 8], _mm256_sub_ps(v1, lov));
    }
    const float step = range > 0.0f && std::isfinite(range) ? range / 255.0f : 1.0f;
    uint8_t* l = s.luts.data() + static_cast<size_t>(j) * lines * 32;
    // round(t / step) clamped to [0, 255], 16 entries at once: the same
    // division and rounding (to nearest) as the scalar nearbyint.
    const __m256 stepv = _mm256_set1_ps(step);
    const __m256 zero = _mm256_setzero_ps(), top = _mm256_set1_ps(255.0f);
    for (int sub = 0; sub < subspaces_; ++sub) {
      __m256i w[2];
      for (int h = 0; h < 2; ++h) {
        const __m256 t = _mm256_div_ps(_mm256_loadu_ps(&s.table[sub * kCentroids + 8 * h]), stepv);
        const __m256 r = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        w[h] = _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(r, zero), top));
      }
      // 16 int32 in [0, 255] to 16 bytes in order.
      const __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(w[0], w[1]), 0xd8);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(l + (sub / 2) * 32 + (sub % 2) * 16),
                       _mm_packus_epi16(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1)));
    }
    double qm = 0.0;
    for (int d = 0; d < dim_; ++d) qm += static_cast<double>(full[d]) * mean_[d];
    s.base[j] = static_cast<float>(scale * base);
    s.offset[j] = static_cast<float>(scale * qm);
    s.step[j] = scale * step;
  }

  // Per page and query: the largest and the sum of its rows' logits (scaled,
  // less q.mean).
  const size_t cells = static_cast<size_t>(num_pages) * num_queries;
  s.pmax.assign(cells, -std::numeric_limits<float>::infinity());
  s.psum.assign(cells, 0.0f);
  s.fills.resize(num_pages + 8);  // 8 past the last page read as 0 (the exp pass's loads)
  std::fill(s.fills.begin() + num_pages, s.fills.end(), 0u);
  {
    uint32_t* __restrict fills = s.fills.data();
    const uint32_t cap = static_cast<uint32_t>(page_tokens_);
    for (uint32_t p = 0; p < num_pages; ++p) fills[p] = std::min(fill[p], cap);
  }
  s.sums.resize(static_cast<size_t>(num_queries) * kGroup);
  const uint64_t slots = static_cast<uint64_t>(num_pages) * page_tokens_;
  const uint64_t groups = (slots + kGroup - 1) / kGroup;
  const bool halves = page_tokens_ % 16 == 0;  // every 16-slot half lies in one page
  const ScanKernelId kernel = ActiveScanKernel();
  // The codes (and projections) are read once per select, cold: the groups
  // ScanPrefetchGroups() further on are asked for while this one is scanned.
  const uint64_t ahead = ScanPrefetchGroups();
  for (uint64_t g = 0; g < std::min(ahead, groups); ++g) PrefetchGroup(g, bs);
  for (uint64_t g = 0; g < groups; ++g) {
    if (g + ahead < groups) PrefetchGroup(g + ahead, bs);
    const uint64_t first = g * kGroup;
    if (halves && first + kGroup <= slots) {
      // Both halves whole rows of full pages: reduced in registers.
      const uint32_t page_lo = static_cast<uint32_t>(first / page_tokens_);
      const uint32_t page_hi = static_cast<uint32_t>((first + 16) / page_tokens_);
      if (first % page_tokens_ + 16 <= s.fills[page_lo] &&
          (first + 16) % page_tokens_ + 16 <= s.fills[page_hi]) {
        ScanGroupHalves(
            g, s.luts.data(), num_queries, s.base.data(), s.step.data(), bs,
            bs != nullptr ? s.coef.data() : nullptr, static_cast<size_t>(page_lo) * num_queries,
            static_cast<size_t>(page_hi) * num_queries, s.pmax.data(), s.psum.data(), kernel);
        continue;
      }
    }
    ScanGroup(g, s.luts.data(), num_queries, s.sums.data());
    for (int t = 0; t < kGroup; ++t) {  // pages of other sizes, partly filled pages
      const uint64_t slot = first + t;
      if (slot >= slots) break;
      const uint32_t pg = static_cast<uint32_t>(slot / page_tokens_);
      if (slot % page_tokens_ >= s.fills[pg]) continue;
      const float n = norm(slot);
      const uint8_t* p8 = bs != nullptr ? bs->group(g) + NormIndex(t) * kBasis : nullptr;
      for (int j = 0; j < num_queries; ++j) {
        float e = std::fma(s.step[j], static_cast<float>(s.sums[j * kGroup + t]), s.base[j]);
        if (p8 != nullptr) {
          // HalfTerms' integers and operations.
          const BasisCoef& bc = s.coef[j];
          int32_t dot = bc.corr;
          for (int r = 0; r < kBasis; ++r) {
            dot +=
                static_cast<int32_t>(static_cast<int8_t>(static_cast<uint32_t>(bc.cw) >> (8 * r))) *
                static_cast<int32_t>(p8[r]);
          }
          e = std::fma(bc.gamma, static_cast<float>(dot), e);
        }
        const float v = n * e;
        const size_t cell = static_cast<size_t>(pg) * num_queries + j;
        s.pmax[cell] = std::max(s.pmax[cell], v);
        s.psum[cell] += v;
      }
    }
  }
  // mass ~ e^max + (fill - 1) e^mean, relative to each query's largest max.
  // An empty page's pmax stays -inf, so each query's largest is the
  // column's maximum over every cell.
  ColumnMax(s.pmax.data(), num_pages, num_queries, log_ref);
  for (int j = 0; j < num_queries; ++j) {
    log_ref[j] += s.offset[j];  // offset + max = max of offset + x (rounding is monotone)
    s.ref[j] = log_ref[j];
  }
  const float* __restrict offset = s.offset.data();
  const float* __restrict ref = s.ref.data();
  const float* __restrict pmax = s.pmax.data();
  const float* __restrict psum = s.psum.data();
  const uint32_t* __restrict fills = s.fills.data();
  // Per cell (page p, query j): a = the max term's exponent, b = the mean
  // term's, w = fill - 1 (an empty page: a = b = -100, w = -1, mass 0); the
  // mass is e^a + w e^b, the bulk (w + 1) e^b.
  if (8 % num_queries == 0) {
    // A GQA group of 1, 2, 4 or 8 queries: a, b and w built in registers
    // for 8 cells at once (lane L: query L % num_queries of page
    // i / num_queries + L / num_queries) and exponentiated there, instead
    // of three arrays written and read back. The same operations lane by
    // lane as the general path below, so the same bits.
    const int shift = __builtin_ctz(static_cast<unsigned>(num_queries));  // log2
    alignas(32) float off8[8], ref8[8];
    alignas(32) int32_t page8[8];
    for (int l = 0; l < 8; ++l) {
      off8[l] = offset[l % num_queries];
      ref8[l] = ref[l % num_queries];
      page8[l] = l >> shift;
    }
    const __m256 offv = _mm256_load_ps(off8), refv = _mm256_load_ps(ref8);
    const __m256i pagev = _mm256_load_si256(reinterpret_cast<const __m256i*>(page8));
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
    const __m256 empty_ab = _mm256_set1_ps(-100.0f), empty_w = _mm256_set1_ps(-1.0f);
    size_t i = 0;
    for (; i + 8 <= cells; i += 8) {
      // The lanes' pages lie below num_pages: (i + 7) / num_queries < num_pages.
      // The lanes' fills: eight from the first lane's page on, permuted to
      // the lanes (a load and a permute instead of a gather).
      const __m256 ff = _mm256_cvtepi32_ps(_mm256_permutevar8x32_epi32(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(fills + (i >> shift))),
          pagev));  // <= 256: exact
      const __m256 empty = _mm256_cmp_ps(ff, zero, _CMP_EQ_OQ);
      const __m256 a = _mm256_blendv_ps(
          _mm256_sub_ps(_mm256_add_ps(offv, _mm256_loadu_ps(pmax + i)), refv), empty_ab, empty);
      const __m256 b = _mm256_blendv_ps(
          _mm256_sub_ps(_mm256_add_ps(offv, _mm256_div_ps(_mm256_loadu_ps(psum + i), ff)), refv),
          empty_ab, empty);
      const __m256 w = _mm256_blendv_ps(_mm256_sub_ps(ff, one), empty_w, empty);
      const __m256 ea = simd::Exp256(a);
      const __m256 eb = simd::Exp256(b);
      __m256 m = _mm256_fmadd_ps(w, eb, ea);
      m = _mm256_and_ps(m, _mm256_cmp_ps(w, zero, _CMP_GE_OQ));
      _mm256_storeu_ps(mass + i, m);
      if (bulk != nullptr) {
        const __m256 f = _mm256_add_ps(w, one);
        _mm256_storeu_ps(bulk + i, _mm256_max_ps(_mm256_mul_ps(f, eb), zero));
      }
    }
    for (; i < cells; ++i) {
      const uint32_t f = fills[i >> shift];
      const int j = static_cast<int>(i & static_cast<size_t>(num_queries - 1));
      if (f == 0) {
        mass[i] = 0.0f;
        if (bulk != nullptr) bulk[i] = 0.0f;
        continue;
      }
      const float a = (offset[j] + pmax[i]) - ref[j];
      const float b = (offset[j] + psum[i] / static_cast<float>(f)) - ref[j];
      const float w = static_cast<float>(f - 1);
      mass[i] = std::exp(a) + w * std::exp(b);
      if (bulk != nullptr) bulk[i] = (w + 1.0f) * std::exp(b);
    }
    return;
  }
  s.a.resize(cells + 8);
  s.b.resize(cells + 8);
  s.w.resize(cells + 8);
  {
    float* __restrict a = s.a.data();
    float* __restrict b = s.b.data();
    float* __restrict w = s.w.data();
    for (uint32_t p = 0; p < num_pages; ++p) {
      const uint32_t f = fills[p];
      const size_t c0 = static_cast<size_t>(p) * num_queries;
      if (f == 0) {
        for (int j = 0; j < num_queries; ++j) {
          a[c0 + j] = b[c0 + j] = -100.0f;  // exp clamps: 0 next to the largest term
          w[c0 + j] = -1.0f;                // empty: mass 0 (masked below)
        }
        continue;
      }
      const float ff = static_cast<float>(f);
      const float wf = static_cast<float>(f - 1);
      int j = 0;
      // Four queries per step: the same operations lane by lane, so the
      // same bits as the scalar loop, whose division by the fill was most
      // of this pass.
      const __m128 ffv = _mm_set1_ps(ff), wfv = _mm_set1_ps(wf);
      for (; j + 4 <= num_queries; j += 4) {
        const __m128 off = _mm_loadu_ps(offset + j), rf = _mm_loadu_ps(ref + j);
        _mm_storeu_ps(a + c0 + j, _mm_sub_ps(_mm_add_ps(off, _mm_loadu_ps(pmax + c0 + j)), rf));
        _mm_storeu_ps(
            b + c0 + j,
            _mm_sub_ps(_mm_add_ps(off, _mm_div_ps(_mm_loadu_ps(psum + c0 + j), ffv)), rf));
        _mm_storeu_ps(w + c0 + j, wfv);
      }
      for (; j < num_queries; ++j) {
        a[c0 + j] = (offset[j] + pmax[c0 + j]) - ref[j];
        b[c0 + j] = (offset[j] + psum[c0 + j] / ff) - ref[j];
        w[c0 + j] = wf;
      }
    }
  }
  size_t i = 0;
  for (; i + 8 <= cells; i += 8) {
    const __m256 ea = simd::Exp256(_mm256_loadu_ps(s.a.data() + i));
    const __m256 eb = simd::Exp256(_mm256_loadu_ps(s.b.data() + i));
    const __m256 w = _mm256_loadu_ps(s.w.data() + i);
    __m256 m = _mm256_fmadd_ps(w, eb, ea);
    m = _mm256_and_ps(m, _mm256_cmp_ps(w, _mm256_setzero_ps(), _CMP_GE_OQ));
    _mm256_storeu_ps(mass + i, m);
    if (bulk != nullptr) {
      const __m256 f = _mm256_add_ps(w, _mm256_set1_ps(1.0f));
      _mm256_storeu_ps(bulk + i, _mm256_max_ps(_mm256_mul_ps(f, eb), _mm256_setzero_ps()));
    }
  }
  for (; i < cells; ++i) {
    mass[i] = s.w[i] < 0.0f ? 0.0f : std::exp(s.a[i]) + s.w[i] * std::exp(s.b[i]);
    if (bulk != nullptr) bulk[i] = s.w[i] < 0.0f ? 0.0f : (s.w[i] + 1.0f) * std::exp(s.b[i]);
  }
}

size_t PqSketch::bytes() const {
  return blocks_.size() * kGroupsPerBlock * group_bytes_ +
         (mean_.size() + centroids_.size() + centroid_lanes_.size()) * sizeof(float) + [this] {
           const std::shared_ptr<BasisState> st = std::atomic_load(&basis_state_);
           return st == nullptr
                      ? size_t{0}
                      : st->blocks.size() * kGroupsPerBlock * kBasis * kGroup * sizeof(uint16_t) +
                            st->basis.size() * sizeof(float);
         }();
}

}  // namespace icecache
