// DMS ring update, RoPE with Variant A decisions, Variant B threshold; see dms.cuh.
//
// The ring update is one CTA per (sequence, KV head): thread 0 does the scalar bookkeeping of
// §4 and publishes the slot through shared memory, then the CTA copies the K and V rows with
// 16-byte stores. RoPE is one CTA per (token, head), one thread per rotated channel pair.
#include "kernels/dms.cuh"

#include <climits>

#include "kernels/cuda_check.h"

namespace dmsrt {
namespace {

__global__ void RingUpdateKernel(DmsRingParams p, const int32_t* __restrict__ positions,
                                 const uint8_t* __restrict__ bits,
                                 const __nv_bfloat16* __restrict__ k,
                                 const __nv_bfloat16* __restrict__ v,
                                 const int32_t* __restrict__ spare_blocks, int32_t* lengths,
                                 int32_t* block_tables, int32_t* ring_slot, uint8_t* ring_flag,
                                 __nv_bfloat16* k_pool, __nv_bfloat16* v_pool, int32_t* pos_pool,
                                 int32_t* last_vis_pool, int32_t* status) {
  const int j = blockIdx.x, b = blockIdx.y;
  const int hs = b * p.n_kv_heads + j;
  const int ring = p.window + 1;
  const int bt = p.block_tokens;
  int32_t* table = block_tables + static_cast<size_t>(hs) * p.max_blocks_per_head;
  int32_t* rslot = ring_slot + static_cast<size_t>(hs) * ring;
  uint8_t* rflag = ring_flag + static_cast<size_t>(hs) * ring;
  __shared__ long long s_dst;  // element offset of the slot in the pools, or -1
  if (threadIdx.x == 0) {
    const int t = positions[b];
    const int idx = t % ring;
    int n = lengths[hs];
    int slot;
    int st = 0;
    bool ok = true;
    if (t >= ring && rflag[idx]) {
      slot = rslot[idx];  // the leaving token was flagged: recycle its slot
    } else {
      slot = n;
      if (n % bt == 0) {
        const int spare = spare_blocks[hs];
        if (spare < 0 || n / bt >= p.max_blocks_per_head) {
          ok = false;
        } else {
          table[n / bt] = spare;
          st = 1;
        }
      }
      if (ok) lengths[hs] = n + 1;
    }
    if (!ok) {
      status[hs] = -1;
      s_dst = -1;
    } else {
      status[hs] = st;
      if (t >= 1) {
        const int prev = (t - 1) % ring;
        const uint8_t d = bits[hs];
        rflag[prev] = d;
        const int ps = rslot[prev];
        if (last_vis_pool != nullptr && ps >= 0) {
          const size_t e = static_cast<size_t>(table[ps / bt]) * bt + ps % bt;
          last_vis_pool[e] = d ? (t - 1) + p.window : INT_MAX;
        }
      }
      rslot[idx] = slot;
      rflag[idx] = 0;
      const size_t e = static_cast<size_t>(table[slot / bt]) * bt + slot % bt;
      if (pos_pool != nullptr) pos_pool[e] = t;
      if (last_vis_pool != nullptr) last_vis_pool[e] = INT_MAX;
      s_dst = static_cast<long long>(e) * p.head_dim;
    }
  }
  __syncthreads();
  const long long dst = s_dst;
  if (dst < 0) return;
  const size_t src = static_cast<size_t>(hs) * p.head_dim;
  const int nvec = p.head_dim / 8;
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
    reinterpret_cast<uint4*>(k_pool + dst)[i] = reinterpret_cast<const uint4*>(k + src)[i];
    reinterpret_cast<uint4*>(v_pool + dst)[i] = reinterpret_cast<const uint4*>(v + src)[i];
  }
}

__global__ void BoundaryFlagKernel(DmsRingParams p, const int32_t* __restrict__ positions,
                                   const uint8_t* __restrict__ bits,
                                   const int32_t* __restrict__ block_tables,
                                   const int32_t* __restrict__ ring_slot, uint8_t* ring_flag,
                                   int32_t* last_vis_pool) {
  const int hs = blockIdx.x * blockDim.x + threadIdx.x;
  if (hs >= p.batch * p.n_kv_heads) return;
  const int b = hs / p.n_kv_heads;
  const int t = positions[b];
  if (t < 1) return;
  const int ring = p.window + 1;
  const int prev = (t - 1) % ring;
  const uint8_t d = bits[hs];
  ring_flag[static_cast<size_t>(hs) * ring + prev] = d;
  const int ps = ring_slot[static_cast<size_t>(hs) * ring + prev];
  if (last_vis_pool != nullptr && ps >= 0) {
    const int32_t* table = block_tables + static_cast<size_t>(hs) * p.max_blocks_per_head;
    last_vis_pool[static_cast<size_t>(table[ps / p.block_tokens]) * p.block_tokens +
                  ps % p.block_tokens] = d ? (t - 1) + p.window : INT_MAX;
  }
}

__global__ void RopeDmsKernel(RopeDmsParams p, const int32_t* __restrict__ positions,
                              __nv_bfloat16* q, __nv_bfloat16* k, uint8_t* bits) {
  const int head = blockIdx.x, t = blockIdx.y;
  const int half = p.head_dim / 2;
  const int i = threadIdx.x;  // pair (i, i + half)
  const bool is_q = head < p.n_heads;
  const int g = p.n_heads / p.n_kv_heads;
  __nv_bfloat16* row = is_q ? q + (static_cast<size_t>(t) * p.n_heads + head) * p.head_dim
                            : k + (static_cast<size_t>(t) * p.n_kv_heads + (head - p.n_heads)) *
                                      p.head_dim;
  const bool zero_last = p.decide && is_q && head % g == 0;
  if (i >= half) return;
  float lo = __bfloat162float(row[i]);
  float hi = __bfloat162float(row[i + half]);
  if (zero_last && i == half - 1) {
    const int j = head / g;
    const uint8_t d = hi * p.alpha_scale - p.alpha_offset > 0.f ? 1 : 0;
    if (!p.alpha_per_layer) {
      bits[static_cast<size_t>(t) * p.n_kv_heads + j] = d;
    } else if (j == 0) {
      for (int jj = 0; jj < p.n_kv_heads; ++jj) bits[static_cast<size_t>(t) * p.n_kv_heads + jj] = d;
    }
    hi = 0.f;
  }
  const double inv_freq = kernels::RopeInvFreq(p.theta, p.scaling, i, p.head_dim);
  double s, c;
  sincos(static_cast<double>(positions[t]) * inv_freq, &s, &c);
  const float cf = static_cast<float>(c), sf = static_cast<float>(s);
  float out_lo = lo * cf - hi * sf;
  float out_hi = hi * cf + lo * sf;
  if (zero_last && i == half - 1) out_hi = 0.f;
  row[i] = __float2bfloat16(out_lo);
  row[i + half] = __float2bfloat16(out_hi);
}

__global__ void ThresholdKernel(int32_t n_tokens, int32_t n_kv, const float* __restrict__ logits,
                                int32_t ld, const float* __restrict__ bias, float scale,
                                float offset, bool per_layer, uint8_t* __restrict__ bits) {
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= n_tokens * n_kv) return;
  const int t = idx / n_kv, j = idx % n_kv;
  const int c = per_layer ? 0 : j;
  const float x = logits[static_cast<size_t>(t) * ld + c] + (bias != nullptr ? bias[c] : 0.f);
  bits[idx] = x * scale - offset > 0.f ? 1 : 0;
}

}  // namespace

