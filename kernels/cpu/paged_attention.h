// CPU attention over a paged KV store: softmax(q k^T / sqrt(head_dim)) v for the g query heads
// of one KV head (grouped-query attention), over m keys given as row pointers.
//
// Shapes: q and out [g, head_dim]; key/value row c of the m is k_rows[c] / v_rows[c] [head_dim];
// probs [g, m] receives the attention weights (a policy may read them afterwards). The rows of
// a paged store are contiguous only inside a block, so the caller builds the row pointers
// (GatherSlotRows for slots 0..n-1 of one head, or its own filter for a visibility rule).
//
// Algorithm: float32 with float accumulation and max subtraction (exp by a ~1 ulp polynomial on
// 8-wide vectors). Keys eight at a time (a query chunk is loaded once per eight keys, the eight
// dot products reduced by a transpose-add), software prefetch a few rows ahead across block
// edges, and V accumulated in tiles of 32 rows that stay in L1 while every query head of the
// group adds them into register accumulators. Allocates nothing; thread-safe for distinct
// outputs and probability buffers.
#pragma once

#include <cstdint>

namespace dmsrt {
namespace kernels {

// A pool of KV blocks, each [2, block_tokens, head_dim] float32: K rows, then V rows, of the
// block's slots. Block b starts at data + b * block_floats; its V rows at + v_offset.
struct PagedKvPool {
  const float* data = nullptr;
  int64_t block_floats = 0;
  int64_t v_offset = 0;
  int32_t block_tokens = 0;
  int32_t head_dim = 0;

  const float* key(int32_t block, int32_t offset) const {
    return data + static_cast<int64_t>(block) * block_floats + static_cast<int64_t>(offset) * head_dim;
  }
  const float* value(int32_t block, int32_t offset) const { return key(block, offset) + v_offset; }
};

// k_rows[s], v_rows[s] = the rows of slot s in [0, n) of a head with block table `blocks`
// (slot s in blocks[s / block_tokens]).
void GatherSlotRows(const PagedKvPool& pool, const int32_t* blocks, int32_t n,
                    const float** k_rows, const float** v_rows);
// The same for slots s in [first, end) only (k_rows[s], v_rows[s]; other entries untouched).
void GatherSlotRange(const PagedKvPool& pool, const int32_t* blocks, int32_t first, int32_t end,
                     const float** k_rows, const float** v_rows);

// out [g, head_dim] = softmax(scale * q k^T) v over the m rows; probs [g, m] keeps the weights.
void AttendRows(const float* q, int32_t g, int32_t head_dim, float scale,
                const float* const* k_rows, const float* const* v_rows, int32_t m, float* probs,
                float* out);

// Decode attention split over key chunks, so that one head's keys can be shared between threads
// (a result depends on the chunking, never on which thread ran a chunk).
//
// AttendKeyChunk: for the g query heads over the m keys of one chunk, writes
//   p[h * ldp + c]                 = exp(scale * q_h . k_c - max_h)  (unnormalised weights)
//   part[h * hd .. (h + 1) * hd)   = Σ_c p[h * ldp + c] v_c
//   part[g * hd + 2h], [+ 1]       = max_h, Σ_c p[h * ldp + c]
// part holds KeyChunkFloats(g, hd) floats. CombineKeyChunks turns n_parts such partials (stride
// KeyChunkFloats) into the softmax-weighted output outg [g, hd], rescaling each chunk by
// exp(max_k - max) / Σ_k exp(max_k - max) sum_k.
inline int64_t KeyChunkFloats(int32_t g, int32_t hd) { return static_cast<int64_t>(g) * (hd + 2); }
void AttendKeyChunk(const float* q, int32_t g, int32_t head_dim, float scale,
                    const float* const* k_rows, const float* const* v_rows, int32_t m, float* p,
                    int64_t ldp, float* part);
void CombineKeyChunks(const float* parts, int32_t n_parts, int32_t g, int32_t head_dim, float* out);

}  // namespace kernels
}  // namespace dmsrt
