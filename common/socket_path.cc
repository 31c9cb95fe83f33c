#include "common/socket_path.h"

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <system_error>

#include "absl/strings/str_cat.h"

namespace icecache {
namespace {

std::string EnvOrEmpty(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr ? std::string() : std::string(v);
}

bool DirectoryWritable(const std::string& socket_path) {
  const std::string dir = std::filesystem::path(socket_path).parent_path().string();
  std::error_code ec;
  return std::filesystem::is_directory(dir, ec) && ::access(dir.c_str(), W_OK | X_OK) == 0;
}

bool Exists(const std::string& path) {
  std::error_code ec;
  return std::filesystem::exists(path, ec);
}

}  // namespace

std::vector<std::string> SocketCandidates(std::string_view xdg_runtime_dir, uint32_t uid) {
  std::vector<std::string> out = {"/run/icecache/icecached.sock"};
  if (!xdg_runtime_dir.empty() && xdg_runtime_dir[0] == '/') {
    std::string p = std::string(xdg_runtime_dir) + "/icecached.sock";
    if (p.size() <= kMaxUnixSocketPath) out.push_back(std::move(p));
  }
  out.push_back(absl::StrCat("/tmp/icecached-", uid, ".sock"));
  return out;
}

std::string FirstUsableSocket(const std::vector<std::string>& candidates,
                              absl::FunctionRef<bool(const std::string&)> usable) {
  for (const std::string& c : candidates) {
    if (usable(c)) return c;
  }
  return candidates.back();
}

std::string DaemonDefaultSocketPath() {
  return FirstUsableSocket(SocketCandidates(EnvOrEmpty("XDG_RUNTIME_DIR"), ::getuid()),
                           DirectoryWritable);
}

std::string ClientDefaultSocketPath() {
  const std::vector<std::string> candidates =
      SocketCandidates(EnvOrEmpty("XDG_RUNTIME_DIR"), ::getuid());
  for (const std::string& c : candidates) {
    if (Exists(c)) return c;
  }
  return DaemonDefaultSocketPath();
}

}  // namespace icecache
