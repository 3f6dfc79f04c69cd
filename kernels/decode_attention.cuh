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
//   block_tables [batch, n_kv_heads, max_blocks_per_head]   int32 block ids; with table_rows,
//                [rows, n_kv_heads, max_blocks_per_head] and row b reads table row table_rows[b]
//                (tables that stay on the device between steps while the batch changes)
//   lengths      [batch, n_kv_heads]                          int32 resident slots (0 allowed)
//   out          [batch, n_heads, head_dim]
// Workspace (only when more than one split): partial outputs and log-sum-exps in fp32; ask
// DecodeAttentionWorkspaceSize. The launcher allocates nothing and does not synchronise.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
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
  const int32_t* table_rows = nullptr;  // [batch] device memory, or null: row b reads table row b
};

// The split plan is host code, inline here so that every launcher of this contract (the CUDA
// one and the test emulator's) sizes the same workspace.
//
// Slots per CTA that give enough CTAs to fill `num_sms` multiprocessors. Measured on an H100
// (docs/perf-gpu-notes.md): a CTA of this kernel keeps 4 resident per multiprocessor for g <= 4.
// Few heads (small batches): fill about one wave of resident CTAs, with splits of 256..2048 slots
// (the best sizes measured at batch 1 and 8). Many heads: about four waves of CTAs so the last,
// partial wave costs little, splits of at least 256 slots.
inline int32_t DecodeAttentionSplitTokens(int32_t batch, int32_t n_kv_heads, int32_t max_length,
                                          int32_t num_sms) {
  auto round128 = [](int64_t x) { return (x + 127) / 128 * 128; };
  const int64_t heads = std::max<int64_t>(1, static_cast<int64_t>(batch) * n_kv_heads);
  const int64_t resident = 4LL * std::max(1, num_sms);
  const int64_t len = std::max(1, max_length);
  int64_t split;
  if (heads * 4 <= resident) {
    const int64_t splits = resident / heads;
    split = std::min<int64_t>(2048, std::max<int64_t>(256, round128((len + splits - 1) / splits)));
  } else {
    const int64_t splits = std::max<int64_t>(1, (4 * resident + heads - 1) / heads);
    split = std::max<int64_t>(256, round128((len + splits - 1) / splits));
  }
  return static_cast<int32_t>(split);
}

// Slots per CTA of a launch: p.split_tokens, or the plan above.
inline int32_t DecodeAttentionResolveSplit(const DecodeAttentionParams& p, int32_t num_sms) {
  if (p.split_tokens > 0) return p.split_tokens;
  return DecodeAttentionSplitTokens(p.batch, p.n_kv_heads, p.max_length, num_sms);
}

// Number of splits the launch will use (after resolving split_tokens with num_sms).
inline int32_t DecodeAttentionNumSplits(const DecodeAttentionParams& p, int32_t num_sms) {
  const int32_t split = DecodeAttentionResolveSplit(p, num_sms);
  return std::max(1, (p.max_length + split - 1) / split);
}

// Bytes of scratch the launch needs (0 when one split suffices).
inline size_t DecodeAttentionWorkspaceSize(const DecodeAttentionParams& p, int32_t num_sms) {
  const int32_t s = DecodeAttentionNumSplits(p, num_sms);
  if (s <= 1) return 0;
  const size_t rows = static_cast<size_t>(p.batch) * p.n_heads * s;
  return rows * (p.head_dim + 1) * sizeof(float);
}

// `num_sms`: the device's multiprocessor count (cudaDevAttrMultiProcessorCount), used only to
// choose the split when p.split_tokens == 0; pass the same value to the size query.
cudaError_t DecodeAttention(const DecodeAttentionParams& p, const __nv_bfloat16* q,
                            const __nv_bfloat16* k_pool, const __nv_bfloat16* v_pool,
                            const int32_t* block_tables, const int32_t* lengths,
                            __nv_bfloat16* out, void* workspace, size_t workspace_bytes,
                            int32_t num_sms, cudaStream_t stream);

}  // namespace dmsrt
