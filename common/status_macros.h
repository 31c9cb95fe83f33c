// RETURN_IF_ERROR / ASSIGN_OR_RETURN for absl::Status and absl::StatusOr<T>.
// Abseil 20220623 has neither; these are the only definitions in the tree.
#ifndef ICECACHE_COMMON_STATUS_MACROS_H_
#define ICECACHE_COMMON_STATUS_MACROS_H_

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define ICECACHE_CONCAT_INNER_(a, b) a##b
#define ICECACHE_CONCAT_(a, b) ICECACHE_CONCAT_INNER_(a, b)

// Evaluates `expr` (an absl::Status); returns it from the enclosing function
// when it is not OK.
#define RETURN_IF_ERROR(expr)                            \
  do {                                                   \
    ::absl::Status _icecache_status = (expr);            \
    if (!_icecache_status.ok()) return _icecache_status; \
  } while (0)

// ASSIGN_OR_RETURN(lhs, expr): evaluates `expr` (an absl::StatusOr<T>); on
// error returns its status, else assigns/declares `lhs` from its value.
// `lhs` may be a declaration: ASSIGN_OR_RETURN(auto x, Make());
#define ASSIGN_OR_RETURN(lhs, expr) \
  ICECACHE_ASSIGN_OR_RETURN_IMPL_(ICECACHE_CONCAT_(_icecache_statusor_, __LINE__), lhs, expr)

#define ICECACHE_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                    \
  if (!tmp.ok()) return std::move(tmp).status();        \
  lhs = std::move(tmp).value()

#endif  // ICECACHE_COMMON_STATUS_MACROS_H_
