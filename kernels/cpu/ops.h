// Element-wise and row-wise float kernels of the CPU forward pass: RMSNorm, rotate-half RoPE,
// SwiGLU (silu(gate) * up), residual adds. Plain loops the compiler vectorises, plus a vector
// exp for SiLU (a scalar exp per FFN element is a visible share of decode time).
#pragma once

#include <cstdint>

namespace dmsrt {
namespace kernels {

// out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w, for t < n rows of `dim`; w [dim] (nullptr = 1).
// out may equal x.
void RmsNorm(const float* x, const float* w, int64_t n, int64_t dim, float eps, float* out);

// Rotate-half RoPE in place on x [n, heads, head_dim] (row stride `row_stride` floats between
// tokens): channel i < rope_dim/2 pairs with i + rope_dim/2;
//   x'[i]      = x[i] cos - x[i+h] sin
//   x'[i + h]  = x[i+h] cos + x[i] sin
// cos_sin [n, rope_dim/2, 2] holds (cos, sin) of position(t) * inv_freq[i].
void RopeNeox(float* x, int64_t n, int64_t heads, int64_t head_dim, int64_t rope_dim,
              int64_t row_stride, const float* cos_sin);

// out[i] = silu(gate[i]) * up[i] = gate / (1 + exp(-gate)) * up, for i < count.
void SiluMul(const float* gate, const float* up, float* out, int64_t count);

// x[i] += y[i].
void AddInPlace(float* x, const float* y, int64_t count);

}  // namespace kernels
}  // namespace dmsrt
