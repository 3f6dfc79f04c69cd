// Decode attention over the per-head paged DMS store (flash-decoding).
//
// One new query token per sequence. Every (sequence, KV head) has its own resident length and its
// own block table into a shared pool of blocks; the g = n_heads / n_kv_heads query heads of a
// group read that head's keys once, together. Long heads are split across CTAs (each CTA takes
// `split_tokens` consecutive slots); each CTA writes a partial output and its log-sum-exp, and a
// merge kernel combines them. Slot order is irrelevant to attention (keys are stored after RoPE),
// so a CTA walks its slots in any order.
//
// Storage: bf16; accumulation fp32. head_dim 64, 128 or 256; g <= 8. q and the pools are read
// with 16-byte loads and must be 16-byte aligned.
//   q            [batch, n_heads, head_dim]
//   k_pool/v_pool [num_blocks, block_tokens, head_dim]
//   block_tables [batch, n_kv_heads, max_blocks_per_head]   int32 block ids
//   lengths      [batch, n_kv_heads]                          int32 resident slots (0 allowed)
//   out          [batch, n_heads, head_dim]
// Workspace (only when more than one split): partial outputs and log-sum-exps in fp32; ask
// DecodeAttentionWorkspaceSize. The launcher allocates nothing and does not synchronise.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace dmsrt {

struct DecodeAttentionParams {
  int32_t batch = 0;
  int32_t n_heads = 0;
  int32_t n_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t block_tokens = 0;
  int32_t max_blocks_per_head = 0;
  int32_t max_length = 0;    // host-known upper bound of every entry of `lengths`
  int32_t split_tokens = 0;  // slots per CTA; 0 picks DecodeAttentionSplitTokens(...)
  float scale = 0.f;         // usually 1/sqrt(head_dim)
};

// Slots per CTA that give enough CTAs to fill `num_sms` multiprocessors.
int32_t DecodeAttentionSplitTokens(int32_t batch, int32_t n_kv_heads, int32_t max_length,
                                   int32_t num_sms);

// Number of splits the launch will use (after resolving split_tokens with num_sms).
int32_t DecodeAttentionNumSplits(const DecodeAttentionParams& p, int32_t num_sms);

// Bytes of scratch the launch needs (0 when one split suffices).
size_t DecodeAttentionWorkspaceSize(const DecodeAttentionParams& p, int32_t num_sms);

// `num_sms`: the device's multiprocessor count (cudaDevAttrMultiProcessorCount), used only to
// choose the split when p.split_tokens == 0; pass the same value to the size query.
cudaError_t DecodeAttention(const DecodeAttentionParams& p, const __nv_bfloat16* q,
                            const __nv_bfloat16* k_pool, const __nv_bfloat16* v_pool,
                            const int32_t* block_tables, const int32_t* lengths,
                            __nv_bfloat16* out, void* workspace, size_t workspace_bytes,
                            int32_t num_sms, cudaStream_t stream);

}  // namespace dmsrt
