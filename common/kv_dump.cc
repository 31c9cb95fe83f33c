#include "common/kv_dump.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string_view>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/json.h"
#include "common/npy.h"
#include "common/status_macros.h"

namespace icecache {
namespace {

constexpr size_t kMaxMetaBytes = 1 << 20;

std::string Join(const std::string& dir, const char* name) { return absl::StrCat(dir, "/", name); }

std::string DumpShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("(", absl::StrJoin(shape, ", "), ")");
}

absl::Status CheckDump(const KvDump& d) {
  auto bad = [](const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat("KvDump: ", why));
  };
  if (d.layers < 1 || d.kv_heads < 1 || d.q_heads < 1 || d.head_dim < 1 || d.tokens < 0 ||
      d.steps < 0) {
    return bad(absl::StrCat("shape must be positive (layers ", d.layers, ", kv_heads ", d.kv_heads,
                            ", q_heads ", d.q_heads, ", head_dim ", d.head_dim, ") and tokens ",
                            d.tokens, ", steps ", d.steps, " non-negative"));
  }
  if (d.q_heads % d.kv_heads != 0) {
    return bad(absl::StrCat("q_heads ", d.q_heads, " is not a multiple of kv_heads ", d.kv_heads));
  }
  const size_t kv = static_cast<size_t>(d.layers) * d.kv_heads * d.tokens * d.head_dim;
  const size_t q = static_cast<size_t>(d.steps) * d.layers * d.q_heads * d.head_dim;
  if (d.keys.size() != kv || d.values.size() != kv) {
    return bad(absl::StrCat("keys/values hold ", d.keys.size(), "/", d.values.size(),
                            " floats, the shape needs ", kv));
  }
  if (d.queries.size() != q) {
    return bad(absl::StrCat("queries hold ", d.queries.size(), " floats, the shape needs ", q));
  }
  return absl::OkStatus();
}

absl::Status MakeDirs(const std::string& dir) {
  if (dir.empty()) return absl::InvalidArgumentError("KV dump directory is empty");
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  std::error_code is_dir_ec;
  if (std::filesystem::is_directory(dir, is_dir_ec)) return absl::OkStatus();
  if (std::filesystem::exists(dir, is_dir_ec)) {
    return absl::FailedPreconditionError(absl::StrCat(dir, " exists and is not a directory"));
  }
  return absl::ErrnoToStatus(ec ? ec.value() : ENOTDIR,
                             absl::StrCat("cannot create directory ", dir));
}

absl::Status WriteText(const std::string& path, const std::string& text) {
  const std::string tmp = absl::StrCat(path, ".tmp.", ::getpid());
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (f == nullptr) {
    const int err = errno;
    return absl::ErrnoToStatus(err, absl::StrCat("cannot create ", tmp));
  }
  const bool wrote = std::fwrite(text.data(), 1, text.size(), f) == text.size();
  const bool closed = std::fclose(f) == 0;
  if (!wrote || !closed || std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    std::remove(tmp.c_str());
    return absl::ErrnoToStatus(err, absl::StrCat("cannot write ", path));
  }
  return absl::OkStatus();
}

// Lenient reader of meta.json: takes "model" (a string) and "rope_theta" (a
// finite number >= 0); anything else, including malformed JSON, is ignored,
// because the metadata is optional.
void ParseMeta(std::string_view text, KvDump* dump) {
  absl::StatusOr<Json> meta = ParseJson(text);
  if (!meta.ok() || !meta->is_object()) return;
  const auto model = meta->find("model");
  if (model != meta->end() && model->is_string()) dump->model = model->get<std::string>();
  const auto theta = meta->find("rope_theta");
  if (theta != meta->end() && theta->is_number()) {
    const double v = theta->get<double>();
    if (std::isfinite(v) && v >= 0) dump->rope_theta = v;
  }
}

absl::StatusOr<NpyArray> ReadPart(const std::string& dir, const char* name, int token_axis,
                                  int64_t max_tokens) {
  const std::string path = Join(dir, name);
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV dump ", dir, " has no ", name, " (", std::strerror(errno),
                     "); a dump needs keys.npy, values.npy and queries.npy"));
  }
  if (token_axis >= 0 && max_tokens > 0) {
    // Peek at the header to learn the token count, then read only the prefix.
    ASSIGN_OR_RETURN(NpyArray head, ReadNpyPrefix(path, 0, 0));
    if (head.shape.size() != 4) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": expected 4 dimensions [layers, kv_heads, tokens, head_dim], got shape ",
          DumpShapeString(head.shape)));
    }
    if (max_tokens < head.shape[token_axis]) return ReadNpyPrefix(path, token_axis, max_tokens);
  }
  return ReadNpy(path);
}

}  // namespace