cudaError_t DmsRingUpdate(const DmsRingParams& p, const int32_t* positions, const uint8_t* bits,
                          const __nv_bfloat16* k, const __nv_bfloat16* v,
                          const int32_t* spare_blocks, int32_t* lengths, int32_t* block_tables,
                          int32_t* ring_slot, uint8_t* ring_flag, __nv_bfloat16* k_pool,
                          __nv_bfloat16* v_pool, int32_t* pos_pool, int32_t* last_vis_pool,
                          int32_t* status, cudaStream_t stream) {
  if (p.batch <= 0 || p.n_kv_heads <= 0 || p.window < 1 || p.block_tokens <= 0 ||
      p.max_blocks_per_head <= 0 || p.head_dim <= 0 || p.head_dim % 8 != 0) {
    return cudaErrorInvalidValue;
  }
  dim3 grid(p.n_kv_heads, p.batch);
  RingUpdateKernel<<<grid, 32, 0, stream>>>(p, positions, bits, k, v, spare_blocks, lengths,
                                            block_tables, ring_slot, ring_flag, k_pool, v_pool,
                                            pos_pool, last_vis_pool, status);
  DMSRT_LAUNCH_CHECK(stream);
  return cudaSuccess;
}

cudaError_t DmsApplyBoundaryFlag(const DmsRingParams& p, const int32_t* positions,
                                 const uint8_t* bits, const int32_t* block_tables,
                                 const int32_t* ring_slot, uint8_t* ring_flag,
                                 int32_t* last_vis_pool, cudaStream_t stream) {
  if (p.batch <= 0 || p.n_kv_heads <= 0 || p.window < 1 || p.block_tokens <= 0 ||
      p.max_blocks_per_head <= 0) {
    return cudaErrorInvalidValue;
  }
  const int total = p.batch * p.n_kv_heads;
  BoundaryFlagKernel<<<(total + 127) / 128, 128, 0, stream>>>(p, positions, bits, block_tables,
                                                             ring_slot, ring_flag, last_vis_pool);
  DMSRT_LAUNCH_CHECK(stream);
  return cudaSuccess;
}

cudaError_t RopeDmsVariantA(const RopeDmsParams& p, const int32_t* positions, __nv_bfloat16* q,
                            __nv_bfloat16* k, uint8_t* bits, cudaStream_t stream) {
  if (p.n_tokens <= 0 || p.n_kv_heads <= 0 || p.n_heads % p.n_kv_heads != 0 ||
      p.head_dim <= 0 || p.head_dim % 2 != 0 || p.head_dim > 2048 ||
      (p.decide && bits == nullptr)) {
    return cudaErrorInvalidValue;
  }
  dim3 grid(p.n_heads + (k != nullptr ? p.n_kv_heads : 0), p.n_tokens);
  const int threads = ((p.head_dim / 2) + 31) / 32 * 32;
  RopeDmsKernel<<<grid, threads, 0, stream>>>(p, positions, q, k, bits);
  DMSRT_LAUNCH_CHECK(stream);
  return cudaSuccess;
}

cudaError_t DmsThreshold(int32_t n_tokens, int32_t n_kv_heads, const float* logits, int32_t ld,
                         const float* bias, float alpha_scale, float alpha_offset,
                         bool alpha_per_layer, uint8_t* bits, cudaStream_t stream) {
  if (n_tokens <= 0 || n_kv_heads <= 0 || ld < (alpha_per_layer ? 1 : n_kv_heads)) {
    return cudaErrorInvalidValue;
  }
  const int total = n_tokens * n_kv_heads;
  ThresholdKernel<<<(total + 255) / 256, 256, 0, stream>>>(n_tokens, n_kv_heads, logits, ld, bias,
                                                           alpha_scale, alpha_offset,
                                                           alpha_per_layer, bits);
  DMSRT_LAUNCH_CHECK(stream);
  return cudaSuccess;
}

}  // namespace dmsrt
