// Sharding plan arithmetic (see shard_plan.h). Pure functions over integers.
#include "parallel/shard_plan.h"

#include <algorithm>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace dmsrt {

std::string Range::ToString() const { return absl::StrFormat("[%d, %d)", begin, end); }

Range EvenSplit(int64_t n, int parts, int index) {
  const int64_t base = n / parts;
  const int64_t extra = n % parts;
  const int64_t begin = index * base + std::min<int64_t>(index, extra);
  return Range{begin, begin + base + (index < extra ? 1 : 0)};
}

Range AlignedSplit(int64_t n, int64_t unit, int parts, int index) {
  Range r = EvenSplit(n / unit, parts, index);
  return Range{r.begin * unit, r.end * unit};
}

std::string ShardPlan::ToString() const {
  return absl::StrFormat(
      "tp %d rank %d: kv_heads %s q_heads %s q_rows %s kv_rows %s o_cols %s ffn %s vocab %s",
      tp, rank, kv_heads.ToString(), q_heads.ToString(), q_rows.ToString(), kv_rows.ToString(),
      o_cols.ToString(), ffn.ToString(), vocab.ToString());
}

std::vector<int> ValidTpDegrees(int64_t n_kv_heads) {
  std::vector<int> out;
  for (int64_t d = 1; d <= n_kv_heads; ++d) {
    if (n_kv_heads % d == 0) out.push_back(static_cast<int>(d));
  }
  return out;
}

absl::Status CheckTpDegree(const ModelDims& dims, int tp) {
  if (tp < 1) {
    return absl::InvalidArgumentError(absl::StrFormat("tensor-parallel degree must be >= 1, got %d", tp));
  }
  if (dims.n_kv_heads <= 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("model has %d KV heads; need at least 1", dims.n_kv_heads));
  }
  if (dims.n_kv_heads % tp != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "tensor-parallel degree %d does not divide the model's %d KV heads (each rank must own "
        "whole KV heads and their query-head groups); valid degrees for this model: %s",
        tp, dims.n_kv_heads, absl::StrJoin(ValidTpDegrees(dims.n_kv_heads), ", ")));
  }
  return absl::OkStatus();
}

absl::StatusOr<ShardPlan> MakeShardPlan(const ModelDims& dims, int tp, int rank,
                                        const ShardOptions& options) {
  struct Named {
    const char* name;
    int64_t value;
  };
  for (const Named& d : {Named{"n_heads", dims.n_heads}, Named{"n_kv_heads", dims.n_kv_heads},
                         Named{"head_dim", dims.head_dim}, Named{"hidden", dims.hidden},
                         Named{"ffn", dims.ffn}, Named{"vocab", dims.vocab}}) {
    if (d.value <= 0) {
      return absl::InvalidArgumentError(
          absl::StrFormat("MakeShardPlan: %s must be positive, got %d", d.name, d.value));
    }
  }
  if (dims.n_heads % dims.n_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "MakeShardPlan: n_heads %d is not a multiple of n_kv_heads %d", dims.n_heads,
        dims.n_kv_heads));
  }
  absl::Status s = CheckTpDegree(dims, tp);
  if (!s.ok()) return s;
  if (rank < 0 || rank >= tp) {
    return absl::InvalidArgumentError(
        absl::StrFormat("MakeShardPlan: rank %d out of range for tp %d", rank, tp));
  }
  if (options.ffn_align < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("MakeShardPlan: ffn_align must be >= 1, got %d", options.ffn_align));
  }
  if (dims.ffn % options.ffn_align != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "MakeShardPlan: ffn %d is not a multiple of ffn_align %d (the down projection's rows "
        "would not be whole blocks)",
        dims.ffn, options.ffn_align));
  }
  if (dims.ffn / options.ffn_align < tp) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "MakeShardPlan: ffn %d in units of %d gives %d pieces, fewer than tp %d; use a smaller "
        "ffn_align or a smaller tp",
        dims.ffn, options.ffn_align, dims.ffn / options.ffn_align, tp));
  }
  if (dims.vocab < tp) {
    return absl::InvalidArgumentError(
        absl::StrFormat("MakeShardPlan: vocab %d is smaller than tp %d", dims.vocab, tp));
  }

  ShardPlan p;
  p.tp = tp;
  p.rank = rank;
  p.group = dims.n_heads / dims.n_kv_heads;
  p.kv_heads = EvenSplit(dims.n_kv_heads, tp, rank);
  p.q_heads = Range{p.kv_heads.begin * p.group, p.kv_heads.end * p.group};
  p.q_rows = Range{p.q_heads.begin * dims.head_dim, p.q_heads.end * dims.head_dim};
  p.kv_rows = Range{p.kv_heads.begin * dims.head_dim, p.kv_heads.end * dims.head_dim};
  p.o_cols = p.q_rows;
  p.ffn = AlignedSplit(dims.ffn, options.ffn_align, tp, rank);
  p.vocab = EvenSplit(dims.vocab, tp, rank);
  p.max_vocab_slice = EvenSplit(dims.vocab, tp, 0).size();
  return p;
}

absl::Status CheckBlockAligned(Range cols, int64_t row_len, int64_t block, std::string_view what) {
  if (block < 1) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: block size must be >= 1, got %d", what, block));
  }
  if (cols.begin < 0 || cols.end > row_len || cols.begin > cols.end) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: column slice %s is not inside a row of %d values", what, cols.ToString(), row_len));
  }
  if (row_len % block != 0) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "%s: rows of %d values are not whole blocks of %d", what, row_len, block));
  }
  if (cols.begin % block != 0 || cols.end % block != 0) {
    const Range cover = BlockCover(cols, row_len, block);
    return absl::FailedPreconditionError(absl::StrFormat(
        "%s: column slice %s splits a block of %d values; load the block-aligned cover %s and "
        "zero the input outside %s (or shard with ShardOptions::ffn_align = %d)",
        what, cols.ToString(), block, cover.ToString(), cols.ToString(), block));
  }
  return absl::OkStatus();
}

Range BlockCover(Range cols, int64_t row_len, int64_t block) {
  if (block <= 1) return cols;
  const int64_t begin = (cols.begin / block) * block;
  const int64_t end = std::min(row_len, ((cols.end + block - 1) / block) * block);
  return Range{begin, end};
}

}  // namespace dmsrt
