// cuBLAS bf16 GEMM wrapper; see gemm.cuh.
#include "kernels/gemm.cuh"

#include "kernels/cuda_check.h"

namespace dmsrt {

cudaError_t GemmBf16(cublasHandle_t handle, int32_t m, int32_t n, int32_t k,
                     const __nv_bfloat16* a, int32_t lda, const __nv_bfloat16* w, int32_t ldw,
                     void* c, int32_t ldc, GemmOut out_type, float alpha, float beta,
                     cudaStream_t stream) {
  if (handle == nullptr || m < 0 || n < 0 || k <= 0 || lda < k || ldw < k || ldc < n) {
    return cudaErrorInvalidValue;
  }
  if (m == 0 || n == 0) return cudaSuccess;
  DMSRT_CUBLAS_TRY(cublasSetStream(handle, stream));
  const cudaDataType_t ctype = out_type == GemmOut::kBf16 ? CUDA_R_16BF : CUDA_R_32F;
  DMSRT_CUBLAS_TRY(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &alpha, w, CUDA_R_16BF,
                                ldw, a, CUDA_R_16BF, lda, &beta, c, ctype, ldc,
                                CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  return cudaSuccess;
}

}  // namespace dmsrt
