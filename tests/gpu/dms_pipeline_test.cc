// The kernels' data contracts end to end (docs/dms-semantics.md §8): token-by-token decode (ring
// update + decode attention), one-chunk prefill, and two-chunk prefill (prefill attention over
// the survivors that the ring update committed, with the boundary flag applied first) give the
// same attention outputs, and committing the same tokens leaves the same resident sets.
#include <algorithm>
#include <climits>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "kernels/decode_attention.cuh"
#include "kernels/dms.cuh"
#include "kernels/prefill_attention.cuh"
#include "kernels/reference/attention_ref.h"
#include "tests/gpu/gpu_test_util.h"

namespace dmsrt {
namespace {

using gpu_test::Bf;
using gpu_test::DeviceBuffer;

constexpr int kHeads = 4, kKv = 2, kDim = 64, kBlock = 16, kWindow = 5, kTokens = 60, kSplit = 23;

double Rms(const std::vector<float>& v) {
  double s = 0;
  for (float x : v) s += static_cast<double>(x) * x;
  return std::sqrt(s / std::max<size_t>(1, v.size()));
}

void ExpectClose(const std::vector<float>& got, const std::vector<float>& want, const char* what) {
  EXPECT_LT(gpu_test::RelError(got, want), 1e-2) << what;
  size_t where = 0;
  EXPECT_LE(gpu_test::WorstScaledError(got, want, 0.03 * Rms(want), 0.02, &where), 1.0)
      << what << ": element " << where << " got " << got[where] << " want " << want[where];
}

// Device state of one sequence's cache (all layers collapsed to one).
struct Cache {
  static constexpr int kMaxBlocks = kTokens / kBlock + 2;
  static constexpr int kNumBlocks = kKv * kMaxBlocks;
  DeviceBuffer<int32_t> lengths{std::vector<int32_t>(kKv, 0)};
  DeviceBuffer<int32_t> tables{std::vector<int32_t>(kKv * kMaxBlocks, -1)};
  DeviceBuffer<int32_t> ring_slot{std::vector<int32_t>(kKv * (kWindow + 1), -1)};
  DeviceBuffer<uint8_t> ring_flag{std::vector<uint8_t>(kKv * (kWindow + 1), 0)};
  DeviceBuffer<uint16_t> k_pool{static_cast<size_t>(kNumBlocks) * kBlock * kDim};
  DeviceBuffer<uint16_t> v_pool{static_cast<size_t>(kNumBlocks) * kBlock * kDim};
  DeviceBuffer<int32_t> pos_pool{std::vector<int32_t>(kNumBlocks * kBlock, -1)};
  DeviceBuffer<int32_t> last_pool{std::vector<int32_t>(kNumBlocks * kBlock, -1)};
  std::vector<int32_t> free_blocks;
  Cache() {
    for (int b = kNumBlocks - 1; b >= 0; --b) free_blocks.push_back(b);
  }
  DmsRingParams Params() const {
    DmsRingParams p;
    p.batch = 1;
    p.n_kv_heads = kKv;
    p.head_dim = kDim;
    p.window = kWindow;
    p.block_tokens = kBlock;
    p.max_blocks_per_head = kMaxBlocks;
    return p;
  }
  // Commits token t (K/V rows [kKv, kDim] at k_row/v_row of the device buffers).
  void Commit(int t, const uint8_t* bits_t, const __nv_bfloat16* k_row, const __nv_bfloat16* v_row) {
    const std::vector<int32_t> len = lengths.Download();
    std::vector<int32_t> spare(kKv, -1);
    for (int j = 0; j < kKv; ++j) {
      if (len[j] % kBlock == 0) {
        spare[j] = free_blocks.back();
        free_blocks.pop_back();
      }
    }
    DeviceBuffer<int32_t> d_pos(std::vector<int32_t>{t}), d_spare(spare), d_status(kKv);
    DeviceBuffer<uint8_t> d_bits(std::vector<uint8_t>(bits_t, bits_t + kKv));
    ASSERT_EQ(DmsRingUpdate(Params(), d_pos.get(), d_bits.get(), k_row, v_row, d_spare.get(),
                            lengths.get(), tables.get(), ring_slot.get(), ring_flag.get(),
                            Bf(k_pool), Bf(v_pool), pos_pool.get(), last_pool.get(),
                            d_status.get(), nullptr), cudaSuccess);
    const std::vector<int32_t> status = d_status.Download();
    for (int j = 0; j < kKv; ++j) {
      ASSERT_GE(status[j], 0);
      if (spare[j] >= 0 && status[j] == 0) free_blocks.push_back(spare[j]);
    }
  }
  std::vector<std::vector<int32_t>> Resident() const {
    const auto len = lengths.Download();
    const auto tab = tables.Download();
    const auto pos = pos_pool.Download();
    std::vector<std::vector<int32_t>> out(kKv);
    for (int j = 0; j < kKv; ++j) {
      for (int s = 0; s < len[j]; ++s) out[j].push_back(pos[tab[j * kMaxBlocks + s / kBlock] * kBlock + s % kBlock]);
      std::sort(out[j].begin(), out[j].end());
    }
    return out;
  }
};

TEST(DmsPipeline, DecodeOneChunkAndTwoChunksAgree) {
  DMSRT_REQUIRE_GPU();
  std::mt19937 rng(2024);
  std::vector<float> qf, kf, vf;
  const auto q = gpu_test::RandomBf16(static_cast<size_t>(kTokens) * kHeads * kDim, rng, 2.f, &qf);
  const auto k = gpu_test::RandomBf16(static_cast<size_t>(kTokens) * kKv * kDim, rng, 1.f, &kf);
  const auto v = gpu_test::RandomBf16(static_cast<size_t>(kTokens) * kKv * kDim, rng, 1.f, &vf, 0.2f);
  std::vector<uint8_t> bits(static_cast<size_t>(kTokens) * kKv);
  std::bernoulli_distribution flag(0.6);
  for (auto& b : bits) b = flag(rng);
  // last visible position of each token: flag(t) = d[t+1]; the newest token is unflagged.
  std::vector<int32_t> last_vis(static_cast<size_t>(kTokens) * kKv);
  for (int t = 0; t < kTokens; ++t) {
    for (int j = 0; j < kKv; ++j) {
      const bool flagged = t + 1 < kTokens && bits[(t + 1) * kKv + j];
      last_vis[t * kKv + j] = flagged ? t + kWindow : INT_MAX;
    }
  }
  DeviceBuffer<uint16_t> dq(q), dk(k), dv(v);
  const float scale = 1.f / std::sqrt(static_cast<float>(kDim));
  const size_t row = static_cast<size_t>(kHeads) * kDim;

  // A: token by token.
  Cache a;
  std::vector<float> out_a(q.size());
  {
    DeviceBuffer<uint16_t> dout(row);
    const int sms = gpu_test::NumSms();
    for (int t = 0; t < kTokens; ++t) {
      a.Commit(t, &bits[t * kKv], Bf(dk) + static_cast<size_t>(t) * kKv * kDim,
               Bf(dv) + static_cast<size_t>(t) * kKv * kDim);
      DecodeAttentionParams p;
      p.batch = 1;
      p.n_heads = kHeads;
      p.n_kv_heads = kKv;
      p.head_dim = kDim;
      p.block_tokens = kBlock;
      p.max_blocks_per_head = Cache::kMaxBlocks;
      p.max_length = t + 1;
      p.split_tokens = 32;  // several splits once the heads grow
      p.scale = scale;
      DeviceBuffer<uint8_t> ws(std::max<size_t>(1, DecodeAttentionWorkspaceSize(p, sms)));
      dout.Poison(gpu_test::kPoisonFloat);
      ASSERT_EQ(::dmsrt::DecodeAttention(p, Bf(dq) + t * row, Bf(a.k_pool), Bf(a.v_pool),
                                         a.tables.get(), a.lengths.get(), Bf(dout), ws.get(),
                                         ws.size(), sms, nullptr), cudaSuccess);
      const auto o = gpu_test::Bf16ToFloat(dout.Download());
      std::copy(o.begin(), o.end(), out_a.begin() + t * row);
    }
  }

  // B: one chunk.
  std::vector<float> out_b;
  {
    DeviceBuffer<int32_t> dlast(last_vis), zero_len(std::vector<int32_t>(kKv, 0)),
        table(std::vector<int32_t>(kKv, 0)), dummy_i(std::vector<int32_t>(kBlock, 0));
    DeviceBuffer<uint16_t> dummy_kv(static_cast<size_t>(kBlock) * kDim), dout(q.size());
    PrefillAttentionParams p;
    p.n_queries = kTokens;
    p.q_pos0 = 0;
    p.n_heads = kHeads;
    p.n_kv_heads = kKv;
    p.head_dim = kDim;
    p.block_tokens = kBlock;
    p.max_blocks_per_head = 1;
    p.scale = scale;
    dout.Poison(gpu_test::kPoisonFloat);
    ASSERT_EQ(::dmsrt::PrefillAttention(p, Bf(dq), Bf(dk), Bf(dv), dlast.get(), Bf(dummy_kv),
                                        Bf(dummy_kv), dummy_i.get(), dummy_i.get(), table.get(),
                                        zero_len.get(), Bf(dout), nullptr), cudaSuccess);
    out_b = gpu_test::Bf16ToFloat(dout.Download());
  }

  // C: two chunks, the first committed through the ring update before the second attends.
  Cache c;
  std::vector<float> out_c(q.size());
  {
    auto prefill = [&](int t0, int n, const int32_t* old_len, const Cache& cache) {
      std::vector<int32_t> lv(last_vis.begin() + t0 * kKv, last_vis.begin() + (t0 + n) * kKv);
      DeviceBuffer<int32_t> dlast(lv);
      DeviceBuffer<uint16_t> dout(static_cast<size_t>(n) * row);
      PrefillAttentionParams p;
      p.n_queries = n;
      p.q_pos0 = t0;
      p.n_heads = kHeads;
      p.n_kv_heads = kKv;
      p.head_dim = kDim;
      p.block_tokens = kBlock;
      p.max_blocks_per_head = Cache::kMaxBlocks;
      p.scale = scale;
      dout.Poison(gpu_test::kPoisonFloat);
      ASSERT_EQ(::dmsrt::PrefillAttention(
                    p, Bf(dq) + t0 * row, Bf(dk) + static_cast<size_t>(t0) * kKv * kDim,
                    Bf(dv) + static_cast<size_t>(t0) * kKv * kDim, dlast.get(), Bf(cache.k_pool),
                    Bf(cache.v_pool), cache.pos_pool.get(), cache.last_pool.get(),
                    cache.tables.get(), old_len, Bf(dout), nullptr), cudaSuccess);
      const auto o = gpu_test::Bf16ToFloat(dout.Download());
      std::copy(o.begin(), o.end(), out_c.begin() + t0 * row);
    };
    DeviceBuffer<int32_t> zero_len(std::vector<int32_t>(kKv, 0));
    prefill(0, kSplit, zero_len.get(), c);
    for (int t = 0; t < kSplit; ++t) {
      c.Commit(t, &bits[t * kKv], Bf(dk) + static_cast<size_t>(t) * kKv * kDim,
               Bf(dv) + static_cast<size_t>(t) * kKv * kDim);
    }
    // The chunk's first token flags the previous chunk's last token before attention.
    DeviceBuffer<int32_t> d_pos(std::vector<int32_t>{kSplit});
    DeviceBuffer<uint8_t> d_bits(std::vector<uint8_t>(&bits[kSplit * kKv], &bits[kSplit * kKv] + kKv));
    ASSERT_EQ(DmsApplyBoundaryFlag(c.Params(), d_pos.get(), d_bits.get(), c.tables.get(),
                                   c.ring_slot.get(), c.ring_flag.get(), c.last_pool.get(),
                                   nullptr), cudaSuccess);
    prefill(kSplit, kTokens - kSplit, c.lengths.get(), c);
    for (int t = kSplit; t < kTokens; ++t) {
      c.Commit(t, &bits[t * kKv], Bf(dk) + static_cast<size_t>(t) * kKv * kDim,
               Bf(dv) + static_cast<size_t>(t) * kKv * kDim);
    }
  }

  // Reference: the one-chunk rule in double.
  std::vector<float> want(q.size());
  const int32_t zero = 0, table0 = 0, dummy_i = 0;
  const float dummy_f = 0.f;
  std::vector<int32_t> zeros(kKv, 0);
  kernels::PrefillAttentionRef(kTokens, 0, kHeads, kKv, kDim, kBlock, 1, scale, qf.data(), kf.data(),
                               vf.data(), last_vis.data(), &dummy_f, &dummy_f, &dummy_i, &dummy_i,
                               &table0, zeros.data(), want.data());
  (void)zero;
  ExpectClose(out_a, want, "token-by-token decode vs reference");
  ExpectClose(out_b, want, "one-chunk prefill vs reference");
  ExpectClose(out_c, want, "two-chunk prefill vs reference");
  EXPECT_LT(gpu_test::RelError(out_a, out_b), 1e-2);
  EXPECT_LT(gpu_test::RelError(out_c, out_b), 1e-2);

  // Same tokens committed: same resident sets, and they are R(T-1) of §3.
  const auto ra = a.Resident(), rc = c.Resident();
  EXPECT_EQ(ra, rc);
  for (int j = 0; j < kKv; ++j) {
    std::vector<int32_t> expect;
    const int p = kTokens - 1;
    for (int t = 0; t <= p; ++t) {
      if (last_vis[t * kKv + j] == INT_MAX || p - t <= kWindow) expect.push_back(t);
    }
    EXPECT_EQ(ra[j], expect) << "head " << j;
  }
}

}  // namespace
}  // namespace dmsrt
