#include "server/session/snapshot.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/file_util.h"
#include "common/json.h"
#include "common/status_macros.h"
#include "server/pool/frame_checksum.h"
#include "server/session/snapshot_quality.h"

namespace icecache {
namespace {

constexpr char kMagic[8] = {'I', 'C', 'E', 'C', 'S', 'N', 'A', 'P'};
// SessionConfig.granularity unset: the unit follows each call's destination.
constexpr char kByDestination[] = "by-destination";

// Field readers that never throw: a missing or mistyped field is `def`.
int64_t Int(const Json& o, const char* k, int64_t def) {
  auto it = o.find(k);
  if (it == o.end() || !it->is_number_integer()) return def;
  return it->get<int64_t>();
}
uint64_t U64(const Json& o, const char* k) {
  auto it = o.find(k);
  if (it == o.end() || !it->is_number_unsigned()) return 0;
  return it->get<uint64_t>();
}
double Num(const Json& o, const char* k, double def) {
  auto it = o.find(k);
  if (it == o.end() || !it->is_number()) return def;
  return it->get<double>();
}
std::string Str(const Json& o, const char* k) {
  auto it = o.find(k);
  if (it == o.end() || !it->is_string()) return "";
  return it->get<std::string>();
}
bool Bool(const Json& o, const char* k, bool def) {
  auto it = o.find(k);
  if (it == o.end() || !it->is_boolean()) return def;
  return it->get<bool>();
}
std::vector<uint64_t> U64s(const Json& o, const char* k) {
  std::vector<uint64_t> out;
  auto it = o.find(k);
  if (it == o.end() || !it->is_array()) return out;
  for (const Json& v : *it) out.push_back(v.is_number_unsigned() ? v.get<uint64_t>() : 0);
  return out;
}
std::vector<int64_t> Ints(const Json& o, const char* k) {
  std::vector<int64_t> out;
  auto it = o.find(k);
  if (it == o.end() || !it->is_array()) return out;
  for (const Json& v : *it) out.push_back(v.is_number_integer() ? v.get<int64_t>() : -1);
  return out;
}

Json ConfigToJson(const SessionConfig& c) {
  const MdciParams& m = c.mdci;
  return Json{
      {"layers", c.layers},
      {"kv_heads", c.kv_heads},
      {"q_heads", c.q_heads},
      {"head_dim", c.head_dim},
      {"dtype", std::string(DTypeName(c.dtype))},
      {"page_tokens", c.page_tokens},
      {"layer_reuse", c.layer_reuse},
      {"ttl_ms", absl::ToInt64Milliseconds(c.ttl)},
      {"selector", std::string(SelectorKindName(c.selector))},
      {"mdci",
       {{"num_composite", m.num_composite},
        {"num_simple", m.num_simple},
        {"field_of_view", m.field_of_view},
        {"candidate_factor", m.candidate_factor},
        {"norm_headroom", m.norm_headroom},
        {"rebuild_fraction", m.rebuild_fraction},
        {"seed", m.seed},
        {"promotion_ratio", m.promotion_ratio},
        {"route_fov", m.route_fov},
        {"insert_route_fov", m.insert_route_fov},
        {"insert_fit", m.insert_fit},
        {"build_candidates", m.build_candidates},
        {"refine_iters", m.refine_iters},
        {"cover_factor", m.cover_factor},
        {"entry_nodes", m.entry_nodes},
        {"spread_weight", m.spread_weight},
        {"spread_rank", m.spread_rank},
        {"locality_window", m.locality_window},
        {"sketch_scoring", m.sketch_scoring},
        {"pq_factor", m.pq_factor},
        {"query_basis", m.query_basis},
        {"carry_keep_factor", m.carry_keep_factor}}},
      {"budget_tokens", c.default_select.budget_tokens},
      {"sink_tokens", c.default_select.sink_tokens},
      {"recent_tokens", c.default_select.recent_tokens},
      {"want_positions", c.default_select.want_positions},
      {"granularity", c.granularity.has_value() ? std::string(GranularityName(*c.granularity))
                                                : std::string(kByDestination)},
      {"pinned", c.pinned},
      {"checksum_mode", static_cast<int>(c.checksums.mode)},
      {"checksum_sample_fraction", c.checksums.sample_fraction}};
}

absl::StatusOr<SessionConfig> ConfigFromJson(const Json& j) {
  SessionConfig c;
  c.layers = static_cast<int>(Int(j, "layers", 0));
  c.kv_heads = static_cast<int>(Int(j, "kv_heads", 0));
  c.q_heads = static_cast<int>(Int(j, "q_heads", 0));
  c.head_dim = static_cast<int>(Int(j, "head_dim", 0));
  ASSIGN_OR_RETURN(c.dtype, ParseDType(Str(j, "dtype")));
  c.page_tokens = static_cast<int>(Int(j, "page_tokens", 0));
  c.layer_reuse = static_cast<int>(Int(j, "layer_reuse", 0));
  c.ttl = absl::Milliseconds(Int(j, "ttl_ms", 0));
  ASSIGN_OR_RETURN(c.selector, ParseSelectorKind(Str(j, "selector")));
  const Json empty = Json::object();
  auto mit = j.find("mdci");
  const Json& md = mit != j.end() && mit->is_object() ? *mit : empty;
  MdciParams& m = c.mdci;
  m.num_composite = static_cast<int>(Int(md, "num_composite", m.num_composite));
  m.num_simple = static_cast<int>(Int(md, "num_simple", m.num_simple));
  m.field_of_view = static_cast<int>(Int(md, "field_of_view", m.field_of_view));
  m.candidate_factor = static_cast<float>(Num(md, "candidate_factor", m.candidate_factor));
  m.norm_headroom = static_cast<float>(Num(md, "norm_headroom", m.norm_headroom));
  m.rebuild_fraction = static_cast<float>(Num(md, "rebuild_fraction", m.rebuild_fraction));
  if (md.contains("seed")) m.seed = U64(md, "seed");
  m.promotion_ratio = static_cast<int>(Int(md, "promotion_ratio", m.promotion_ratio));
  m.route_fov = static_cast<int>(Int(md, "route_fov", m.route_fov));
  m.insert_route_fov = static_cast<int>(Int(md, "insert_route_fov", m.insert_route_fov));
  // A snapshot from before insert_fit routed every decode key: it keeps
  // doing so, so that its appends replay to the same placements.
  m.insert_fit = static_cast<float>(Num(md, "insert_fit", 0.0));
  m.build_candidates = static_cast<int>(Int(md, "build_candidates", m.build_candidates));
  m.refine_iters = static_cast<int>(Int(md, "refine_iters", m.refine_iters));
  m.cover_factor = static_cast<float>(Num(md, "cover_factor", m.cover_factor));
  m.entry_nodes = static_cast<int>(Int(md, "entry_nodes", m.entry_nodes));
  m.spread_weight = static_cast<float>(Num(md, "spread_weight", m.spread_weight));
  m.spread_rank = static_cast<int>(Int(md, "spread_rank", m.spread_rank));
  m.locality_window = static_cast<int>(Int(md, "locality_window", m.locality_window));
  m.sketch_scoring = Bool(md, "sketch_scoring", m.sketch_scoring);
  m.pq_factor = static_cast<float>(Num(md, "pq_factor", m.pq_factor));
  m.query_basis = Bool(md, "query_basis", m.query_basis);
  m.carry_keep_factor = static_cast<float>(Num(md, "carry_keep_factor", m.carry_keep_factor));
  c.default_select.budget_tokens = static_cast<int>(Int(j, "budget_tokens", 256));
  c.default_select.sink_tokens = static_cast<int>(Int(j, "sink_tokens", 4));
  c.default_select.recent_tokens = static_cast<int>(Int(j, "recent_tokens", 0));
  c.default_select.want_positions = Bool(j, "want_positions", false);
  // Absent: written by a daemon that selected whole pages when no
  // granularity was set, so the session goes on in pages.
  const std::string granularity = j.contains("granularity") ? Str(j, "granularity") : "page";
  if (granularity != kByDestination) {
    ASSIGN_OR_RETURN(c.granularity, ParseGranularity(granularity));
  }
  c.pinned = Bool(j, "pinned", false);
  const int64_t mode = Int(j, "checksum_mode", 0);
  if (mode < 0 || mode > 2) return absl::InvalidArgumentError("snapshot: bad checksum_mode");
  c.checksums.mode = static_cast<ChecksumMode>(mode);
  c.checksums.sample_fraction = Num(j, "checksum_sample_fraction", 0.0625);
  return c;
}

template <typename T>
void Put(std::string* out, const T& v) {
  out->append(reinterpret_cast<const char*>(&v), sizeof(T));
}
template <typename T>
void PutArray(std::string* out, const std::vector<T>& v) {
  Put<uint64_t>(out, v.size());
  out->append(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

// Bounds-checked reads of the blob.
class Cursor {
 public:
  Cursor(const char* data, size_t size) : p_(data), end_(data + size) {}
  template <typename T>
  bool Get(T* v) {
    if (static_cast<size_t>(end_ - p_) < sizeof(T)) return false;
    std::memcpy(v, p_, sizeof(T));
    p_ += sizeof(T);
    return true;
  }
  template <typename T>
  bool GetArray(std::vector<T>* v) {
    uint64_t n = 0;
    if (!Get(&n) || n > static_cast<uint64_t>(end_ - p_) / sizeof(T)) return false;
    v->resize(n);
    // An empty vector's data() may be null, and memcpy's pointers must not
    // be, even for 0 bytes (UBSan).
    if (n > 0) std::memcpy(v->data(), p_, n * sizeof(T));
    p_ += n * sizeof(T);
    return true;
  }
  bool Skip(uint64_t n) {
    if (n > static_cast<uint64_t>(end_ - p_)) return false;
    p_ += n;
    return true;
  }

 private:
  const char* p_;
  const char* end_;
};

Json SessionToJson(const SessionImage& s, std::string* blob) {
  Json j{{"id", s.id},
         {"tenant", s.tenant},
         {"epoch", s.epoch},
         {"created_unix_ns", absl::ToUnixNanos(s.created)},
         {"tokens", s.tokens},
         {"next_layer", s.next_layer},
         {"pending_tokens", s.pending_tokens},
         {"chunks", s.chunks},
         {"group_tokens", s.group_tokens},
         {"config", ConfigToJson(s.config)},
         {"blob_offset", blob->size()}};
  if (!s.index_images.empty()) {
    std::vector<uint64_t> offsets, bytes, hashes;
    for (const IndexImageRef& r : s.index_images) {
      offsets.push_back(r.offset);
      bytes.push_back(r.bytes);
      hashes.push_back(r.hash);
    }
    j["image_offsets"] = offsets;
    j["image_bytes"] = bytes;
    j["image_hashes"] = hashes;
  }
  if (s.quality.has_value()) j["quality"] = QualityStateToJson(*s.quality);
  for (size_t t = 0; t < s.frame_offsets.size(); ++t) {
    PutArray(blob, s.frame_offsets[t]);
    PutArray(blob, s.checksums[t]);
  }
  for (const auto& v : s.slots) PutArray(blob, v);
  return j;
}

absl::StatusOr<SessionImage> SessionFromJson(const Json& j, const std::string& blob) {
  SessionImage s;
  s.id = Str(j, "id");
  s.tenant = Str(j, "tenant");
  s.epoch = U64(j, "epoch");
  s.created = absl::FromUnixNanos(Int(j, "created_unix_ns", 0));
  s.tokens = Int(j, "tokens", -1);
  s.next_layer = static_cast<int>(Int(j, "next_layer", -1));
  s.pending_tokens = Int(j, "pending_tokens", -1);
  s.chunks = Ints(j, "chunks");
  s.group_tokens = Ints(j, "group_tokens");
  auto cit = j.find("config");
  if (cit == j.end() || !cit->is_object()) {
    return absl::InvalidArgumentError(absl::StrCat("snapshot: session ", s.id, " has no config"));
  }
  ASSIGN_OR_RETURN(s.config, ConfigFromJson(*cit));
  const SessionConfig& c = s.config;
  if (c.layers < 1 || c.layers > 512 || c.kv_heads < 1 || c.kv_heads > 256 || c.layer_reuse < 1 ||
      c.layer_reuse > c.layers) {
    return absl::InvalidArgumentError(absl::StrCat("snapshot: session ", s.id, " has a bad shape"));
  }
  Cursor cur(blob.data(), blob.size());
  const size_t tables = static_cast<size_t>(c.layers) * c.kv_heads;
  const size_t indexes = static_cast<size_t>(NumLayerGroups(c)) * c.kv_heads;
  s.frame_offsets.resize(tables);
  s.checksums.resize(tables);
  s.slots.resize(indexes);
  bool ok = cur.Skip(U64(j, "blob_offset"));
  for (size_t t = 0; ok && t < tables; ++t) {
    ok = cur.GetArray(&s.frame_offsets[t]) && cur.GetArray(&s.checksums[t]);
  }
  for (size_t i = 0; ok && i < indexes; ++i) ok = cur.GetArray(&s.slots[i]);
  if (!ok) {
    return absl::InvalidArgumentError(
        absl::StrCat("snapshot: session ", s.id, "'s arrays run past the file"));
  }
  // Index images: used only when all three lists name every index (else
  // the session restores by replay).
  const std::vector<uint64_t> offsets = U64s(j, "image_offsets");
  const std::vector<uint64_t> bytes = U64s(j, "image_bytes");
  const std::vector<uint64_t> hashes = U64s(j, "image_hashes");
  if (offsets.size() == indexes && bytes.size() == indexes && hashes.size() == indexes) {
    for (size_t i = 0; i < indexes; ++i)
      s.index_images.push_back({offsets[i], bytes[i], hashes[i]});
  }
  // Checked against the session's heads by Restore, which drops the
  // session when it is unreadable or out of range.
  QualityStateRead quality = QualityStateFromJson(j);
  s.quality = std::move(quality.state);
  s.quality_missing = std::move(quality.missing);
  s.quality_error = std::move(quality.error);
  return s;
}

absl::Status WriteAll(int fd, const std::string& bytes, const std::string& path) {
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      return absl::InternalError(absl::StrCat("snapshot: write ", path, ": ", strerror(errno)));
    }
    done += static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status WriteSnapshotFile(const SnapshotImage& image, const std::string& path) {
  std::string blob;
  Json sessions = Json::array();
  for (const SessionImage& s : image.sessions) sessions.push_back(SessionToJson(s, &blob));
  const std::string json = DumpJson(Json{{"daemon_epoch", image.daemon_epoch},
                                         {"capacity_bytes", image.capacity_bytes},
                                         {"written_unix_ms", absl::ToUnixMillis(image.written)},
                                         {"sessions", std::move(sessions)}});
  std::string out(kMagic, sizeof(kMagic));
  Put<uint32_t>(&out, kSnapshotVersion);
  Put<uint32_t>(&out, 0);
  Put<uint64_t>(&out, json.size());
  out += json;
  Put<uint64_t>(&out, blob.size());
  out += blob;
  Put<uint64_t>(&out, FrameChecksum(out.data(), out.size()));
  const std::string tmp = path + ".tmp";
  unlink(tmp.c_str());
  const int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0) {
    return absl::PermissionDeniedError(
        absl::StrCat("snapshot: cannot create ", tmp, ": ", strerror(errno)));
  }
  absl::Status st = WriteAll(fd, out, tmp);
  if (st.ok() && fsync(fd) != 0) {
    st = absl::InternalError(absl::StrCat("snapshot: fsync ", tmp, ": ", strerror(errno)));
  }
  close(fd);
  if (st.ok() && rename(tmp.c_str(), path.c_str()) != 0) {
    st = absl::InternalError(absl::StrCat("snapshot: rename to ", path, ": ", strerror(errno)));
  }
  if (!st.ok()) unlink(tmp.c_str());
  return st;
}

absl::StatusOr<SnapshotImage> ReadSnapshotFile(const std::string& path) {
  ASSIGN_OR_RETURN(std::string bytes, ReadFileToString(path));
  const auto lost = [&](const char* why) {
    return absl::DataLossError(absl::StrCat("snapshot ", path, ": ", why));
  };
  if (bytes.size() < sizeof(kMagic) + 24 + 8 || std::memcmp(bytes.data(), kMagic, 8) != 0) {
    return lost("not a snapshot (bad magic or truncated)");
  }
  uint64_t sum = 0;
  std::memcpy(&sum, bytes.data() + bytes.size() - 8, 8);
  if (FrameChecksum(bytes.data(), bytes.size() - 8) != sum) return lost("checksum mismatch");
  Cursor cur(bytes.data() + 8, bytes.size() - 16);
  uint32_t version = 0, zero = 0;
  uint64_t json_bytes = 0;
  cur.Get(&version);
  cur.Get(&zero);
  if (version != kSnapshotVersion) {
    return absl::FailedPreconditionError(absl::StrCat("snapshot ", path, " has format version ",
                                                      version, "; this daemon reads ",
                                                      kSnapshotVersion));
  }
  if (!cur.Get(&json_bytes) || json_bytes > bytes.size()) return lost("truncated header");
  const size_t json_at = 8 + 16;
  ASSIGN_OR_RETURN(Json root, ParseJson(std::string_view(bytes).substr(json_at, json_bytes)));
  cur.Skip(json_bytes);
  uint64_t blob_bytes = 0;
  if (!cur.Get(&blob_bytes) || json_at + json_bytes + 8 + blob_bytes + 8 != bytes.size()) {
    return lost("truncated blob");
  }
  const std::string blob = bytes.substr(json_at + json_bytes + 8, blob_bytes);
  SnapshotImage image;
  image.daemon_epoch = U64(root, "daemon_epoch");
  image.capacity_bytes = U64(root, "capacity_bytes");
  image.written = absl::FromUnixMillis(Int(root, "written_unix_ms", 0));
  auto sit = root.find("sessions");
  if (sit == root.end() || !sit->is_array()) return lost("no session list");
  for (const Json& j : *sit) {
    ASSIGN_OR_RETURN(SessionImage s, SessionFromJson(j, blob));
    image.sessions.push_back(std::move(s));
  }
  return image;
}

}  // namespace icecache
