// PqSketch: a 4-bit product quantiser of a selector's keys, scanned in
// full as mdci's first pass (MdciParams::pq_scan, docs/architecture.md §3.4).
//
// The keys, less their mean (a shift common to every key adds the same
// q.mean to every logit of a query and changes no softmax over tokens), are
// split into norm and direction. The norm is kept as fp16; the direction is
// cut into dim / 4 sub-vectors of 4 dimensions, each sub-space gets 16
// centroids by k-means on a sample of the directions, and a key is stored as
// dim / 4 four-bit codes: 16 + 2 bytes per token at dim 128, 1/14 of the
// fp16 frames. (One codebook for the raw keys spent its centroids on the
// bulk and quantised the few large-norm keys that take the mass worst:
// docs/bench/pq16_scan.md.) A query's inner product with every centroid is
// tabulated once and quantised to uint8 per sub-space (a per-query step, a
// per-sub-space offset), so a token's approximate logit is its norm x the
// sum of dim / 4 table bytes: in SIMD, 32 tokens per shuffle ("fast scan",
// the layout of FAISS's IndexPQFastScan and Andre et al., "Cache locality is
// not enough", VLDB 2015; written here from the idea, not the code).
//
// Codes are kept by slot (page x page_tokens + row) in groups of 32 slots:
// per group, dim / 8 lines of 32 bytes, line p holding sub-space 2p in its
// low 16 bytes and 2p + 1 in its high 16; byte i of a half holds the code of
// the group's slot i (low nibble) and slot i + 16 (high nibble); then the 32
// norms, in the order the scan's sums come out (NormIndex). Groups are
// kept in blocks that never move (an insert allocates at most one block).
//
// EstimatePageMass gives, per page and query, an estimate of the sum of the
// exponentiated scaled logits of the page's rows from the codes: e^max +
// (fill - 1) e^mean over its approximate logits, between the page's largest
// term and the bound fill x e^max. mdci ranks pages by the group mass it implies and
// scores the best of them exactly from the frames.
//
// The query basis (SetBasis, docs/architecture.md §3.4): up to kBasis
// orthonormal directions where the queries live, learnt from the queries
// seen (QueryBasis). With one set, a query's part in the basis is scored
// almost exactly: every slot also keeps its direction's projection on each
// basis vector (one byte each: round(127 x [-1, 1]) + 128), the tables are
// built from the query less its part in the basis, and a row's approximate
// logit is norm x (the table bytes' sum + sum_r (q . u_r) x projection_r),
// the last sum one byte dot product per row (the coefficients rounded to
// 1/63 of the largest: VNNI where the CPU has it, else maddubs). Queries
// shifted away from the keys (a mean the keys lack) put most of their
// length there, which the 4-dimension codebooks quantise worst.
//
// It is derived from the keys only: Train() fits the codebooks on the keys a
// Build places, Write() encodes the keys Build and Insert place (decode keys
// use the codebooks of then), and Rebuild() fits and encodes from the frames
// (a warm restart from an image written before the images carried the
// codes, SaveImage / LoadImage; and MdciSelector::Insert when the context
// has grown 4x past a sample smaller than kMaxTrainRows).
//
// Thread safety: EstimatePageMass() may run concurrently with itself;
// Train(), Write(), CoverPages() and Rebuild() need exclusive access (the
// selector's writer lock).
#ifndef ICECACHE_SERVER_INDEX_PQ_SKETCH_H_
#define ICECACHE_SERVER_INDEX_PQ_SKETCH_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "common/dtype.h"
#include "server/index/byte_image.h"
#include "server/index/selector.h"

namespace icecache {

class PqSketch {
 public:
  static constexpr int kSubDims = 4;     // dimensions per sub-space
  static constexpr int kCentroids = 16;  // per sub-space (4-bit codes)
  static constexpr int kGroup = 32;      // slots per code group (the scan's unit)
  static constexpr int kGroupsPerBlock = 256;
  static constexpr int64_t kMaxTrainRows = 4096;  // k-means sample
  static constexpr int kTrainIterations = 8;
  static constexpr int kMaxQueries = 64;  // per EstimatePageMass call
  static constexpr int kBasis = 4;        // query basis vectors (SetBasis)

  // The dims it can quantise: a positive multiple of 8 (an even number of
  // 4-dim sub-spaces).
  static bool Supports(int dim) { return dim >= 8 && dim % 8 == 0; }

  // dim: Supports(dim); page_tokens in [1, 256].
  PqSketch(int dim, int page_tokens);

  // Fits the mean and codebooks on `n` fp32 rows (every (n / kMaxTrainRows)th
  // when there are more; deterministic). n == 0 leaves it untrained (zero
  // codebooks: every estimate equal).
  void Train(const float* keys, int64_t n);

