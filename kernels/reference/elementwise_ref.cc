// Element-wise references.
#include "kernels/reference/elementwise_ref.h"

#include <cmath>

namespace dmsrt {
namespace kernels {

void RmsNormRef(const float* x, const float* weight, int32_t rows, int32_t dim, float eps,
                float* out) {
  for (int32_t r = 0; r < rows; ++r) {
    const float* xr = x + static_cast<size_t>(r) * dim;
    double ss = 0;
    for (int32_t i = 0; i < dim; ++i) ss += static_cast<double>(xr[i]) * xr[i];
    const double inv = 1.0 / std::sqrt(ss / dim + eps);
    for (int32_t i = 0; i < dim; ++i) {
      out[static_cast<size_t>(r) * dim + i] = static_cast<float>(xr[i] * inv * weight[i]);
    }
  }
}

void SiluMulRef(const float* gate, const float* up, int32_t rows, int32_t ffn, int32_t ld_in,
                float* out, int32_t ld_out) {
  for (int32_t r = 0; r < rows; ++r) {
    for (int32_t i = 0; i < ffn; ++i) {
      const double gv = gate[static_cast<size_t>(r) * ld_in + i];
      const double uv = up[static_cast<size_t>(r) * ld_in + i];
      out[static_cast<size_t>(r) * ld_out + i] = static_cast<float>(gv / (1.0 + std::exp(-gv)) * uv);
    }
  }
}

void EmbeddingGatherRef(const float* table, int32_t vocab, int32_t hidden, const int32_t* ids,
                        int32_t rows, float* out) {
  for (int32_t r = 0; r < rows; ++r) {
    const bool ok = ids[r] >= 0 && ids[r] < vocab;
    for (int32_t i = 0; i < hidden; ++i) {
      out[static_cast<size_t>(r) * hidden + i] =
          ok ? table[static_cast<size_t>(ids[r]) * hidden + i] : 0.f;
    }
  }
}

}  // namespace kernels
}  // namespace dmsrt
