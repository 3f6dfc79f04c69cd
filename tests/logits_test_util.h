// Comparisons of logits rows shared by the backend tests (tests/gpu/, tests/mpi/): no CUDA, no
// MPI. The argmax of a row, its top-1 minus top-2 margin, and the relative L2 error of a whole
// set of rows.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace dmsrt {
namespace logits_test {

inline int32_t Argmax(const float* row, int32_t n) {
  return static_cast<int32_t>(std::max_element(row, row + n) - row);
}

// Top-1 minus top-2 of a row: where it is small, bf16 arithmetic may pick either.
inline double Margin(const float* row, int32_t n) {
  float a = -INFINITY, b = -INFINITY;
  for (int32_t i = 0; i < n; ++i) {
    if (row[i] > a) {
      b = a;
      a = row[i];
    } else if (row[i] > b) {
      b = row[i];
    }
  }
  return a - b;
}

// ||got - want|| / ||want||; +inf if any value is NaN/inf (poison left behind), the sizes differ
// or the reference is zero.
inline double RelError(const std::vector<float>& got, const std::vector<float>& want) {
  if (got.size() != want.size()) return INFINITY;
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    const double d = static_cast<double>(got[i]) - want[i];
    num += d * d;
    den += static_cast<double>(want[i]) * want[i];
  }
  if (den == 0) return num == 0 ? 0 : INFINITY;
  return std::sqrt(num / den);
}

}  // namespace logits_test
}  // namespace dmsrt
