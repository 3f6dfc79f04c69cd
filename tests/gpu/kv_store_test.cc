// KV store data movement and helper kernels (kernels/kv_store.cuh) against their references
// (kernels/reference/kv_store_ref.h): outputs poisoned before each launch, random non-zero data,
// awkward counts (one pair, more pairs than a CTA has threads, head_dim not a multiple of 8).
#include "kernels/kv_store.cuh"

#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/reference/kv_store_ref.h"
#include "tests/gpu/gpu_test_util.h"

namespace dmsrt {
namespace {

using gpu_test::Bf;
using gpu_test::DeviceBuffer;

TEST(KvStoreKernels, CopyBlocksAndWriteSlotsMatchReference) {
  DMSRT_REQUIRE_GPU();
  std::mt19937 rng(3);
  for (int hd : {64, 128, 36}) {
    for (int bt : {16, 5}) {
      const int blocks = 64, nkv = 3, rows = 11;
      const size_t slots = static_cast<size_t>(blocks) * bt;
      std::vector<float> kf, vf, kpf, vpf;
      auto kpool = gpu_test::RandomBf16(slots * hd, rng, 1.f, &kpf, 0.5f);
      auto vpool = gpu_test::RandomBf16(slots * hd, rng, 1.f, &vpf, -0.5f);
      auto knew = gpu_test::RandomBf16(static_cast<size_t>(rows) * nkv * hd, rng, 1.f, &kf, 1.f);
      auto vnew = gpu_test::RandomBf16(static_cast<size_t>(rows) * nkv * hd, rng, 1.f, &vf, 1.f);
      std::vector<int32_t> pos(slots), lv(slots);
      for (size_t i = 0; i < slots; ++i) {
        pos[i] = static_cast<int32_t>(i * 7 + 1);
        lv[i] = static_cast<int32_t>(i * 3 + 2);
      }
      // Copies: sources among the first half, destinations among the second.
      std::vector<int32_t> pairs;
      for (int i = 0; i < 20; ++i) {
        pairs.push_back(i);
        pairs.push_back(blocks / 2 + (i * 7) % (blocks / 2));
      }
      // Writes: distinct slots.
      std::vector<int32_t> slot_ids(slots);
      std::iota(slot_ids.begin(), slot_ids.end(), 0);
      std::shuffle(slot_ids.begin(), slot_ids.end(), rng);
      std::vector<int32_t> writes;
      for (int r = 0; r < rows; ++r) {
        for (int j = 0; j < nkv; ++j) {
          writes.insert(writes.end(), {r, j, slot_ids[r * nkv + j], 1000 + r});
        }
      }
      // Destinations must be unique for a well-defined copy: drop repeats.
      std::vector<int32_t> uniq;
      std::vector<bool> seen(blocks, false);
      for (size_t i = 0; i < pairs.size(); i += 2) {
        if (seen[pairs[i + 1]]) continue;
        seen[pairs[i + 1]] = true;
        uniq.push_back(pairs[i]);
        uniq.push_back(pairs[i + 1]);
      }
      const int n_pairs = static_cast<int>(uniq.size() / 2);
      const int n_writes = static_cast<int>(writes.size() / 4);

      DeviceBuffer<uint16_t> dk(kpool), dv(vpool), dkn(knew), dvn(vnew);
      DeviceBuffer<int32_t> dpos(pos), dlv(lv), dpairs(uniq), dwrites(writes);
      ASSERT_CUDA_OK(KvCopyBlocks(dpairs.get(), n_pairs, bt, hd, Bf(dk), Bf(dv), dpos.get(),
                                  dlv.get(), nullptr));
      ASSERT_CUDA_OK(KvWriteSlots(dwrites.get(), n_writes, Bf(dkn), Bf(dvn), nkv, hd, Bf(dk),
                                  Bf(dv), dpos.get(), nullptr));
      kernels::KvCopyBlocksRef(uniq.data(), n_pairs, bt, hd, kpf.data(), vpf.data(), pos.data(),
                               lv.data());
      kernels::KvWriteSlotsRef(writes.data(), n_writes, kf.data(), vf.data(), nkv, hd, kpf.data(),
                               vpf.data(), pos.data());
      // Moves are exact: bf16 in, bf16 out.
      EXPECT_EQ(gpu_test::Bf16ToFloat(dk.Download()), kpf) << "hd " << hd << " bt " << bt;
      EXPECT_EQ(gpu_test::Bf16ToFloat(dv.Download()), vpf) << "hd " << hd << " bt " << bt;
      EXPECT_EQ(dpos.Download(), pos);
      EXPECT_EQ(dlv.Download(), lv);
    }
  }
}

TEST(KvStoreKernels, ScatterAddBiasAndRandomFillMatchReference) {
  DMSRT_REQUIRE_GPU();
  std::vector<int32_t> dst(1000, 5);
  std::vector<int32_t> pairs;
  for (int i = 0; i < 300; ++i) pairs.insert(pairs.end(), {(i * 37) % 1000, -i});
  for (bool fill : {false, true}) {
    DeviceBuffer<int32_t> d(dst), p(pairs);
    ASSERT_CUDA_OK(KvScatterInt32(p.get(), 300, fill, 0x7fffffff, d.get(), nullptr));
    std::vector<int32_t> want = dst;
    kernels::KvScatterInt32Ref(pairs.data(), 300, fill, 0x7fffffff, want.data());
    EXPECT_EQ(d.Download(), want);
  }

  std::mt19937 rng(5);
  const int rows = 7, cols = 100, ld = 104;
  std::vector<float> xf, bf;
  auto x = gpu_test::RandomBf16(static_cast<size_t>(rows) * ld, rng, 1.f, &xf, 0.3f);
  auto b = gpu_test::RandomBf16(cols, rng, 1.f, &bf, -0.2f);
  DeviceBuffer<uint16_t> dx(x), db(b);
  ASSERT_CUDA_OK(AddBiasRows(Bf(dx), Bf(db), rows, cols, ld, nullptr));
  kernels::AddBiasRowsRef(xf.data(), bf.data(), rows, cols, ld);
  EXPECT_LE(gpu_test::WorstScaledError(gpu_test::Bf16ToFloat(dx.Download()), xf, 1e-6, 8e-3), 1.0);

  const int64_t n = 100003;
  DeviceBuffer<uint16_t> r(n);
  r.Poison(gpu_test::kPoisonFloat);
  ASSERT_CUDA_OK(FillRandomBf16(Bf(r), n, 42, 0.5f, nullptr));
  const std::vector<uint16_t> got = r.Download();
  int64_t mismatches = 0;
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t want = kernels::Fp32ToBf16(0.5f * kernels::RandomUniformSigned(42, i));
    mismatches += got[i] != want;
    sum += gpu_test::Bf16(got[i]);
  }
  EXPECT_EQ(mismatches, 0) << "device and host random streams differ";
  EXPECT_LT(std::fabs(sum / n), 0.01) << "not centred";
}

}  // namespace
}  // namespace dmsrt
