// Plain C++ references of the CUDA attention kernels (kernels/decode_attention.cuh,
// kernels/prefill_attention.cuh): same data layout, float inputs, double accumulation.
#pragma once

#include <cstdint>

namespace dmsrt {
namespace kernels {

// Decode: q [batch, n_heads, D], k_pool/v_pool [num_blocks, block_tokens, D],
// block_tables [batch, n_kv, max_blocks], lengths [batch, n_kv], out [batch, n_heads, D].
// A head with length 0 gives a zero output.
void DecodeAttentionRef(int32_t batch, int32_t n_heads, int32_t n_kv_heads, int32_t head_dim,
                        int32_t block_tokens, int32_t max_blocks_per_head, float scale,
                        const float* q, const float* k_pool, const float* v_pool,
                        const int32_t* block_tables, const int32_t* lengths, float* out);

// Decode attention weights per slot (kernels/slot_weights.cuh): out [batch, n_kv, ld], for each
// (b, j) the mean over the group's query heads of the softmax weight of slot s < min(len, ld).
void DecodeSlotWeightsRef(int32_t batch, int32_t n_heads, int32_t n_kv_heads, int32_t head_dim,
                          int32_t block_tokens, int32_t max_blocks_per_head, float scale,
                          const float* q, const float* k_pool, const int32_t* block_tables,
                          const int32_t* lengths, float* out, int32_t ld);

// Prefill with DMS visibility (key visible iff k_pos <= q_pos <= last_visible(k)):
// q [n, n_heads, D], k_new/v_new [n, n_kv, D], last_vis_new [n, n_kv],
// pools as above plus pos_pool/last_vis_pool [num_blocks, block_tokens],
// block_table [n_kv, max_blocks], old_lengths [n_kv], out [n, n_heads, D].
void PrefillAttentionRef(int32_t n, int32_t q_pos0, int32_t n_heads, int32_t n_kv_heads,
                         int32_t head_dim, int32_t block_tokens, int32_t max_blocks_per_head,
                         float scale, const float* q, const float* k_new, const float* v_new,
                         const int32_t* last_vis_new, const float* k_pool, const float* v_pool,
                         const int32_t* pos_pool, const int32_t* last_vis_pool,
                         const int32_t* block_table, const int32_t* old_lengths, float* out);

}  // namespace kernels
}  // namespace dmsrt
