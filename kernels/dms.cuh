// DMS on the device: the per-head ring bookkeeping with the K/V slot write of a decode step, the
// Variant A decision extraction fused with RoPE, and the Variant B threshold.
// Semantics: docs/dms-semantics.md §1, §2, §4.
//
// ---- Ring update + slot write (one decode token per sequence, one layer) ------------------
// Per (sequence b, KV head j) the device holds
//   lengths      [batch, n_kv]                 n: resident slots (in/out)
//   block_tables [batch, n_kv, max_blocks]     block ids of slots 0..n-1 (in/out: one entry may
//                                              be appended)
//   ring_slot    [batch, n_kv, w+1]  int32     slot of token t is at index t % (w+1)
//   ring_flag    [batch, n_kv, w+1]  uint8     flag of that token
// Inputs of the step:
//   positions    [batch]           t, the new token's absolute position (tokens seen before it)
//   bits         [batch, n_kv]     d[t] (1 = evict), flags token t-1 (ignored when t == 0)
//   k, v         [batch, n_kv, head_dim]  the new token's key (after RoPE) and value
//   spare_blocks [batch, n_kv]     a free block id the kernel may take, or -1
// Data contract for new blocks: the host cannot know whether the leaving token was flagged
// (flags live on the device), so for every head whose n is a multiple of block_tokens it passes
// one free block in spare_blocks (the host knows an upper bound of n: n only grows, by at most
// one per step). The kernel reports per head in status [batch, n_kv]:
//    0  written into a recycled slot or into the current block (spare not used)
//    1  appended into a new block: spare_blocks[b,j] is now block_tables[b,j,n/bt]
//   -1  an append needed a new block and spare was -1, or the table is full: NOTHING changed for
//       that head (the host must supply a block and rerun the step for it)
// The host reads status back (batch*n_kv int32) to return unused spares to its free list.
// Optional per-slot metadata pools (nullptr to skip), parallel to the K/V pools, are kept
// up to date for prefill attention after decode:
//   pos_pool, last_vis_pool [num_blocks, block_tokens]  position, and pos+w if flagged else
//   INT32_MAX.
// w must be >= 1.
//
// ---- RoPE (+ Variant A decisions) ----------------------------------------------------------
//   q [n, n_heads, head_dim] after q_norm, k [n, n_kv, head_dim]: rotated in place (rotate-half,
//   inv_freq_i = theta^(-2i/head_dim) with the frequency scaling of kernels/reference/rope_freq.h,
//   angle = position * inv_freq_i, computed in double).
// With decide: for KV head j, query head j*g channel head_dim-1 gives
//   bits[t, j] = q * alpha_scale - alpha_offset > 0, then the channel is zeroed before and after
//   the rotation. alpha_per_layer copies KV head 0's bit to every head.
//
// ---- Variant B threshold -------------------------------------------------------------------
//   logits [n, ld] fp32 (first n_kv columns used) -> bits [n, n_kv].
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/reference/rope_freq.h"

namespace dmsrt {

struct DmsRingParams {
  int32_t batch = 0;
  int32_t n_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t window = 0;  // w
  int32_t block_tokens = 0;
  int32_t max_blocks_per_head = 0;
};

cudaError_t DmsRingUpdate(const DmsRingParams& p, const int32_t* positions, const uint8_t* bits,
                          const __nv_bfloat16* k, const __nv_bfloat16* v,
                          const int32_t* spare_blocks, int32_t* lengths, int32_t* block_tables,
                          int32_t* ring_slot, uint8_t* ring_flag, __nv_bfloat16* k_pool,
                          __nv_bfloat16* v_pool, int32_t* pos_pool, int32_t* last_vis_pool,
                          int32_t* status, cudaStream_t stream);

// Step 2 alone, for the first token t of a prefill chunk, BEFORE the chunk's attention: flags
// token t-1 (the last token of the previous chunk) with d[t] in the ring and in last_vis_pool,
// so that the chunk's queries see it only up to t-1+w (docs/dms-semantics.md §5). The ring
// update of token t repeats the same write later (idempotent). Does nothing when t == 0.
cudaError_t DmsApplyBoundaryFlag(const DmsRingParams& p, const int32_t* positions,
                                 const uint8_t* bits, const int32_t* block_tables,
                                 const int32_t* ring_slot, uint8_t* ring_flag,
                                 int32_t* last_vis_pool, cudaStream_t stream);

struct RopeDmsParams {
  int32_t n_tokens = 0;
  int32_t n_heads = 0;
  int32_t n_kv_heads = 0;
  int32_t head_dim = 0;
  float theta = 10000.f;
  kernels::RopeScalingParams scaling;  // frequency scaling (kernels/reference/rope_freq.h)
  bool decide = false;  // Variant A decisions and zeroing
  float alpha_scale = 100.f;
  float alpha_offset = 5.f;
  bool alpha_per_layer = false;
};

cudaError_t RopeDmsVariantA(const RopeDmsParams& p, const int32_t* positions, __nv_bfloat16* q,
                            __nv_bfloat16* k, uint8_t* bits, cudaStream_t stream);

// `bias` (nullable) [ld] fp32 is added to each row of logits first (an adapter with a bias).
cudaError_t DmsThreshold(int32_t n_tokens, int32_t n_kv_heads, const float* logits, int32_t ld,
                         const float* bias, float alpha_scale, float alpha_offset,
                         bool alpha_per_layer, uint8_t* bits, cudaStream_t stream);

}  // namespace dmsrt
