// Sharding plan: ranges tile every dimension, GQA groups stay whole, invalid TP degrees are
// refused with the valid ones listed, and block alignment is checked. The last tests rebuild a
// full row-parallel matvec from per-rank partial sums (exact small-integer inputs), including the
// zero-padded block-cover fallback for slices that split a quantization block.
#include "parallel/shard_plan.h"

#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "gtest/gtest.h"

namespace dmsrt {
namespace {

constexpr ModelDims kSmolLM2{9, 3, 64, 576, 1536, 49152};
constexpr ModelDims kQwen3_8B{32, 8, 128, 4096, 12288, 151936};
constexpr ModelDims kOddVocab{8, 4, 16, 64, 100, 1001};

std::string DimsName(const ModelDims& d) {
  return absl::StrFormat("heads%d_kv%d_dim%d_ffn%d_vocab%d", d.n_heads, d.n_kv_heads, d.head_dim,
                         d.ffn, d.vocab);
}

TEST(EvenSplit, FirstRanksGetTheExtra) {
  EXPECT_EQ(EvenSplit(10, 3, 0), (Range{0, 4}));
  EXPECT_EQ(EvenSplit(10, 3, 1), (Range{4, 7}));
  EXPECT_EQ(EvenSplit(10, 3, 2), (Range{7, 10}));
  EXPECT_EQ(EvenSplit(10, 4, 3), (Range{8, 10}));
  EXPECT_EQ(EvenSplit(1, 1, 0), (Range{0, 1}));
  EXPECT_EQ(AlignedSplit(1536, 256, 4, 2), (Range{1024, 1280}));
  EXPECT_EQ(Range({3, 5}).ToString(), "[3, 5)");
}

TEST(ShardPlan, SmolLM2Tp3MatchesHeaderExample) {
  absl::StatusOr<ShardPlan> p = MakeShardPlan(kSmolLM2, 3, 1);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->group, 3);
  EXPECT_EQ(p->kv_heads, (Range{1, 2}));
  EXPECT_EQ(p->q_heads, (Range{3, 6}));
  EXPECT_EQ(p->q_rows, (Range{192, 384}));
  EXPECT_EQ(p->kv_rows, (Range{64, 128}));
  EXPECT_EQ(p->o_cols, (Range{192, 384}));
  EXPECT_EQ(p->ffn, (Range{512, 1024}));
  EXPECT_EQ(p->vocab, (Range{16384, 32768}));
  EXPECT_EQ(p->max_vocab_slice, 16384);
}

TEST(ShardPlan, Tp1OwnsEverything) {
  absl::StatusOr<ShardPlan> p = MakeShardPlan(kSmolLM2, 1, 0);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->kv_heads, (Range{0, 3}));
  EXPECT_EQ(p->q_heads, (Range{0, 9}));
  EXPECT_EQ(p->q_rows, (Range{0, 576}));
  EXPECT_EQ(p->ffn, (Range{0, 1536}));
  EXPECT_EQ(p->vocab, (Range{0, 49152}));
}

TEST(ShardPlan, RefusesTpThatDoesNotDivideKvHeads) {
  absl::StatusOr<ShardPlan> p = MakeShardPlan(kSmolLM2, 2, 0);
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(p.status().message().find("valid degrees for this model: 1, 3"), std::string::npos)
      << p.status();
  EXPECT_EQ(ValidTpDegrees(8), (std::vector<int>{1, 2, 4, 8}));
  EXPECT_EQ(ValidTpDegrees(3), (std::vector<int>{1, 3}));
  EXPECT_TRUE(CheckTpDegree(kQwen3_8B, 8).ok());
  EXPECT_FALSE(CheckTpDegree(kQwen3_8B, 16).ok());
  EXPECT_FALSE(CheckTpDegree(kQwen3_8B, 0).ok());
}

TEST(ShardPlan, RejectsBadDimensionsAndRanks) {
  ModelDims d = kSmolLM2;
  d.n_heads = 10;  // not a multiple of 3 KV heads
  EXPECT_FALSE(MakeShardPlan(d, 1, 0).ok());
  d = kSmolLM2;
  d.ffn = 0;
  absl::StatusOr<ShardPlan> p = MakeShardPlan(d, 1, 0);
  ASSERT_FALSE(p.ok());
  EXPECT_NE(p.status().message().find("ffn must be positive"), std::string::npos);
  EXPECT_FALSE(MakeShardPlan(kSmolLM2, 3, 3).ok());
  EXPECT_FALSE(MakeShardPlan(kSmolLM2, 3, -1).ok());
  ShardOptions o;
  o.ffn_align = 1000;  // 1536 is not a multiple
  EXPECT_FALSE(MakeShardPlan(kSmolLM2, 3, 0, o).ok());
  o.ffn_align = 768;  // 2 units for 3 ranks
  p = MakeShardPlan(kSmolLM2, 3, 0, o);
  ASSERT_FALSE(p.ok());
  EXPECT_NE(p.status().message().find("fewer than tp 3"), std::string::npos) << p.status();
  o.ffn_align = 0;
  EXPECT_FALSE(MakeShardPlan(kSmolLM2, 1, 0, o).ok());
}

