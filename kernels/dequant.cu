// GGUF block dequantization to bf16; see dequant.cuh. One thread per 32-value block (Q4_0,
// Q4_1, Q8_0), one warp per 256-value Q6_K superblock (a lane per l of both halves), one thread
// per value for the float formats. Block structs are read byte-wise: GGUF blocks are only
// 2-byte aligned. Rows are contiguous and cols is a multiple of the block size, so the tensor is
// one flat run of blocks.
#include "kernels/dequant.cuh"

#include <cuda_fp16.h>

#include "kernels/cuda_check.h"
#include "kernels/reference/quant.h"

namespace dmsrt {
namespace {

namespace q = ::dmsrt::kernels;

__device__ __forceinline__ float Half(const uint8_t* p) {
  const uint16_t bits = static_cast<uint16_t>(p[0]) | (static_cast<uint16_t>(p[1]) << 8);
  return __half2float(__ushort_as_half(bits));
}

__device__ __forceinline__ void Store32(__nv_bfloat16* dst, const float* f) {
#pragma unroll
  for (int i = 0; i < 32; i += 2) {
    *reinterpret_cast<__nv_bfloat162*>(dst + i) = __floats2bfloat162_rn(f[i], f[i + 1]);
  }
}

template <int kType>
__global__ void Block32Kernel(const uint8_t* __restrict__ src, int64_t n_blocks,
                              __nv_bfloat16* __restrict__ dst) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b >= n_blocks) return;
  float f[32];
  if (kType == q::kTypeQ4_0) {
    const uint8_t* p = src + b * 18;
    const float d = Half(p);
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const uint8_t x = p[2 + i];
      f[i] = ((x & 0x0F) - 8) * d;
      f[i + 16] = ((x >> 4) - 8) * d;
    }
  } else if (kType == q::kTypeQ4_1) {
    const uint8_t* p = src + b * 20;
    const float d = Half(p), m = Half(p + 2);
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const uint8_t x = p[4 + i];
      f[i] = (x & 0x0F) * d + m;
      f[i + 16] = (x >> 4) * d + m;
    }
  } else {  // Q8_0
    const uint8_t* p = src + b * 34;
    const float d = Half(p);
#pragma unroll
    for (int i = 0; i < 32; ++i) f[i] = static_cast<int8_t>(p[2 + i]) * d;
  }
  Store32(dst + b * 32, f);
}

// One warp per superblock; lane l handles l of both 128-value halves.
__global__ void Q6KKernel(const uint8_t* __restrict__ src, int64_t n_blocks,
                          __nv_bfloat16* __restrict__ dst) {
  const int64_t b = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32;
  const int l = threadIdx.x % 32;
  if (b >= n_blocks) return;
  const uint8_t* p = src + b * 210;
  const uint8_t* ql_all = p;
  const uint8_t* qh_all = p + 128;
  const int8_t* sc_all = reinterpret_cast<const int8_t*>(p + 192);
  const float d = Half(p + 208);
  __nv_bfloat16* out = dst + b * 256;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const uint8_t* ql = ql_all + 64 * h;
    const uint8_t* qh = qh_all + 32 * h;
    const int8_t* sc = sc_all + 8 * h;
    const int is = l / 16;
    const int q0 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
    const int q1 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
    const int q2 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
    const int q3 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
    __nv_bfloat16* o = out + 128 * h;
    o[l] = __float2bfloat16(d * sc[is + 0] * q0);
    o[l + 32] = __float2bfloat16(d * sc[is + 2] * q1);
    o[l + 64] = __float2bfloat16(d * sc[is + 4] * q2);
    o[l + 96] = __float2bfloat16(d * sc[is + 6] * q3);
  }
}

template <int kType>
__global__ void FloatKernel(const uint8_t* __restrict__ src, int64_t n,
                            __nv_bfloat16* __restrict__ dst) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (kType == q::kTypeF32) {
      dst[i] = __float2bfloat16(reinterpret_cast<const float*>(src)[i]);
    } else if (kType == q::kTypeF16) {
      dst[i] = __float2bfloat16(Half(src + 2 * i));
    } else {
      dst[i] = reinterpret_cast<const __nv_bfloat16*>(src)[i];
    }
  }
}

// Values per block; 0 for the formats this file does not handle. (Kept here rather than calling
// quant.cc so that this library does not depend on the host kernels library.)
int64_t BlockValues(int type) {
  switch (type) {
    case q::kTypeF32: case q::kTypeF16: case q::kTypeBF16: return 1;
    case q::kTypeQ4_0: case q::kTypeQ4_1: case q::kTypeQ8_0: return q::kQK;
    case q::kTypeQ6_K: return q::kQK_K;
    default: return 0;
  }
}

int GridFor(int64_t items, int threads) {
  const int64_t g = (items + threads - 1) / threads;
  return static_cast<int>(g < (1LL << 30) ? g : (1LL << 30));
}

}  // namespace

cudaError_t DequantizeToBf16(int ggml_type, const void* src, int64_t rows, int64_t cols,
                             __nv_bfloat16* dst, cudaStream_t stream) {
  const int64_t bs = BlockValues(ggml_type);
  if (bs == 0 || rows < 0 || cols <= 0 || cols % bs != 0) return cudaErrorInvalidValue;
  const int64_t n = rows * cols;
  if (n == 0) return cudaSuccess;
  const uint8_t* s = static_cast<const uint8_t*>(src);
  const int64_t n_blocks = n / bs;
  switch (ggml_type) {
    case q::kTypeQ4_0: Block32Kernel<q::kTypeQ4_0><<<GridFor(n_blocks, 128), 128, 0, stream>>>(s, n_blocks, dst); break;
    case q::kTypeQ4_1: Block32Kernel<q::kTypeQ4_1><<<GridFor(n_blocks, 128), 128, 0, stream>>>(s, n_blocks, dst); break;
    case q::kTypeQ8_0: Block32Kernel<q::kTypeQ8_0><<<GridFor(n_blocks, 128), 128, 0, stream>>>(s, n_blocks, dst); break;
    case q::kTypeQ6_K: Q6KKernel<<<GridFor(n_blocks * 32, 128), 128, 0, stream>>>(s, n_blocks, dst); break;
    case q::kTypeF32: FloatKernel<q::kTypeF32><<<GridFor(n, 256), 256, 0, stream>>>(s, n, dst); break;
    case q::kTypeF16: FloatKernel<q::kTypeF16><<<GridFor(n, 256), 256, 0, stream>>>(s, n, dst); break;
    case q::kTypeBF16: FloatKernel<q::kTypeBF16><<<GridFor(n, 256), 256, 0, stream>>>(s, n, dst); break;
    default: return cudaErrorInvalidValue;
  }
  DMSRT_LAUNCH_CHECK(stream);
  return cudaSuccess;
}

}  // namespace dmsrt
