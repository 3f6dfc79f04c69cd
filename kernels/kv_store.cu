// Paged KV store data movement and the CUDA backend's small helpers; see kv_store.cuh.
// Copies and writes move 16 bytes per thread when head_dim allows (it is a multiple of 8 for
// every supported model), else one bf16.
#include "kernels/kv_store.cuh"

#include <algorithm>

#include "kernels/cuda_check.h"
#include "kernels/reference/random_hash.h"

namespace dmsrt {
namespace {

constexpr int kThreads = 256;

inline unsigned Blocks(int64_t work) {
  return static_cast<unsigned>((work + kThreads - 1) / kThreads);
}

// One CTA per pair; threads stride over the block's bytes as 16-byte words.
__global__ void CopyBlocksKernel(const int32_t* __restrict__ pairs, int32_t block_tokens,
                                 int32_t head_dim, __nv_bfloat16* k_pool, __nv_bfloat16* v_pool,
                                 int32_t* pos_pool, int32_t* last_vis_pool) {
  const int64_t src = pairs[2 * blockIdx.x], dst = pairs[2 * blockIdx.x + 1];
  const int64_t row = static_cast<int64_t>(block_tokens) * head_dim;  // bf16 per block
  if (row % 8 == 0) {
    const uint4* ks = reinterpret_cast<const uint4*>(k_pool + src * row);
    const uint4* vs = reinterpret_cast<const uint4*>(v_pool + src * row);
    uint4* kd = reinterpret_cast<uint4*>(k_pool + dst * row);
    uint4* vd = reinterpret_cast<uint4*>(v_pool + dst * row);
    for (int64_t i = threadIdx.x; i < row / 8; i += blockDim.x) {
      kd[i] = ks[i];
      vd[i] = vs[i];
    }
  } else {
    for (int64_t i = threadIdx.x; i < row; i += blockDim.x) {
      k_pool[dst * row + i] = k_pool[src * row + i];
      v_pool[dst * row + i] = v_pool[src * row + i];
    }
  }
  for (int64_t i = threadIdx.x; i < block_tokens; i += blockDim.x) {
    pos_pool[dst * block_tokens + i] = pos_pool[src * block_tokens + i];
    last_vis_pool[dst * block_tokens + i] = last_vis_pool[src * block_tokens + i];
  }
}

// One warp per write.
__global__ void WriteSlotsKernel(const int32_t* __restrict__ writes, int32_t n,
                                 const __nv_bfloat16* __restrict__ k,
                                 const __nv_bfloat16* __restrict__ v, int32_t n_kv_heads,
                                 int32_t head_dim, __nv_bfloat16* k_pool, __nv_bfloat16* v_pool,
                                 int32_t* pos_pool) {
  const int64_t wi = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (wi >= n) return;
  const int32_t* w = writes + 4 * wi;
  const int64_t src = (static_cast<int64_t>(w[0]) * n_kv_heads + w[1]) * head_dim;
  const int64_t dst = static_cast<int64_t>(w[2]) * head_dim;
  if (head_dim % 8 == 0) {
    for (int i = lane; i < head_dim / 8; i += 32) {
      reinterpret_cast<uint4*>(k_pool + dst)[i] = reinterpret_cast<const uint4*>(k + src)[i];
      reinterpret_cast<uint4*>(v_pool + dst)[i] = reinterpret_cast<const uint4*>(v + src)[i];
    }
  } else {
    for (int i = lane; i < head_dim; i += 32) {
      k_pool[dst + i] = k[src + i];
      v_pool[dst + i] = v[src + i];
    }
  }
  if (lane == 0) pos_pool[w[2]] = w[3];
}

__global__ void ScatterInt32Kernel(const int32_t* __restrict__ pairs, int32_t n, bool use_fill,
                                   int32_t fill, int32_t* dst) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) dst[pairs[2 * i]] = use_fill ? fill : pairs[2 * i + 1];
}

__global__ void AddBiasKernel(__nv_bfloat16* x, const __nv_bfloat16* __restrict__ bias,
                              int32_t rows, int32_t cols, int32_t ld) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<int64_t>(rows) * cols) return;
  const int64_t r = i / cols, c = i % cols;
  __nv_bfloat16& e = x[r * ld + c];
  e = __float2bfloat16(__bfloat162float(e) + __bfloat162float(bias[c]));
}

__global__ void FillRandomKernel(__nv_bfloat16* dst, int64_t n, uint64_t seed, float scale) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    dst[i] = __float2bfloat16(scale * kernels::HashUniformSigned(seed, static_cast<uint64_t>(i)));
  }
}

}  // namespace

cudaError_t KvCopyBlocks(const int32_t* pairs, int32_t n, int32_t block_tokens, int32_t head_dim,
                         __nv_bfloat16* k_pool, __nv_bfloat16* v_pool, int32_t* pos_pool,
                         int32_t* last_vis_pool, cudaStream_t stream) {
  if (n < 0 || block_tokens <= 0 || head_dim <= 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  CopyBlocksKernel<<<n, 128, 0, stream>>>(pairs, block_tokens, head_dim, k_pool, v_pool, pos_pool,
                                          last_vis_pool);
  DMSRT_LAUNCH_CHECK(stream);
  return cudaSuccess;
}

cudaError_t KvWriteSlots(const int32_t* writes, int32_t n, const __nv_bfloat16* k,
                         const __nv_bfloat16* v, int32_t n_kv_heads, int32_t head_dim,
                         __nv_bfloat16* k_pool, __nv_bfloat16* v_pool, int32_t* pos_pool,
                         cudaStream_t stream) {
  if (n < 0 || n_kv_heads <= 0 || head_dim <= 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  WriteSlotsKernel<<<Blocks(static_cast<int64_t>(n) * 32), kThreads, 0, stream>>>(
      writes, n, k, v, n_kv_heads, head_dim, k_pool, v_pool, pos_pool);
  DMSRT_LAUNCH_CHECK(stream);
  return cudaSuccess;
}

cudaError_t KvScatterInt32(const int32_t* pairs, int32_t n, bool use_fill, int32_t fill,
                           int32_t* dst, cudaStream_t stream) {
  if (n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  ScatterInt32Kernel<<<Blocks(n), kThreads, 0, stream>>>(pairs, n, use_fill, fill, dst);
  DMSRT_LAUNCH_CHECK(stream);
  return cudaSuccess;
}

cudaError_t AddBiasRows(__nv_bfloat16* x, const __nv_bfloat16* bias, int32_t rows, int32_t cols,
                        int32_t ld, cudaStream_t stream) {
  if (rows < 0 || cols < 0 || ld < cols) return cudaErrorInvalidValue;
  if (rows == 0 || cols == 0) return cudaSuccess;
  AddBiasKernel<<<Blocks(static_cast<int64_t>(rows) * cols), kThreads, 0, stream>>>(x, bias, rows,
                                                                                    cols, ld);
  DMSRT_LAUNCH_CHECK(stream);
  return cudaSuccess;
}

cudaError_t FillRandomBf16(__nv_bfloat16* dst, int64_t n, uint64_t seed, float scale,
                           cudaStream_t stream) {
  if (n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, 65536);
  FillRandomKernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(dst, n, seed, scale);
  DMSRT_LAUNCH_CHECK(stream);
  return cudaSuccess;
}

}  // namespace dmsrt
