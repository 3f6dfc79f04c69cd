// Plain C++ references of the DMS kernels (kernels/dms.cuh): the ring update with the slot
// write, RoPE with Variant A decisions, the Variant B threshold. Same layouts and the same data
// contract (spare blocks, status codes) as the device versions; K/V rows are raw 16-bit words
// (bf16 bits) so that the slot write can be compared bit for bit.
#pragma once

#include <cstdint>

#include "kernels/reference/rope_freq.h"

namespace dmsrt {
namespace kernels {

void DmsRingUpdateRef(int32_t batch, int32_t n_kv_heads, int32_t head_dim, int32_t window,
                      int32_t block_tokens, int32_t max_blocks_per_head,
                      const int32_t* positions, const uint8_t* bits, const uint16_t* k,
                      const uint16_t* v, const int32_t* spare_blocks, int32_t* lengths,
                      int32_t* block_tables, int32_t* ring_slot, uint8_t* ring_flag,
                      uint16_t* k_pool, uint16_t* v_pool, int32_t* pos_pool,
                      int32_t* last_vis_pool, int32_t* status);

// q [n, n_heads, D] and k [n, n_kv, D] (k may be null) rotated in place; with `decide`, bits
// [n, n_kv] and the channel zeroing of docs/dms-semantics.md §1 step 4. Angles in double, with
// the frequency scaling of rope_freq.h.
void RopeDmsVariantARef(int32_t n, int32_t n_heads, int32_t n_kv_heads, int32_t head_dim,
                        float theta, bool decide, float alpha_scale, float alpha_offset,
                        bool alpha_per_layer, const int32_t* positions, float* q, float* k,
                        uint8_t* bits, const RopeScalingParams& scaling = {});

// Variant B bits from adapter logits [n, ld] (+ `bias` [ld] when not null).
void DmsThresholdRef(int32_t n, int32_t n_kv_heads, const float* logits, int32_t ld,
                     const float* bias, float alpha_scale, float alpha_offset,
                     bool alpha_per_layer, uint8_t* bits);

}  // namespace kernels
}  // namespace dmsrt
