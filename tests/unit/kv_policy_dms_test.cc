// Policy dms: the model's decision bits, delayed by the window (runtime/kv/policy_dms.cc).
#include "tests/unit/kv_policy_test_util.h"

namespace dmsrt {
namespace {

using kvpolicytest::Bits;
using kvpolicytest::Geo;
using kvpolicytest::Make;

KvPolicyConfig Dms(int32_t window) {
  KvPolicyConfig c;
  c.kind = KvPolicyKind::kDms;
  c.window = window;
  return c;
}

TEST(KvPolicyDms, TakesTheModelBits) {
  auto p = Make(Dms(3), Geo(2));
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(p->reuse(), KvSlotReuse::kFlagged);
  EXPECT_TRUE(p->model_bits());
  EXPECT_TRUE(p->IndexSupport().ok());
  EXPECT_EQ(p->delay_window(), 3);
  const uint8_t evict[] = {0, 1, 1, 0, 7, 0};  // [3 tokens, 2 heads]; any nonzero is a 1
  EXPECT_EQ(Bits(*p, 2, 10, 3, evict), (std::vector<uint8_t>{0, 1, 1, 0, 1, 0}));
}

TEST(KvPolicyDms, NoBitsDecideZeroAndNothingIsKnownInAdvance) {
  auto p = Make(Dms(0), Geo(2));
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(p->delay_window(), 0);
  for (uint8_t b : Bits(*p, 0, 0, 4)) EXPECT_EQ(b, 0);
  EXPECT_EQ(p->KnownFlag(0, 1, 5), -1);
  EXPECT_EQ(p->MaybeUnflagged(0, 1, 3, 11), 8);
}

// dms_sinks: the bits of tokens 1..sinks (which flag tokens 0..sinks-1) are dropped, in any
// chunk that covers them; later bits pass.
TEST(KvPolicyDms, SinkTokensAreNeverFlagged) {
  KvPolicyConfig c = Dms(3);
  c.dms_sinks = 2;
  auto p = Make(c, Geo(1));
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(p->protected_prefix(), 2);
  const uint8_t ones[] = {1, 1, 1, 1, 1};
  // Tokens 0..4 in one chunk: d[0] (discarded anyway), d[1] and d[2] dropped.
  EXPECT_EQ(Bits(*p, 0, 0, 5, ones), (std::vector<uint8_t>{0, 0, 0, 1, 1}));
  // A chunk starting at token 2: only d[2] is a sink's.
  EXPECT_EQ(Bits(*p, 0, 2, 3, ones), (std::vector<uint8_t>{0, 1, 1}));
  // Without sinks every bit passes (the reference rule).
  auto q = Make(Dms(3), Geo(1));
  EXPECT_EQ(q->protected_prefix(), 0);
  EXPECT_EQ(Bits(*q, 0, 0, 5, ones), (std::vector<uint8_t>{1, 1, 1, 1, 1}));
  c.dms_sinks = -1;
  EXPECT_FALSE(MakeKvPolicy(c, Geo(1)).ok());
}

TEST(KvPolicyDms, RejectsANegativeWindow) {
  auto p = MakeKvPolicy(Dms(-1), Geo(2));
  ASSERT_FALSE(p.ok());
  EXPECT_NE(p.status().message().find("DMS window must be >= 0"), std::string::npos);
}

}  // namespace
}  // namespace dmsrt
