// Shared helpers of the per-policy unit tests (kv_policy_*_test.cc).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "gtest/gtest.h"
#include "runtime/kv/policy.h"

namespace dmsrt {
namespace kvpolicytest {

inline KvGeometry Geo(int32_t nkv, int32_t kv_head_offset = 0) {
  KvGeometry g;
  g.n_layers = 3;
  g.n_kv_heads = nkv;
  g.n_heads = 2 * nkv;
  g.head_dim = 8;
  g.block_tokens = 4;
  g.kv_head_offset = kv_head_offset;
  return g;
}

inline std::unique_ptr<KvPolicy> Make(const KvPolicyConfig& config, const KvGeometry& geo) {
  auto p = MakeKvPolicy(config, geo);
  EXPECT_TRUE(p.ok()) << p.status();
  return p.ok() ? std::move(*p) : nullptr;
}

// Decisions of n tokens from t0 in one layer: [n, n_kv_heads].
inline std::vector<uint8_t> Bits(const KvPolicy& p, int32_t layer, int64_t t0, int32_t n,
                                 const uint8_t* evict = nullptr) {
  std::vector<uint8_t> out(static_cast<size_t>(n) * p.geometry().n_kv_heads, 0xAB);  // poisoned
  KvStepInputs in;
  in.evict = evict;
  p.Decisions(layer, t0, n, in, out.data());
  return out;
}

// Every policy that decides bits in advance must agree with itself: KnownFlag(k) = d[k+1] as
// Decisions gives it, and MaybeUnflagged bounds the unflagged count of any range from above.
inline void ExpectConsistentFlags(const KvPolicy& p, int32_t layer, int64_t t_end) {
  const int32_t nkv = p.geometry().n_kv_heads;
  const std::vector<uint8_t> d = Bits(p, layer, 0, static_cast<int32_t>(t_end));
  for (int32_t j = 0; j < nkv; ++j) {
    int64_t unflagged = 0;
    for (int64_t k = 0; k + 1 < t_end; ++k) {
      ASSERT_EQ(p.KnownFlag(layer, j, k), d[(k + 1) * nkv + j]) << "head " << j << " k " << k;
      unflagged += d[(k + 1) * nkv + j] == 0;
    }
    EXPECT_GE(p.MaybeUnflagged(layer, j, 0, t_end - 1), unflagged);
  }
}

}  // namespace kvpolicytest
}  // namespace dmsrt
