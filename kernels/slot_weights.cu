// Decode attention weights per slot; see slot_weights.cuh for the contract.
//
// CTA = one (sequence, KV head); each thread takes slots tid, tid + kThreads, ... and computes
// the g scores of a slot from one read of its key row (16-byte loads). Two passes over the keys:
// the first keeps an online (max, sum) per query head and the block reduces them; the second
// recomputes the scores and writes the group's mean weight. The keys are read twice, but a
// victim policy's heads hold at most its budget of slots (hundreds), and this runs once per layer
// of a decode step: a few microseconds beside the step's weight reads.
#include "kernels/slot_weights.cuh"

#include <cmath>

#include "kernels/common.cuh"

namespace dmsrt {
namespace {

using cuda_detail::Bf16x8ToFloat;
using cuda_detail::LoadU4;

constexpr int kThreads = 128;
constexpr int kMaxGroup = 8;

template <int D>
__device__ __forceinline__ void Scores(const float* s_q, int g, const __nv_bfloat16* krow,
                                       float scale, float* out) {
  float acc[kMaxGroup];
#pragma unroll
  for (int h = 0; h < kMaxGroup; ++h) acc[h] = 0.f;
#pragma unroll 4
  for (int c = 0; c < D; c += 8) {
    float k8[8];
    Bf16x8ToFloat(LoadU4(krow + c), k8);
#pragma unroll
    for (int h = 0; h < kMaxGroup; ++h) {
      if (h >= g) break;
      const float* qh = s_q + h * D + c;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[h] += qh[i] * k8[i];
    }
  }
#pragma unroll
  for (int h = 0; h < kMaxGroup; ++h) out[h] = acc[h] * scale;
}

template <int D>
__global__ void __launch_bounds__(kThreads)
SlotWeightsKernel(DecodeAttentionParams p, const __nv_bfloat16* __restrict__ q,
                  const __nv_bfloat16* __restrict__ k_pool, const int32_t* __restrict__ tables,
                  const int32_t* __restrict__ lengths, float* __restrict__ out, int32_t ld) {
  __shared__ float s_q[kMaxGroup * D];
  __shared__ float s_m[kThreads / 32][kMaxGroup];
  __shared__ float s_l[kThreads / 32][kMaxGroup];
  __shared__ float s_max[kMaxGroup], s_sum[kMaxGroup];
  const int b = blockIdx.x / p.n_kv_heads;
  const int j = blockIdx.x % p.n_kv_heads;
  const int g = p.n_heads / p.n_kv_heads;
  const int len = lengths[blockIdx.x];
  const int table_row = p.table_rows != nullptr ? p.table_rows[b] : b;
  const int32_t* table =
      tables + (static_cast<size_t>(table_row) * p.n_kv_heads + j) * p.max_blocks_per_head;
  const __nv_bfloat16* qg = q + (static_cast<size_t>(b) * p.n_heads + j * g) * D;
  for (int i = threadIdx.x; i < g * D; i += kThreads) s_q[i] = __bfloat162float(qg[i]);
  __syncthreads();

  auto key_row = [&](int s) {
    return k_pool + (static_cast<size_t>(table[s / p.block_tokens]) * p.block_tokens +
                     s % p.block_tokens) * D;
  };
  // Pass 1: per query head, the online max and sum of this thread's slots.
  float m[kMaxGroup], l[kMaxGroup], sc[kMaxGroup];
#pragma unroll
  for (int h = 0; h < kMaxGroup; ++h) {
    m[h] = -INFINITY;
    l[h] = 0.f;
  }
  for (int s = threadIdx.x; s < len; s += kThreads) {
    Scores<D>(s_q, g, key_row(s), p.scale, sc);
#pragma unroll
    for (int h = 0; h < kMaxGroup; ++h) {
      const float mn = fmaxf(m[h], sc[h]);
      l[h] = l[h] * __expf(m[h] - mn) + __expf(sc[h] - mn);
      m[h] = mn;
    }
  }
  // Warp, then block: combine (max, sum) pairs.
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int h = 0; h < kMaxGroup; ++h) {
    for (int o = 16; o > 0; o >>= 1) {
      const float mo = __shfl_xor_sync(0xffffffffu, m[h], o);
      const float lo = __shfl_xor_sync(0xffffffffu, l[h], o);
      const float mn = fmaxf(m[h], mo);
      l[h] = (m[h] == -INFINITY ? 0.f : l[h] * __expf(m[h] - mn)) +
             (mo == -INFINITY ? 0.f : lo * __expf(mo - mn));
      m[h] = mn;
    }
    if (lane == 0) {
      s_m[warp][h] = m[h];
      s_l[warp][h] = l[h];
    }
  }
  __syncthreads();
  if (threadIdx.x < kMaxGroup) {
    const int h = threadIdx.x;
    float mm = -INFINITY;
    for (int w = 0; w < kThreads / 32; ++w) mm = fmaxf(mm, s_m[w][h]);
    float ll = 0.f;
    for (int w = 0; w < kThreads / 32; ++w) {
      if (s_m[w][h] != -INFINITY) ll += s_l[w][h] * __expf(s_m[w][h] - mm);
    }
    s_max[h] = mm;
    s_sum[h] = ll;
  }
  __syncthreads();
  // Pass 2: the group's mean weight of each slot.
  float* o = out + static_cast<size_t>(blockIdx.x) * ld;
  const int n_out = min(len, ld);
  for (int s = threadIdx.x; s < n_out; s += kThreads) {
    Scores<D>(s_q, g, key_row(s), p.scale, sc);
    float w = 0.f;
    for (int h = 0; h < g; ++h) w += __expf(sc[h] - s_max[h]) / s_sum[h];
    o[s] = w / g;
  }
}

}  // namespace

cudaError_t DecodeSlotWeights(const DecodeAttentionParams& p, const __nv_bfloat16* q,
                              const __nv_bfloat16* k_pool, const int32_t* block_tables,
                              const int32_t* lengths, float* out, int32_t ld,
                              cudaStream_t stream) {
  if (p.batch <= 0 || p.n_kv_heads <= 0 || p.n_heads % p.n_kv_heads != 0 ||
      p.n_heads / p.n_kv_heads > kMaxGroup || p.block_tokens <= 0 ||
      p.max_blocks_per_head <= 0 || ld <= 0) {
    return cudaErrorInvalidValue;
  }
  const dim3 grid(static_cast<unsigned>(p.batch * p.n_kv_heads));
  switch (p.head_dim) {
    case 64: SlotWeightsKernel<64><<<grid, kThreads, 0, stream>>>(p, q, k_pool, block_tables, lengths, out, ld); break;
    case 128: SlotWeightsKernel<128><<<grid, kThreads, 0, stream>>>(p, q, k_pool, block_tables, lengths, out, ld); break;
    case 256: SlotWeightsKernel<256><<<grid, kThreads, 0, stream>>>(p, q, k_pool, block_tables, lengths, out, ld); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace dmsrt
