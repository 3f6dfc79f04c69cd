// Prefill (chunk) attention with DMS visibility, flash-attention style.
//
// The queries of one chunk of one sequence, positions q_pos0 .. q_pos0+n-1, attend over
//   * the older survivors of each KV head: paged slots with their absolute position and their
//     last visible query position (pos + w if flagged, INT32_MAX otherwise), and
//   * the chunk's own keys (position q_pos0 + i, last visible bound given per key),
// with the rule of docs/dms-semantics.md §3: key visible to query iff
//   k_pos <= q_pos  and  q_pos <= last_visible(k).
// Keys are tiled through shared memory with an online softmax (no score matrix in memory);
// all exponentials in base 2.
//
//   q              [n, n_heads, head_dim]          bf16, after RoPE
//   k_new, v_new   [n, n_kv_heads, head_dim]       bf16
//   last_vis_new   [n, n_kv_heads]                 int32
//   k_pool/v_pool  [num_blocks, block_tokens, head_dim]
//   pos_pool       [num_blocks, block_tokens]      int32 absolute position of each slot
//   last_vis_pool  [num_blocks, block_tokens]      int32 last visible query position
//   block_table    [n_kv_heads, max_blocks_per_head]
//   old_lengths    [n_kv_heads]                    int32 resident slots before the chunk
//   out            [n, n_heads, head_dim]          bf16
// head_dim 64, 128 or 256. Allocates nothing; dynamic shared memory is raised as needed.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace dmsrt {

struct PrefillAttentionParams {
  int32_t n_queries = 0;
  int32_t q_pos0 = 0;
  int32_t n_heads = 0;
  int32_t n_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t block_tokens = 0;
  int32_t max_blocks_per_head = 0;
  float scale = 0.f;
};

cudaError_t PrefillAttention(const PrefillAttentionParams& p, const __nv_bfloat16* q,
                             const __nv_bfloat16* k_new, const __nv_bfloat16* v_new,
                             const int32_t* last_vis_new, const __nv_bfloat16* k_pool,
                             const __nv_bfloat16* v_pool, const int32_t* pos_pool,
                             const int32_t* last_vis_pool, const int32_t* block_table,
                             const int32_t* old_lengths, __nv_bfloat16* out,
                             cudaStream_t stream);

}  // namespace dmsrt
