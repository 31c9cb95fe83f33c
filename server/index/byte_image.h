// Byte images of index state (docs/architecture.md §5, warm restart): a
// little-endian append-only writer and a bounds-checked reader. An image is
// read from a file a crash or anyone with the daemon's uid may have changed,
// so the reader must survive any bytes: every read checks the bytes left,
// and an array's element count is checked against the bytes left (and
// against the count the caller expects) before anything is allocated. A
// failed read sets a sticky error; later reads fail too, so a loader can
// read a whole section and check ok() once.
//
// Thread safety: none (one writer or reader per image).
#ifndef ICECACHE_SERVER_INDEX_BYTE_IMAGE_H_
#define ICECACHE_SERVER_INDEX_BYTE_IMAGE_H_

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace icecache {

class ByteWriter {
 public:
  explicit ByteWriter(std::string* out) : out_(out) {}

  template <typename T>
  void Put(const T& v) {
    static_assert(std::is_trivially_copyable_v<T>);
    out_->append(reinterpret_cast<const char*>(&v), sizeof(T));
  }
  // u64 count, then the elements.
  template <typename T>
  void PutArray(const std::vector<T>& v) {
    static_assert(std::is_trivially_copyable_v<T>);
    Put<uint64_t>(v.size());
    out_->append(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
  }
  void PutBytes(const void* p, size_t n) { out_->append(static_cast<const char*>(p), n); }

 private:
  std::string* out_;
};

class ByteReader {
 public:
  explicit ByteReader(std::string_view bytes) : p_(bytes.data()), end_(p_ + bytes.size()) {}

  bool ok() const { return ok_; }
  size_t remaining() const { return static_cast<size_t>(end_ - p_); }

  template <typename T>
  bool Get(T* v) {
    static_assert(std::is_trivially_copyable_v<T>);
    if (!ok_ || remaining() < sizeof(T)) return Fail();
    std::memcpy(v, p_, sizeof(T));
    p_ += sizeof(T);
    return true;
  }
  // An array written by PutArray whose count must be exactly `expect`:
  // fails (allocating nothing) on another count or one the bytes left
  // cannot hold.
  template <typename T>
  bool GetArray(std::vector<T>* v, uint64_t expect) {
    static_assert(std::is_trivially_copyable_v<T>);
    uint64_t n = 0;
    if (!Get(&n) || n != expect || n > remaining() / sizeof(T)) return Fail();
    v->resize(n);
    if (n > 0) std::memcpy(v->data(), p_, n * sizeof(T));
    p_ += n * sizeof(T);
    return true;
  }
  // Same, for an array whose count is read from the image: at most `max`.
  template <typename T>
  bool GetArrayUpTo(std::vector<T>* v, uint64_t max) {
    static_assert(std::is_trivially_copyable_v<T>);
    const char* at = p_;
    uint64_t n = 0;
    if (!Get(&n) || n > max) return Fail();
    p_ = at;
    return GetArray(v, n);
  }
  bool GetBytes(void* out, size_t n) {
    if (!ok_ || remaining() < n) return Fail();
    std::memcpy(out, p_, n);
    p_ += n;
    return true;
  }

 private:
  bool Fail() {
    ok_ = false;
    return false;
  }
  const char* p_;
  const char* end_;
  bool ok_ = true;
};

}  // namespace icecache

#endif  // ICECACHE_SERVER_INDEX_BYTE_IMAGE_H_
