// A small JSON value for the benchmark driver's report: built in memory,
// written with stable key order, and parsed back by `--check` so the driver
// can validate its own output without outside tools.
//
// Ownership: a Json owns its children by value. Not thread-safe; one thread
// builds and writes a report.
#ifndef ICECACHE_TESTS_BENCH_JSON_H_
#define ICECACHE_TESTS_BENCH_JSON_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace icecache::bench {

class Json {
 public:
  enum class Type { kNull, kBool, kNumber, kString, kArray, kObject };

  Json() = default;                                                            // null
  Json(bool b) : type_(Type::kBool), bool_(b) {}                               // NOLINT
  Json(double d) : type_(Type::kNumber), number_(d) {}                         // NOLINT
  Json(int v) : type_(Type::kNumber), number_(v) {}                            // NOLINT
  Json(int64_t v) : type_(Type::kNumber), number_(static_cast<double>(v)) {}   // NOLINT
  Json(uint64_t v) : type_(Type::kNumber), number_(static_cast<double>(v)) {}  // NOLINT
  Json(std::string s) : type_(Type::kString), string_(std::move(s)) {}         // NOLINT
  Json(const char* s) : type_(Type::kString), string_(s) {}                    // NOLINT

  static Json Array() {
    Json j;
    j.type_ = Type::kArray;
    return j;
  }
  static Json Object() {
    Json j;
    j.type_ = Type::kObject;
    return j;
  }

  Type type() const { return type_; }
  bool is_null() const { return type_ == Type::kNull; }
  bool is_number() const { return type_ == Type::kNumber; }
  bool is_string() const { return type_ == Type::kString; }
  bool is_array() const { return type_ == Type::kArray; }
  bool is_object() const { return type_ == Type::kObject; }
  double number() const { return number_; }
  bool boolean() const { return bool_; }
  const std::string& str() const { return string_; }
  const std::vector<Json>& items() const { return items_; }
  const std::vector<std::pair<std::string, Json>>& members() const { return members_; }

  // Object: sets `key` (replacing an earlier value), keeps insertion order.
  // Non-finite numbers are stored as null (JSON has no NaN/Inf).
  Json& Set(std::string_view key, Json value);
  // Array: appends.
  Json& Push(Json value);
  // Object member or nullptr.
  const Json* Find(std::string_view key) const;

  // Serialises with `indent` spaces per level (0: one line).
  std::string Dump(int indent = 2) const;

  // Parses a complete JSON text. InvalidArgument with the byte offset on
  // malformed input.
  static absl::StatusOr<Json> Parse(std::string_view text);

 private:
  void DumpTo(std::string* out, int indent, int level) const;

  Type type_ = Type::kNull;
  bool bool_ = false;
  double number_ = 0;
  std::string string_;
  std::vector<Json> items_;
  std::vector<std::pair<std::string, Json>> members_;
};

}  // namespace icecache::bench

#endif  // ICECACHE_TESTS_BENCH_JSON_H_
