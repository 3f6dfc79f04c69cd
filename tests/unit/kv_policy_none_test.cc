// Policy none: a dense cache (runtime/kv/policy_none.cc).
#include "tests/unit/kv_policy_test_util.h"

namespace dmsrt {
namespace {

using kvpolicytest::Bits;
using kvpolicytest::Geo;
using kvpolicytest::Make;

TEST(KvPolicyNone, AppendsEveryTokenAndDecidesNothing) {
  KvPolicyConfig c;
  c.kind = KvPolicyKind::kNone;
  auto p = Make(c, Geo(3));
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(p->reuse(), KvSlotReuse::kAppend);
  EXPECT_TRUE(p->IndexSupport().ok());
  EXPECT_FALSE(p->model_bits());
  EXPECT_EQ(p->delay_window(), -1);
  for (uint8_t b : Bits(*p, 1, 5, 7)) EXPECT_EQ(b, 0);
  EXPECT_EQ(p->KnownFlag(0, 0, 10), 0);
}

}  // namespace
}  // namespace dmsrt