  // Encodes row i of `keys` (fp32, placements.size() x dim), first rounded
  // to `dtype` (the value the frame holds), into placements[i]'s slot.
  void Write(const std::vector<Placement>& placements, const float* keys, DType dtype);

  // Opens pages up to `pages` (codes 0).
  void CoverPages(uint32_t pages) { EnsureSlots(static_cast<uint64_t>(pages) * page_tokens_); }

  // Fits the codebooks on the frames' keys and encodes every page's first
  // fill(page) rows. FailedPrecondition when a page with rows has no frame.
  absl::Status Rebuild(const PageKeys& keys, DType dtype, uint32_t num_pages,
                       absl::FunctionRef<uint32_t(uint32_t)> fill);

  // Sets the query basis: `basis` kBasis x dim floats, orthonormal rows
  // (QueryBasis::Fit), and projects every covered page's first fill(page)
  // rows on it from the frames (later Writes and Rebuilds project their
  // rows as they encode them). The projections are computed aside and the
  // basis published at once, so it may run concurrently with
  // EstimatePageMass (a select installs it: MdciSelector), but not with
  // itself or the writers. InvalidArgument for a non-finite basis;
  // FailedPrecondition, the basis then as before, when a page with rows has
  // no frame. Untrained: sets nothing (there are no directions yet).
  absl::Status SetBasis(const float* basis, const PageKeys& keys, DType dtype, uint32_t num_pages,
                        absl::FunctionRef<uint32_t(uint32_t)> fill);
  bool has_basis() const { return std::atomic_load(&basis_state_) != nullptr; }
  // kBasis x dim (zeros without a basis).
  std::vector<float> basis() const;
  // The projection kept for `slot` on basis vector r (tests).
  float projection(uint64_t slot, int r) const;

  // The whole state (the mean, the codebooks, the query basis and every
  // covered slot's codes, norm and projections) into an index image, and
  // back: a warm restart then selects exactly as before it, where Rebuild
  // fits the codebooks on the frames' order and comes out near, not equal.
  // LoadImage fails (DataLoss) on a section that is not this shape's, or
  // that covers more than `max_slots` slots, leaving the sketch as it was.
  // `with_basis`: the section carries the basis (images before it did not;
  // they load without one).
  void SaveImage(ByteWriter* w) const;
  absl::Status LoadImage(ByteReader* r, uint64_t max_slots, bool with_basis);

  // mass[page * num_queries + j]: the estimated sum over the page's first
  // fill[page] rows of e^(scale x q_j.k - log_ref[j]), for pages
  // [0, num_pages) (<= pages covered); 0 for an empty page. log_ref[j] is
  // query j's largest estimated row logit (-inf when every page is empty),
  // so log(mass) + log_ref[j] estimates the page's log-sum-exp in the
  // frames' logit domain. `queries`: num_queries x dim fp32, num_queries in
  // [1, kMaxQueries]; mass: num_pages x num_queries, log_ref: num_queries. `bulk`
  // (if not null, as `mass`) gets fill x e^(mean - log_ref[j]) alone: the
  // max term's upward noise left out (the selector's normalisers).
  // `fill`: num_pages fills, indexed by page (an array, not a callback: a
  // call per page was a tenth of this pass).
  void EstimatePageMass(const float* queries, int num_queries, float scale, uint32_t num_pages,
                        const uint32_t* fill, float* mass, float* log_ref,
                        float* bulk = nullptr) const;

  // The approximate logit (unscaled, less q.mean) of slot `slot` for query
  // `q` from the float tables: its norm x (q' . (the direction's centroids)
  // + sum_r (q . u_r) x projection_r), q' = q less its part in the basis
  // (without a basis: q and no projections) (tests).
  float ApproxDot(const float* q, uint64_t slot) const;
  // The norm kept for `slot` (fp16; tests).
  float norm(uint64_t slot) const;
  // The code of sub-space `sub` at `slot` (tests).
  int code(uint64_t slot, int sub) const;
  // Centroid c of sub-space `sub` (kSubDims floats) and the keys' mean the
  // directions are taken from (tests).
  const float* centroid(int sub, int c) const {
    return centroids_.data() + (static_cast<size_t>(sub) * kCentroids + c) * kSubDims;
  }
  const std::vector<float>& mean() const { return mean_; }

