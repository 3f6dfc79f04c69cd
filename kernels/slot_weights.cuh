// Decode attention weights per resident slot, for the victim policies (tova, h2o): the KV index
// on the host picks the slot the next token overwrites from them (runtime/kv/policy.h,
// KvVictimInputs), so the device hands back what the CPU store's attention computes.
//
// For each (sequence b, KV head j), with g = n_heads / n_kv_heads query heads in its group and
// L = lengths[b, j] resident slots, slot s (block block_tables[row, j, s / block_tokens], offset
// s % block_tokens):
//   out[b, j, s] = (1/g) * sum over the group's query heads h of softmax_s(scale * q_h . k_s)
// for s < min(L, ld); slots at ld and beyond are not written (a sequence whose eviction is
// frozen may hold more slots than a policy's budget, and needs no weights). The softmax is over
// all L slots, as DecodeAttention's. Same parameters and layouts as DecodeAttention
// (kernels/decode_attention.cuh; split_tokens is unused); out [batch, n_kv_heads, ld] fp32.
// The launcher allocates nothing and does not synchronise.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/decode_attention.cuh"

namespace dmsrt {

cudaError_t DecodeSlotWeights(const DecodeAttentionParams& p, const __nv_bfloat16* q,
                              const __nv_bfloat16* k_pool, const int32_t* block_tables,
                              const int32_t* lengths, float* out, int32_t ld,
                              cudaStream_t stream);

}  // namespace dmsrt
