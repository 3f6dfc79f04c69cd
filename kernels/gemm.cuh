// bf16 matrix products through cuBLAS (tensor cores, fp32 accumulation).
//
// Row-major activations times a weight in nn.Linear layout:
//   C[m, n] = alpha * A[m, k] · W[n, k]^T + beta * C       (A, W bf16; C bf16 or fp32)
// lda, ldw, ldc are row strides in elements. In cuBLAS's column-major terms this is
// C^T = W · A^T, i.e. gemm(T, N) with the operands swapped, so no transposes are materialised.
// m = 1 (a decode step) and the Variant B adapter logits (n = n_kv_heads) go through the same
// call. The handle is bound to `stream`; cuBLAS may use its own default workspace.
#pragma once

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace dmsrt {

enum class GemmOut { kBf16, kF32 };

cudaError_t GemmBf16(cublasHandle_t handle, int32_t m, int32_t n, int32_t k,
                     const __nv_bfloat16* a, int32_t lda, const __nv_bfloat16* w, int32_t ldw,
                     void* c, int32_t ldc, GemmOut out_type, float alpha, float beta,
                     cudaStream_t stream);

}  // namespace dmsrt
