// Flash-decoding over the per-head paged store; see decode_attention.cuh for the contract.
//
// CTA = 4 warps = one (sequence, KV head, split). A "row group" of D/8 lanes reads one key row
// with 16-byte loads (8 bf16 per lane); D=128 gives 8 row groups per CTA. Each row group keeps an
// online softmax (max, sum, accumulator) for every query head of the GQA group, so K and V are
// read from device memory exactly once per step. kUnroll rows per group are loaded before the
// first is used (2*kUnroll 16-byte loads in flight per thread) and the running softmax is
// rescaled once per such chunk, not once per row. Block ids are staged in shared memory per
// window of slots so that the K/V loads never wait on a dependent table load. (A variant that
// also prefetched the next chunk in registers ran slower on an H100: 164 instead of 128
// registers for g = 4 cost occupancy; see docs/perf-gpu-notes.md.) At the end the row groups
// merge through shared memory; with several splits a second kernel merges the CTAs by their
// log-sum-exp (all exponentials in base 2, the scale folded into q).
#include "kernels/decode_attention.cuh"

#include <algorithm>
#include <cmath>

#include "kernels/common.cuh"
#include "kernels/cuda_check.h"

namespace dmsrt {
namespace {

using cuda_detail::Bf16x8ToFloat;
using cuda_detail::kLog2e;
using cuda_detail::LoadU4;

constexpr int kThreads = 128;
constexpr int kUnroll = 4;

template <int D>
constexpr int RowGroups() { return (kThreads / 32) * (32 / (D / 8)); }

// Loads the K and V rows of one chunk (kUnroll rows of this row group); rows past t1 read as 0.
// `s_table` holds the block ids first_blk, first_blk+1, ... of the current window.
template <int D>
__device__ __forceinline__ void LoadChunk(int base, int t1, int grp, int sub, int bt, int bt_shift,
                                          const int32_t* s_table, int first_blk,
                                          const __nv_bfloat16* __restrict__ k_pool,
                                          const __nv_bfloat16* __restrict__ v_pool, uint4* kr,
                                          uint4* vr) {
  constexpr int kGroups = RowGroups<D>();
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int t = base + u * kGroups + grp;
    if (t < t1) {
      int blk_i, in_blk;
      if (bt_shift >= 0) {
        blk_i = t >> bt_shift;
        in_blk = t & (bt - 1);
      } else {
        blk_i = t / bt;
        in_blk = t - blk_i * bt;
      }
      const size_t off = (static_cast<size_t>(s_table[blk_i - first_blk]) * bt + in_blk) * D + sub * 8;
      kr[u] = LoadU4(k_pool + off);
      vr[u] = LoadU4(v_pool + off);
    } else {
      kr[u] = make_uint4(0, 0, 0, 0);
      vr[u] = make_uint4(0, 0, 0, 0);
    }
  }
}

template <int D, int G>
__global__ void __launch_bounds__(kThreads)
DecodeSplitKernel(DecodeAttentionParams p, int32_t split_tokens, int32_t num_splits,
                  const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k_pool,
                  const __nv_bfloat16* __restrict__ v_pool, const int32_t* __restrict__ tables,
                  const int32_t* __restrict__ lengths, __nv_bfloat16* __restrict__ out,
                  float* __restrict__ ws_o, float* __restrict__ ws_lse) {
  constexpr int kLanes = D / 8;           // lanes per key row
  constexpr int kGroups = RowGroups<D>();  // row groups per CTA
  const int split = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  const int g = p.n_heads / p.n_kv_heads;
  const int head_slot = b * p.n_kv_heads + kvh;
  const int len = lengths[head_slot];
  const int t0 = split * split_tokens;
  const int t1 = min(len, t0 + split_tokens);
  const int lane = threadIdx.x % 32;
  const int grp = (threadIdx.x / 32) * (32 / kLanes) + lane / kLanes;
  const int sub = lane % kLanes;
  const int bt = p.block_tokens;
  const int table_row = p.table_rows != nullptr ? p.table_rows[b] : b;
  const int32_t* table =
      tables + (static_cast<size_t>(table_row) * p.n_kv_heads + kvh) * p.max_blocks_per_head;

  // q of the group's heads, pre-scaled so that scores are in base-2 log units.
  float qf[G][8];
  const float qscale = p.scale * kLog2e;
#pragma unroll
  for (int h = 0; h < G; ++h) {
    if (h < g) {
      const uint4 raw = LoadU4(q + (static_cast<size_t>(b) * p.n_heads + kvh * g + h) * D + sub * 8);
      Bf16x8ToFloat(raw, qf[h]);
#pragma unroll
      for (int i = 0; i < 8; ++i) qf[h][i] *= qscale;
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) qf[h][i] = 0.f;
    }
  }
  float m[G], l[G], acc[G][8];
#pragma unroll
  for (int h = 0; h < G; ++h) {
    m[h] = -INFINITY;
    l[h] = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[h][i] = 0.f;
  }

