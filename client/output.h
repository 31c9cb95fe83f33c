// Output helpers of the command-line tools (icecachectl, icecache-demo,
// icecache-bench-rpc): an aligned text table, JSON views of the admin
// records (common/json.h) and byte counts for people. Not thread-safe (one
// table per thread).
#ifndef ICECACHE_CLIENT_OUTPUT_H_
#define ICECACHE_CLIENT_OUTPUT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "client/client.h"
#include "common/json.h"

namespace icecache {

// A table with a header row; every column is as wide as its widest cell,
// columns separated by two spaces. Columns whose cells are all numeric are
// right-aligned (header included).
class TextTable {
 public:
  explicit TextTable(std::vector<std::string> header) : header_(std::move(header)) {}
  // A row with fewer cells than the header is padded with empty cells; extra
  // cells are kept (the header gets empty titles).
  void AddRow(std::vector<std::string> row) { rows_.push_back(std::move(row)); }
  size_t num_rows() const { return rows_.size(); }
  std::string Render() const;

 private:
  std::vector<std::string> header_;
  std::vector<std::vector<std::string>> rows_;
};

// JSON views of the daemon's admin records, as `icecachectl --json` prints
// them. Epochs are strings (they exceed 2^53, as proto JSON writes them);
// times are Unix milliseconds, 0 for "never".
// A session's unit of selection for display: "page", "token", or
// "by-destination" (the default: per token into HOST_SHM buffers, per page
// into CUDA_IPC buffers, with device fields and for SelectPages).
std::string GranularityText(SelectionGranularity granularity);
Json SessionJson(const SessionInfo& s);
Json QualityJson(const SessionQuality& q);  // SessionJson's "quality"
Json TenantJson(const TenantInfo& t);
Json StatsJson(const DaemonStats& s);

// 1536 -> "1.5 KiB"; exact below 1 KiB.
std::string HumanBytes(int64_t bytes);

}  // namespace icecache

#endif  // ICECACHE_CLIENT_OUTPUT_H_
