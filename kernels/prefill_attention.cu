// Prefill attention with DMS visibility; see prefill_attention.cuh for the contract.
//
// CTA = 4 warps = 32 queries of one query head. Per key tile (64 keys of the head's KV group):
// the tile's K and V rows go to shared memory (rows padded by one 4-byte word so that 32 lanes
// reading 32 different rows hit 32 banks), each warp owns 8 query rows; a lane scores keys
// `lane` and `lane+32` of the tile against the row's query (broadcast from shared memory), the
// warp updates the row's running max and sum, and each lane accumulates head_dim/32 output
// channels. Old survivors come first (slot order), then the chunk's keys up to the CTA's last
// query (causal bound), so no tile beyond the diagonal is loaded.
#include "kernels/prefill_attention.cuh"

#include <climits>
#include <cmath>

#include "kernels/common.cuh"
#include "kernels/cuda_check.h"

namespace dmsrt {
namespace {

using cuda_detail::kLog2e;

constexpr int kThreads = 128;
constexpr int kRows = 32;          // queries per CTA
constexpr int kRowsPerWarp = 8;
constexpr int kTile = 64;          // keys per tile

template <int D>
constexpr int PaddedWords() { return D / 2 + 1; }

template <int D>
constexpr size_t SmemBytes() {
  return sizeof(float) * kRows * D + 2 * sizeof(uint32_t) * kTile * PaddedWords<D>() +
         2 * sizeof(int32_t) * kTile;
}

template <int D>
__global__ void __launch_bounds__(kThreads)
PrefillKernel(PrefillAttentionParams p, const __nv_bfloat16* __restrict__ q,
              const __nv_bfloat16* __restrict__ k_new, const __nv_bfloat16* __restrict__ v_new,
              const int32_t* __restrict__ last_vis_new, const __nv_bfloat16* __restrict__ k_pool,
              const __nv_bfloat16* __restrict__ v_pool, const int32_t* __restrict__ pos_pool,
              const int32_t* __restrict__ last_vis_pool, const int32_t* __restrict__ block_table,
              const int32_t* __restrict__ old_lengths, __nv_bfloat16* __restrict__ out) {
  constexpr int kW = PaddedWords<D>();
  constexpr int kPerLane = D / 32;
  extern __shared__ __align__(16) unsigned char smem[];
  float* sq = reinterpret_cast<float*>(smem);                       // [kRows][D]
  uint32_t* sk = reinterpret_cast<uint32_t*>(sq + kRows * D);       // [kTile][kW]
  uint32_t* sv = sk + kTile * kW;                                   // [kTile][kW]
  int32_t* spos = reinterpret_cast<int32_t*>(sv + kTile * kW);      // [kTile]
  int32_t* slast = spos + kTile;                                    // [kTile]

  const int h = blockIdx.y;
  const int g = p.n_heads / p.n_kv_heads;
  const int kvh = h / g;
  const int q0 = blockIdx.x * kRows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int n = p.n_queries;
  const int n_old = old_lengths[kvh];
  const int q_last = min(n, q0 + kRows) - 1;  // last query of this CTA (chunk index)
  const int n_keys = n_old + q_last + 1;      // old survivors + chunk keys up to q_last
  const int32_t* table = block_table + static_cast<size_t>(kvh) * p.max_blocks_per_head;
  const int bt = p.block_tokens;

  // Queries of this CTA, scaled into base-2 units. Rows past the chunk are zero and unused.
  const float qscale = p.scale * kLog2e;
  for (int idx = threadIdx.x; idx < kRows * D; idx += kThreads) {
    const int r = idx / D, d = idx % D;
    const int qi = q0 + r;
    sq[idx] = qi < n ? __bfloat162float(q[(static_cast<size_t>(qi) * p.n_heads + h) * D + d]) * qscale
                     : 0.f;
  }

  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][kPerLane];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) acc[r][i] = 0.f;
  }

  for (int kt = 0; kt < n_keys; kt += kTile) {
    __syncthreads();  // previous tile fully consumed (and sq written on the first pass)
    // Load the tile: 16-byte global reads, 4-byte shared stores into padded rows.
    constexpr int kVecPerRow = D / 8;
    for (int idx = threadIdx.x; idx < kTile * kVecPerRow; idx += kThreads) {
      const int j = idx / kVecPerRow, c = idx % kVecPerRow;
      const int key = kt + j;
      uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
      if (key < n_keys) {
        size_t off;
        const __nv_bfloat16 *kb, *vb;
        if (key < n_old) {
          const int blk = table[key / bt];
          off = (static_cast<size_t>(blk) * bt + key % bt) * D;
          kb = k_pool;
          vb = v_pool;
        } else {
          off = (static_cast<size_t>(key - n_old) * p.n_kv_heads + kvh) * D;
          kb = k_new;
          vb = v_new;
        }
        kv = cuda_detail::LoadU4(kb + off + c * 8);
        vv = cuda_detail::LoadU4(vb + off + c * 8);
      }
      uint32_t* kd = sk + j * kW + c * 4;
      uint32_t* vd = sv + j * kW + c * 4;
      kd[0] = kv.x; kd[1] = kv.y; kd[2] = kv.z; kd[3] = kv.w;
      vd[0] = vv.x; vd[1] = vv.y; vd[2] = vv.z; vd[3] = vv.w;
    }
    for (int j = threadIdx.x; j < kTile; j += kThreads) {
      const int key = kt + j;
      int pos = INT_MAX, last = INT_MIN;  // invisible by default
      if (key < n_old) {
        const int blk = table[key / bt];
        const size_t s = static_cast<size_t>(blk) * bt + key % bt;
        pos = pos_pool[s];
        last = last_vis_pool[s];
      } else if (key < n_keys) {
        pos = p.q_pos0 + (key - n_old);
        last = last_vis_new[static_cast<size_t>(key - n_old) * p.n_kv_heads + kvh];
      }
      spos[j] = pos;
      slast[j] = last;
    }
    __syncthreads();

    const int pos_a = spos[lane], pos_b = spos[lane + 32];
    const int last_a = slast[lane], last_b = slast[lane + 32];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int row = warp * kRowsPerWarp + r;
      const int qi = q0 + row;
      if (q0 + warp * kRowsPerWarp >= n) break;  // warp-uniform: whole warp past the chunk
      const int qpos = p.q_pos0 + qi;
      const float* qr = sq + row * D;
      float sa = 0.f, sb = 0.f;
      const uint32_t* ka = sk + lane * kW;
      const uint32_t* kb = sk + (lane + 32) * kW;
#pragma unroll 8
      for (int w = 0; w < D / 2; ++w) {
        const float q_lo = qr[2 * w], q_hi = qr[2 * w + 1];
        const uint32_t a = ka[w], b = kb[w];
        sa = fmaf(q_lo, __uint_as_float(a << 16), sa);
        sa = fmaf(q_hi, __uint_as_float(a & 0xffff0000u), sa);
        sb = fmaf(q_lo, __uint_as_float(b << 16), sb);
        sb = fmaf(q_hi, __uint_as_float(b & 0xffff0000u), sb);
      }
      const bool valid_row = qi < n;
      const bool va = valid_row && pos_a <= qpos && qpos <= last_a;
      const bool vb = valid_row && pos_b <= qpos && qpos <= last_b;
      sa = va ? sa : -INFINITY;
      sb = vb ? sb : -INFINITY;
      const float tmax = cuda_detail::WarpMax<32>(fmaxf(sa, sb));
      const float m_new = fmaxf(m[r], tmax);
      if (m_new == -INFINITY) continue;  // nothing visible yet for this row (warp-uniform)
      const float c = exp2f(m[r] - m_new);
      const float pa = va ? exp2f(sa - m_new) : 0.f;
      const float pb = vb ? exp2f(sb - m_new) : 0.f;
      l[r] = l[r] * c + cuda_detail::WarpSum<32>(pa + pb);
      m[r] = m_new;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) acc[r][i] *= c;
      // Lane owns the bf16 pairs (words) lane + 32*i: channels 2w and 2w+1.
