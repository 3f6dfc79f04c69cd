// Status helpers shared by every library above kernels/.
//
// The Debian abseil (20220623) has no RETURN_IF_ERROR / ASSIGN_OR_RETURN, so we define one small
// local pair here, once. parallel/ is the lowest layer that speaks absl::Status, so the macros
// live here and runtime/ and launch/ include them from here.
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define DMSRT_STATUS_CONCAT_INNER_(a, b) a##b
#define DMSRT_STATUS_CONCAT_(a, b) DMSRT_STATUS_CONCAT_INNER_(a, b)

// Returns from the enclosing function if `expr` (an absl::Status) is not OK.
#define DMSRT_RETURN_IF_ERROR(expr)                 \
  do {                                              \
    ::absl::Status dmsrt_status_ = (expr);          \
    if (!dmsrt_status_.ok()) return dmsrt_status_;  \
  } while (0)

// `DMSRT_ASSIGN_OR_RETURN(auto x, Foo());` — evaluates an absl::StatusOr<T>, returns its status
// when not OK, otherwise moves the value into the declaration on the left.
#define DMSRT_ASSIGN_OR_RETURN(lhs, rexpr) \
  DMSRT_ASSIGN_OR_RETURN_IMPL_(DMSRT_STATUS_CONCAT_(dmsrt_statusor_, __LINE__), lhs, rexpr)
#define DMSRT_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, rexpr) \
  auto statusor = (rexpr);                                 \
  if (!statusor.ok()) return std::move(statusor).status(); \
  lhs = std::move(statusor).value()
