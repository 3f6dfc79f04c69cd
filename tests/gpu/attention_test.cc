// Decode and prefill attention kernels (and the decode weights per slot of the victim policies)
// against their C++ references, on awkward shapes:
// lengths 1, 19, 111, exactly on a block boundary and one past, ragged lengths across heads
// (one head empty), shuffled block tables, forced multi-split and the automatic split.
#include <algorithm>
#include <climits>
#include <cmath>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "kernels/decode_attention.cuh"
#include "kernels/prefill_attention.cuh"
#include "kernels/reference/attention_ref.h"
#include "kernels/slot_weights.cuh"
#include "tests/gpu/gpu_test_util.h"

namespace dmsrt {
namespace {

using gpu_test::Bf;
using gpu_test::DeviceBuffer;

double Rms(const std::vector<float>& v) {
  double s = 0;
  for (float x : v) s += static_cast<double>(x) * x;
  return std::sqrt(s / std::max<size_t>(1, v.size()));
}

void ExpectClose(const std::vector<float>& got, const std::vector<float>& want) {
  const double rel = gpu_test::RelError(got, want);
  EXPECT_LT(rel, 1e-2) << "relative L2 error";
  size_t where = 0;
  const double worst = gpu_test::WorstScaledError(got, want, 0.03 * Rms(want), 0.02, &where);
  EXPECT_LE(worst, 1.0) << "element " << where << ": got " << got[where] << " want " << want[where];
}

struct DecodeCase {
  int batch, heads, kv, dim, len, block, split;  // split 0 = automatic
  bool ragged;
  bool indirect = false;  // tables in shuffled rows of a larger array, found through table_rows
};

std::string DecodeName(const testing::TestParamInfo<DecodeCase>& info) {
  const DecodeCase& c = info.param;
  return "batch" + std::to_string(c.batch) + "_heads" + std::to_string(c.heads) + "_kv" +
         std::to_string(c.kv) + "_dim" + std::to_string(c.dim) + "_len" + std::to_string(c.len) +
         "_block" + std::to_string(c.block) + (c.split ? "_split" + std::to_string(c.split) : "_autosplit") +
         (c.ragged ? "_ragged" : "") + (c.indirect ? "_indirect" : "");
}

class DecodeAttention : public testing::TestWithParam<DecodeCase> {};

TEST_P(DecodeAttention, MatchesReference) {
  DMSRT_REQUIRE_GPU();
  const DecodeCase c = GetParam();
  std::mt19937 rng(1234 + c.len * 7 + c.dim + c.heads);
  const int max_blocks = (c.len + c.block - 1) / c.block + 1;
  const int heads_total = c.batch * c.kv;
  const int num_blocks = heads_total * max_blocks + 3;
  // Lengths: all = len, or ragged in [0, len] with the first head empty and the last full.
  std::vector<int32_t> lengths(heads_total, c.len);
  if (c.ragged) {
    std::uniform_int_distribution<int> ld(0, c.len);
    for (int i = 0; i < heads_total; ++i) lengths[i] = ld(rng);
    lengths[0] = 0;
    lengths[heads_total - 1] = c.len;
  }
  // Block tables: a random permutation of the pool, so consecutive slots are far apart.
  std::vector<int32_t> perm(num_blocks);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<int32_t> tables(static_cast<size_t>(heads_total) * max_blocks, -1);
  for (int i = 0; i < heads_total * max_blocks; ++i) tables[i] = perm[i];

  std::vector<float> qf, kf, vf;
  const auto q = gpu_test::RandomBf16(static_cast<size_t>(c.batch) * c.heads * c.dim, rng, 2.f, &qf);
  const auto k = gpu_test::RandomBf16(static_cast<size_t>(num_blocks) * c.block * c.dim, rng, 1.f, &kf);
  const auto v = gpu_test::RandomBf16(static_cast<size_t>(num_blocks) * c.block * c.dim, rng, 1.f, &vf, 0.3f);

  DecodeAttentionParams p;
  p.batch = c.batch;
  p.n_heads = c.heads;
  p.n_kv_heads = c.kv;
  p.head_dim = c.dim;
  p.block_tokens = c.block;
  p.max_blocks_per_head = max_blocks;
  p.max_length = c.len;
  p.split_tokens = c.split;
  p.scale = 1.f / std::sqrt(static_cast<float>(c.dim));
  const int sms = gpu_test::NumSms();

  // Indirect: batch row b's tables sit at table row rows[b] of an array with two spare rows,
  // whose entries are out of the pool (reading them would fault or show up as wrong output).
  std::vector<int32_t> device_tables = tables, rows(c.batch);
  if (c.indirect) {
    const size_t row_ints = static_cast<size_t>(c.kv) * max_blocks;
    std::vector<int32_t> order(c.batch + 2);
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    device_tables.assign(order.size() * row_ints, num_blocks + 1000);
    for (int b = 0; b < c.batch; ++b) {
      rows[b] = order[b];
      std::copy_n(tables.begin() + b * row_ints, row_ints, device_tables.begin() + rows[b] * row_ints);
    }
  }
  DeviceBuffer<uint16_t> dq(q), dk(k), dv(v), dout(q.size());
  DeviceBuffer<int32_t> dtab(device_tables), dlen(lengths), drows(rows);
  if (c.indirect) p.table_rows = drows.get();
  DeviceBuffer<uint8_t> ws(std::max<size_t>(1, DecodeAttentionWorkspaceSize(p, sms)));
  std::vector<float> want(q.size());
  kernels::DecodeAttentionRef(c.batch, c.heads, c.kv, c.dim, c.block, max_blocks, p.scale,
                              qf.data(), kf.data(), vf.data(), tables.data(), lengths.data(),
                              want.data());
  dout.Poison(gpu_test::kPoisonFloat);
  ws.Poison(gpu_test::kPoisonFloat);
  ASSERT_CUDA_OK(::dmsrt::DecodeAttention(p, Bf(dq), Bf(dk), Bf(dv), dtab.get(), dlen.get(),
                                          Bf(dout), ws.get(), ws.size(), sms, nullptr));
  ASSERT_CUDA_OK(cudaDeviceSynchronize());
  ExpectClose(gpu_test::Bf16ToFloat(dout.Download()), want);

  // The same launch's weights per slot (kernels/slot_weights.cuh), with ld below the longest
  // head: the slots past ld stay unwritten.
  const int32_t ld = std::max(1, c.len - 3);
  std::vector<float> want_w(static_cast<size_t>(heads_total) * ld, 0.f);
  kernels::DecodeSlotWeightsRef(c.batch, c.heads, c.kv, c.dim, c.block, max_blocks, p.scale,
                                qf.data(), kf.data(), tables.data(), lengths.data(), want_w.data(),
                                ld);
  DeviceBuffer<float> dw(want_w.size());
  dw.Poison(gpu_test::kPoisonFloat);
  ASSERT_CUDA_OK(::dmsrt::DecodeSlotWeights(p, Bf(dq), Bf(dk), dtab.get(), dlen.get(), dw.get(),
                                            ld, nullptr));
  ASSERT_CUDA_OK(cudaDeviceSynchronize());
  const std::vector<float> got_w = dw.Download();
  for (size_t i = 0; i < got_w.size(); ++i) {
    const bool written = static_cast<int32_t>(i % ld) < lengths[i / ld];
    if (!written) {
      ASSERT_TRUE(std::isnan(got_w[i])) << "slot " << i % ld << " of head " << i / ld;
    } else {
      ASSERT_NEAR(got_w[i], want_w[i], 2e-3 + 0.02 * want_w[i]) << "slot " << i % ld
                                                                << " of head " << i / ld;
    }
  }
}

std::vector<DecodeCase> DecodeCases() {
  std::vector<DecodeCase> cases;
  for (int len : {1, 19, 111, 1000}) {
    cases.push_back({2, 8, 2, 128, len, 16, 0, false});
    cases.push_back({1, 9, 3, 64, len, 16, 64, false});
  }
  // Exactly on a block boundary and one past, forced splits on and off the boundary.
  for (int len : {256, 257}) {
    cases.push_back({3, 32, 8, 128, len, 16, 64, false});
    cases.push_back({3, 32, 8, 128, len, 16, 0, false});
    cases.push_back({2, 16, 16, 64, len, 32, 96, false});
  }
  cases.push_back({5, 8, 1, 128, 4096, 16, 0, true});   // g = 8, ragged, auto split
  cases.push_back({4, 12, 4, 256, 777, 16, 128, true}); // head_dim 256, g = 3
  cases.push_back({7, 32, 8, 128, 2053, 64, 0, true});
  cases.push_back({2, 8, 2, 128, 500, 24, 80, true});   // block size not a power of two
  cases.push_back({2, 8, 2, 128, 3000, 1, 2000, true});  // splits spanning several table windows
  cases.push_back({1, 4, 1, 64, 20000, 16, 0, false});   // long head, automatic split
  cases.push_back({6, 32, 8, 128, 1500, 16, 256, true, true});  // tables through table_rows
  cases.push_back({3, 8, 2, 64, 300, 16, 0, true, true});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Shapes, DecodeAttention, testing::ValuesIn(DecodeCases()), DecodeName);

TEST(DecodeAttentionArgs, RejectsBadGroupAndLength) {
  DMSRT_REQUIRE_GPU();
  DecodeAttentionParams p;
  p.batch = 1; p.n_heads = 6; p.n_kv_heads = 4; p.head_dim = 128; p.block_tokens = 16;
  p.max_blocks_per_head = 4; p.max_length = 10; p.scale = 1.f;
  EXPECT_EQ(::dmsrt::DecodeAttention(p, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0,
                            132, nullptr), cudaErrorInvalidValue);
  p.n_heads = 8; p.max_length = 65;  // more than 4 blocks of 16
  EXPECT_EQ(::dmsrt::DecodeAttention(p, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0,
                            132, nullptr), cudaErrorInvalidValue);
  p.max_length = 10; p.head_dim = 96;
  EXPECT_EQ(::dmsrt::DecodeAttention(p, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0,
                            132, nullptr), cudaErrorInvalidValue);
}

struct PrefillCase {
  int heads, kv, dim, n_old, n, block, window;
};

std::string PrefillName(const testing::TestParamInfo<PrefillCase>& info) {
  const PrefillCase& c = info.param;
  return "heads" + std::to_string(c.heads) + "_kv" + std::to_string(c.kv) + "_dim" +
         std::to_string(c.dim) + "_old" + std::to_string(c.n_old) + "_chunk" +
         std::to_string(c.n) + "_block" + std::to_string(c.block) + "_w" + std::to_string(c.window);
}

class PrefillAttention : public testing::TestWithParam<PrefillCase> {};

TEST_P(PrefillAttention, MatchesReference) {
  DMSRT_REQUIRE_GPU();
  const PrefillCase c = GetParam();
  std::mt19937 rng(99 + c.n * 3 + c.n_old + c.dim);
  const int max_blocks = std::max(1, (c.n_old + c.block - 1) / c.block);
  const int num_blocks = c.kv * max_blocks + 2;
  // The chunk starts after the old tokens; old survivors have distinct positions below it.
  const int q_pos0 = c.n_old + c.n_old / 2 + 5;
  std::vector<int32_t> perm(num_blocks);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<int32_t> table(static_cast<size_t>(c.kv) * max_blocks);
  for (size_t i = 0; i < table.size(); ++i) table[i] = perm[i];
  std::vector<int32_t> old_len(c.kv, c.n_old);
  if (c.kv > 1) old_len[c.kv - 1] = c.n_old / 2;  // heads differ in length
  std::vector<int32_t> pos_pool(static_cast<size_t>(num_blocks) * c.block, -7);
  std::vector<int32_t> last_pool(pos_pool.size(), -7);
  std::bernoulli_distribution flag(0.5);
  for (int j = 0; j < c.kv; ++j) {
    std::vector<int32_t> positions(q_pos0);
    std::iota(positions.begin(), positions.end(), 0);
    std::shuffle(positions.begin(), positions.end(), rng);  // slot order is not chronological
    for (int t = 0; t < old_len[j]; ++t) {
      const size_t s = static_cast<size_t>(table[j * max_blocks + t / c.block]) * c.block + t % c.block;
      pos_pool[s] = positions[t];
      last_pool[s] = flag(rng) ? positions[t] + c.window : INT_MAX;
    }
  }
  std::vector<int32_t> last_new(static_cast<size_t>(c.n) * c.kv);
  for (int i = 0; i < c.n; ++i) {
    for (int j = 0; j < c.kv; ++j) last_new[i * c.kv + j] = flag(rng) ? q_pos0 + i + c.window : INT_MAX;
  }
  std::vector<float> qf, knf, vnf, kpf, vpf;
  const auto q = gpu_test::RandomBf16(static_cast<size_t>(c.n) * c.heads * c.dim, rng, 2.f, &qf);
  const auto kn = gpu_test::RandomBf16(static_cast<size_t>(c.n) * c.kv * c.dim, rng, 1.f, &knf);
  const auto vn = gpu_test::RandomBf16(static_cast<size_t>(c.n) * c.kv * c.dim, rng, 1.f, &vnf, 0.3f);
  const auto kp = gpu_test::RandomBf16(static_cast<size_t>(num_blocks) * c.block * c.dim, rng, 1.f, &kpf);
  const auto vp = gpu_test::RandomBf16(static_cast<size_t>(num_blocks) * c.block * c.dim, rng, 1.f, &vpf, -0.2f);

  PrefillAttentionParams p;
  p.n_queries = c.n;
  p.q_pos0 = q_pos0;
  p.n_heads = c.heads;
  p.n_kv_heads = c.kv;
  p.head_dim = c.dim;
  p.block_tokens = c.block;
  p.max_blocks_per_head = max_blocks;
  p.scale = 1.f / std::sqrt(static_cast<float>(c.dim));

  DeviceBuffer<uint16_t> dq(q), dkn(kn), dvn(vn), dkp(kp), dvp(vp), dout(q.size());
  DeviceBuffer<int32_t> dlast_new(last_new), dpos(pos_pool), dlast(last_pool), dtab(table),
      dold(old_len);
  dout.Poison(gpu_test::kPoisonFloat);
  ASSERT_CUDA_OK(::dmsrt::PrefillAttention(p, Bf(dq), Bf(dkn), Bf(dvn), dlast_new.get(), Bf(dkp), Bf(dvp),
                                  dpos.get(), dlast.get(), dtab.get(), dold.get(), Bf(dout),
                                  nullptr));
  ASSERT_CUDA_OK(cudaDeviceSynchronize());
  const std::vector<float> got = gpu_test::Bf16ToFloat(dout.Download());
  std::vector<float> want(q.size());
  kernels::PrefillAttentionRef(c.n, q_pos0, c.heads, c.kv, c.dim, c.block, max_blocks, p.scale,
                               qf.data(), knf.data(), vnf.data(), last_new.data(), kpf.data(),
                               vpf.data(), pos_pool.data(), last_pool.data(), table.data(),
                               old_len.data(), want.data());
  ExpectClose(got, want);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, PrefillAttention,
    testing::Values(PrefillCase{8, 2, 128, 0, 1, 16, 4}, PrefillCase{8, 2, 128, 0, 19, 16, 3},
                    PrefillCase{8, 2, 128, 0, 111, 16, 8}, PrefillCase{9, 3, 64, 64, 19, 16, 5},
                    PrefillCase{9, 3, 64, 65, 111, 16, 17}, PrefillCase{32, 8, 128, 256, 1, 16, 512},
                    PrefillCase{32, 8, 128, 257, 111, 16, 30}, PrefillCase{4, 4, 256, 100, 70, 32, 6},
                    PrefillCase{16, 2, 128, 1000, 129, 64, 50}),
    PrefillName);

}  // namespace
}  // namespace dmsrt
