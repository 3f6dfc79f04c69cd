// Error checking for CUDA, cuBLAS and kernel launches.
//
// Two layers, because kernels/ is framework-free but the runtime speaks absl::Status:
//   * DMSRT_CUDA_TRY / DMSRT_CUBLAS_TRY: inside launchers that return cudaError_t, return the
//     first failure unchanged (cuBLAS failures become cudaErrorUnknown after being recorded).
//   * DMSRT_LAUNCH_CHECK(stream): after every <<<...>>> launch; returns the launch error, and
//     when the environment variable DMSRT_CUDA_SYNC=1 is set, synchronises the stream so that a
//     fault is reported by the launcher of the kernel that caused it (debug switch).
//   * DMSRT_CUDA_RETURN_IF_ERROR / DMSRT_CUBLAS_RETURN_IF_ERROR: in code returning absl::Status
//     (runtime, tests), turn a failure into an INTERNAL status naming the call, file and line.
//     Available when abseil's headers are on the include path.
#pragma once

#include <cstdlib>
#include <cstring>

#include <cublas_v2.h>
#include <cuda_runtime.h>

namespace dmsrt {

// True when DMSRT_CUDA_SYNC=1: read once per process.
inline bool CudaSyncAfterLaunch() {
  static const bool on = [] {
    const char* v = std::getenv("DMSRT_CUDA_SYNC");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return on;
}

inline cudaError_t CudaLaunchResult(cudaStream_t stream) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  if (CudaSyncAfterLaunch()) return cudaStreamSynchronize(stream);
  return cudaSuccess;
}

inline const char* CublasStatusName(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    default: return "CUBLAS_STATUS_<other>";
  }
}

}  // namespace dmsrt

#define DMSRT_CUDA_TRY(expr)                          \
  do {                                                \
    cudaError_t dmsrt_cuda_err_ = (expr);             \
    if (dmsrt_cuda_err_ != cudaSuccess) return dmsrt_cuda_err_; \
  } while (0)

#define DMSRT_CUBLAS_TRY(expr)                        \
  do {                                                \
    cublasStatus_t dmsrt_cublas_st_ = (expr);         \
    if (dmsrt_cublas_st_ == CUBLAS_STATUS_INVALID_VALUE) return cudaErrorInvalidValue; \
    if (dmsrt_cublas_st_ == CUBLAS_STATUS_NOT_SUPPORTED) return cudaErrorNotSupported; \
    if (dmsrt_cublas_st_ != CUBLAS_STATUS_SUCCESS) return cudaErrorUnknown; \
  } while (0)

#define DMSRT_LAUNCH_CHECK(stream) DMSRT_CUDA_TRY(::dmsrt::CudaLaunchResult(stream))

#if __has_include("absl/status/status.h")
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace dmsrt {
inline absl::Status CudaStatus(cudaError_t err, const char* what, const char* file, int line) {
  if (err == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, " failed: ", cudaGetErrorName(err), " (",
                                          cudaGetErrorString(err), ") at ", file, ":", line));
}
inline absl::Status CublasStatus(cublasStatus_t st, const char* what, const char* file, int line) {
  if (st == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::InternalError(
      absl::StrCat(what, " failed: ", CublasStatusName(st), " at ", file, ":", line));
}
}  // namespace dmsrt

#define DMSRT_CUDA_RETURN_IF_ERROR(expr)                                          \
  do {                                                                            \
    ::absl::Status dmsrt_st_ = ::dmsrt::CudaStatus((expr), #expr, __FILE__, __LINE__); \
    if (!dmsrt_st_.ok()) return dmsrt_st_;                                        \
  } while (0)

#define DMSRT_CUBLAS_RETURN_IF_ERROR(expr)                                          \
  do {                                                                              \
    ::absl::Status dmsrt_st_ = ::dmsrt::CublasStatus((expr), #expr, __FILE__, __LINE__); \
    if (!dmsrt_st_.ok()) return dmsrt_st_;                                          \
  } while (0)
#endif
