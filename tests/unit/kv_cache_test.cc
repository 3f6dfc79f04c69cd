// Unit tests of the CPU KV store: dense attention against a float64 reference (GQA mapping,
// block boundaries, chunked prefill), the pool budget and RESOURCE_EXHAUSTED, figures, the
// baseline policies (window, tova, h2o, forced) and the parsers.
#include "runtime/kv/kv_cache.h"

#include <algorithm>
#include <numeric>
#include <random>
#include <set>
#include <string>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/cpu/thread_pool.h"
#include "tests/unit/kv_test_util.h"

namespace dmsrt {
namespace {

using kvtest::FeedChunk;
using kvtest::Geo;
using kvtest::MakeStream;
using kvtest::MaxRelErr;
using kvtest::RefAttention;
using kvtest::Stream;

// Feeds the whole stream in chunks of the given sizes and checks every output against the
// float64 reference with visibility `vis(layer, j, kp, qp)`.
void CheckAgainstReference(KvCache& cache, const Stream& s, const std::vector<int32_t>& chunks,
                           bool with_bits,
                           const std::function<bool(int32_t, int32_t, int32_t, int32_t)>& vis,
                           double tol) {
  auto seq = cache.Create();
  ASSERT_TRUE(seq.ok());
  int32_t from = 0;
  for (int32_t n : chunks) {
    std::vector<std::vector<float>> out;
    ASSERT_TRUE(FeedChunk(cache, *seq, s, from, n, with_bits, &out).ok());
    for (int32_t l = 0; l < s.n_layers; ++l) {
      for (int32_t i = 0; i < n; ++i) {
        const int32_t qp = from + i;
        auto ref = RefAttention(s, l, qp, [&](int32_t j, int32_t kp) { return vis(l, j, kp, qp); });
        const double err = MaxRelErr(out[l].data() + (size_t)i * s.nh * s.hd, ref.data(), ref.size());
        ASSERT_LT(err, tol) << "layer " << l << " query " << qp;
      }
    }
    from += n;
    EXPECT_EQ(cache.Length(*seq), from);
  }
  ASSERT_TRUE(cache.Free(*seq).ok());
}

struct DenseCase {
  int32_t nkv, nh, hd, block, len, chunk;
};

class DenseAttention : public ::testing::TestWithParam<DenseCase> {};

TEST_P(DenseAttention, MatchesFloat64Reference) {
  const DenseCase c = GetParam();
  KvPolicyConfig pol;
  auto cache = MakeCpuKvCache(Geo(2, c.nkv, c.nh, c.hd, c.block), pol, 64ll << 20);
  ASSERT_TRUE(cache.ok()) << cache.status();
  Stream s = MakeStream(c.len, 2, c.nh, c.nkv, c.hd, 1234 + c.len, 0.5);
  std::vector<int32_t> chunks;
  for (int32_t t = 0; t < c.len; t += c.chunk) chunks.push_back(std::min(c.chunk, c.len - t));
  CheckAgainstReference(**cache, s, chunks, false,
                        [](int32_t, int32_t, int32_t kp, int32_t qp) { return kp <= qp; }, 2e-5);
  // Dense: every head holds every token, in order.
  EXPECT_EQ((*cache)->free_blocks(), (*cache)->total_blocks());
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, DenseAttention,
    ::testing::Values(DenseCase{1, 1, 1, 1, 19, 1}, DenseCase{3, 9, 64, 16, 33, 1},
                      DenseCase{3, 9, 64, 16, 33, 7}, DenseCase{2, 8, 19, 5, 40, 40},
                      DenseCase{4, 4, 8, 3, 25, 4}, DenseCase{1, 5, 111, 7, 29, 3},
                      DenseCase{2, 6, 17, 16, 48, 16}, DenseCase{2, 6, 17, 16, 49, 1}),
    [](const auto& info) {
      const DenseCase& c = info.param;
      return absl::StrCat("kv", c.nkv, "_heads", c.nh, "_dim", c.hd, "_block", c.block, "_len",
                          c.len, "_chunk", c.chunk);
    });

TEST(KvCache, DenseResidentPositionsAndFigures_block4_len10) {
  KvPolicyConfig pol;
  auto cache = MakeCpuKvCache(Geo(3, 2, 4, 8, 4), pol, 1 << 20);
  ASSERT_TRUE(cache.ok());
  KvCache& kv = **cache;
  Stream s = MakeStream(10, 3, 4, 2, 8, 7, 0.5);
  auto seq = kv.Create();
  ASSERT_TRUE(seq.ok());
  ASSERT_TRUE(FeedChunk(kv, *seq, s, 0, 6, false).ok());
  for (int t = 6; t < 10; ++t) ASSERT_TRUE(FeedChunk(kv, *seq, s, t, 1, false).ok());
  std::vector<int32_t> all(10);
  std::iota(all.begin(), all.end(), 0);
  for (int l = 0; l < 3; ++l)
    for (int j = 0; j < 2; ++j) EXPECT_EQ(kv.ResidentPositions(*seq, l, j), all);
  KvFigures f = kv.Figures();
  EXPECT_EQ(f.logical_tokens, 3 * 2 * 10);
  EXPECT_EQ(f.resident_tokens, 3 * 2 * 10);
  EXPECT_EQ(f.flagged_tokens, 0);
  EXPECT_EQ(f.blocks_held, 3 * 2 * 3);  // ceil(10 / 4) = 3 per head
  EXPECT_EQ(f.dense_blocks, 3 * 2 * 3);
  EXPECT_EQ(f.kv_bytes, f.blocks_held * kv.block_bytes());
  EXPECT_EQ(kv.block_bytes(), 2 * 4 * 8 * 4);
  EXPECT_EQ(f.kv_reads, f.dense_reads);
  EXPECT_EQ(f.dense_reads, 3 * 2 * 55);  // Σ_{t<10} (t+1)
  EXPECT_DOUBLE_EQ(f.cache_cr(), 1.0);
  EXPECT_DOUBLE_EQ(f.block_cr(), 1.0);
  EXPECT_DOUBLE_EQ(f.asymptotic_cr(), 1.0);
  ASSERT_EQ(f.per_layer.size(), 3u);
  ASSERT_EQ(f.per_head.size(), 6u);
  EXPECT_EQ(f.per_layer[1].logical, 20);
  EXPECT_EQ(f.per_head[5].resident, 10);
  KvFigures fs = kv.Figures(*seq);
  EXPECT_EQ(fs.blocks_held, f.blocks_held);
  ASSERT_TRUE(kv.Free(*seq).ok());
  EXPECT_EQ(kv.free_blocks(), kv.total_blocks());
  EXPECT_EQ(kv.Figures().blocks_held, 0);
}

TEST(KvCache, BudgetExhaustionLeavesOthersIntact_block4) {
  // 2 layers x 1 head x block 4: a budget of 10 blocks.
  KvGeometry g = Geo(2, 1, 2, 8, 4);
  const int64_t block_bytes = 2 * 4 * 8 * 4;
  KvPolicyConfig pol;
  auto cache = MakeCpuKvCache(g, pol, 10 * block_bytes + 17);
  ASSERT_TRUE(cache.ok());
  KvCache& kv = **cache;
  EXPECT_EQ(kv.total_blocks(), 10);
  Stream s = MakeStream(40, 2, 2, 1, 8, 99, 0.5);
  auto a = kv.Create();
  auto b = kv.Create();
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_TRUE(FeedChunk(kv, *a, s, 0, 12, false).ok());  // 3 blocks per layer: 6
  // b wants 9 tokens = 3 blocks per layer = 6 > 4 free.
  absl::Status st = FeedChunk(kv, *b, s, 0, 9, false);
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted) << st;
  EXPECT_NE(std::string(st.message()).find("--kv-budget"), std::string::npos) << st;
  EXPECT_EQ(kv.Length(*b), 0);
  EXPECT_EQ(kv.free_blocks(), 4);
  // A reservation of a's next step must not be eaten by b.
  ASSERT_TRUE(kv.Reserve(*a, 4).ok());  // 2 more blocks
  EXPECT_EQ(kv.Reserve(*b, 8).code(), absl::StatusCode::kResourceExhausted);  // needs 4, 2 left
  ASSERT_TRUE(kv.Reserve(*b, 4).ok());
  // a continues and gives the same outputs as an unconstrained cache.
  std::vector<std::vector<float>> out_a;
  ASSERT_TRUE(FeedChunk(kv, *a, s, 12, 4, false, &out_a).ok());
  auto big = MakeCpuKvCache(g, pol, 1 << 20);
  auto r = (*big)->Create();
  std::vector<std::vector<float>> ref;
  ASSERT_TRUE(FeedChunk(**big, *r, s, 0, 12, false).ok());
  ASSERT_TRUE(FeedChunk(**big, *r, s, 12, 4, false, &ref).ok());
  EXPECT_EQ(out_a, ref);
  // The pool never exceeds the budget.
  EXPECT_LE(kv.total_blocks() * kv.block_bytes(), 10 * block_bytes + 17);
  ASSERT_TRUE(kv.Free(*a).ok());
  ASSERT_TRUE(kv.Free(*b).ok());
  EXPECT_EQ(kv.free_blocks(), 10);
}

TEST(KvCache, AttendWithoutReserveFailsLoudly_block2) {
  KvGeometry g = Geo(1, 1, 1, 4, 2);
  KvPolicyConfig pol;
  auto cache = MakeCpuKvCache(g, pol, 2 * 2 * 4 * 4);  // one block
  ASSERT_TRUE(cache.ok());
  KvCache& kv = **cache;
  Stream s = MakeStream(3, 1, 1, 1, 4, 5, 0.5);
  auto a = kv.Create();
  ASSERT_TRUE(FeedChunk(kv, *a, s, 0, 2, false).ok());
  std::vector<float> out(4, 0.0f);
  kv.AttendAndAppend(*a, 0, 1, s.qt(0, 2), s.kt(0, 2), s.vt(0, 2), nullptr, out.data());
  EXPECT_TRUE(std::isnan(out[0]));
  EXPECT_EQ(kv.Reserve(*a, 1).code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(kv.Free(*a).ok());
  EXPECT_EQ(kv.free_blocks(), 1);
}

TEST(KvCache, RejectsBadConfigs) {
  KvPolicyConfig pol;
  EXPECT_EQ(MakeCpuKvCache(Geo(1, 2, 3, 8, 4), pol, 1 << 20).status().code(),
            absl::StatusCode::kInvalidArgument);  // 3 heads over 2 KV heads
  EXPECT_EQ(MakeCpuKvCache(Geo(1, 1, 1, 8, 4), pol, 10).status().code(),
            absl::StatusCode::kInvalidArgument);  // budget below one block
  pol.kind = KvPolicyKind::kWindow;
  pol.window = 0;
  EXPECT_EQ(MakeCpuKvCache(Geo(1, 1, 1, 8, 4), pol, 1 << 20).status().code(),
            absl::StatusCode::kInvalidArgument);
  pol.kind = KvPolicyKind::kH2o;
  pol.budget_tokens = 1;
  EXPECT_EQ(MakeCpuKvCache(Geo(1, 1, 1, 8, 4), pol, 1 << 20).status().code(),
            absl::StatusCode::kInvalidArgument);
  pol.kind = KvPolicyKind::kForced;
  pol.window = 4;
  pol.force_rate = 1.5;
  EXPECT_EQ(MakeCpuKvCache(Geo(1, 1, 1, 8, 4), pol, 1 << 20).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto kv = MakeCpuKvCache(Geo(1, 1, 1, 8, 4), KvPolicyConfig{}, 1 << 20);
  ASSERT_TRUE(kv.ok());
  EXPECT_EQ((*kv)->Free(42).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ((*kv)->Fork(42).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ((*kv)->Reserve(42, 1).code(), absl::StatusCode::kNotFound);
}

// ---- baselines ------------------------------------------------------------------------------

std::vector<int32_t> Sorted(std::vector<int32_t> v) {
  std::sort(v.begin(), v.end());
  return v;
}

std::vector<int32_t> ChunkSizes(int32_t T, uint32_t seed, int32_t max_chunk) {
  std::mt19937 rng(seed);
  std::vector<int32_t> c;
  for (int32_t t = 0; t < T;) {
    const int32_t n = std::min<int32_t>(T - t, rng() % 2 ? 1 : 1 + rng() % max_chunk);
    c.push_back(n);
    t += n;
  }
  return c;
}

struct WindowCase {
  int32_t window, sinks, block, len, max_chunk;
};
class WindowPolicy : public ::testing::TestWithParam<WindowCase> {};

TEST_P(WindowPolicy, KeepsExactlySinksAndLastWindow) {
  const WindowCase c = GetParam();
  KvPolicyConfig pol;
  pol.kind = KvPolicyKind::kWindow;
  pol.window = c.window;
  pol.sinks = c.sinks;
  const int32_t nkv = 2, nh = 6, hd = 9;
  auto cache = MakeCpuKvCache(Geo(2, nkv, nh, hd, c.block), pol, 4 << 20);
  ASSERT_TRUE(cache.ok()) << cache.status();
  KvCache& kv = **cache;
  Stream s = MakeStream(c.len, 2, nh, nkv, hd, 77 + c.len, 0.5);
  auto vis = [&](int32_t kp, int32_t qp) { return kp <= qp && (kp < c.sinks || qp - kp < c.window); };
  auto seq = kv.Create();
  int32_t from = 0;
  for (int32_t n : ChunkSizes(c.len, c.len, c.max_chunk)) {
    std::vector<std::vector<float>> out;
    ASSERT_TRUE(FeedChunk(kv, *seq, s, from, n, false, &out).ok());
    const int32_t p = from + n - 1;
    std::vector<int32_t> want;
    for (int32_t k = 0; k <= p; ++k)
      if (vis(k, p)) want.push_back(k);
    for (int32_t l = 0; l < 2; ++l) {
      for (int32_t j = 0; j < nkv; ++j) {
        auto res = kv.ResidentPositions(*seq, l, j);
        ASSERT_LE((int32_t)res.size(), c.sinks + c.window);
        ASSERT_EQ(Sorted(res), want) << "after " << p;
      }
      for (int32_t i = 0; i < n; ++i) {
        auto ref = RefAttention(s, l, from + i, [&](int32_t, int32_t kp) { return vis(kp, from + i); });
        ASSERT_LT(MaxRelErr(out[l].data() + (size_t)i * nh * hd, ref.data(), ref.size()), 2e-5);
      }
    }
    from += n;
  }
  const KvFigures f = kv.Figures();
  EXPECT_EQ(f.resident_tokens, 2 * nkv * std::min(c.len, c.sinks + c.window));
  EXPECT_EQ(f.blocks_held, 2 * nkv * ((std::min(c.len, c.sinks + c.window) + c.block - 1) / c.block));
}

INSTANTIATE_TEST_SUITE_P(
    Sizes, WindowPolicy,
    ::testing::Values(WindowCase{1, 0, 1, 10, 3}, WindowCase{4, 2, 4, 37, 9},
                      WindowCase{7, 4, 5, 64, 20}, WindowCase{16, 1, 16, 111, 40},
                      WindowCase{3, 0, 2, 19, 19}),
    [](const auto& info) {
      const WindowCase& c = info.param;
      return absl::StrCat("window", c.window, "_sinks", c.sinks, "_block", c.block, "_len", c.len,
                          "_chunk", c.max_chunk);
    });

// Independent float64 simulation of tova / h2o on one head of one layer.
std::vector<std::vector<int32_t>> SimulateScored(const Stream& s, int32_t l, int32_t j,
                                                 bool h2o, int32_t budget) {
  const int32_t g = s.nh / s.nkv;
  std::vector<int32_t> pos;
  std::vector<double> score;
  int32_t victim = -1;
  std::vector<std::vector<int32_t>> history;
  for (int32_t t = 0; t < s.T; ++t) {
    if (victim >= 0) {
      pos[victim] = t;
      score[victim] = 0;
      victim = -1;
    } else {
      pos.push_back(t);
      score.push_back(0);
    }
    const int32_t m = (int32_t)pos.size();
    std::vector<double> avg(m, 0.0);
    for (int32_t hh = 0; hh < g; ++hh) {
      const float* q = s.qt(l, t) + (size_t)(j * g + hh) * s.hd;
      std::vector<double> sc(m);
      double mx = -1e300, sum = 0;
      for (int32_t c = 0; c < m; ++c) {
        const float* k = s.kt(l, pos[c]) + (size_t)j * s.hd;
        double d = 0;
        for (int32_t i = 0; i < s.hd; ++i) d += (double)q[i] * k[i];
        sc[c] = d / std::sqrt((double)s.hd);
        mx = std::max(mx, sc[c]);
      }
      for (auto& x : sc) sum += (x = std::exp(x - mx));
      for (int32_t c = 0; c < m; ++c) avg[c] += sc[c] / sum / g;
    }
    if (h2o)
      for (int32_t c = 0; c < m; ++c) score[c] += avg[c];
    if (m >= budget) {
      double best = 0;
      for (int32_t c = 0; c < m; ++c) {
        if (h2o && pos[c] > t - budget / 2) continue;
        const double v = h2o ? score[c] : avg[c];
        if (victim < 0 || v < best || (v == best && pos[c] < pos[victim])) {
          victim = c;
          best = v;
        }
      }
    }
    history.push_back(Sorted(pos));
  }
  return history;
}

struct ScoredCase {
  KvPolicyKind kind;
  int32_t budget, block, len;
};
class ScoredPolicy : public ::testing::TestWithParam<ScoredCase> {};

TEST_P(ScoredPolicy, MatchesFloat64SimulationAndStaysInBudget) {
  const ScoredCase c = GetParam();
  const bool h2o = c.kind == KvPolicyKind::kH2o;
  KvPolicyConfig pol;
  pol.kind = c.kind;
  pol.budget_tokens = c.budget;
  const int32_t nkv = 2, nh = 4, hd = 7;
  Stream s = MakeStream(c.len, 1, nh, nkv, hd, 900 + c.budget, 0.5);
  std::vector<std::vector<std::vector<int32_t>>> sim;
  for (int32_t j = 0; j < nkv; ++j) sim.push_back(SimulateScored(s, 0, j, h2o, c.budget));
  for (bool chunked : {false, true}) {
    auto cache = MakeCpuKvCache(Geo(1, nkv, nh, hd, c.block), pol, 4 << 20);
    ASSERT_TRUE(cache.ok()) << cache.status();
    KvCache& kv = **cache;
    auto seq = kv.Create();
    int32_t from = 0;
    for (int32_t n : chunked ? ChunkSizes(c.len, c.budget, 2 * c.budget) : std::vector<int32_t>(c.len, 1)) {
      std::vector<std::vector<float>> out;
      ASSERT_TRUE(FeedChunk(kv, *seq, s, from, n, false, &out).ok());
      const int32_t p = from + n - 1;
      for (int32_t j = 0; j < nkv; ++j) {
        auto res = Sorted(kv.ResidentPositions(*seq, 0, j));
        ASSERT_LE((int32_t)res.size(), c.budget);
        ASSERT_EQ(res, sim[j][p]) << "after " << p << " head " << j << (chunked ? " chunked" : "");
        if (h2o) {  // the recent half is always resident
          for (int32_t k = std::max(0, p - c.budget / 2 + 1); k <= p; ++k)
            ASSERT_TRUE(std::binary_search(res.begin(), res.end(), k));
        }
      }
      from += n;
    }
    const KvFigures f = kv.Figures();
    EXPECT_EQ(f.resident_tokens, nkv * std::min(c.len, c.budget));
    EXPECT_LT(f.kv_reads, f.dense_reads);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Budgets, ScoredPolicy,
    ::testing::Values(ScoredCase{KvPolicyKind::kTova, 1, 1, 12}, ScoredCase{KvPolicyKind::kTova, 5, 2, 40},
                      ScoredCase{KvPolicyKind::kTova, 16, 16, 64}, ScoredCase{KvPolicyKind::kH2o, 2, 1, 15},
                      ScoredCase{KvPolicyKind::kH2o, 7, 3, 50}, ScoredCase{KvPolicyKind::kH2o, 20, 8, 64}),
    [](const auto& info) {
      const ScoredCase& c = info.param;
      return absl::StrCat(KvPolicyName(c.kind), "_budget", c.budget, "_block", c.block, "_len", c.len);
    });

TEST(ForcedPolicy, DeterministicRateAndChunkInvariant_w8_rate075) {
  KvPolicyConfig pol;
  pol.kind = KvPolicyKind::kForced;
  pol.window = 8;
  pol.force_rate = 0.75;
  pol.seed = 3;
  const int32_t T = 1200, nkv = 4, nh = 4, hd = 4;
  KvGeometry g = Geo(2, nkv, nh, hd, 16);
  g.kv_head_offset = 4;
  Stream s = MakeStream(T, 2, nh, nkv, hd, 11, 0.5);
  auto run = [&](const KvPolicyConfig& p, const std::vector<int32_t>& chunks) {
    auto cache = MakeCpuKvCache(g, p, 16 << 20);
    EXPECT_TRUE(cache.ok());
    auto seq = (*cache)->Create();
    int32_t from = 0;
    for (int32_t n : chunks) {
      EXPECT_TRUE(FeedChunk(**cache, *seq, s, from, n, true, nullptr).ok());  // bits ignored
      from += n;
    }
    std::vector<std::vector<int32_t>> res;
    for (int l = 0; l < 2; ++l)
      for (int j = 0; j < nkv; ++j) res.push_back(Sorted((*cache)->ResidentPositions(*seq, l, j)));
    return std::make_pair(res, (*cache)->Figures());
  };
  auto a = run(pol, std::vector<int32_t>(T, 1));
  auto b = run(pol, ChunkSizes(T, 5, 100));
  auto c = run(pol, {T});
  EXPECT_EQ(a.first, b.first);
  EXPECT_EQ(a.first, c.first);
  EXPECT_EQ(a.second.kv_reads, b.second.kv_reads);
  EXPECT_EQ(a.second.kv_reads, c.second.kv_reads);
  // The last w+1 tokens are always resident; the rate is close to the configured one.
  for (const auto& r : a.first) {
    for (int32_t k = T - 9; k < T; ++k) EXPECT_TRUE(std::binary_search(r.begin(), r.end(), k));
  }
  EXPECT_NEAR(a.second.eviction_rate(), 0.75, 0.03);
  EXPECT_NEAR(a.second.asymptotic_cr(), 4.0, 0.6);
  EXPECT_GT(a.second.cache_cr(), 3.0);
  EXPECT_GT(a.second.block_cr(), 2.5);
  // Heads differ; another seed gives another cache.
  EXPECT_NE(a.first[0], a.first[1]);
  KvPolicyConfig other = pol;
  other.seed = 4;
  EXPECT_NE(run(other, {T}).first, a.first);
}

// Commit-only calls (q == out == nullptr) leave the same cache as attending calls.
TEST(KvCache, CommitOnlyFillMatchesAttendingFill_dms_w4_block3) {
  KvPolicyConfig pol;
  pol.kind = KvPolicyKind::kDms;
  pol.window = 4;
  const int32_t nkv = 2, nh = 4, hd = 16, T = 45;
  Stream s = MakeStream(T, 2, nh, nkv, hd, 321, 0.5);
  auto a = MakeCpuKvCache(Geo(2, nkv, nh, hd, 3), pol, 1 << 20);
  auto b = MakeCpuKvCache(Geo(2, nkv, nh, hd, 3), pol, 1 << 20);
  ASSERT_TRUE(a.ok() && b.ok());
  auto sa = (*a)->Create();
  auto sb = (*b)->Create();
  ASSERT_TRUE(FeedChunk(**a, *sa, s, 0, 30, true).ok());
  ASSERT_TRUE((*b)->Reserve(*sb, 30).ok());
  for (int32_t l = 0; l < 2; ++l) {
    (*b)->AttendAndAppend(*sb, l, 30, nullptr, s.kt(l, 0), s.vt(l, 0), s.bt(l, 0), nullptr);
  }
  EXPECT_EQ((*b)->Length(*sb), 30);
  for (int32_t t = 30; t < T; ++t) {
    std::vector<std::vector<float>> oa, ob;
    ASSERT_TRUE(FeedChunk(**a, *sa, s, t, 1, true, &oa).ok());
    ASSERT_TRUE(FeedChunk(**b, *sb, s, t, 1, true, &ob).ok());
    EXPECT_EQ(oa, ob) << t;
  }
  for (int32_t l = 0; l < 2; ++l)
    for (int32_t j = 0; j < nkv; ++j)
      EXPECT_EQ((*a)->ResidentPositions(*sa, l, j), (*b)->ResidentPositions(*sb, l, j));
  // tova cannot commit without attention weights: refused loudly.
  KvPolicyConfig tova;
  tova.kind = KvPolicyKind::kTova;
  tova.budget_tokens = 4;
  auto c = MakeCpuKvCache(Geo(1, nkv, nh, hd, 3), tova, 1 << 20);
  auto sc = (*c)->Create();
  ASSERT_TRUE((*c)->Reserve(*sc, 2).ok());
  (*c)->AttendAndAppend(*sc, 0, 2, nullptr, s.kt(0, 0), s.vt(0, 0), nullptr, nullptr);
  EXPECT_EQ((*c)->Reserve(*sc, 1).code(), absl::StatusCode::kFailedPrecondition);
}

// Several sequences reserve before any of them runs (as a batched step does): reservations add
// up, and each step stays within its own.
TEST(KvCache, ReservationsOfABatchAddUp_block2) {
  KvGeometry g = Geo(1, 1, 1, 4, 2);
  KvPolicyConfig pol;
  const int64_t bb = 2 * 2 * 4 * 4;
  auto cache = MakeCpuKvCache(g, pol, 5 * bb);
  ASSERT_TRUE(cache.ok());
  KvCache& kv = **cache;
  Stream s = MakeStream(8, 1, 1, 1, 4, 8, 0.5);
  auto a = kv.Create();
  auto b = kv.Create();
  auto c = kv.Create();
  ASSERT_TRUE(kv.Reserve(*a, 4).ok());  // 2 blocks
  ASSERT_TRUE(kv.Reserve(*b, 3).ok());  // 2 blocks
  EXPECT_EQ(kv.Reserve(*c, 3).code(), absl::StatusCode::kResourceExhausted);  // 1 left
  ASSERT_TRUE(kv.Reserve(*c, 2).ok());  // 1 block
  std::vector<float> out(4 * 4);
  kv.AttendAndAppend(*b, 0, 3, s.qt(0, 0), s.kt(0, 0), s.vt(0, 0), nullptr, out.data());
  kv.AttendAndAppend(*c, 0, 2, s.qt(0, 0), s.kt(0, 0), s.vt(0, 0), nullptr, out.data());
  kv.AttendAndAppend(*a, 0, 4, s.qt(0, 0), s.kt(0, 0), s.vt(0, 0), nullptr, out.data());
  for (float x : out) EXPECT_FALSE(std::isnan(x));
  EXPECT_EQ(kv.free_blocks(), 0);
  EXPECT_EQ(kv.Length(*a), 4);
  EXPECT_EQ(kv.Length(*b), 3);
  EXPECT_EQ(kv.Length(*c), 2);
  // b's half-full block has room for one more token without a new block.
  EXPECT_TRUE(kv.Reserve(*b, 1).ok());
  EXPECT_EQ(kv.Reserve(*a, 1).code(), absl::StatusCode::kResourceExhausted);
}

// Worker threads for the heads give bit-identical results (each head is computed the same way,
// only on another thread), for decode steps and chunks, and for every policy.
TEST(KvCache, ThreadPoolGivesIdenticalResults_kv4_threads3) {
  kernels::ThreadPool pool(3);
  for (KvPolicyKind kind : {KvPolicyKind::kNone, KvPolicyKind::kDms, KvPolicyKind::kWindow,
                            KvPolicyKind::kTova}) {
    KvPolicyConfig pol;
    pol.kind = kind;
    pol.window = 9;
    pol.budget_tokens = 40;
    const int32_t nkv = 4, nh = 8, hd = 64, T = 150;
    Stream s = MakeStream(T, 2, nh, nkv, hd, 17, 0.5);
    auto a = MakeCpuKvCache(Geo(2, nkv, nh, hd, 16), pol, 8 << 20);
    auto b = MakeCpuKvCache(Geo(2, nkv, nh, hd, 16), pol, 8 << 20);
    ASSERT_TRUE(a.ok() && b.ok());
    (*b)->SetThreadPool(&pool);
    auto sa = (*a)->Create();
    auto sb = (*b)->Create();
    int32_t from = 0;
    for (int32_t n : ChunkSizes(T, 3, 60)) {
      std::vector<std::vector<float>> oa, ob;
      ASSERT_TRUE(FeedChunk(**a, *sa, s, from, n, true, &oa).ok());
      ASSERT_TRUE(FeedChunk(**b, *sb, s, from, n, true, &ob).ok());
      ASSERT_EQ(oa, ob) << KvPolicyName(kind) << " at " << from;
      from += n;
    }
    EXPECT_EQ((*a)->Figures().kv_reads, (*b)->Figures().kv_reads);
    (*b)->SetThreadPool(nullptr);
  }
}

// Decode over more slots than one key chunk (kDecodeKeyChunk = 128): the chunks' partial softmaxes
// combine to the reference attention, and the result is the same with and without worker threads
// (the chunking depends on the slot count only).
TEST(KvCache, LongDecodeKeyChunksMatchReferenceAndThreadCount_kv3_g3) {
  kernels::ThreadPool pool(2);
  const int32_t nkv = 3, nh = 9, hd = 64, T = 420;
  Stream s = MakeStream(T, 1, nh, nkv, hd, 29, 0.0);
  KvPolicyConfig pol;  // none: every key stays visible
  auto a = MakeCpuKvCache(Geo(1, nkv, nh, hd, 16), pol, 16 << 20);
  auto b = MakeCpuKvCache(Geo(1, nkv, nh, hd, 16), pol, 16 << 20);
  ASSERT_TRUE(a.ok() && b.ok());
  (*b)->SetThreadPool(&pool);
  auto sa = (*a)->Create();
  auto sb = (*b)->Create();
  const int32_t prompt = 120;  // decode then runs at 121..420 slots: one to four chunks
  ASSERT_TRUE(FeedChunk(**a, *sa, s, 0, prompt, false).ok());
  ASSERT_TRUE(FeedChunk(**b, *sb, s, 0, prompt, false).ok());
  for (int32_t t = prompt; t < T; ++t) {
    std::vector<std::vector<float>> oa, ob;
    ASSERT_TRUE(FeedChunk(**a, *sa, s, t, 1, false, &oa).ok());
    ASSERT_TRUE(FeedChunk(**b, *sb, s, t, 1, false, &ob).ok());
    ASSERT_EQ(oa, ob) << "decode of token " << t;
    if (t % 37 == 0 || t == T - 1) {
      const std::vector<double> ref = RefAttention(s, 0, t, [](int32_t, int32_t) { return true; });
      EXPECT_LT(MaxRelErr(oa[0].data(), ref.data(), ref.size()), 2e-5) << "decode of token " << t;
    }
  }
  EXPECT_EQ((*a)->Figures().kv_reads, (*b)->Figures().kv_reads);
  (*b)->SetThreadPool(nullptr);
}

// FreezeEviction (compress-then-continue): what is resident when a sequence is frozen stays, every
// later token adds to it, and nothing leaves, under flag-driven (dms, window) and victim (tova)
// policies alike; the sequence it was forked from keeps evicting.
TEST(KvCache, FreezeEvictionKeepsTheCompressedContext_dms_window_tova) {
  for (KvPolicyKind kind : {KvPolicyKind::kDms, KvPolicyKind::kWindow, KvPolicyKind::kTova}) {
    KvPolicyConfig pol;
    pol.kind = kind;
    pol.window = 4;
    pol.sinks = 2;
    pol.budget_tokens = 12;
    const int32_t nkv = 2, nh = 4, hd = 8, T = 90, C = 50;
    Stream s = MakeStream(T, 2, nh, nkv, hd, 31, 0.6);
    auto kv = MakeCpuKvCache(Geo(2, nkv, nh, hd, 4), pol, 4 << 20);
    ASSERT_TRUE(kv.ok());
    auto seq = (*kv)->Create();
    ASSERT_TRUE(seq.ok());
    const bool bits = kind == KvPolicyKind::kDms;
    ASSERT_TRUE(FeedChunk(**kv, *seq, s, 0, C, bits).ok());
    auto frozen = (*kv)->Fork(*seq);
    ASSERT_TRUE(frozen.ok());
    ASSERT_TRUE((*kv)->FreezeEviction(*frozen).ok());
    std::vector<std::vector<int32_t>> kept(2 * nkv);
    for (int32_t l = 0; l < 2; ++l) {
      for (int32_t j = 0; j < nkv; ++j) {
        kept[l * nkv + j] = (*kv)->ResidentPositions(*frozen, l, j);
        ASSERT_LT(static_cast<int32_t>(kept[l * nkv + j].size()), C) << KvPolicyName(kind);
      }
    }
    int32_t parent_resident_max = 0;
    for (int32_t t = C; t < T;) {  // chunks of 8, then decode steps for the last 8 tokens
      const int32_t n = T - t > 8 ? 8 : 1;
      ASSERT_TRUE(FeedChunk(**kv, *frozen, s, t, n, bits).ok()) << KvPolicyName(kind);
      ASSERT_TRUE(FeedChunk(**kv, *seq, s, t, n, bits).ok()) << KvPolicyName(kind);
      t += n;
    }
    for (int32_t l = 0; l < 2; ++l) {
      for (int32_t j = 0; j < nkv; ++j) {
        std::vector<int32_t> want = kept[l * nkv + j];
        for (int32_t t = C; t < T; ++t) want.push_back(t);
        EXPECT_EQ((*kv)->ResidentPositions(*frozen, l, j), want) << KvPolicyName(kind);
        parent_resident_max = std::max<int32_t>(
            parent_resident_max, static_cast<int32_t>((*kv)->ResidentPositions(*seq, l, j).size()));
      }
    }
    EXPECT_LT(parent_resident_max, static_cast<int32_t>(kept[0].size()) + (T - C))
        << KvPolicyName(kind) << ": the parent kept evicting";
  }
}

TEST(KvParse, PolicyNames) {
  for (auto k : {KvPolicyKind::kNone, KvPolicyKind::kDms, KvPolicyKind::kForced,
                 KvPolicyKind::kWindow, KvPolicyKind::kTova, KvPolicyKind::kH2o}) {
    auto p = ParseKvPolicy(KvPolicyName(k));
    ASSERT_TRUE(p.ok());
    EXPECT_EQ(*p, k);
  }
  EXPECT_EQ(*ParseKvPolicy("DMS"), KvPolicyKind::kDms);
  auto bad = ParseKvPolicy("snapkv");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(bad.status().message()).find("none, dms, forced, window, tova, h2o"),
            std::string::npos);
}

}  // namespace
}  // namespace dmsrt