  // Block index of slot t: a shift and a mask when block_tokens is a power of two (the usual
  // case), a division otherwise.
  const int bt_shift = (bt & (bt - 1)) == 0 ? __ffs(bt) - 1 : -1;

  // The slots of the split are walked in windows; each window's block ids are staged in shared
  // memory first, so the K/V loads of a chunk do not wait behind a dependent block-table load.
  // Loop bounds are uniform across the CTA (barriers) and the warp (shuffles).
  constexpr int kStep = kGroups * kUnroll;
  constexpr int kTableWindow = 512;
  __shared__ int32_t s_table[kTableWindow];
  const int window_tokens = max(kStep, ((kTableWindow - 2) * bt) / kStep * kStep);
  for (int w0 = t0; w0 < t1; w0 += window_tokens) {
    const int w1 = min(t1, w0 + window_tokens);
    const int first_blk = w0 / bt, last_blk = (w1 - 1) / bt;
    __syncthreads();
    for (int i = threadIdx.x; i <= last_blk - first_blk; i += kThreads) s_table[i] = table[first_blk + i];
    __syncthreads();
    for (int base = w0; base < w1; base += kStep) {
      bool valid[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) valid[u] = base + u * kGroups + grp < w1;
      uint4 kr[kUnroll], vr[kUnroll];
      LoadChunk<D>(base, w1, grp, sub, bt, bt_shift, s_table, first_blk, k_pool, v_pool, kr, vr);
      // Scores of the kUnroll rows for every head of the group.
      float s[kUnroll][G];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        float kf[8];
        Bf16x8ToFloat(kr[u], kf);
#pragma unroll
        for (int h = 0; h < G; ++h) {
          float acc_s = 0.f;
#pragma unroll
          for (int i = 0; i < 8; ++i) acc_s = fmaf(qf[h][i], kf[i], acc_s);
          s[u][h] = cuda_detail::WarpSum<kLanes>(acc_s);
        }
      }
      // One rescale per chunk of kUnroll rows (rows are in increasing t, so valid[0] is false
      // only when the whole chunk is past the end for this row group).
      if (valid[0]) {
#pragma unroll
        for (int h = 0; h < G; ++h) {
          float mx = m[h];
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) mx = valid[u] ? fmaxf(mx, s[u][h]) : mx;
          const float c = exp2f(m[h] - mx);
          m[h] = mx;
          float lsum = l[h] * c;
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            s[u][h] = valid[u] ? exp2f(s[u][h] - mx) : 0.f;  // s now holds the weights p
            lsum += s[u][h];
          }
          l[h] = lsum;
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[h][i] *= c;
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          float vf[8];
          Bf16x8ToFloat(vr[u], vf);
#pragma unroll
          for (int h = 0; h < G; ++h) {
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[h][i] = fmaf(s[u][h], vf[i], acc[h][i]);
          }
        }
      }
    }
  }

  // Merge the row groups of this CTA.
  __shared__ float sm_m[kGroups][G];
  __shared__ float sm_l[kGroups][G];
  __shared__ float sm_acc[kGroups][G][D];
#pragma unroll
  for (int h = 0; h < G; ++h) {
    if (sub == 0) {
      sm_m[grp][h] = m[h];
      sm_l[grp][h] = l[h];
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) sm_acc[grp][h][sub * 8 + i] = acc[h][i];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < g * D; idx += kThreads) {
    const int h = idx / D, d = idx % D;
    float mx = -INFINITY;
#pragma unroll
    for (int r = 0; r < kGroups; ++r) mx = fmaxf(mx, sm_m[r][h]);
    float lsum = 0.f, a = 0.f;
    if (mx != -INFINITY) {
#pragma unroll
      for (int r = 0; r < kGroups; ++r) {
        const float w = exp2f(sm_m[r][h] - mx);
        lsum += sm_l[r][h] * w;
        a += sm_acc[r][h][d] * w;
      }
    }
    const float o = lsum > 0.f ? a / lsum : 0.f;
    const size_t row = static_cast<size_t>(b) * p.n_heads + kvh * g + h;
    if (num_splits == 1) {
      out[row * D + d] = __float2bfloat16(o);
    } else {
      const size_t prow = row * num_splits + split;
      ws_o[prow * D + d] = o;
      if (d == 0) ws_lse[prow] = lsum > 0.f ? mx + log2f(lsum) : -INFINITY;
    }
  }
}