  // The scan's kernel, by KernelIsa() and the CPU: kAvx2 (16-byte table
  // shuffles), kAvx512 (the same, two code lines per shuffle) or
  // kByteLookup (AVX-512 VBMI byte permutes and VNNI sums, docs/
  // architecture.md §3.4). All give the same estimates, bit for bit.
  enum class ScanKernelId { kAvx2, kAvx512, kByteLookup };
  static ScanKernelId ActiveScanKernel();
  // Its name: "avx2", "avx512" or "avx512-vbmi".
  static const char* ScanKernel();
  // Whether an AVX-512 scan may take kByteLookup where the CPU has it (the
  // default; tests and benchmarks compare the two AVX-512 kernels); returns
  // whether this CPU has it.
  static bool AllowByteLookupScan(bool allow);
  // The scan's software prefetch distance in groups (0: none; benchmarks
  // compare); returns the one before. Clamped to [0, 64].
  static constexpr int kScanPrefetchGroups = 4;
  static int SetScanPrefetch(int groups);
  static uint64_t ScanPrefetchGroups();

  bool trained() const { return trained_; }
  // The keys the codebooks were fitted on (the sample of the last Train).
  int64_t trained_rows() const { return trained_rows_; }
  uint32_t num_pages() const { return static_cast<uint32_t>(slots_ / page_tokens_); }
  size_t bytes() const;
  int subspaces() const { return subspaces_; }

 private:
  void EnsureSlots(uint64_t slots);
  // Train's k-means into mean_ and centroids_.
  void TrainCentroids(const float* keys, int64_t n);
  // centroid_lanes_ from centroids_ (after every change to them).
  void LaneCentroids();
  uint8_t* group(uint64_t g) const {
    return blocks_[g / kGroupsPerBlock].get() + (g % kGroupsPerBlock) * group_bytes_;
  }
  // Encodes rows[j] (fp32, as the frame holds it) into slots[j], j <
  // count <= 8, eight rows per nearest-centroid pass.
  void EncodeBlock(const float* const* rows, const uint64_t* slots, int count);
  // Group g's 32 uint16 sums per query (slot order) into `sums`.
  void ScanGroup(uint64_t g, const uint8_t* luts, int num_queries, uint16_t* sums) const;
  // The same when each 16-slot half of the group is 16 rows of one page
  // (page_tokens a multiple of 16, those rows filled): folded at once into
  // the pages' largest sums and sums (cells cell_lo + j and cell_hi + j).
  // The rows' logits are n x (a[j] + b[j] x sum). `kernel`: which scan
  // (the same sums).
  // `basis`, `c`: the query basis and per query its coefficients (the
  // scan's BasisCoef); null without one.
  struct BasisState;
  void ScanGroupHalves(uint64_t g, const uint8_t* luts, int num_queries, const float* a,
                       const float* b, const BasisState* basis, const void* c, size_t cell_lo,
                       size_t cell_hi, float* pmax, float* psum, ScanKernelId kernel) const;
  // The query basis and every slot's projections on it, published whole
  // (SetBasis) and read by a scan through one atomic load.
  struct BasisState {
    std::vector<float> basis;                        // kBasis x dim
    std::vector<std::unique_ptr<uint8_t[]>> blocks;  // as blocks_
    // Group g's projections: per row (in NormIndex order) kBasis bytes,
    // round(127 x projection) + 128.
    uint8_t* group(uint64_t g) const {
      return blocks[g / kGroupsPerBlock].get() + (g % kGroupsPerBlock) * kBasis * kGroup;
    }
  };
  // Projection blocks in `st` for every group block.
  void EnsureProjBlocks(BasisState* st) const;
  // Asks for group g's code and norm lines (and its projections).
  void PrefetchGroup(uint64_t g, const BasisState* basis) const;
  // The centred row over its norm into `dir`; returns the norm (0, and a
  // zero direction, for a row at the mean).
  float Direction(const float* row, float* dir) const;
  // Where slot t of a group keeps its norm: the order of the scan's sums
  // (even rows, then odd, per half).
  static int NormIndex(int t);

  int dim_;
  int page_tokens_;
  int subspaces_;       // dim / 4
  size_t code_bytes_;   // subspaces / 2 lines of 32
  size_t group_bytes_;  // the codes, then 32 fp16 norms
  uint64_t slots_ = 0;  // slots covered (whole blocks are allocated)
  bool trained_ = false;
  int64_t trained_rows_ = 0;
  std::vector<float> mean_;
  std::vector<float> centroids_;       // [subspace][centroid][4]
  std::vector<float> centroid_lanes_;  // the same as [subspace][4][centroid]
  std::vector<std::unique_ptr<uint8_t[]>> blocks_;
  std::shared_ptr<BasisState> basis_state_;  // null without a basis (std::atomic_load/store)
  std::vector<float> row_;                   // Write's scratch
  std::vector<float> dir_;                   // EncodeBlock's scratch: 8 directions
  std::vector<float> dir_t_;                 // the same, dimension-major
  std::vector<uint8_t> raw_;
};

}  // namespace icecache

#endif  // ICECACHE_SERVER_INDEX_PQ_SKETCH_H_
