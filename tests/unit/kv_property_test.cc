// Property tests of DMS delayed eviction (docs/dms-semantics.md §3-§5, §8): the worked example of
// §3 verbatim, then thousands of random cases (w in 0..8, random bits, lengths up to 64, awkward
// block sizes) fed token by token, in random chunks (prefill after decode included) and as one
// chunk: after every step the resident set equals R(p), n never decreases, slots 0..n-1 hold
// exactly R(p), the figures add up, and every attention output matches a float64 evaluation of
// the §3 visibility rule.
#include <algorithm>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "runtime/kv/kv_cache.h"
#include "tests/unit/kv_test_util.h"

namespace dmsrt {
namespace {

using kvtest::DmsResident;
using kvtest::DmsVisible;
using kvtest::FeedChunk;
using kvtest::Geo;
using kvtest::MakeStream;
using kvtest::MaxRelErr;
using kvtest::RefAttention;
using kvtest::Stream;

KvPolicyConfig Dms(int32_t w) {
  KvPolicyConfig p;
  p.kind = KvPolicyKind::kDms;
  p.window = w;
  return p;
}

TEST(DmsWorkedExample, Window3_Table) {
  // w = 3, d = [0,1,0,1,1,0,0,0,0]: tokens 0, 2 and 3 get flagged.
  const std::vector<uint8_t> d = {0, 1, 0, 1, 1, 0, 0, 0, 0};
  Stream s = MakeStream(9, 1, 2, 1, 6, 31, 0.5);
  s.bits[0].assign(d.begin(), d.end());
  auto cache = MakeCpuKvCache(Geo(1, 1, 2, 6, 2), Dms(3), 1 << 20);
  ASSERT_TRUE(cache.ok());
  auto seq = (*cache)->Create();
  const std::vector<std::vector<int32_t>> table = {
      {0}, {0, 1}, {0, 1, 2}, {0, 1, 2, 3}, {1, 2, 3, 4}, {1, 2, 3, 4, 5},
      {1, 3, 4, 5, 6}, {1, 4, 5, 6, 7}, {1, 4, 5, 6, 7, 8}};
  for (int32_t t = 0; t < 9; ++t) {
    std::vector<std::vector<float>> out;
    ASSERT_TRUE(FeedChunk(**cache, *seq, s, t, 1, true, &out).ok());
    auto res = (*cache)->ResidentPositions(*seq, 0, 0);
    std::sort(res.begin(), res.end());
    EXPECT_EQ(res, table[t]) << "query " << t;
    auto ref = RefAttention(s, 0, t, [&](int32_t, int32_t kp) {
      return std::find(table[t].begin(), table[t].end(), kp) != table[t].end();
    });
    EXPECT_LT(MaxRelErr(out[0].data(), ref.data(), ref.size()), 1e-5) << "query " << t;
  }
  // Slots are recycled, not appended: 6 resident at the end.
  EXPECT_EQ((*cache)->ResidentPositions(*seq, 0, 0).size(), 6u);
  KvFigures f = (*cache)->Figures();
  EXPECT_EQ(f.flagged_tokens, 3);
  EXPECT_EQ(f.logical_tokens, 9);
  EXPECT_EQ(f.resident_tokens, 6);
  EXPECT_DOUBLE_EQ(f.cache_cr(), 9.0 / 6.0);
  EXPECT_DOUBLE_EQ(f.eviction_rate(), 3.0 / 9.0);
  EXPECT_DOUBLE_EQ(f.asymptotic_cr(), 1.5);
  // KV reads: Σ |R(p)| = 1+2+3+4+4+5+5+5+6.
  EXPECT_EQ(f.kv_reads, 35);
  EXPECT_EQ(f.dense_reads, 45);

  // One chunk of all nine tokens gives the same cache and the same outputs.
  auto c2 = MakeCpuKvCache(Geo(1, 1, 2, 6, 2), Dms(3), 1 << 20);
  auto s2 = (*c2)->Create();
  std::vector<std::vector<float>> out;
  ASSERT_TRUE(FeedChunk(**c2, *s2, s, 0, 9, true, &out).ok());
  auto res = (*c2)->ResidentPositions(*s2, 0, 0);
  std::sort(res.begin(), res.end());
  EXPECT_EQ(res, table[8]);
  for (int32_t t = 0; t < 9; ++t) {
    auto ref = RefAttention(s, 0, t, [&](int32_t, int32_t kp) {
      return std::find(table[t].begin(), table[t].end(), kp) != table[t].end();
    });
    EXPECT_LT(MaxRelErr(out[0].data() + (size_t)t * 2 * 6, ref.data(), ref.size()), 1e-5)
        << "query " << t;
  }
  EXPECT_EQ((*c2)->Figures().kv_reads, 35);
}

enum class Mode { kTokenByToken, kRandomChunks, kOneChunk };

struct CaseResult {
  std::vector<std::vector<std::vector<int32_t>>> final_resident;  // [layer][head]
  std::vector<std::vector<float>> outputs;                         // [layer][T * nh * hd]
};

// Runs one random case in one mode, checking every invariant after every step.
void RunCase(uint64_t seed, Mode mode, CaseResult* result) {
  std::mt19937_64 rng(seed);
  const int32_t w = std::uniform_int_distribution<int>(0, 8)(rng);
  const int32_t T = std::uniform_int_distribution<int>(1, 64)(rng);
  const int32_t nkv = std::uniform_int_distribution<int>(1, 3)(rng);
  const int32_t g = std::uniform_int_distribution<int>(1, 3)(rng);
  const int32_t hd = std::uniform_int_distribution<int>(1, 6)(rng);
  const int32_t layers = std::uniform_int_distribution<int>(1, 2)(rng);
  const int32_t blocks[] = {1, 2, 3, 5, 8, 16};
  const int32_t block = blocks[std::uniform_int_distribution<int>(0, 5)(rng)];
  const double p = std::uniform_real_distribution<double>(0.0, 1.0)(rng);
  const Stream s = MakeStream(T, layers, nkv * g, nkv, hd, seed * 31 + 7, p);
  const int32_t nh = nkv * g;
  SCOPED_TRACE(absl::StrCat("seed ", seed, " w ", w, " T ", T, " kv ", nkv, " g ", g, " hd ", hd,
                            " layers ", layers, " block ", block, " p ", p));

  auto cache = MakeCpuKvCache(Geo(layers, nkv, nh, hd, block), Dms(w), 8 << 20);
  ASSERT_TRUE(cache.ok());
  KvCache& kv = **cache;
  auto seq = kv.Create();
  ASSERT_TRUE(seq.ok());
  // Chunk sizes: the chunking RNG is separate so the data does not depend on the mode.
  std::mt19937_64 crng(seed ^ 0xABCDEFull);
  std::vector<int32_t> last_n(layers * nkv, 0);
  result->outputs.assign(layers, std::vector<float>((size_t)T * nh * hd));
  int64_t want_reads = 0, want_dense = 0;
  int32_t from = 0;
  while (from < T) {
    int32_t n = 1;
    if (mode == Mode::kOneChunk) {
      n = T;
    } else if (mode == Mode::kRandomChunks) {
      // Mix decode steps and chunks of awkward sizes, including ones longer than the window.
      const int r = std::uniform_int_distribution<int>(0, 3)(crng);
      n = r == 0 ? 1 : std::uniform_int_distribution<int>(1, 2 * w + 3)(crng);
    }
    n = std::min(n, T - from);
    std::vector<std::vector<float>> out;
    ASSERT_TRUE(FeedChunk(kv, *seq, s, from, n, true, &out).ok());
    const int32_t p_last = from + n - 1;
    for (int32_t l = 0; l < layers; ++l) {
      for (int32_t i = 0; i < n; ++i) {
        const int32_t qp = from + i;
        auto ref = RefAttention(s, l, qp, [&](int32_t j, int32_t kp) {
          return DmsVisible(s, l, j, kp, qp, w);
        });
        const float* o = out[l].data() + (size_t)i * nh * hd;
        ASSERT_LT(MaxRelErr(o, ref.data(), ref.size()), 1e-5) << "layer " << l << " query " << qp;
        std::copy(o, o + (size_t)nh * hd, result->outputs[l].begin() + (size_t)qp * nh * hd);
        for (int32_t j = 0; j < nkv; ++j) {
          want_reads += DmsResident(s, l, j, qp, w).size();
          want_dense += qp + 1;
        }
      }
      for (int32_t j = 0; j < nkv; ++j) {
        auto res = kv.ResidentPositions(*seq, l, j);
        const auto want = DmsResident(s, l, j, p_last, w);
        ASSERT_GE((int32_t)res.size(), last_n[l * nkv + j]) << "n decreased";
        last_n[l * nkv + j] = (int32_t)res.size();
        std::sort(res.begin(), res.end());
        ASSERT_EQ(res, want) << "resident set after position " << p_last << " layer " << l
                             << " head " << j;
      }
    }
    from += n;
  }
  // Figures.
  KvFigures f = kv.Figures();
  int64_t want_flagged = 0, want_resident = 0;
  for (int32_t l = 0; l < layers; ++l) {
    for (int32_t j = 0; j < nkv; ++j) {
      for (int32_t t = 1; t < T; ++t) want_flagged += s.bits[l][(size_t)t * nkv + j];
      want_resident += DmsResident(s, l, j, T - 1, w).size();
    }
  }
  EXPECT_EQ(f.logical_tokens, (int64_t)T * layers * nkv);
  EXPECT_EQ(f.resident_tokens, want_resident);
  EXPECT_EQ(f.flagged_tokens, want_flagged);
  EXPECT_EQ(f.kv_reads, want_reads);
  EXPECT_EQ(f.dense_reads, want_dense);
  int64_t blocks_needed = 0;
  result->final_resident.assign(layers, {});
  for (int32_t l = 0; l < layers; ++l) {
    for (int32_t j = 0; j < nkv; ++j) {
      auto res = kv.ResidentPositions(*seq, l, j);
      blocks_needed += ((int64_t)res.size() + block - 1) / block;
      std::sort(res.begin(), res.end());
      result->final_resident[l].push_back(res);
    }
  }
  EXPECT_EQ(f.blocks_held, blocks_needed);  // dense slot arrays: no holes, no spare blocks
  ASSERT_TRUE(kv.Free(*seq).ok());
  EXPECT_EQ(kv.free_blocks(), kv.total_blocks());
}

class DmsProperty : public ::testing::TestWithParam<int> {};

// Each instance runs 500 random cases in all three modes and compares the modes.
TEST_P(DmsProperty, ResidentSetsAndOutputsMatchRule) {
  const int shard = GetParam();
  for (int c = 0; c < 500; ++c) {
    const uint64_t seed = (uint64_t)shard * 100000 + c;
    CaseResult a, b, d;
    RunCase(seed, Mode::kTokenByToken, &a);
    if (HasFatalFailure()) return;
    RunCase(seed, Mode::kRandomChunks, &b);
    if (HasFatalFailure()) return;
    RunCase(seed, Mode::kOneChunk, &d);
    if (HasFatalFailure()) return;
    ASSERT_EQ(a.final_resident, b.final_resident) << "seed " << seed;
    ASSERT_EQ(a.final_resident, d.final_resident) << "seed " << seed;
    for (size_t l = 0; l < a.outputs.size(); ++l) {
      for (size_t i = 0; i < a.outputs[l].size(); ++i) {
        ASSERT_NEAR(a.outputs[l][i], b.outputs[l][i], 1e-5 * (1 + std::fabs(a.outputs[l][i])));
        ASSERT_NEAR(a.outputs[l][i], d.outputs[l][i], 1e-5 * (1 + std::fabs(a.outputs[l][i])));
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Random, DmsProperty, ::testing::Range(0, 6),
                         [](const auto& info) { return absl::StrCat("shard", info.param, "_500cases_w0to8_len1to64"); });

// Prefill, decode, prefill again (multi-turn) with a large head, against float64.
TEST(DmsMultiTurn, PrefillDecodePrefill_w5_dim64_block4) {
  const int32_t w = 5, T = 60, nkv = 2, nh = 6, hd = 64;
  Stream s = MakeStream(T, 2, nh, nkv, hd, 4242, 0.6);
  auto cache = MakeCpuKvCache(Geo(2, nkv, nh, hd, 4), Dms(w), 4 << 20);
  ASSERT_TRUE(cache.ok());
  auto seq = (*cache)->Create();
  const std::vector<int32_t> chunks = {17, 1, 1, 1, 9, 1, 1, 20, 1, 8};
  int32_t from = 0;
  for (int32_t n : chunks) {
    std::vector<std::vector<float>> out;
    ASSERT_TRUE(FeedChunk(**cache, *seq, s, from, n, true, &out).ok());
    for (int32_t l = 0; l < 2; ++l) {
      for (int32_t i = 0; i < n; ++i) {
        auto ref = RefAttention(s, l, from + i, [&](int32_t j, int32_t kp) {
          return DmsVisible(s, l, j, kp, from + i, w);
        });
        EXPECT_LT(MaxRelErr(out[l].data() + (size_t)i * nh * hd, ref.data(), ref.size()), 1e-5);
      }
      for (int32_t j = 0; j < nkv; ++j) {
        auto res = (*cache)->ResidentPositions(*seq, l, j);
        std::sort(res.begin(), res.end());
        EXPECT_EQ(res, DmsResident(s, l, j, from + n - 1, w));
      }
    }
    from += n;
  }
  EXPECT_EQ(from, T);
}

// A chunk token recycles the slot of an old flagged token that earlier queries of the same chunk
// still see: the queries must see the old key, not the new one.
TEST(DmsChunk, RecycledSlotStillVisibleInsideChunk_w2) {
  const int32_t w = 2;
  Stream s = MakeStream(8, 1, 1, 1, 4, 555, 0.0);
  // Token 0 flagged (d[1] = 1); a chunk of tokens 1..6 then recycles 0's slot at token 3.
  s.bits[0] = {0, 1, 0, 0, 0, 0, 0, 0};
  auto cache = MakeCpuKvCache(Geo(1, 1, 1, 4, 1), Dms(w), 1 << 20);
  auto seq = (*cache)->Create();
  ASSERT_TRUE(FeedChunk(**cache, *seq, s, 0, 1, true).ok());
  std::vector<std::vector<float>> out;
  ASSERT_TRUE(FeedChunk(**cache, *seq, s, 1, 6, true, &out).ok());
  for (int32_t i = 0; i < 6; ++i) {
    const int32_t qp = 1 + i;
    auto ref = RefAttention(s, 0, qp, [&](int32_t j, int32_t kp) { return DmsVisible(s, 0, j, kp, qp, w); });
    EXPECT_LT(MaxRelErr(out[0].data() + (size_t)i * 4, ref.data(), ref.size()), 1e-5) << qp;
  }
  EXPECT_EQ((*cache)->ResidentPositions(*seq, 0, 0), (std::vector<int32_t>{1, 2, 3, 4, 5, 6}));
  // One-slot blocks: 6, not 7, so token 0's slot went to a later token (token 3).
  EXPECT_EQ((*cache)->total_blocks() - (*cache)->free_blocks(), 6);
}

}  // namespace
}  // namespace dmsrt