// One CTA per (query head, sequence): out = Σ_s 2^(lse_s - M) o_s / Σ_s 2^(lse_s - M).
template <int D>
__global__ void DecodeMergeKernel(int32_t n_heads, int32_t num_splits,
                                  const float* __restrict__ ws_o,
                                  const float* __restrict__ ws_lse,
                                  __nv_bfloat16* __restrict__ out) {
  const size_t row = static_cast<size_t>(blockIdx.y) * n_heads + blockIdx.x;
  const float* lse = ws_lse + row * num_splits;
  float mx = -INFINITY;
  for (int s = 0; s < num_splits; ++s) mx = fmaxf(mx, lse[s]);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float wsum = 0.f, a = 0.f;
    if (mx != -INFINITY) {
      for (int s = 0; s < num_splits; ++s) {
        const float w = exp2f(lse[s] - mx);
        wsum += w;
        a += w * ws_o[(row * num_splits + s) * D + d];
      }
    }
    out[row * D + d] = __float2bfloat16(wsum > 0.f ? a / wsum : 0.f);
  }
}

template <int D, int G>
cudaError_t LaunchSplit(const DecodeAttentionParams& p, int32_t split, int32_t num_splits,
                        const __nv_bfloat16* q, const __nv_bfloat16* k_pool,
                        const __nv_bfloat16* v_pool, const int32_t* tables,
                        const int32_t* lengths, __nv_bfloat16* out, float* ws_o, float* ws_lse,
                        cudaStream_t stream) {
  dim3 grid(num_splits, p.n_kv_heads, p.batch);
  DecodeSplitKernel<D, G><<<grid, kThreads, 0, stream>>>(p, split, num_splits, q, k_pool, v_pool,
                                                         tables, lengths, out, ws_o, ws_lse);
  DMSRT_LAUNCH_CHECK(stream);
  if (num_splits > 1) {
    dim3 mgrid(p.n_heads, p.batch);
    DecodeMergeKernel<D><<<mgrid, std::min(D, 128), 0, stream>>>(p.n_heads, num_splits, ws_o,
                                                                 ws_lse, out);
    DMSRT_LAUNCH_CHECK(stream);
  }
  return cudaSuccess;
}

template <int D>
cudaError_t DispatchGroup(const DecodeAttentionParams& p, int32_t split, int32_t num_splits,
                          const __nv_bfloat16* q, const __nv_bfloat16* k_pool,
                          const __nv_bfloat16* v_pool, const int32_t* tables,
                          const int32_t* lengths, __nv_bfloat16* out, float* ws_o,
                          float* ws_lse, cudaStream_t stream) {
  const int g = p.n_heads / p.n_kv_heads;
  if (g == 1) return LaunchSplit<D, 1>(p, split, num_splits, q, k_pool, v_pool, tables, lengths, out, ws_o, ws_lse, stream);
  if (g == 2) return LaunchSplit<D, 2>(p, split, num_splits, q, k_pool, v_pool, tables, lengths, out, ws_o, ws_lse, stream);
  if (g <= 4) return LaunchSplit<D, 4>(p, split, num_splits, q, k_pool, v_pool, tables, lengths, out, ws_o, ws_lse, stream);
  return LaunchSplit<D, 8>(p, split, num_splits, q, k_pool, v_pool, tables, lengths, out, ws_o, ws_lse, stream);
}

}  // namespace

cudaError_t DecodeAttention(const DecodeAttentionParams& p, const __nv_bfloat16* q,
                            const __nv_bfloat16* k_pool, const __nv_bfloat16* v_pool,
                            const int32_t* block_tables, const int32_t* lengths,
                            __nv_bfloat16* out, void* workspace, size_t workspace_bytes,
                            int32_t num_sms, cudaStream_t stream) {
  if (p.batch <= 0 || p.n_kv_heads <= 0 || p.n_heads % p.n_kv_heads != 0 ||
      p.n_heads / p.n_kv_heads > 8 || p.block_tokens <= 0 || p.max_blocks_per_head <= 0 ||
      p.max_length < 0 || p.max_length > p.block_tokens * p.max_blocks_per_head) {
    return cudaErrorInvalidValue;
  }
  const int32_t split = DecodeAttentionResolveSplit(p, num_sms);
  const int32_t num_splits = DecodeAttentionNumSplits(p, num_sms);
  if (workspace_bytes < DecodeAttentionWorkspaceSize(p, num_sms)) return cudaErrorInvalidValue;
  float* ws_o = static_cast<float*>(workspace);
  float* ws_lse = num_splits > 1
                      ? ws_o + static_cast<size_t>(p.batch) * p.n_heads * num_splits * p.head_dim
                      : nullptr;
  switch (p.head_dim) {
    case 64: return DispatchGroup<64>(p, split, num_splits, q, k_pool, v_pool, block_tables, lengths, out, ws_o, ws_lse, stream);
    case 128: return DispatchGroup<128>(p, split, num_splits, q, k_pool, v_pool, block_tables, lengths, out, ws_o, ws_lse, stream);
    case 256: return DispatchGroup<256>(p, split, num_splits, q, k_pool, v_pool, block_tables, lengths, out, ws_o, ws_lse, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace dmsrt
