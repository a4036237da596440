// absl::Status propagation helpers (Debian's Abseil has none public).
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define ICECACHE_STATUS_CONCAT_INNER(a, b) a##b
#define ICECACHE_STATUS_CONCAT(a, b) ICECACHE_STATUS_CONCAT_INNER(a, b)

// Returns the status from the enclosing function when `expr` is not OK.
#define ICECACHE_RETURN_IF_ERROR(expr)                   \
  do {                                                   \
    ::absl::Status _icecache_status = (expr);            \
    if (!_icecache_status.ok()) return _icecache_status; \
  } while (0)

// `ICECACHE_ASSIGN_OR_RETURN(auto x, MakeX());` binds the value or returns the error.
#define ICECACHE_ASSIGN_OR_RETURN(lhs, expr)                                                    \
  ICECACHE_ASSIGN_OR_RETURN_IMPL(ICECACHE_STATUS_CONCAT(_icecache_statusor_, __COUNTER__), lhs, \
                                 expr)

#define ICECACHE_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                                   \
  if (!tmp.ok()) return tmp.status();                  \
  lhs = std::move(tmp).value()