#pragma unroll 4
      for (int j = 0; j < 32; ++j) {
        const float pj_a = __shfl_sync(0xffffffffu, pa, j);
        const float pj_b = __shfl_sync(0xffffffffu, pb, j);
        const uint32_t* va_row = sv + j * kW;
        const uint32_t* vb_row = sv + (j + 32) * kW;
#pragma unroll
        for (int i = 0; i < kPerLane / 2; ++i) {
          const int w = lane + 32 * i;  // word index: channels 2w, 2w+1
          const uint32_t x = va_row[w], y = vb_row[w];
          acc[r][2 * i] = fmaf(pj_a, __uint_as_float(x << 16), acc[r][2 * i]);
          acc[r][2 * i + 1] = fmaf(pj_a, __uint_as_float(x & 0xffff0000u), acc[r][2 * i + 1]);
          acc[r][2 * i] = fmaf(pj_b, __uint_as_float(y << 16), acc[r][2 * i]);
          acc[r][2 * i + 1] = fmaf(pj_b, __uint_as_float(y & 0xffff0000u), acc[r][2 * i + 1]);
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int qi = q0 + warp * kRowsPerWarp + r;
    if (qi >= n) break;
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
    __nv_bfloat16* o = out + (static_cast<size_t>(qi) * p.n_heads + h) * D;
#pragma unroll
    for (int i = 0; i < kPerLane / 2; ++i) {
      const int w = lane + 32 * i;
      *reinterpret_cast<__nv_bfloat162*>(o + 2 * w) =
          __floats2bfloat162_rn(acc[r][2 * i] * inv, acc[r][2 * i + 1] * inv);
    }
  }
}

