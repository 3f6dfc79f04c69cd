// RMSNorm, residual add, SiLU-mul, embedding gather; see elementwise.cuh.
// RMSNorm: one CTA per row, the sum of squares reduced across the CTA in fp32, 16-byte accesses
// when the row allows it.
#include "kernels/elementwise.cuh"

#include <algorithm>

#include "kernels/common.cuh"
#include "kernels/cuda_check.h"

namespace dmsrt {
namespace {

constexpr int kNormThreads = 256;

__global__ void __launch_bounds__(kNormThreads)
RmsNormKernel(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,
              int32_t dim, float eps, __nv_bfloat16* __restrict__ out) {
  __shared__ float scratch[kNormThreads / 32];
  const size_t r = blockIdx.x;
  const __nv_bfloat16* xr = x + r * dim;
  __nv_bfloat16* orow = out + r * dim;
  const bool vec = dim % 8 == 0;
  float ss = 0.f;
  if (vec) {
    for (int i = threadIdx.x; i < dim / 8; i += kNormThreads) {
      float f[8];
      cuda_detail::Bf16x8ToFloat(reinterpret_cast<const uint4*>(xr)[i], f);
#pragma unroll
      for (int k = 0; k < 8; ++k) ss = fmaf(f[k], f[k], ss);
    }
  } else {
    for (int i = threadIdx.x; i < dim; i += kNormThreads) {
      const float f = __bfloat162float(xr[i]);
      ss = fmaf(f, f, ss);
    }
  }
  ss = cuda_detail::BlockSum<kNormThreads>(ss, scratch);
  const float inv = rsqrtf(ss / dim + eps);
  if (vec) {
    for (int i = threadIdx.x; i < dim / 8; i += kNormThreads) {
      float f[8], g[8];
      cuda_detail::Bf16x8ToFloat(reinterpret_cast<const uint4*>(xr)[i], f);
      cuda_detail::Bf16x8ToFloat(reinterpret_cast<const uint4*>(w)[i], g);
#pragma unroll
      for (int k = 0; k < 8; ++k) f[k] = f[k] * inv * g[k];
      reinterpret_cast<uint4*>(orow)[i] = cuda_detail::FloatToBf16x8(f);
    }
  } else {
    for (int i = threadIdx.x; i < dim; i += kNormThreads) {
      orow[i] = __float2bfloat16(__bfloat162float(xr[i]) * inv * __bfloat162float(w[i]));
    }
  }
}

__global__ void AddKernel(__nv_bfloat16* x, const __nv_bfloat16* __restrict__ y, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    x[i] = __float2bfloat16(__bfloat162float(x[i]) + __bfloat162float(y[i]));
  }
}

__global__ void AddF32Kernel(__nv_bfloat16* x, const float* __restrict__ y, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float yb = __bfloat162float(__float2bfloat16(y[i]));  // as a bf16 GEMM output
    x[i] = __float2bfloat16(__bfloat162float(x[i]) + yb);
  }
}

__global__ void SiluMulKernel(const __nv_bfloat16* __restrict__ gate,
                              const __nv_bfloat16* __restrict__ up, int32_t ffn, int32_t ld_in,
                              __nv_bfloat16* __restrict__ out, int32_t ld_out) {
  const size_t r = blockIdx.y;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < ffn; i += gridDim.x * blockDim.x) {
    const float gv = __bfloat162float(gate[r * ld_in + i]);
    const float uv = __bfloat162float(up[r * ld_in + i]);
    out[r * ld_out + i] = __float2bfloat16(gv / (1.f + __expf(-gv)) * uv);
  }
}

__global__ void EmbedKernel(const __nv_bfloat16* __restrict__ table, int32_t vocab,
                            int32_t hidden, const int32_t* __restrict__ ids,
                            __nv_bfloat16* __restrict__ out) {
  const size_t r = blockIdx.x;
  const int id = ids[r];
  const bool ok = id >= 0 && id < vocab;
  const __nv_bfloat16* src = table + static_cast<size_t>(ok ? id : 0) * hidden;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    out[r * hidden + i] = ok ? src[i] : __float2bfloat16(0.f);
  }
}

}  // namespace

cudaError_t RmsNorm(const __nv_bfloat16* x, const __nv_bfloat16* weight, int32_t rows,
                    int32_t dim, float eps, __nv_bfloat16* out, cudaStream_t stream) {
  if (rows < 0 || dim <= 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  RmsNormKernel<<<rows, kNormThreads, 0, stream>>>(x, weight, dim, eps, out);
  DMSRT_LAUNCH_CHECK(stream);
  return cudaSuccess;
}

cudaError_t ResidualAdd(__nv_bfloat16* x, const __nv_bfloat16* y, int64_t n,
                        cudaStream_t stream) {
  if (n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((n + 255) / 256, 65535);
  AddKernel<<<static_cast<int>(blocks), 256, 0, stream>>>(x, y, n);
  DMSRT_LAUNCH_CHECK(stream);
  return cudaSuccess;
}

cudaError_t ResidualAddF32(__nv_bfloat16* x, const float* y, int64_t n, cudaStream_t stream) {
  if (n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((n + 255) / 256, 65535);
  AddF32Kernel<<<static_cast<int>(blocks), 256, 0, stream>>>(x, y, n);
  DMSRT_LAUNCH_CHECK(stream);
  return cudaSuccess;
}

cudaError_t SiluMul(const __nv_bfloat16* gate, const __nv_bfloat16* up, int32_t rows,
                    int32_t ffn, int32_t ld_in, __nv_bfloat16* out, int32_t ld_out,
                    cudaStream_t stream) {
  if (rows < 0 || ffn <= 0 || ld_in < ffn || ld_out < ffn || rows > 65535) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0) return cudaSuccess;
  dim3 grid((ffn + 255) / 256, rows);
  SiluMulKernel<<<grid, 256, 0, stream>>>(gate, up, ffn, ld_in, out, ld_out);
  DMSRT_LAUNCH_CHECK(stream);
  return cudaSuccess;
}

cudaError_t EmbeddingGather(const __nv_bfloat16* table, int32_t vocab, int32_t hidden,
                            const int32_t* ids, int32_t rows, __nv_bfloat16* out,
                            cudaStream_t stream) {
  if (rows < 0 || hidden <= 0 || vocab <= 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  EmbedKernel<<<rows, 256, 0, stream>>>(table, vocab, hidden, ids, out);
  DMSRT_LAUNCH_CHECK(stream);
  return cudaSuccess;
}

}  // namespace dmsrt
