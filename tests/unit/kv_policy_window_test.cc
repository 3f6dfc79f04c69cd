// Policy window: sinks plus a sliding window (runtime/kv/policy_window.cc).
#include "tests/unit/kv_policy_test_util.h"

namespace dmsrt {
namespace {

using kvpolicytest::Bits;
using kvpolicytest::Geo;
using kvpolicytest::Make;

KvPolicyConfig Window(int32_t window, int32_t sinks) {
  KvPolicyConfig c;
  c.kind = KvPolicyKind::kWindow;
  c.window = window;
  c.sinks = sinks;
  return c;
}

TEST(KvPolicyWindow, FlagsEveryTokenAfterTheSinks) {
  auto p = Make(Window(5, 2), Geo(2));
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(p->reuse(), KvSlotReuse::kFlagged);
  EXPECT_EQ(p->delay_window(), 4);  // a token is seen by `window` queries: itself and 4 more
  // d[t] = (t - 1 >= sinks): tokens 0 and 1 are never flagged.
  EXPECT_EQ(Bits(*p, 0, 0, 5), (std::vector<uint8_t>{0, 0, 0, 0, 0, 0, 1, 1, 1, 1}));
  kvpolicytest::ExpectConsistentFlags(*p, 1, 19);
  EXPECT_EQ(p->MaybeUnflagged(0, 0, 0, 10), 2);  // the sinks
  EXPECT_EQ(p->MaybeUnflagged(0, 0, 1, 10), 1);
  EXPECT_EQ(p->MaybeUnflagged(0, 0, 3, 10), 0);
}

TEST(KvPolicyWindow, Validation) {
  EXPECT_TRUE(MakeKvPolicy(Window(1, 0), Geo(1)).ok());
  auto bad = MakeKvPolicy(Window(0, 4), Geo(1));
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("window >= 1 and sinks >= 0"), std::string::npos);
  EXPECT_FALSE(MakeKvPolicy(Window(3, -1), Geo(1)).ok());
}

}  // namespace
}  // namespace dmsrt
