// Policy tova: the lowest attention weight of the current query is evicted
// (runtime/kv/policy_tova.cc).
#include "tests/unit/kv_policy_test_util.h"

namespace dmsrt {
namespace {

using kvpolicytest::Geo;
using kvpolicytest::Make;

KvPolicyConfig Tova(int32_t budget) {
  KvPolicyConfig c;
  c.kind = KvPolicyKind::kTova;
  c.budget_tokens = budget;
  return c;
}

TEST(KvPolicyTova, VictimIsTheLowestMeanWeightOldestOnTies) {
  auto p = Make(Tova(4), Geo(1));
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(p->reuse(), KvSlotReuse::kVictim);
  EXPECT_EQ(p->budget_tokens(), 4);
  EXPECT_FALSE(p->slot_scores());
  // Two query heads over 4 slots; slots 1 and 3 tie on the mean (0.15), slot 3 holds the older
  // token.
  const float probs[] = {0.4f, 0.1f, 0.3f, 0.2f,   // head 0
                         0.3f, 0.2f, 0.4f, 0.1f};  // head 1
  const int32_t pos[] = {0, 9, 4, 2};
  KvVictimInputs in;
  in.probs = probs;
  in.group = 2;
  in.m = 4;
  in.pos = pos;
  in.t = 9;
  EXPECT_EQ(p->PickVictim(in), 3);
  in.m = 3;  // below the budget: nothing is evicted
  EXPECT_EQ(p->PickVictim(in), -1);
}

TEST(KvPolicyTova, RunsOnAnIndex) {
  // An index takes the attention weights from the caller (KvIndex::SetVictimWeights).
  auto p = Make(Tova(4), Geo(1));
  ASSERT_NE(p, nullptr);
  EXPECT_TRUE(p->IndexSupport().ok());
}

TEST(KvPolicyTova, Validation) {
  auto bad = MakeKvPolicy(Tova(0), Geo(1));
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("tova needs budget_tokens >= 1"), std::string::npos);
}

}  // namespace
}  // namespace dmsrt
