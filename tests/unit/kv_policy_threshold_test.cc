// Policy threshold: key-norm score against a threshold, with the DMS delay window
// (runtime/kv/policy_threshold.cc).
#include <algorithm>
#include <cmath>
#include <random>

#include "runtime/kv/policy_threshold.h"
#include "tests/unit/kv_policy_test_util.h"

namespace dmsrt {
namespace {

using kvpolicytest::Geo;
using kvpolicytest::Make;

KvPolicyConfig Threshold(double threshold, int32_t window, int32_t shift = 0) {
  KvPolicyConfig c;
  c.kind = KvPolicyKind::kThreshold;
  c.threshold = threshold;
  c.window = window;
  c.threshold_shift = shift;
  return c;
}

// Keys [n, nkv, hd] whose L2 norm is norms[i * nkv + j] (all in channel (i + j) % hd).
std::vector<float> KeysWithNorms(const std::vector<float>& norms, int32_t nkv, int32_t hd) {
  const int32_t n = static_cast<int32_t>(norms.size()) / nkv;
  std::vector<float> k(static_cast<size_t>(n) * nkv * hd, 0.0f);
  for (int32_t i = 0; i < n; ++i) {
    for (int32_t j = 0; j < nkv; ++j) {
      const float sign = (i + j) % 2 ? -1.0f : 1.0f;
      k[(static_cast<size_t>(i) * nkv + j) * hd + (i + j) % hd] = sign * norms[i * nkv + j];
    }
  }
  return k;
}

std::vector<uint8_t> Decide(const KvPolicy& p, int64_t t0, const std::vector<float>& k,
                            const float* k_prev = nullptr) {
  const int32_t nkv = p.geometry().n_kv_heads;
  const int32_t n = static_cast<int32_t>(k.size() / (static_cast<size_t>(nkv) * p.geometry().head_dim));
  std::vector<uint8_t> out(static_cast<size_t>(n) * nkv, 0xAB);
  KvStepInputs in;
  in.k = k.data();
  in.k_prev = k_prev;
  p.Decisions(1, t0, n, in, out.data());
  return out;
}

TEST(KvPolicyThreshold, ScoreIsMinusTheKeyNorm) {
  const float k[4] = {3.0f, -4.0f, 0.0f, 0.0f};
  EXPECT_FLOAT_EQ(KeyNormScore(k, 4), -5.0f);
}

TEST(KvPolicyThreshold, Mechanism) {
  auto p = Make(Threshold(-2.5, 4), Geo(2));
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(p->reuse(), KvSlotReuse::kFlagged);
  EXPECT_EQ(p->delay_window(), 4);
  EXPECT_FALSE(p->model_bits());
  EXPECT_TRUE(p->previous_key());
  EXPECT_EQ(p->KnownFlag(0, 1, 7), -1);  // the keys decide: nothing is known in advance
  const absl::Status idx = p->IndexSupport();
  ASSERT_FALSE(idx.ok());
  EXPECT_NE(idx.message().find("CPU backend only"), std::string::npos);
  auto s1 = Make(Threshold(-2.5, 4, 1), Geo(2));
  ASSERT_NE(s1, nullptr);
  EXPECT_FALSE(s1->previous_key());
}

// Shift 0: d[t] judges token t-1 by its own key, so a chunk's first bit reads k_prev.
TEST(KvPolicyThreshold, NoShiftJudgesEachTokenByItsOwnKey) {
  const int32_t nkv = 2, hd = 8;
  auto p = Make(Threshold(-2.5, 4), Geo(nkv));
  ASSERT_NE(p, nullptr);
  // Norms of tokens 0..3 (head 0, head 1): a norm above 2.5 is a score below -2.5: flagged.
  const std::vector<float> norms = {1, 3, 3, 1, 2, 2, 9, 0.5};
  const std::vector<float> k = KeysWithNorms(norms, nkv, hd);
  // From t0 = 0: d[0] = 0 (flags nothing); d[t] = norm(t-1) > 2.5.
  EXPECT_EQ(Decide(*p, 0, k), (std::vector<uint8_t>{0, 0, 0, 1, 1, 0, 0, 0}));
  // From t0 = 5 with the key of token 4 (norms 4, 1): d[5] comes from it.
  const std::vector<float> prev = KeysWithNorms({4, 1}, nkv, hd);
  EXPECT_EQ(Decide(*p, 5, k, prev.data()), (std::vector<uint8_t>{1, 0, 0, 1, 1, 0, 0, 0}));
  // A score equal to the threshold is not below it.
  const std::vector<float> edge = KeysWithNorms({2.5f, 2.5f, 2.5f, 2.5f}, nkv, hd);
  EXPECT_EQ(Decide(*p, 1, edge, edge.data()), (std::vector<uint8_t>{0, 0, 0, 0}));
}

// Shift 1: d[t] judges token t-1 by the key of token t, as a DMS head does.
TEST(KvPolicyThreshold, ShiftOneJudgesByTheNextKey) {
  const int32_t nkv = 2, hd = 8;
  auto p = Make(Threshold(-2.5, 4, 1), Geo(nkv));
  ASSERT_NE(p, nullptr);
  const std::vector<float> k = KeysWithNorms({1, 3, 3, 1, 2, 2, 9, 0.5}, nkv, hd);
  EXPECT_EQ(Decide(*p, 0, k), (std::vector<uint8_t>{0, 0, 1, 0, 0, 0, 1, 0}));
  EXPECT_EQ(Decide(*p, 3, k), (std::vector<uint8_t>{0, 1, 1, 0, 0, 0, 1, 0}));
}

TEST(KvPolicyThreshold, Validation) {
  EXPECT_TRUE(MakeKvPolicy(Threshold(-1.0, 0), Geo(1)).ok());
  EXPECT_TRUE(MakeKvPolicy(Threshold(-INFINITY, 3), Geo(1)).ok());
  auto w = MakeKvPolicy(Threshold(-1.0, -1), Geo(1));
  ASSERT_FALSE(w.ok());
  EXPECT_NE(w.status().message().find("DMS window must be >= 0"), std::string::npos);
  EXPECT_FALSE(MakeKvPolicy(Threshold(NAN, 3), Geo(1)).ok());
  auto s = MakeKvPolicy(Threshold(-1.0, 3, 2), Geo(1));
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.status().message().find("shift must be 0 or 1"), std::string::npos);
}

// Through the CPU store: token-by-token and chunked commits leave the resident set of
// docs/dms-semantics.md §3 with flag(k) = (score(k) < threshold) (shift 0) or
// (score(k+1) < threshold) (shift 1); the chunked path reads the previous key from the store.
TEST(KvPolicyThreshold, StoreKeepsTheResidentSetOfTheRule) {
  const int32_t nkv = 2, hd = 8, L = 40;
  KvGeometry g = Geo(nkv);
  g.n_layers = 1;
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (int32_t shift = 0; shift <= 1; ++shift) {
    for (int32_t w : {0, 1, 3, 6}) {
      for (int32_t chunk : {1, 3, 7, L}) {
        std::vector<float> k(static_cast<size_t>(L) * nkv * hd), v(k.size());
        for (float& x : k) x = u(rng);
        for (float& x : v) x = u(rng);
        // Threshold at minus the median norm: about half the tokens are flagged.
        std::vector<float> scores;
        for (int32_t r = 0; r < L * nkv; ++r) scores.push_back(KeyNormScore(&k[r * hd], hd));
        std::vector<float> sorted = scores;
        std::nth_element(sorted.begin(), sorted.begin() + L * nkv / 2, sorted.end());
        const double thr = sorted[L * nkv / 2];
        auto cache = MakeCpuKvCache(g, Threshold(thr, w, shift), 1 << 20);
        ASSERT_TRUE(cache.ok()) << cache.status();
        auto seq = (*cache)->Create();
        ASSERT_TRUE(seq.ok());
        for (int32_t t0 = 0; t0 < L; t0 += chunk) {
          const int32_t n = std::min(chunk, L - t0);
          ASSERT_TRUE((*cache)->Reserve(*seq, n).ok());
          const size_t off = static_cast<size_t>(t0) * nkv * hd;
          std::vector<float> q(static_cast<size_t>(n) * g.n_heads * hd, 0.1f), out(q.size());
          (*cache)->AttendAndAppend(*seq, 0, n, q.data(), k.data() + off, v.data() + off, nullptr,
                                    out.data());
          const int64_t p = t0 + n - 1;  // the newest token
          for (int32_t j = 0; j < nkv; ++j) {
            std::vector<int32_t> want;
            for (int64_t kk = 0; kk <= p; ++kk) {
              // flag(kk) is known once token kk+1 has arrived.
              const int64_t judge = kk + shift;
              const bool flagged = kk + 1 <= p && scores[judge * nkv + j] < thr;
              if (!flagged || p - kk <= w) want.push_back(static_cast<int32_t>(kk));
            }
            std::vector<int32_t> got = (*cache)->ResidentPositions(*seq, 0, j);
            std::sort(got.begin(), got.end());
            ASSERT_EQ(got, want) << "shift " << shift << " w " << w << " chunk " << chunk
                                 << " head " << j << " after token " << p;
          }
        }
      }
    }
  }
}

}  // namespace
}  // namespace dmsrt
