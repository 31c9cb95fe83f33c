// Reading and writing NumPy .npy files (format versions 1.0 and 2.0) of
// little-endian float16 ('<f2') or float32 ('<f4') in C order. In memory the
// data is always fp32. Used for KV dumps (common/kv_dump.h).
//
// Every malformed input is InvalidArgument with the file name and what is
// wrong (bad magic, unsupported version, unparsable header, unsupported dtype,
// Fortran order, header not 16-byte aligned, data size that does not match the
// shape, truncated data); nothing in a file can crash the reader. Files are
// read through bounded chunks, never mapped.
//
// Thread safety: the functions are reentrant; concurrent calls on different
// paths are safe. A failed write leaves no partial file at `path` (data goes
// to a temporary file that is renamed into place).
#ifndef ICECACHE_COMMON_NPY_H_
#define ICECACHE_COMMON_NPY_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/dtype.h"

namespace icecache {

// What the header of an .npy file says.
struct NpyHeader {
  DType dtype = DType::kF32;   // kF16 or kF32
  std::vector<int64_t> shape;  // empty for a scalar
  int64_t data_offset = 0;     // bytes before the data (magic + length + header)
  int64_t num_elements() const;
};

// An array read from an .npy file, converted to fp32.
struct NpyArray {
  DType dtype = DType::kF32;  // dtype in the file
  std::vector<int64_t> shape;
  std::vector<float> data;  // C order
};

// Parses the header at the start of `bytes` (which must hold at least the
// whole header; more is fine). `name` names the file in messages.
absl::StatusOr<NpyHeader> ParseNpyHeader(std::string_view bytes, const std::string& name);

// Encodes the header for `shape` and `dtype` (kF16 or kF32): version 1.0, or
// 2.0 when the header needs more than 65535 bytes; padded to 64 bytes.
// InvalidArgument for another dtype or a negative dimension.
absl::StatusOr<std::string> EncodeNpyHeader(const std::vector<int64_t>& shape, DType dtype);

// Reads a whole file. NotFound when it does not exist, PermissionDenied when
// it cannot be opened for that reason, InvalidArgument as above,
// ResourceExhausted when the array cannot be allocated.
absl::StatusOr<NpyArray> ReadNpy(const std::string& path);

// Reads only the first `keep` indices along `axis` (0 <= axis < rank,
// 0 <= keep <= shape[axis]; the other axes whole), without reading the rest;
// the returned shape has shape[axis] == keep. InvalidArgument for a bad
// axis or keep, else as ReadNpy.
absl::StatusOr<NpyArray> ReadNpyPrefix(const std::string& path, int axis, int64_t keep);

// Writes `data` (product(shape) fp32 values, C order) to `path` as `dtype`
// (kF16 or kF32; values are rounded to nearest even). InvalidArgument for
// another dtype or a negative dimension; an errno-derived code (NotFound for a
// missing directory, PermissionDenied, ResourceExhausted when the disk is full,
// ...) when the file cannot be written.
absl::Status WriteNpy(const std::string& path, const float* data, const std::vector<int64_t>& shape,
                      DType dtype);

}  // namespace icecache

#endif  // ICECACHE_COMMON_NPY_H_
