// Host tests of the plain C++ references of the CUDA kernels (kernels/reference/*_ref.h): they
// are the oracles of the GPU tests, so they are checked here, without a GPU, against facts
// computed by hand (the worked example of docs/dms-semantics.md §3 among them).
#include <climits>
#include <cmath>
#include <cstdint>
#include <set>
#include <vector>

#include <gtest/gtest.h>

#include "kernels/reference/attention_ref.h"
#include "kernels/reference/dms_ref.h"
#include "kernels/reference/elementwise_ref.h"
#include "kernels/reference/sampling_ref.h"

namespace dmsrt {
namespace kernels {
namespace {

TEST(DecodeAttentionRef, OneKeyGivesItsValueAndEmptyHeadGivesZero) {
  // 2 KV heads of dim 4, block 2; head 0 holds one slot, head 1 none.
  const std::vector<float> q = {1, 2, 3, 4, -1, 0, 1, 0};
  std::vector<float> k(3 * 2 * 4, 0.5f), v(3 * 2 * 4);
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(i);
  const std::vector<int32_t> tables = {2, 0, 1, 0};  // head 0 -> block 2, head 1 -> block 1
  const std::vector<int32_t> lengths = {1, 0};
  std::vector<float> out(8, -1.f);
  DecodeAttentionRef(1, 2, 2, 4, 2, 2, 0.5f, q.data(), k.data(), v.data(), tables.data(),
                     lengths.data(), out.data());
  for (int i = 0; i < 4; ++i) EXPECT_FLOAT_EQ(out[i], v[2 * 2 * 4 + i]);  // block 2, slot 0
  for (int i = 4; i < 8; ++i) EXPECT_EQ(out[i], 0.f);
}

TEST(DecodeAttentionRef, EqualScoresAverageTheValues) {
  // Query orthogonal to every key: uniform weights over 3 slots split across 2 blocks.
  const std::vector<float> q = {0, 0};
  const std::vector<float> k = {1, 0, 2, 0, 3, 0, 4, 0};
  const std::vector<float> v = {1, 10, 2, 20, 4, 40, 8, 80};
  const std::vector<int32_t> tables = {1, 0};
  const std::vector<int32_t> lengths = {3};
  std::vector<float> out(2);
  DecodeAttentionRef(1, 1, 1, 2, 2, 2, 1.f, q.data(), k.data(), v.data(), tables.data(),
                     lengths.data(), out.data());
  // Slots 0,1 are block 1 (values 4, 8), slot 2 is block 0 slot 0 (value 1).
  EXPECT_NEAR(out[0], (4 + 8 + 1) / 3.0, 1e-6);
  EXPECT_NEAR(out[1], (40 + 80 + 10) / 3.0, 1e-5);
}

// The worked example of docs/dms-semantics.md §3: w = 3, d = [0,1,0,1,1,0,0,0,0].
// With q = 0 every visible key gets the same weight; value of key k is the one-hot e_k, so the
// output's non-zero channels are exactly the visible keys.
TEST(PrefillAttentionRef, WorkedExampleVisibility) {
  const int n = 9, d = 9, w = 3;
  const std::vector<int> bits = {0, 1, 0, 1, 1, 0, 0, 0, 0};
  std::vector<float> q(n * d, 0.f), k(n * d, 0.f), v(n * d, 0.f);
  std::vector<int32_t> last(n);
  for (int t = 0; t < n; ++t) {
    v[t * d + t] = 1.f;
    const bool flagged = t + 1 < n && bits[t + 1] == 1;
    last[t] = flagged ? t + w : INT_MAX;
  }
  std::vector<float> out(n * d);
  const int32_t table = 0, old_len = 0, dummy = 0;
  const float dummy_f = 0.f;
  PrefillAttentionRef(n, 0, 1, 1, d, 1, 1, 1.f, q.data(), k.data(), v.data(), last.data(),
                      &dummy_f, &dummy_f, &dummy, &dummy, &table, &old_len, out.data());
  const std::vector<std::set<int>> expect = {
      {}, {}, {}, {0, 1, 2, 3}, {1, 2, 3, 4}, {}, {1, 3, 4, 5, 6}, {1, 4, 5, 6, 7}, {1, 4, 5, 6, 7, 8}};
  for (int qi : {3, 4, 6, 7, 8}) {
    std::set<int> seen;
    for (int c = 0; c < d; ++c) {
      if (out[qi * d + c] > 0.f) seen.insert(c);
    }
    EXPECT_EQ(seen, expect[qi]) << "query " << qi;
  }
}

TEST(PrefillAttentionRef, OneQueryEqualsDecodeOverTheSameKeys) {
  // Old survivors (unflagged) + the chunk's single key == decode over all of them.
  const int d = 4, old_n = 5, bt = 2, max_blocks = 3;
  std::vector<float> pool_k(max_blocks * bt * d), pool_v(max_blocks * bt * d);
  for (size_t i = 0; i < pool_k.size(); ++i) {
    pool_k[i] = std::sin(0.7f * i);
    pool_v[i] = std::cos(0.3f * i);
  }
  std::vector<float> kn = {0.1f, -0.2f, 0.3f, 0.4f}, vn = {1, 2, 3, 4}, q = {0.5f, 1, -1, 2};
  std::vector<int32_t> table = {2, 0, 1}, pos(max_blocks * bt), last(max_blocks * bt, INT_MAX);
  for (int s = 0; s < old_n; ++s) pos[table[s / bt] * bt + s % bt] = s;
  const int32_t old_len = old_n, last_new = INT_MAX;
  std::vector<float> out_p(d), out_d(d);
  PrefillAttentionRef(1, old_n, 1, 1, d, bt, max_blocks, 0.5f, q.data(), kn.data(), vn.data(),
                      &last_new, pool_k.data(), pool_v.data(), pos.data(), last.data(),
                      table.data(), &old_len, out_p.data());
  // Decode: append the new key at slot 5 (block table[2] = 1, slot 1).
  std::vector<float> dk = pool_k, dv = pool_v;
  for (int i = 0; i < d; ++i) {
    dk[(1 * bt + 1) * d + i] = kn[i];
    dv[(1 * bt + 1) * d + i] = vn[i];
  }
  const int32_t len = old_n + 1;
  DecodeAttentionRef(1, 1, 1, d, bt, max_blocks, 0.5f, q.data(), dk.data(), dv.data(),
                     table.data(), &len, out_d.data());
  for (int i = 0; i < d; ++i) EXPECT_NEAR(out_p[i], out_d[i], 1e-6);
}

TEST(DmsRingUpdateRef, WorkedExampleResidentSets) {
  // One head, w = 3, block 2: after token p the resident positions are R(p).
  const int w = 3, bt = 2, max_blocks = 8, dim = 8;
  const std::vector<uint8_t> bits = {0, 1, 0, 1, 1, 0, 0, 0, 0};
  int32_t length = 0;
  std::vector<int32_t> table(max_blocks, -1), ring_slot(w + 1, -1), pos(max_blocks * bt, -1),
      last(max_blocks * bt, -1);
  std::vector<uint8_t> ring_flag(w + 1, 0);
  std::vector<uint16_t> kp(max_blocks * bt * dim), vp(kp.size());
  int32_t next_block = 0;
  const std::vector<std::set<int>> expect = {
      {0}, {0, 1}, {0, 1, 2}, {0, 1, 2, 3}, {1, 2, 3, 4}, {1, 2, 3, 4, 5},
      {1, 3, 4, 5, 6}, {1, 4, 5, 6, 7}, {1, 4, 5, 6, 7, 8}};
  for (int t = 0; t < 9; ++t) {
    std::vector<uint16_t> k(dim, static_cast<uint16_t>(t)), v(dim, static_cast<uint16_t>(100 + t));
    const int32_t spare = next_block;
    int32_t status = 7;
    DmsRingUpdateRef(1, 1, dim, w, bt, max_blocks, &t, &bits[t], k.data(), v.data(), &spare,
                     &length, table.data(), ring_slot.data(), ring_flag.data(), kp.data(),
                     vp.data(), pos.data(), last.data(), &status);
    ASSERT_GE(status, 0);
    if (status == 1) ++next_block;
    std::set<int> resident;
    for (int s = 0; s < length; ++s) {
      const int e = table[s / bt] * bt + s % bt;
      resident.insert(pos[e]);
      EXPECT_EQ(kp[e * dim], static_cast<uint16_t>(pos[e]));  // K written with its token
      EXPECT_EQ(vp[e * dim], static_cast<uint16_t>(100 + pos[e]));
    }
    EXPECT_EQ(resident, expect[t]) << "after token " << t;
    EXPECT_EQ(length, static_cast<int32_t>(expect[t].size()));  // dense: n == |R(t)|
  }
  EXPECT_EQ(next_block, 3);  // 6 slots in blocks of 2: exactly three blocks taken
}

TEST(DmsRingUpdateRef, MissingSpareChangesNothing) {
  const int w = 2, bt = 2, max_blocks = 2, dim = 8;
  int32_t length = 2, t = 2, status = 0;
  const uint8_t bit = 0;
  std::vector<int32_t> table = {0, -1}, ring_slot = {0, 1, -1}, pos(4, -1), last(4, -1);
  std::vector<uint8_t> ring_flag = {0, 0, 0};
  std::vector<uint16_t> kp(4 * dim, 9), vp(4 * dim, 9), k(dim, 1), v(dim, 2);
  const int32_t spare = -1;
  DmsRingUpdateRef(1, 1, dim, w, bt, max_blocks, &t, &bit, k.data(), v.data(), &spare, &length,
                   table.data(), ring_slot.data(), ring_flag.data(), kp.data(), vp.data(),
                   pos.data(), last.data(), &status);
  EXPECT_EQ(status, -1);
  EXPECT_EQ(length, 2);
  EXPECT_EQ(table[1], -1);
  EXPECT_EQ(ring_slot[2], -1);
}

TEST(RopeDmsVariantARef, DecisionZeroingAndRotation) {
  // 2 query heads, 1 KV head (g = 2), head_dim 4, one token at position 1.
  std::vector<float> q = {1, 2, 3, 0.06f, 1, 2, 3, 0.04f};
  std::vector<float> k = {1, 0, 0, 1};
  const int32_t pos = 1;
  uint8_t bit = 9;
  RopeDmsVariantARef(1, 2, 1, 4, 10000.f, true, 100.f, 5.f, false, &pos, q.data(), k.data(), &bit);
  EXPECT_EQ(bit, 1);          // 0.06 * 100 - 5 > 0
  EXPECT_EQ(q[3], 0.f);       // zeroed after RoPE
  // Channel 1 (partner of 3) lost its sine term: x1 * cos(theta_1).
  const double a1 = 1.0 * std::pow(10000.0, -2.0 * 1 / 4);
  EXPECT_NEAR(q[1], 2 * std::cos(a1), 1e-6);
  // Head 1 is not a group leader: plain rotation, pair norms kept.
  EXPECT_NEAR(q[4] * q[4] + q[6] * q[6], 1 + 9, 1e-5);
  EXPECT_NEAR(q[5] * q[5] + q[7] * q[7], 4 + 0.04f * 0.04f, 1e-5);
  EXPECT_NEAR(k[0], std::cos(1.0), 1e-6);
  EXPECT_NEAR(k[2], std::sin(1.0), 1e-6);
  std::vector<float> q2 = {1, 2, 3, 0.04f, 1, 2, 3, 0.04f};
  RopeDmsVariantARef(1, 2, 1, 4, 10000.f, true, 100.f, 5.f, false, &pos, q2.data(), nullptr, &bit);
  EXPECT_EQ(bit, 0);          // 0.04 * 100 - 5 < 0
}

// Llama-3.1's RoPE scaling (theta 5e5, factor 8, low 1, high 4, 8192 original positions) on a
// 128-channel head: high frequencies untouched, low ones divided by 8, a blend between.
TEST(RopeInvFreq, Llama3AndLinearScaling) {
  RopeScalingParams s;
  s.type = RopeScalingParams::kLlama3;
  s.factor = 8.f;
  s.low_freq_factor = 1.f;
  s.high_freq_factor = 4.f;
  s.original_max_positions = 8192;
  const double pi = 3.14159265358979323846;
  int blended = 0;
  for (int32_t i = 0; i < 64; ++i) {
    const double base = std::pow(500000.0, -2.0 * i / 128);
    const double wavelen = 2 * pi / base;
    double want = base;  // wavelength under 8192 / 4: unchanged
    if (wavelen > 8192.0) {
      want = base / 8;
    } else if (wavelen >= 2048.0) {
      const double smooth = (8192.0 / wavelen - 1.0) / 3.0;
      want = (1 - smooth) * base / 8 + smooth * base;
      ++blended;
    }
    EXPECT_NEAR(RopeInvFreq(500000.f, s, i, 128) / want, 1.0, 1e-12) << "channel pair " << i;
  }
  EXPECT_GT(blended, 0);
  EXPECT_EQ(RopeInvFreq(500000.f, s, 0, 128), 1.0);
  EXPECT_NEAR(RopeInvFreq(500000.f, s, 63, 128), std::pow(500000.0, -126.0 / 128) / 8, 1e-18);
  // Linear: positions / factor. A key at position 4 with factor 4 turns as at position 1.
  RopeScalingParams lin;
  lin.type = RopeScalingParams::kLinear;
  lin.factor = 4.f;
  std::vector<float> q = {0, 0, 0, 0}, k = {1, 0, 0, 1};
  const int32_t pos = 4;
  uint8_t bit = 0;
  RopeDmsVariantARef(1, 1, 1, 4, 10000.f, false, 100.f, 5.f, false, &pos, q.data(), k.data(),
                     &bit, lin);
  EXPECT_NEAR(k[0], std::cos(1.0), 1e-6);
  EXPECT_NEAR(k[2], std::sin(1.0), 1e-6);
}

TEST(DmsThresholdRef, PerHeadAndPerLayer) {
  const std::vector<float> logits = {0.06f, 0.01f, 0.2f, 0.f, 0.07f, 0.f};  // [2, ld 3]
  std::vector<uint8_t> bits(4);
  DmsThresholdRef(2, 2, logits.data(), 3, nullptr, 100.f, 5.f, false, bits.data());
  EXPECT_EQ(bits, (std::vector<uint8_t>{1, 0, 0, 1}));
  DmsThresholdRef(2, 2, logits.data(), 3, nullptr, 100.f, 5.f, true, bits.data());
  EXPECT_EQ(bits, (std::vector<uint8_t>{1, 1, 0, 0}));
  // A bias moves each column's logits: +0.05 lifts column 1 of both rows over the threshold,
  // -0.03 drops 0.06 and 0.07 of column 0 under it.
  const std::vector<float> bias = {-0.03f, 0.05f, 0.f};
  DmsThresholdRef(2, 2, logits.data(), 3, bias.data(), 100.f, 5.f, false, bits.data());
  EXPECT_EQ(bits, (std::vector<uint8_t>{0, 1, 0, 1}));
}

TEST(RmsNormRef, KnownValues) {
  const std::vector<float> x = {3, 4}, w = {1, 2};
  std::vector<float> out(2);
  RmsNormRef(x.data(), w.data(), 1, 2, 0.f, out.data());
  const double rms = std::sqrt((9 + 16) / 2.0);
  EXPECT_NEAR(out[0], 3 / rms, 1e-6);
  EXPECT_NEAR(out[1], 8 / rms, 1e-6);
}

TEST(SiluMulAndEmbeddingRef, KnownValues) {
  const std::vector<float> gate = {0, 1}, up = {5, 2};
  std::vector<float> out(2);
  SiluMulRef(gate.data(), up.data(), 1, 2, 2, out.data(), 2);
  EXPECT_EQ(out[0], 0.f);
  EXPECT_NEAR(out[1], 2.0 / (1 + std::exp(-1.0)), 1e-6);
  const std::vector<float> table = {1, 2, 3, 4};
  const std::vector<int32_t> ids = {1, 5, 0};
  std::vector<float> emb(6);
  EmbeddingGatherRef(table.data(), 2, 2, ids.data(), 3, emb.data());
  EXPECT_EQ(emb, (std::vector<float>{3, 4, 0, 0, 1, 2}));
}

TEST(SamplingRef, GreedyTopKMinPTopPAndTheDraw) {
  const std::vector<float> logits = {1.f, 3.f, 3.f, 0.f, 2.f};
  SamplingRowParams greedy;
  EXPECT_EQ(SampleRowRef(logits.data(), 5, greedy), 1);  // ties -> lowest id
  SamplingRowParams topk1;
  topk1.temperature = 1.f;
  topk1.top_k = 1;
  auto w = SamplingKeptWeightsRef(logits.data(), 5, topk1);
  EXPECT_GT(w[1], 0u);
  EXPECT_GT(w[2], 0u);  // tied with the k-th value: kept
  EXPECT_EQ(w[0] + w[3] + w[4], 0u);
  SamplingRowParams minp;
  minp.temperature = 1.f;
  minp.min_p = 0.3f;  // keeps p >= 0.3 p_max: logits >= 3 + ln 0.3 = 1.796
  w = SamplingKeptWeightsRef(logits.data(), 5, minp);
  EXPECT_EQ(w[0], 0u);
  EXPECT_EQ(w[3], 0u);
  EXPECT_GT(w[4], 0u);
  SamplingRowParams topp;
  topp.temperature = 1.f;
  topp.top_p = 0.5f;  // the two tokens of logit 3 hold 0.63 of the mass
  w = SamplingKeptWeightsRef(logits.data(), 5, topp);
  EXPECT_GT(w[1], 0u);
  EXPECT_GT(w[2], 0u);
  EXPECT_EQ(w[0] + w[3] + w[4], 0u);
  for (uint64_t c = 0; c < 1000; ++c) {
    const double u = CounterUniform(7, c);
    ASSERT_GE(u, 0.0);
    ASSERT_LT(u, 1.0);
  }
  EXPECT_EQ(CounterUniform(7, 3), CounterUniform(7, 3));
  EXPECT_NE(CounterUniform(7, 3), CounterUniform(8, 3));
  SamplingRowParams plain;
  plain.temperature = 1.f;
  for (uint64_t c = 0; c < 50; ++c) {
    plain.counter = c;
    const int tok = SampleRowRef(logits.data(), 5, plain);
    ASSERT_GE(tok, 0);
    ASSERT_LT(tok, 5);
  }
  EXPECT_LT(SamplingKey(-1.f), SamplingKey(-0.5f));
  EXPECT_LT(SamplingKey(-0.5f), SamplingKey(0.f));
  EXPECT_LT(SamplingKey(0.f), SamplingKey(2.f));
  EXPECT_NEAR(LogProbRef(logits.data(), 5, 3),
              0.0 - std::log(std::exp(1.) + 2 * std::exp(3.) + 1 + std::exp(2.)), 1e-5);
}

}  // namespace
}  // namespace kernels
}  // namespace dmsrt