// For every model and every valid tp: the ranks' ranges tile each dimension in rank order.
TEST(ShardPlan, RangesTileEveryDimension) {
  for (const ModelDims& d : {kSmolLM2, kQwen3_8B, kOddVocab}) {
    for (int tp : ValidTpDegrees(d.n_kv_heads)) {
      SCOPED_TRACE(absl::StrFormat("%s_tp%d", DimsName(d), tp));
      int64_t kv = 0, q = 0, qr = 0, kvr = 0, f = 0, v = 0, max_vocab = 0;
      for (int r = 0; r < tp; ++r) {
        absl::StatusOr<ShardPlan> p = MakeShardPlan(d, tp, r);
        ASSERT_TRUE(p.ok()) << p.status();
        EXPECT_EQ(p->kv_heads.begin, kv);
        EXPECT_EQ(p->q_heads.begin, q);
        EXPECT_EQ(p->q_rows.begin, qr);
        EXPECT_EQ(p->kv_rows.begin, kvr);
        EXPECT_EQ(p->ffn.begin, f);
        EXPECT_EQ(p->vocab.begin, v);
        EXPECT_FALSE(p->kv_heads.empty());
        EXPECT_EQ(p->q_heads.size(), p->kv_heads.size() * p->group);  // whole GQA groups
        EXPECT_EQ(p->q_heads.begin % p->group, 0);
        EXPECT_EQ(p->o_cols, p->q_rows);
        EXPECT_LE(p->vocab.size(), p->max_vocab_slice);
        kv = p->kv_heads.end;
        q = p->q_heads.end;
        qr = p->q_rows.end;
        kvr = p->kv_rows.end;
        f = p->ffn.end;
        v = p->vocab.end;
        max_vocab = std::max(max_vocab, p->vocab.size());
        // Uneven splits differ by at most one element (first ranks get the extra).
        EXPECT_LE(p->ffn.size() - MakeShardPlan(d, tp, tp - 1)->ffn.size(), 1);
      }
      EXPECT_EQ(kv, d.n_kv_heads);
      EXPECT_EQ(q, d.n_heads);
      EXPECT_EQ(qr, d.n_heads * d.head_dim);
      EXPECT_EQ(kvr, d.n_kv_heads * d.head_dim);
      EXPECT_EQ(f, d.ffn);
      EXPECT_EQ(v, d.vocab);
      EXPECT_EQ(max_vocab, MakeShardPlan(d, tp, 0)->max_vocab_slice);
    }
  }
}

TEST(ShardPlan, UnevenVocabAndFfn) {
  // vocab 1001 over 4: 251, 250, 250, 250; ffn 100 over 4: 25 each.
  EXPECT_EQ(MakeShardPlan(kOddVocab, 4, 0)->vocab, (Range{0, 251}));
  EXPECT_EQ(MakeShardPlan(kOddVocab, 4, 1)->vocab, (Range{251, 501}));
  EXPECT_EQ(MakeShardPlan(kOddVocab, 4, 3)->vocab, (Range{751, 1001}));
  EXPECT_EQ(MakeShardPlan(kOddVocab, 4, 3)->max_vocab_slice, 251);
}

