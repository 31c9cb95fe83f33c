#include "common/npy.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstring>
#include <limits>
#include <new>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"

namespace icecache {
namespace {

constexpr char kMagic[] = "\x93NUMPY";
constexpr size_t kMagicLen = 6;
// Arrays above this many elements are refused before any allocation (2^40:
// 4 TiB of fp32); products are checked against it as they are formed.
constexpr int64_t kMaxElements = int64_t{1} << 40;
constexpr size_t kChunkElements = size_t{1} << 20;

absl::Status Bad(const std::string& name, std::string_view what) {
  return absl::InvalidArgumentError(
      absl::StrCat(name, ": not a valid .npy file: ", std::string(what)));
}

// Owns a file descriptor.
class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  int get() const { return fd_; }
  // Closes now; returns the close() error, if any.
  int Close() {
    int rc = 0;
    if (fd_ >= 0) rc = ::close(fd_);
    fd_ = -1;
    return rc;
  }

 private:
  int fd_;
};

absl::Status ErrnoStatus(int err, const std::string& what) {
  return absl::ErrnoToStatus(err, what);
}

// Reads up to `n` bytes at `offset`; returns how many were read (less only at
// end of file).
absl::StatusOr<size_t> PreadFull(int fd, void* buf, size_t n, int64_t offset,
                                 const std::string& name) {
  size_t done = 0;
  while (done < n) {
    const ssize_t r =
        ::pread(fd, static_cast<char*>(buf) + done, n - done, static_cast<off_t>(offset + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus(errno, absl::StrCat("reading ", name));
    }
    if (r == 0) break;
    done += static_cast<size_t>(r);
  }
  return done;
}

absl::Status WriteFull(int fd, const void* buf, size_t n, const std::string& name) {
  size_t done = 0;
  while (done < n) {
    const ssize_t w = ::write(fd, static_cast<const char*>(buf) + done, n - done);
    if (w < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus(errno, absl::StrCat("writing ", name));
    }
    done += static_cast<size_t>(w);
  }
  return absl::OkStatus();
}

// A tiny parser for the Python dict literal of an .npy header, e.g.
//   {'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }
class HeaderParser {
 public:
  HeaderParser(std::string_view text, const std::string& name) : s_(text), name_(name) {}

  absl::StatusOr<NpyHeader> Parse() {
    NpyHeader h;
    bool have_descr = false, have_order = false, have_shape = false;
    SkipSpace();
    if (!Consume('{')) return Error("header does not start with '{'");
    for (;;) {
      SkipSpace();
      if (Consume('}')) break;
      ASSIGN_OR_RETURN(std::string key, String());
      SkipSpace();
      if (!Consume(':')) return Error(absl::StrCat("expected ':' after key '", key, "'"));
      SkipSpace();
      if (key == "descr") {
        if (have_descr) return Error("duplicate key 'descr'");
        have_descr = true;
        ASSIGN_OR_RETURN(std::string descr, String());
        if (descr == "<f4") {
          h.dtype = DType::kF32;
        } else if (descr == "<f2") {
          h.dtype = DType::kF16;
        } else {
          return absl::InvalidArgumentError(
              absl::StrCat(name_, ": unsupported dtype '", descr,
                           "'; supported: '<f2' (float16), '<f4' (float32)"));
        }
      } else if (key == "fortran_order") {
        if (have_order) return Error("duplicate key 'fortran_order'");
        have_order = true;
        if (Word("False")) {
        } else if (Word("True")) {
          return absl::InvalidArgumentError(
              absl::StrCat(name_, ": Fortran-order arrays are not supported; save it in C order"));
        } else {
          return Error("'fortran_order' must be True or False");
        }
      } else if (key == "shape") {
        if (have_shape) return Error("duplicate key 'shape'");
        have_shape = true;
        ASSIGN_OR_RETURN(h.shape, Shape());
      } else {
        return Error(absl::StrCat("unexpected key '", key, "'"));
      }
      SkipSpace();
      if (Consume(',')) continue;
      SkipSpace();
      if (Consume('}')) break;
      return Error("expected ',' or '}' in the header dict");
    }
    SkipSpace();
    if (pos_ != s_.size()) return Error("trailing characters after the header dict");
    if (!have_descr || !have_order || !have_shape) {
      return Error("header must have the keys 'descr', 'fortran_order' and 'shape'");
    }
    return h;
  }

 private:
  absl::Status Error(std::string_view what) {
    return Bad(name_, absl::StrCat("unparsable header (", std::string(what), ") in \"",
                                   std::string(s_), "\""));
  }
  void SkipSpace() {
    while (pos_ < s_.size() &&
           (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r'))
      ++pos_;
  }
  bool Consume(char c) {
    if (pos_ < s_.size() && s_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }
  bool Word(std::string_view w) {
    if (s_.substr(pos_, w.size()) == w) {
      pos_ += w.size();
      return true;
    }
    return false;
  }
  absl::StatusOr<std::string> String() {
    if (pos_ >= s_.size() || (s_[pos_] != '\'' && s_[pos_] != '"'))
      return Error("expected a quoted string");
    const char q = s_[pos_++];
    const size_t end = s_.find(q, pos_);
    if (end == std::string_view::npos) return Error("unterminated string");
    std::string out(s_.substr(pos_, end - pos_));
    pos_ = end + 1;
    return out;
  }
  absl::StatusOr<std::vector<int64_t>> Shape() {
    std::vector<int64_t> shape;
    if (!Consume('(')) return Error("'shape' must be a tuple");
    int64_t total = 1;
    for (;;) {
      SkipSpace();
      if (Consume(')')) break;
      if (pos_ >= s_.size() || !std::isdigit(static_cast<unsigned char>(s_[pos_]))) {
        return Error("'shape' must hold non-negative integers");
      }
      int64_t v = 0;
      while (pos_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[pos_]))) {
        if (v > kMaxElements) return Error("a dimension is too large");
        v = v * 10 + (s_[pos_++] - '0');
      }
      if (v > kMaxElements) return Error("a dimension is too large");
      if (v > 0 && total > kMaxElements / v) {
        return Bad(name_, absl::StrCat("shape has more than 2^40 elements"));
      }
      total *= v;
      shape.push_back(v);
      SkipSpace();
      if (Consume(',')) continue;
      SkipSpace();
      if (Consume(')')) break;
      return Error("expected ',' or ')' in 'shape'");
    }
    return shape;
  }

  std::string_view s_;
  const std::string& name_;
  size_t pos_ = 0;
};

int64_t Product(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string NpyShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("(", absl::StrJoin(shape, ", "), shape.size() == 1 ? ",)" : ")");
}

struct OpenedNpy {
  NpyHeader header;
  int64_t file_size = 0;
};

absl::StatusOr<OpenedNpy> OpenAndCheck(int fd, const std::string& name) {
  struct stat st;
  if (::fstat(fd, &st) != 0) return ErrnoStatus(errno, absl::StrCat("stat ", name));
  if (!S_ISREG(st.st_mode))
    return absl::InvalidArgumentError(absl::StrCat(name, ": not a regular file"));
  OpenedNpy o;
  o.file_size = st.st_size;
  // Magic, version and length first; then exactly the header.
  char pre[12];
  ASSIGN_OR_RETURN(size_t got, PreadFull(fd, pre, sizeof(pre), 0, name));
  if (got < 10)
    return Bad(name, absl::StrCat("file is only ", got, " bytes, too short for an .npy header"));
  if (std::memcmp(pre, kMagic, kMagicLen) != 0) return Bad(name, "bad magic (expected \\x93NUMPY)");
  const int major = static_cast<unsigned char>(pre[6]);
  const size_t len_bytes = major == 1 ? 2 : 4;
  const size_t fixed = kMagicLen + 2 + len_bytes;
  if (got < fixed && (major == 2)) return Bad(name, "file ends inside the header length");
  std::string head(pre, got);
  uint64_t header_len = 0;
  if (major == 1 || major == 2) {
    for (size_t i = 0; i < len_bytes; ++i)
      header_len |= static_cast<uint64_t>(static_cast<unsigned char>(pre[8 + i])) << (8 * i);
    if (header_len > (uint64_t{1} << 24))
      return Bad(name, absl::StrCat("header length ", header_len, " is implausibly large"));
    if (static_cast<int64_t>(fixed + header_len) > o.file_size) {
      return Bad(
          name,
          absl::StrCat("truncated header: the header claims ", header_len, " bytes, the file has ",
                       o.file_size - static_cast<int64_t>(fixed), " after the length field"));
    }
    head.resize(fixed + header_len);
    ASSIGN_OR_RETURN(size_t got2, PreadFull(fd, head.data(), head.size(), 0, name));
    if (got2 != head.size()) return Bad(name, "file shrank while reading the header");
  }
  ASSIGN_OR_RETURN(o.header, ParseNpyHeader(head, name));
  return o;
}

// Reads `count` elements of `dtype` starting at byte `offset` into `out` as fp32.
absl::Status ReadConvert(int fd, int64_t offset, DType dtype, size_t count, float* out,
                         const std::string& name) {
  const size_t esize = DTypeSize(dtype);
  if (dtype == DType::kF32) {
    ASSIGN_OR_RETURN(size_t got, PreadFull(fd, out, count * esize, offset, name));
    if (got != count * esize) return Bad(name, "truncated data (file shrank while reading)");
    return absl::OkStatus();
  }
  std::vector<uint16_t> buf(std::min(count, kChunkElements));
  size_t done = 0;
  while (done < count) {
    const size_t n = std::min(count - done, buf.size());
    ASSIGN_OR_RETURN(size_t got, PreadFull(fd, buf.data(), n * esize,
                                           offset + static_cast<int64_t>(done * esize), name));
    if (got != n * esize) return Bad(name, "truncated data (file shrank while reading)");
    ToFloat(dtype, buf.data(), out + done, n);
    done += n;
  }
  return absl::OkStatus();
}

absl::StatusOr<NpyArray> ReadImpl(const std::string& path, int axis, int64_t keep) {
  const int raw = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (raw < 0) return ErrnoStatus(errno, absl::StrCat("cannot open ", path));
  Fd fd(raw);
  ASSIGN_OR_RETURN(OpenedNpy o, OpenAndCheck(fd.get(), path));
  const NpyHeader& h = o.header;
  const int64_t n = h.num_elements();
  const int64_t esize = static_cast<int64_t>(DTypeSize(h.dtype));
  const int64_t data_bytes = o.file_size - h.data_offset;
  if (data_bytes < n * esize) {
    return Bad(path, absl::StrCat("truncated data: shape ", NpyShapeString(h.shape), " of ",
                                  std::string(DTypeName(h.dtype)), " needs ", n * esize,
                                  " bytes, the file holds ", data_bytes));
  }
  if (data_bytes > n * esize) {
    return Bad(path, absl::StrCat("size mismatch: shape ", NpyShapeString(h.shape), " of ",
                                  std::string(DTypeName(h.dtype)), " needs ", n * esize,
                                  " bytes, the file holds ", data_bytes, " (trailing bytes)"));
  }
  NpyArray a;
  a.dtype = h.dtype;
  a.shape = h.shape;
  int64_t outer = 1, inner = 1, along = 1;
  if (axis >= 0) {
    if (axis >= static_cast<int>(h.shape.size())) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": axis ", axis, " out of range for shape ", NpyShapeString(h.shape)));
    }
    if (keep < 0 || keep > h.shape[axis]) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": cannot keep ", keep, " of ",
                                                     h.shape[axis], " entries along axis ", axis));
    }
    for (int i = 0; i < axis; ++i) outer *= h.shape[i];
    for (size_t i = axis + 1; i < h.shape.size(); ++i) inner *= h.shape[i];
    along = h.shape[axis];
    a.shape[axis] = keep;
  } else {
    inner = n;
    keep = 1;
  }
  try {
    a.data.resize(static_cast<size_t>(outer * keep * inner));
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(
        absl::StrCat(path, ": cannot allocate ", outer * keep * inner, " floats"));
  }
  for (int64_t o_idx = 0; o_idx < outer; ++o_idx) {
    const int64_t src = h.data_offset + o_idx * along * inner * esize;
    RETURN_IF_ERROR(ReadConvert(fd.get(), src, h.dtype, static_cast<size_t>(keep * inner),
                                a.data.data() + o_idx * keep * inner, path));
  }
  return a;
}

}  // namespace

