// Policy forced: synthetic DMS bits from a seeded hash (runtime/kv/policy_forced.cc).
#include "tests/unit/kv_policy_test_util.h"

namespace dmsrt {
namespace {

using kvpolicytest::Bits;
using kvpolicytest::Geo;
using kvpolicytest::Make;

KvPolicyConfig Forced(int32_t window, double rate, uint64_t seed) {
  KvPolicyConfig c;
  c.kind = KvPolicyKind::kForced;
  c.window = window;
  c.force_rate = rate;
  c.seed = seed;
  return c;
}

// The bits are part of every figure recorded under this policy: pinned to the values of the
// hash as first written (seed 7, rate 0.3, layers 0-2, t 0-199, 5 heads; FNV-1a of the bits).
uint64_t Fingerprint(const KvPolicy& p, int* ones) {
  uint64_t h = 1469598103934665603ull;
  *ones = 0;
  for (int32_t l = 0; l < 3; ++l) {
    for (uint8_t b : Bits(p, l, 0, 200)) {
      *ones += b;
      h = (h ^ b) * 1099511628211ull;
    }
  }
  return h;
}

TEST(KvPolicyForced, BitsArePinned) {
  int ones = 0;
  auto p = Make(Forced(4, 0.3, 7), Geo(5));
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(Fingerprint(*p, &ones), 0x16a5d81e1e93ed26ull);
  EXPECT_EQ(ones, 925);
  // The hash takes the global KV head: a rank holding heads 3.. draws their bits.
  auto q = Make(Forced(4, 0.3, 7), Geo(5, /*kv_head_offset=*/3));
  ASSERT_NE(q, nullptr);
  EXPECT_EQ(Fingerprint(*q, &ones), 0x46c518edee600fb4ull);
  EXPECT_EQ(ones, 931);
}

TEST(KvPolicyForced, KnownInAdvanceAndConsistent) {
  auto p = Make(Forced(2, 0.5, 11), Geo(3));
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(p->reuse(), KvSlotReuse::kFlagged);
  EXPECT_FALSE(p->model_bits());
  EXPECT_TRUE(p->IndexSupport().ok());
  EXPECT_EQ(p->delay_window(), 2);
  for (int32_t l = 0; l < 3; ++l) kvpolicytest::ExpectConsistentFlags(*p, l, 111);
  // Exact over a range of at most 2^16 tokens; a larger one is bounded by its length.
  EXPECT_EQ(p->MaybeUnflagged(1, 2, 0, (1 << 16) + 1), (1 << 16) + 1);
}

TEST(KvPolicyForced, RatesZeroAndOne) {
  auto never = Make(Forced(1, 0.0, 3), Geo(2));
  auto always = Make(Forced(1, 1.0, 3), Geo(2));
  ASSERT_NE(never, nullptr);
  ASSERT_NE(always, nullptr);
  for (uint8_t b : Bits(*never, 0, 0, 19)) EXPECT_EQ(b, 0);
  for (uint8_t b : Bits(*always, 0, 0, 19)) EXPECT_EQ(b, 1);
}

TEST(KvPolicyForced, Validation) {
  EXPECT_FALSE(MakeKvPolicy(Forced(-1, 0.5, 0), Geo(1)).ok());
  auto bad = MakeKvPolicy(Forced(1, 1.5, 0), Geo(1));
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("forced eviction rate must be in [0, 1]"),
            std::string::npos);
}

}  // namespace
}  // namespace dmsrt