TEST(BlockAlignment, FfnAlignKeepsDownProjectionBlocksWhole) {
  // 1536 / 4 = 384 splits 256-value K-quant blocks; ffn_align = 256 gives 512, 512, 256, 256.
  ModelDims d{8, 4, 64, 576, 1536, 49152};
  absl::StatusOr<ShardPlan> plain = MakeShardPlan(d, 4, 1);
  ASSERT_TRUE(plain.ok());
  EXPECT_EQ(plain->ffn, (Range{384, 768}));
  absl::Status s = CheckBlockAligned(plain->ffn, d.ffn, 256, "w_down");
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(s.message().find("w_down: column slice [384, 768) splits a block of 256"),
            std::string::npos)
      << s;
  EXPECT_NE(s.message().find("cover [256, 768)"), std::string::npos) << s;
  EXPECT_TRUE(CheckBlockAligned(plain->ffn, d.ffn, 32, "w_down").ok());  // Q4_1 / Q8_0 blocks

  ShardOptions o;
  o.ffn_align = 256;
  const Range want[] = {{0, 512}, {512, 1024}, {1024, 1280}, {1280, 1536}};
  for (int r = 0; r < 4; ++r) {
    absl::StatusOr<ShardPlan> p = MakeShardPlan(d, 4, r, o);
    ASSERT_TRUE(p.ok()) << p.status();
    EXPECT_EQ(p->ffn, want[r]);
    EXPECT_TRUE(CheckBlockAligned(p->ffn, d.ffn, 256, "w_down").ok());
  }
}

TEST(BlockAlignment, WoColumnsWithSmallHeads) {
  // SmolLM2 at tp 3: wo columns [192, 384) are whole 32-blocks but split 256-blocks.
  absl::StatusOr<ShardPlan> p = MakeShardPlan(kSmolLM2, 3, 1);
  ASSERT_TRUE(p.ok());
  EXPECT_TRUE(CheckBlockAligned(p->o_cols, 576, 32, "wo").ok());
  EXPECT_FALSE(CheckBlockAligned(p->o_cols, 576, 256, "wo").ok());  // 576 is not whole 256-blocks
  EXPECT_FALSE(CheckBlockAligned(p->o_cols, 1024, 256, "wo").ok());
  EXPECT_EQ(BlockCover(p->o_cols, 1024, 256), (Range{0, 512}));
  EXPECT_EQ(BlockCover(Range{900, 1000}, 1000, 256), (Range{768, 1000}));  // clamped
  EXPECT_EQ(BlockCover(Range{5, 9}, 100, 1), (Range{5, 9}));
  EXPECT_FALSE(CheckBlockAligned(Range{-1, 5}, 64, 32, "x").ok());
  EXPECT_FALSE(CheckBlockAligned(Range{0, 65}, 64, 32, "x").ok());
  EXPECT_FALSE(CheckBlockAligned(Range{0, 32}, 64, 0, "x").ok());
}

// y = W x with W [rows, cols]; small integers keep every sum exact.
std::vector<float> MatVec(const std::vector<float>& w, int64_t rows, int64_t cols,
                          const std::vector<float>& x, Range col_range) {
  std::vector<float> y(rows, 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = col_range.begin; c < col_range.end; ++c) y[r] += w[r * cols + c] * x[c];
  }
  return y;
}

// Row-parallel w_down: the sum over ranks of W[:, ffn slice] x[ffn slice] equals W x, both for
// exact slices and for block covers with the input zeroed outside the owned slice.
TEST(RowParallel, PartialSumsReproduceFullProduct) {
  const int64_t hidden = 19, ffn = 1536, block = 256;
  std::vector<float> w(hidden * ffn), x(ffn);
  for (int64_t i = 0; i < hidden * ffn; ++i) w[i] = static_cast<float>(i % 5) - 2.0f;
  for (int64_t i = 0; i < ffn; ++i) x[i] = static_cast<float>(i % 3) - 1.0f;
  const std::vector<float> full = MatVec(w, hidden, ffn, x, Range{0, ffn});
  ModelDims d{8, 4, 64, hidden, ffn, 1000};
  std::vector<float> exact(hidden, 0.0f), covered(hidden, 0.0f);
  for (int r = 0; r < 4; ++r) {
    ShardPlan p = *MakeShardPlan(d, 4, r);
    std::vector<float> part = MatVec(w, hidden, ffn, x, p.ffn);
    for (int64_t i = 0; i < hidden; ++i) exact[i] += part[i];
    // Fallback: whole blocks of W, input zero outside the owned slice.
    const Range cover = BlockCover(p.ffn, ffn, block);
    ASSERT_TRUE(CheckBlockAligned(cover, ffn, block, "cover").ok());
    std::vector<float> xz(ffn, 0.0f);
    for (int64_t c = p.ffn.begin; c < p.ffn.end; ++c) xz[c] = x[c];
    std::vector<float> part2 = MatVec(w, hidden, ffn, xz, cover);
    for (int64_t i = 0; i < hidden; ++i) covered[i] += part2[i];
  }
  EXPECT_EQ(exact, full);
  EXPECT_EQ(covered, full);
}

}  // namespace
}  // namespace dmsrt