int64_t NpyHeader::num_elements() const { return Product(shape); }

absl::StatusOr<NpyHeader> ParseNpyHeader(std::string_view bytes, const std::string& name) {
  if (bytes.size() < kMagicLen ||
      bytes.substr(0, kMagicLen) != std::string_view(kMagic, kMagicLen)) {
    return Bad(name, "bad magic (expected \\x93NUMPY)");
  }
  if (bytes.size() < kMagicLen + 2) return Bad(name, "file ends inside the version");
  const int major = static_cast<unsigned char>(bytes[6]);
  const int minor = static_cast<unsigned char>(bytes[7]);
  if ((major != 1 && major != 2) || minor != 0) {
    return Bad(name, absl::StrCat("unsupported format version ", major, ".", minor,
                                  " (supported: 1.0, 2.0)"));
  }
  const size_t len_bytes = major == 1 ? 2 : 4;
  if (bytes.size() < kMagicLen + 2 + len_bytes)
    return Bad(name, "file ends inside the header length");
  uint64_t header_len = 0;
  for (size_t i = 0; i < len_bytes; ++i) {
    header_len |= static_cast<uint64_t>(static_cast<unsigned char>(bytes[8 + i])) << (8 * i);
  }
  const uint64_t total = kMagicLen + 2 + len_bytes + header_len;
  if (total > bytes.size()) {
    return Bad(name,
               absl::StrCat("truncated header: needs ", total, " bytes, have ", bytes.size()));
  }
  if (total % 16 != 0) {
    return Bad(name, absl::StrCat("misaligned header: data would start at byte ", total,
                                  ", not a multiple of 16"));
  }
  std::string_view text = bytes.substr(kMagicLen + 2 + len_bytes, header_len);
  if (text.empty() || text.back() != '\n')
    return Bad(name, "unparsable header (does not end with a newline)");
  for (char ch : text) {
    if (static_cast<unsigned char>(ch) >= 0x80 ||
        (ch < 0x20 && ch != '\n' && ch != '\t' && ch != '\r')) {
      return Bad(name, "unparsable header (non-ASCII or control bytes)");
    }
  }
  HeaderParser parser(text, name);
  ASSIGN_OR_RETURN(NpyHeader h, parser.Parse());
  h.data_offset = static_cast<int64_t>(total);
  return h;
}