template <int D>
cudaError_t Launch(const PrefillAttentionParams& p, const __nv_bfloat16* q,
                   const __nv_bfloat16* k_new, const __nv_bfloat16* v_new,
                   const int32_t* last_vis_new, const __nv_bfloat16* k_pool,
                   const __nv_bfloat16* v_pool, const int32_t* pos_pool,
                   const int32_t* last_vis_pool, const int32_t* block_table,
                   const int32_t* old_lengths, __nv_bfloat16* out, cudaStream_t stream) {
  constexpr size_t smem = SmemBytes<D>();
  DMSRT_CUDA_TRY(cudaFuncSetAttribute(PrefillKernel<D>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  dim3 grid((p.n_queries + kRows - 1) / kRows, p.n_heads);
  PrefillKernel<D><<<grid, kThreads, smem, stream>>>(p, q, k_new, v_new, last_vis_new, k_pool,
                                                     v_pool, pos_pool, last_vis_pool,
                                                     block_table, old_lengths, out);
  DMSRT_LAUNCH_CHECK(stream);
  return cudaSuccess;
}

}  // namespace

cudaError_t PrefillAttention(const PrefillAttentionParams& p, const __nv_bfloat16* q,
                             const __nv_bfloat16* k_new, const __nv_bfloat16* v_new,
                             const int32_t* last_vis_new, const __nv_bfloat16* k_pool,
                             const __nv_bfloat16* v_pool, const int32_t* pos_pool,
                             const int32_t* last_vis_pool, const int32_t* block_table,
                             const int32_t* old_lengths, __nv_bfloat16* out,
                             cudaStream_t stream) {
  if (p.n_queries <= 0 || p.n_kv_heads <= 0 || p.n_heads % p.n_kv_heads != 0 ||
      p.block_tokens <= 0 || p.max_blocks_per_head <= 0 || p.q_pos0 < 0) {
    return cudaErrorInvalidValue;
  }
  switch (p.head_dim) {
    case 64: return Launch<64>(p, q, k_new, v_new, last_vis_new, k_pool, v_pool, pos_pool, last_vis_pool, block_table, old_lengths, out, stream);
    case 128: return Launch<128>(p, q, k_new, v_new, last_vis_new, k_pool, v_pool, pos_pool, last_vis_pool, block_table, old_lengths, out, stream);
    case 256: return Launch<256>(p, q, k_new, v_new, last_vis_new, k_pool, v_pool, pos_pool, last_vis_pool, block_table, old_lengths, out, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace dmsrt
