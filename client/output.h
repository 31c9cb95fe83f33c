// Output helpers of the command-line tools (icecachectl, icecache-demo,
// icecache-bench-rpc): an aligned text table and a small JSON writer.
// Both build a string in memory; not thread-safe (one per thread).
#ifndef ICECACHE_CLIENT_OUTPUT_H_
#define ICECACHE_CLIENT_OUTPUT_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

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

// Streaming JSON writer with commas handled for the caller:
//   JsonWriter w; w.BeginObject(); w.Key("a"); w.Int(1); w.EndObject();
// Strings are escaped per RFC 8259; non-finite doubles are written as null.
class JsonWriter {
 public:
  JsonWriter& BeginObject();
  JsonWriter& EndObject();
  JsonWriter& BeginArray();
  JsonWriter& EndArray();
  JsonWriter& Key(std::string_view key);
  JsonWriter& String(std::string_view value);
  JsonWriter& Int(int64_t value);
  JsonWriter& Uint(uint64_t value);
  JsonWriter& Double(double value);
  JsonWriter& Bool(bool value);
  JsonWriter& Null();
  // Inserts already-serialised JSON as one value.
  JsonWriter& Raw(std::string_view json);
  const std::string& str() const { return out_; }

 private:
  void BeforeValue();
  std::string out_;
  std::vector<bool> first_;  // per open container: no element written yet
  bool after_key_ = false;
};

std::string JsonEscape(std::string_view s);
// 1536 -> "1.5 KiB"; exact below 1 KiB.
std::string HumanBytes(int64_t bytes);

}  // namespace icecache

#endif  // ICECACHE_CLIENT_OUTPUT_H_