absl::StatusOr<std::string> EncodeNpyHeader(const std::vector<int64_t>& shape, DType dtype) {
  if (dtype != DType::kF16 && dtype != DType::kF32) {
    return absl::InvalidArgumentError(absl::StrCat(".npy output supports float16 and float32, not ",
                                                   std::string(DTypeName(dtype))));
  }
  for (int64_t d : shape) {
    if (d < 0)
      return absl::InvalidArgumentError(
          absl::StrCat("negative dimension in shape ", NpyShapeString(shape)));
  }
  std::string dict =
      absl::StrCat("{'descr': '", dtype == DType::kF16 ? "<f2" : "<f4",
                   "', 'fortran_order': False, 'shape': ", NpyShapeString(shape), ", }");
  for (int major : {1, 2}) {
    const size_t len_bytes = major == 1 ? 2 : 4;
    const size_t fixed = kMagicLen + 2 + len_bytes;
    size_t total = fixed + dict.size() + 1;  // + '\n'
    total = (total + 63) / 64 * 64;
    const size_t header_len = total - fixed;
    if (major == 1 && header_len > 0xffff) continue;
    std::string out(kMagic, kMagicLen);
    out.push_back(static_cast<char>(major));
    out.push_back(0);
    for (size_t i = 0; i < len_bytes; ++i)
      out.push_back(static_cast<char>((header_len >> (8 * i)) & 0xff));
    out += dict;
    out.append(header_len - dict.size() - 1, ' ');
    out.push_back('\n');
    return out;
  }
  return absl::InvalidArgumentError("shape too long for an .npy header");
}

