// Head-sharding plan: which slice of every weight and of the KV cache a TP rank owns.
//
// Megatron-style tensor parallelism for a Llama/Qwen decoder layer, with plain integers in and
// ranges out (no model types, so the plan is testable alone and usable by every backend):
//
//   attention  wq, wk, wv   column-parallel: rank keeps the ROWS of its heads (output features)
//              wo           row-parallel: rank keeps the COLUMNS of its query heads (input
//                           features); its product is a partial sum -> all-reduce (sum)
//   MLP        gate, up     column-parallel: rows [ffn.begin, ffn.end)
//              down         row-parallel: columns [ffn.begin, ffn.end) -> all-reduce (sum)
//   vocab      token_embd   rows [vocab.begin, vocab.end): a rank looks up the tokens it owns,
//                           writes zeros for the others, then all-reduce (sum) (exact: one
//                           non-zero term per element); or keep the table replicated.
//              output       rows [vocab.begin, vocab.end): local logits, then all-gather on
//                           slices padded to max_vocab_slice (the split can be uneven).
//
// Heads: the KV heads are split evenly (tp must divide n_kv_heads: with GQA every query head
// must sit on the rank holding its KV head, and each rank runs DMS eviction for its own KV heads),
// and each rank takes the whole GQA groups of its KV heads. A model with 3 KV heads runs at tp 1
// or 3, never 2; MakeShardPlan says so.
//
// Uneven splits (ffn, vocab): part i of n split into p parts has n/p + (i < n%p ? 1 : 0)
// elements, contiguous and in rank order (the first n%p ranks get one extra). With
// ShardOptions::ffn_align = b the ffn is split the same way in units of b values.
//
// Quantized weights: slicing ROWS is always cheap (rows are independent byte ranges). A COLUMN
// slice of a quantized row must start and end on a block boundary (32 values for Q4_0/Q4_1/Q5_x/
// Q8_0, 256 for the K-quants): CheckBlockAligned says whether it does. When it does not (e.g. wo
// with head_dim 64 and 256-value blocks, or an ffn slice of 1536/4 = 384 values), the runtime
// should:
//   1. for w_down, first ask for ShardOptions::ffn_align = block so the ffn slices are whole
//      blocks (the gate/up rows follow the same ranges, so nothing else changes);
//   2. otherwise load the block-widened column range BlockCover(cols, block) and feed the matmul an
//      input vector over that wider range with ZEROS outside the owned slice `cols`. The extra
//      columns then contribute exactly 0 to the partial sums, so the all-reduce result is the
//      same as with an exact slice; the cost is < 2 blocks of extra columns per row.
//   (Dequantizing the local column slice to F32 at load time also works, at ~7x the memory.)
//
// Example (SmolLM2-135M: 9 heads, 3 KV heads, head_dim 64, hidden 576, ffn 1536, vocab 49152):
//   DMSRT_ASSIGN_OR_RETURN(ShardPlan p, MakeShardPlan({9, 3, 64, 576, 1536, 49152}, 3, 1));
//   // p.kv_heads [1,2)  p.q_heads [3,6)  p.q_rows [192,384)  p.kv_rows [64,128)
//   // p.o_cols [192,384)  p.ffn [512,1024)  p.vocab [16384,32768)
//   wq_local = wq.rows(p.q_rows); wk_local = wk.rows(p.kv_rows); wv_local = wv.rows(p.kv_rows);
//   wo_local = wo.cols(p.o_cols);  // [hidden, q_rows.size()]
//   kv cache: p.kv_heads.size() heads per layer on this rank.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace dmsrt {

// Half-open [begin, end).
struct Range {
  int64_t begin = 0;
  int64_t end = 0;
  int64_t size() const { return end - begin; }
  bool empty() const { return end <= begin; }
  bool Contains(int64_t i) const { return i >= begin && i < end; }
  std::string ToString() const;  // "[begin, end)"
  friend bool operator==(const Range& a, const Range& b) {
    return a.begin == b.begin && a.end == b.end;
  }
  friend bool operator!=(const Range& a, const Range& b) { return !(a == b); }
};

// Part `index` of [0, n) cut into `parts` contiguous pieces, the first n % parts one longer.
// Requires n >= 0, parts >= 1, 0 <= index < parts.
Range EvenSplit(int64_t n, int parts, int index);
// The same in units of `unit` values (n % unit == 0).
Range AlignedSplit(int64_t n, int64_t unit, int parts, int index);

struct ModelDims {
  int64_t n_heads = 0;     // query heads
  int64_t n_kv_heads = 0;  // key/value heads (n_heads % n_kv_heads == 0)
  int64_t head_dim = 0;
  int64_t hidden = 0;
  int64_t ffn = 0;    // intermediate size of the MLP
  int64_t vocab = 0;
};

struct ShardOptions {
  // Split the ffn in units of this many values, normally the block size of the down projection's
  // type, so that its column slices are whole blocks. 1 = element granularity.
  int64_t ffn_align = 1;
};

struct ShardPlan {
  int tp = 1;
  int rank = 0;
  int64_t group = 1;  // query heads per KV head (GQA group size)
  Range kv_heads;     // KV heads owned: [kv_begin, kv_end)
  Range q_heads;      // query heads owned: whole GQA groups of kv_heads
  Range q_rows;       // rows of wq (q_heads * head_dim)                       [n_heads*head_dim, hidden]
  Range kv_rows;      // rows of wk and wv (kv_heads * head_dim)               [n_kv_heads*head_dim, hidden]
  Range o_cols;       // columns of wo (row-parallel input), equal to q_rows   [hidden, n_heads*head_dim]
  Range ffn;          // rows of gate and up, columns of down                  [ffn, hidden] / [hidden, ffn]
  Range vocab;        // rows of token_embd and output                         [vocab, hidden]
  int64_t max_vocab_slice = 0;  // largest vocab slice over ranks: all-gather padding

  std::string ToString() const;
};

// The TP degrees a model with `n_kv_heads` KV heads can use: the divisors of n_kv_heads.
std::vector<int> ValidTpDegrees(int64_t n_kv_heads);

// OK when `tp` can shard `dims`; otherwise INVALID_ARGUMENT naming the valid degrees.
absl::Status CheckTpDegree(const ModelDims& dims, int tp);

// The slice of `dims` owned by TP rank `rank` of `tp`. Validates every dimension.
absl::StatusOr<ShardPlan> MakeShardPlan(const ModelDims& dims, int tp, int rank,
                                        const ShardOptions& options = {});

// OK when columns `cols` of rows of `row_len` values, stored in blocks of `block` values, start
// and end on block boundaries; otherwise FAILED_PRECONDITION naming `what`, the slice, the block
// size and the fallback (BlockCover). block 1 always passes.
absl::Status CheckBlockAligned(Range cols, int64_t row_len, int64_t block, std::string_view what);

// The smallest block-aligned range containing `cols` (clamped to [0, row_len]).
Range BlockCover(Range cols, int64_t row_len, int64_t block);

}  // namespace dmsrt