absl::Status WriteKvDump(const KvDump& dump, const std::string& dir, DType dtype) {
  if (dtype != DType::kF16 && dtype != DType::kF32) {
    return absl::InvalidArgumentError(absl::StrCat(
        "KV dumps are written as float16 or float32, not ", std::string(DTypeName(dtype))));
  }
  RETURN_IF_ERROR(CheckDump(dump));
  RETURN_IF_ERROR(MakeDirs(dir));
  const std::vector<int64_t> kv_shape = {dump.layers, dump.kv_heads, dump.tokens, dump.head_dim};
  const std::vector<int64_t> q_shape = {dump.steps, dump.layers, dump.q_heads, dump.head_dim};
  RETURN_IF_ERROR(WriteNpy(Join(dir, "keys.npy"), dump.keys.data(), kv_shape, dtype));
  RETURN_IF_ERROR(WriteNpy(Join(dir, "values.npy"), dump.values.data(), kv_shape, dtype));
  RETURN_IF_ERROR(WriteNpy(Join(dir, "queries.npy"), dump.queries.data(), q_shape, dtype));
  const Json meta = {{"model", dump.model},
                     {"rope_theta", dump.rope_theta},
                     {"layers", dump.layers},
                     {"kv_heads", dump.kv_heads},
                     {"q_heads", dump.q_heads},
                     {"tokens", dump.tokens},
                     {"head_dim", dump.head_dim},
                     {"steps", dump.steps},
                     {"dtype", std::string(DTypeName(dtype))}};
  return WriteText(Join(dir, "meta.json"), DumpJson(meta, 2) + "\n");
}

absl::StatusOr<KvDump> ReadKvDump(const std::string& dir, int64_t max_tokens) {
  struct stat st;
  if (::stat(dir.c_str(), &st) != 0) {
    const int err = errno;
    if (err == ENOENT)
      return absl::NotFoundError(absl::StrCat("KV dump directory ", dir, " does not exist"));
    return absl::ErrnoToStatus(err, absl::StrCat("cannot stat KV dump directory ", dir));
  }
  if (!S_ISDIR(st.st_mode))
    return absl::InvalidArgumentError(absl::StrCat(dir, " is not a directory"));

  ASSIGN_OR_RETURN(NpyArray keys, ReadPart(dir, "keys.npy", 2, max_tokens));
  ASSIGN_OR_RETURN(NpyArray values, ReadPart(dir, "values.npy", 2, max_tokens));
  ASSIGN_OR_RETURN(NpyArray queries, ReadPart(dir, "queries.npy", -1, -1));
  const std::string kp = Join(dir, "keys.npy"), vp = Join(dir, "values.npy"),
                    qp = Join(dir, "queries.npy");
  if (keys.shape.size() != 4) {
    return absl::InvalidArgumentError(
        absl::StrCat(kp, ": expected [layers, kv_heads, tokens, head_dim], got shape ",
                     DumpShapeString(keys.shape)));
  }
  if (values.shape != keys.shape) {
    return absl::InvalidArgumentError(
        absl::StrCat(vp, " has shape ", DumpShapeString(values.shape), " but ", kp, " has ",
                     DumpShapeString(keys.shape), "; they must match"));
  }
  if (queries.shape.size() != 4) {
    return absl::InvalidArgumentError(
        absl::StrCat(qp, ": expected [steps, layers, q_heads, head_dim], got shape ",
                     DumpShapeString(queries.shape)));
  }
  const int64_t layers = keys.shape[0], kv_heads = keys.shape[1], tokens = keys.shape[2],
                head_dim = keys.shape[3];
  const int64_t steps = queries.shape[0], q_heads = queries.shape[2];
  if (layers < 1 || kv_heads < 1 || head_dim < 1 || layers > (1 << 20) || kv_heads > (1 << 20) ||
      head_dim > (1 << 20)) {
    return absl::InvalidArgumentError(
        absl::StrCat(kp, ": layers, kv_heads and head_dim must be in [1, 2^20], got shape ",
                     DumpShapeString(keys.shape)));
  }
  if (queries.shape[1] != layers) {
    return absl::InvalidArgumentError(absl::StrCat(qp, " has ", queries.shape[1], " layers (shape ",
                                                   DumpShapeString(queries.shape), ") but ", kp,
                                                   " has ", layers));
  }
  if (queries.shape[3] != head_dim) {
    return absl::InvalidArgumentError(
        absl::StrCat(qp, " has head_dim ", queries.shape[3], " but ", kp, " has ", head_dim));
  }
  if (q_heads < kv_heads || q_heads % kv_heads != 0 || q_heads > (1 << 20) ||
      steps > (int64_t{1} << 30)) {
    return absl::InvalidArgumentError(absl::StrCat(qp, " has ", q_heads,
                                                   " query heads, not a positive multiple of the ",
                                                   kv_heads, " KV heads of ", kp));
  }

  KvDump dump;
  dump.layers = static_cast<int>(layers);
  dump.kv_heads = static_cast<int>(kv_heads);
  dump.q_heads = static_cast<int>(q_heads);
  dump.tokens = tokens;
  dump.head_dim = static_cast<int>(head_dim);
  dump.steps = static_cast<int>(steps);
  dump.keys = std::move(keys.data);
  dump.values = std::move(values.data);
  dump.queries = std::move(queries.data);

  const std::string mp = Join(dir, "meta.json");
  if (std::FILE* f = std::fopen(mp.c_str(), "rb")) {
    std::string text(kMaxMetaBytes, '\0');
    text.resize(std::fread(text.data(), 1, text.size(), f));
    std::fclose(f);
    ParseMeta(text, &dump);
  }
  return dump;
}

}  // namespace icecache
