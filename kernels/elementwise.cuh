// Row-wise and element-wise kernels of the forward pass, bf16 storage and fp32 arithmetic:
//   RmsNorm          out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight     x, out [rows, dim]
//                    (also the per-head q_norm/k_norm: rows = tokens*heads, dim = head_dim)
//   ResidualAdd      x += y                                                x, y [n]
//   ResidualAddF32   x += bf16(y), y fp32: a tensor-parallel partial sum, all-reduced in fp32,
//                    rounded as a single-device GEMM rounds its bf16 output, then added
//   SiluMul          out[r][i] = silu(gate[r][i]) * up[r][i]               rows with strides
//   EmbeddingGather  out[r] = table[ids[r]]  (ids outside [0, vocab) give a zero row)
// RmsNorm uses 16-byte accesses when dim % 8 == 0: x, weight and out must then be 16-byte
// aligned (cudaMalloc'd buffers and row offsets of whole rows are). Launchers allocate nothing
// and return the launch error.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace dmsrt {

cudaError_t RmsNorm(const __nv_bfloat16* x, const __nv_bfloat16* weight, int32_t rows,
                    int32_t dim, float eps, __nv_bfloat16* out, cudaStream_t stream);

cudaError_t ResidualAdd(__nv_bfloat16* x, const __nv_bfloat16* y, int64_t n,
                        cudaStream_t stream);

// x [n] bf16, y [n] fp32.
cudaError_t ResidualAddF32(__nv_bfloat16* x, const float* y, int64_t n, cudaStream_t stream);

// gate [rows, ld_in] (first `ffn` columns used), up [rows, ld_in], out [rows, ld_out].
cudaError_t SiluMul(const __nv_bfloat16* gate, const __nv_bfloat16* up, int32_t rows,
                    int32_t ffn, int32_t ld_in, __nv_bfloat16* out, int32_t ld_out,
                    cudaStream_t stream);

// table [vocab, hidden], ids [rows], out [rows, hidden].
cudaError_t EmbeddingGather(const __nv_bfloat16* table, int32_t vocab, int32_t hidden,
                            const int32_t* ids, int32_t rows, __nv_bfloat16* out,
                            cudaStream_t stream);

}  // namespace dmsrt
