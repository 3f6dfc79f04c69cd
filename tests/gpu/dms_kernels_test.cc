// DMS device kernels against their references: the ring update + slot write driven for many
// decode steps in lockstep with the host reference (every state array compared exactly, and the
// resident positions checked against the visibility rule of docs/dms-semantics.md §3), RoPE with
// Variant A decisions, and the Variant B threshold.
#include <algorithm>
#include <climits>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "kernels/dms.cuh"
#include "kernels/reference/dms_ref.h"
#include "tests/gpu/gpu_test_util.h"

namespace dmsrt {
namespace {

using gpu_test::Bf;
using gpu_test::DeviceBuffer;

struct RingCase {
  int batch, kv, dim, window, block, steps;
  bool starve;  // sometimes withhold the spare block: status -1, nothing changes
};

std::string RingName(const testing::TestParamInfo<RingCase>& info) {
  const RingCase& c = info.param;
  return "batch" + std::to_string(c.batch) + "_kv" + std::to_string(c.kv) + "_dim" +
         std::to_string(c.dim) + "_w" + std::to_string(c.window) + "_block" +
         std::to_string(c.block) + "_steps" + std::to_string(c.steps) + (c.starve ? "_starved" : "");
}

class DmsRing : public testing::TestWithParam<RingCase> {};

TEST_P(DmsRing, LockstepWithReference) {
  DMSRT_REQUIRE_GPU();
  const RingCase c = GetParam();
  std::mt19937 rng(7 + c.window * 31 + c.block);
  const int hs_total = c.batch * c.kv;
  const int ring = c.window + 1;
  const int max_blocks = c.steps / c.block + 2;
  const int num_blocks = hs_total * max_blocks;
  std::vector<int32_t> lengths(hs_total, 0), tables(static_cast<size_t>(hs_total) * max_blocks, -1);
  std::vector<int32_t> ring_slot(static_cast<size_t>(hs_total) * ring, -1);
  std::vector<uint8_t> ring_flag(static_cast<size_t>(hs_total) * ring, 0);
  std::vector<uint16_t> k_pool = gpu_test::RandomBf16(static_cast<size_t>(num_blocks) * c.block * c.dim, rng, 1.f, nullptr);
  std::vector<uint16_t> v_pool = gpu_test::RandomBf16(k_pool.size(), rng, 1.f, nullptr);
  std::vector<int32_t> pos_pool(static_cast<size_t>(num_blocks) * c.block, -7), last_pool(pos_pool.size(), -7);
  std::vector<int32_t> free_list;
  for (int b = num_blocks - 1; b >= 0; --b) free_list.push_back(b);

  DeviceBuffer<int32_t> d_len(lengths), d_tab(tables), d_rslot(ring_slot), d_pos(pos_pool),
      d_last(last_pool), d_positions(c.batch), d_spare(hs_total), d_status(hs_total);
  DeviceBuffer<uint8_t> d_rflag(ring_flag), d_bits(hs_total);
  DeviceBuffer<uint16_t> d_kpool(k_pool), d_vpool(v_pool), d_k(static_cast<size_t>(hs_total) * c.dim),
      d_v(static_cast<size_t>(hs_total) * c.dim);

  DmsRingParams p;
  p.batch = c.batch;
  p.n_kv_heads = c.kv;
  p.head_dim = c.dim;
  p.window = c.window;
  p.block_tokens = c.block;
  p.max_blocks_per_head = max_blocks;

  // History of flags per head: flag[hs][k] = d[k+1] (0 until the next token arrives).
  std::vector<std::vector<uint8_t>> flags(hs_total);
  std::vector<int> seen(hs_total, 0);  // tokens actually committed per head (starvation skips)
  std::bernoulli_distribution evict(0.6), withhold(0.3);
  for (int t = 0; t < c.steps; ++t) {
    std::vector<int32_t> positions(c.batch, t);
    std::vector<uint8_t> bits(hs_total);
    for (auto& x : bits) x = evict(rng);
    std::vector<int32_t> spare(hs_total, -1);
    for (int hs = 0; hs < hs_total; ++hs) {
      if (lengths[hs] % c.block == 0 && !(c.starve && withhold(rng))) {
        spare[hs] = free_list.back();
        free_list.pop_back();
      }
    }
    std::vector<float> unused;
    const auto k = gpu_test::RandomBf16(static_cast<size_t>(hs_total) * c.dim, rng, 1.f, &unused);
    const auto v = gpu_test::RandomBf16(k.size(), rng, 1.f, &unused);
    d_positions.Upload(positions);
    d_bits.Upload(bits);
    d_spare.Upload(spare);
    d_k.Upload(k);
    d_v.Upload(v);
    d_status.Poison(gpu_test::kPoisonInt);
    ASSERT_CUDA_OK(DmsRingUpdate(p, d_positions.get(), d_bits.get(), Bf(d_k), Bf(d_v),
                                 d_spare.get(), d_len.get(), d_tab.get(), d_rslot.get(),
                                 d_rflag.get(), Bf(d_kpool), Bf(d_vpool), d_pos.get(),
                                 d_last.get(), d_status.get(), nullptr));
    std::vector<int32_t> status(hs_total);
    kernels::DmsRingUpdateRef(c.batch, c.kv, c.dim, c.window, c.block, max_blocks,
                              positions.data(), bits.data(), k.data(), v.data(), spare.data(),
                              lengths.data(), tables.data(), ring_slot.data(), ring_flag.data(),
                              k_pool.data(), v_pool.data(), pos_pool.data(), last_pool.data(),
                              status.data());
    ASSERT_EQ(d_status.Download(), status) << "step " << t;
    ASSERT_EQ(d_len.Download(), lengths) << "step " << t;
    for (int hs = 0; hs < hs_total; ++hs) {
      if (spare[hs] >= 0 && status[hs] != 1) free_list.push_back(spare[hs]);
      if (status[hs] >= 0) {
        if (t >= 1 && !flags[hs].empty()) flags[hs].back() = bits[hs];
        flags[hs].push_back(0);
        ++seen[hs];
      }
    }
    if (!c.starve) {
      // Resident positions == R(t) = {k <= t : flag(k) == 0 or t - k <= w}.
      for (int hs = 0; hs < hs_total; ++hs) {
        std::vector<int32_t> resident, expect;
        for (int s = 0; s < lengths[hs]; ++s) {
          resident.push_back(pos_pool[static_cast<size_t>(tables[hs * max_blocks + s / c.block]) * c.block + s % c.block]);
        }
        for (int kk = 0; kk <= t; ++kk) {
          if (flags[hs][kk] == 0 || t - kk <= c.window) expect.push_back(kk);
        }
        std::sort(resident.begin(), resident.end());
        ASSERT_EQ(resident, expect) << "head " << hs << " step " << t;
      }
    }
  }
  EXPECT_EQ(d_tab.Download(), tables);
  EXPECT_EQ(d_rslot.Download(), ring_slot);
  EXPECT_EQ(d_rflag.Download(), ring_flag);
  EXPECT_EQ(d_kpool.Download(), k_pool);
  EXPECT_EQ(d_vpool.Download(), v_pool);
  EXPECT_EQ(d_pos.Download(), pos_pool);
  EXPECT_EQ(d_last.Download(), last_pool);
}

INSTANTIATE_TEST_SUITE_P(Steps, DmsRing,
                         testing::Values(RingCase{3, 2, 64, 1, 16, 150, false},
                                         RingCase{3, 2, 64, 3, 16, 150, false},
                                         RingCase{2, 8, 128, 8, 16, 200, false},
                                         RingCase{1, 3, 64, 20, 4, 111, false},
                                         RingCase{2, 2, 128, 5, 16, 120, true}),
                         RingName);

struct RopeCase {
  int n, heads, kv, dim;
  bool decide, per_layer;
  float theta;
  int32_t scaling = kernels::RopeScalingParams::kNone;  // llama3: Llama-3.1's (factor 8)
};

std::string RopeName(const testing::TestParamInfo<RopeCase>& info) {
  const RopeCase& c = info.param;
  return "tokens" + std::to_string(c.n) + "_heads" + std::to_string(c.heads) + "_kv" +
         std::to_string(c.kv) + "_dim" + std::to_string(c.dim) +
         (c.decide ? (c.per_layer ? "_decide_per_layer" : "_decide_per_head") : "_rope_only") +
         (c.scaling == kernels::RopeScalingParams::kLlama3 ? "_llama3" : "") +
         (c.scaling == kernels::RopeScalingParams::kLinear ? "_linear" : "");
}

class RopeDms : public testing::TestWithParam<RopeCase> {};

TEST_P(RopeDms, MatchesReference) {
  DMSRT_REQUIRE_GPU();
  const RopeCase c = GetParam();
  std::mt19937 rng(5 + c.n + c.dim);
  std::vector<float> qf, kf;
  const auto q = gpu_test::RandomBf16(static_cast<size_t>(c.n) * c.heads * c.dim, rng, 1.f, &qf);
  const auto k = gpu_test::RandomBf16(static_cast<size_t>(c.n) * c.kv * c.dim, rng, 1.f, &kf);
  std::vector<int32_t> positions(c.n);
  std::uniform_int_distribution<int> pd(0, 40000);
  for (auto& x : positions) x = pd(rng);
  positions[0] = 0;
  DeviceBuffer<uint16_t> dq(q), dk(k);
  DeviceBuffer<int32_t> dpos(positions);
  DeviceBuffer<uint8_t> dbits(static_cast<size_t>(c.n) * c.kv);
  dbits.Poison(gpu_test::kPoisonInt);
  RopeDmsParams p;
  p.n_tokens = c.n;
  p.n_heads = c.heads;
  p.n_kv_heads = c.kv;
  p.head_dim = c.dim;
  p.theta = c.theta;
  p.scaling.type = c.scaling;
  if (c.scaling != kernels::RopeScalingParams::kNone) {
    p.scaling.factor = 8.f;
    p.scaling.low_freq_factor = 1.f;
    p.scaling.high_freq_factor = 4.f;
    p.scaling.original_max_positions = 8192;
  }
  p.decide = c.decide;
  p.alpha_per_layer = c.per_layer;
  ASSERT_CUDA_OK(RopeDmsVariantA(p, dpos.get(), Bf(dq), Bf(dk), c.decide ? dbits.get() : nullptr, nullptr));
  std::vector<uint8_t> bits(static_cast<size_t>(c.n) * c.kv, 0);
  kernels::RopeDmsVariantARef(c.n, c.heads, c.kv, c.dim, c.theta, c.decide, p.alpha_scale,
                              p.alpha_offset, c.per_layer, positions.data(), qf.data(), kf.data(),
                              bits.data(), p.scaling);
  const auto gq = gpu_test::Bf16ToFloat(dq.Download());
  const auto gk = gpu_test::Bf16ToFloat(dk.Download());
  EXPECT_LE(gpu_test::WorstScaledError(gq, qf, 1e-2, 8e-3), 1.0);
  EXPECT_LE(gpu_test::WorstScaledError(gk, kf, 1e-2, 8e-3), 1.0);
  if (c.decide) {
    const auto gb = dbits.Download();
    EXPECT_EQ(gb, bits);
    int ones = 0;
    for (uint8_t b : bits) ones += b;
    EXPECT_GT(ones, 0);
    const int g = c.heads / c.kv;
    for (int t = 0; t < c.n; ++t) {
      for (int j = 0; j < c.kv; ++j) {
        EXPECT_EQ(gq[(static_cast<size_t>(t) * c.heads + j * g) * c.dim + c.dim - 1], 0.f);
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, RopeDms,
                         testing::Values(RopeCase{1, 32, 8, 128, true, false, 1e6f},
                                         RopeCase{19, 32, 8, 128, true, false, 1e6f},
                                         RopeCase{111, 32, 8, 128, true, true, 1e6f},
                                         RopeCase{19, 9, 3, 64, true, false, 1e4f},
                                         RopeCase{111, 9, 3, 64, false, false, 1e4f},
                                         RopeCase{111, 64, 8, 128, true, false, 5e5f,
                                                  kernels::RopeScalingParams::kLlama3},
                                         RopeCase{19, 8, 8, 64, false, false, 1e4f,
                                                  kernels::RopeScalingParams::kLinear}),
                         RopeName);

TEST(DmsThreshold, VariantBBitsMatchReference) {
  DMSRT_REQUIRE_GPU();
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.05f, 0.1f);
  for (bool per_layer : {false, true}) {
    for (bool with_bias : {false, true}) {
      const int n = 111, kv = 8, ld = 19;
      std::vector<float> logits(static_cast<size_t>(n) * ld), bias(ld);
      for (auto& x : logits) x = nd(rng);
      for (auto& x : bias) x = 0.5f * nd(rng);
      DeviceBuffer<float> dl(logits), dbias(bias);
      DeviceBuffer<uint8_t> db(static_cast<size_t>(n) * kv);
      db.Poison(gpu_test::kPoisonInt);
      const float* b = with_bias ? dbias.get() : nullptr;
      ASSERT_CUDA_OK(DmsThreshold(n, kv, dl.get(), ld, b, 100.f, 5.f, per_layer, db.get(), nullptr));
      std::vector<uint8_t> want(static_cast<size_t>(n) * kv);
      kernels::DmsThresholdRef(n, kv, logits.data(), ld, with_bias ? bias.data() : nullptr, 100.f,
                               5.f, per_layer, want.data());
      EXPECT_EQ(db.Download(), want) << "per_layer=" << per_layer << " bias=" << with_bias;
    }
  }
}

}  // namespace
}  // namespace dmsrt
