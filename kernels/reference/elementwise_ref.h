// Plain C++ references of kernels/elementwise.cuh (float in, float out, double sums).
#pragma once

#include <cstdint>

namespace dmsrt {
namespace kernels {

// x, out [rows, dim]; weight [dim].
void RmsNormRef(const float* x, const float* weight, int32_t rows, int32_t dim, float eps,
                float* out);
// out[r][i] = silu(gate[r][i]) * up[r][i]; gate/up [rows, ld_in], out [rows, ld_out].
void SiluMulRef(const float* gate, const float* up, int32_t rows, int32_t ffn, int32_t ld_in,
                float* out, int32_t ld_out);
// out[r] = table[ids[r]] ([vocab, hidden]); out-of-range ids give zeros.
void EmbeddingGatherRef(const float* table, int32_t vocab, int32_t hidden, const int32_t* ids,
                        int32_t rows, float* out);

}  // namespace kernels
}  // namespace dmsrt