absl::StatusOr<NpyArray> ReadNpy(const std::string& path) { return ReadImpl(path, -1, 0); }

absl::StatusOr<NpyArray> ReadNpyPrefix(const std::string& path, int axis, int64_t keep) {
  if (axis < 0) return absl::InvalidArgumentError(absl::StrCat(path, ": negative axis ", axis));
  return ReadImpl(path, axis, keep);
}

absl::Status WriteNpy(const std::string& path, const float* data, const std::vector<int64_t>& shape,
                      DType dtype) {
  ASSIGN_OR_RETURN(std::string header, EncodeNpyHeader(shape, dtype));
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d > 0 && n > kMaxElements / d)
      return absl::InvalidArgumentError("shape has more than 2^40 elements");
    n *= d;
  }
  if (n > 0 && data == nullptr)
    return absl::InvalidArgumentError("WriteNpy: null data for a non-empty shape");
  const std::string tmp = absl::StrCat(path, ".tmp.", ::getpid());
  const int raw = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (raw < 0) return ErrnoStatus(errno, absl::StrCat("cannot create ", tmp));
  Fd fd(raw);
  auto fail = [&](absl::Status s) {
    fd.Close();
    ::unlink(tmp.c_str());
    return s;
  };
  absl::Status s = WriteFull(fd.get(), header.data(), header.size(), tmp);
  if (!s.ok()) return fail(s);
  if (dtype == DType::kF32) {
    for (int64_t done = 0; done < n && s.ok();) {
      const int64_t m = std::min<int64_t>(n - done, static_cast<int64_t>(kChunkElements));
      s = WriteFull(fd.get(), data + done, static_cast<size_t>(m) * sizeof(float), tmp);
      done += m;
    }
  } else {
    std::vector<uint16_t> buf(
        static_cast<size_t>(std::min<int64_t>(n, static_cast<int64_t>(kChunkElements))));
    for (int64_t done = 0; done < n && s.ok();) {
      const int64_t m = std::min<int64_t>(n - done, static_cast<int64_t>(buf.size()));
      FloatToHalf(data + done, buf.data(), static_cast<size_t>(m));
      s = WriteFull(fd.get(), buf.data(), static_cast<size_t>(m) * sizeof(uint16_t), tmp);
      done += m;
    }
  }
  if (!s.ok()) return fail(s);
  if (fd.Close() != 0) return fail(ErrnoStatus(errno, absl::StrCat("closing ", tmp)));
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    return ErrnoStatus(err, absl::StrCat("cannot rename ", tmp, " to ", path));
  }
  return absl::OkStatus();
}

}  // namespace icecache
