// SIMD kernels of the hot paths: dot products of one fp32 query against rows
// of keys stored as fp16, bf16 or fp32. Built for x86-64-v3 (AVX2, FMA, F16C);
// an AVX-512 path is chosen at run time when the CPU has it.
// Thread-safe, allocation-free.
#ifndef ICECACHE_SERVER_INDEX_KERNELS_H_
#define ICECACHE_SERVER_INDEX_KERNELS_H_

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "common/dtype.h"

namespace icecache {

float DotF32(const float* a, const float* b, int dim);
float DotF16(const float* q, const uint16_t* k, int dim);
float DotBf16(const float* q, const uint16_t* k, int dim);

// out[i] = DotF32(q, row i, dim), bit for bit, for `n` fp32 rows: row i is
// rows + (ids ? ids[i] : i) * dim. The single dots of a tree insert
// (routing, representatives) batched: rows fetched ahead and two in flight
// at once, with the arithmetic of DotF32 unchanged, so the trees built and
// replayed stay the same (docs/architecture.md §3.3).
void DotF32Rows(const float* q, const float* rows, const uint32_t* ids, int64_t n, int dim,
                float* out);

// out[i] = DotF16(q, row i, dim), bit for bit, for `n` fp16 rows: row i is
// rows + (ids ? ids[i] : i) * dim. A decode insert's routing over the
// nodes' fp16 mirrors: half the bytes of their fp32 centroids, which it
// reads cold; rows fetched ahead.
void DotF16Rows(const float* q, const uint16_t* rows, const uint32_t* ids, int64_t n, int dim,
                float* out);

// out[x * nrows + r] = DotF32(xs + x * dim, rows + r * dim, dim), bit for
// bit, for `nx` fp32 vectors against `nrows` fp32 rows: a bulk build's
// projection of every key onto its subspace basis in one call, each vector's
// chunks loaded once for several rows and no prefetch (the rows are few and
// stay in L1), with DotF32's arithmetic, so the trees stay the same.
void ProjectF32(const float* xs, int64_t nx, const float* rows, int nrows, int dim, float* out);

// out[i] = q . rows[i] for `n` rows of `dim` elements of `dtype`, row-major.
void DotRows(DType dtype, const void* rows, int64_t n, int dim, const float* q, float* out);

// out[j * n + i] = queries[j] . rows[i] for `nq` queries (GQA group): reads
// every row once for all queries.
void DotRowsMulti(DType dtype, const void* rows, int64_t n, int dim, const float* queries, int nq,
                  float* out);

// out[j * n + i] = row_scales[i] * (queries[j] . codes[i]) for `n` rows of
// `dim` int8 codes (a page of the selector's scoring sketch, page_sketch.h).
// The dot is bit for bit DotRowsMulti's over the codes stored as fp32 (each
// code converts exactly; same blocks, same additions), then one multiply.
void DotRowsMultiI8(const int8_t* codes, const float* row_scales, int64_t n, int dim,
                    const float* queries, int nq, float* out);

// A page of exactly 16 rows against 4 queries (a GQA group of 4, 16-token
// pages): lse[j] = log(sum_i exp(scale * queries[j] . row i)), bit for bit
// what DotRowsMulti into a 4 x 16 buffer followed by PageQueryLogMass
// (page_select.h, stride 16) gives, in one pass: the logits never leave the
// registers. Returns false, writing nothing, where there is no fused pass
// (dim <= 0; on the AVX2 path a dim that is not a multiple of 8); the
// caller then takes the two steps. `max` (if not null) receives each query's
// largest scaled logit, max_i scale * (queries[j] . row i): no token of the
// page scores more for query j (token-granular selection's bound). `logits`
// (if not null) receives the 4 x 16 unscaled logits, query j's at [16 j,
// 16 j + 16), bit for bit what DotRowsMulti writes.
bool PageLogMass16x4(DType dtype, const void* rows, int dim, const float* queries, float scale,
                     float* lse, float* max = nullptr, float* logits = nullptr);

// Index of the first of x[0..n) that is greater than `threshold` (a NaN
// never is), or n. Eight lanes at a time: a top-k scan over many scores
// skips the ones that cannot enter without a branch per score.
int64_t FirstGreater(const float* x, int64_t n, float threshold);

// out[j] = the largest of x[i] for i = j (mod 8), j < 8; -infinity for a
// lane with no element (n < 8). One pass: 8 disjoint maxima bound the k-th
// largest of x from below (k <= 8), a top-k scan's first threshold.
void LaneMax8(const float* x, int64_t n, float* out);

// Name of the dispatched path ("avx512", "avx2"), for benchmark reports.
const char* KernelIsa();

// Forces the dispatched path for tests and benchmarks: "avx2", "avx512" or
// "auto" (the run-time choice). Returns false, changing nothing, for an
// unknown name or "avx512" on a CPU without it. Not meant to be called while
// other threads run kernels (they may see either path, both correct).
bool ForceKernelIsa(std::string_view isa);

}  // namespace icecache

#endif  // ICECACHE_SERVER_INDEX_KERNELS_H_
