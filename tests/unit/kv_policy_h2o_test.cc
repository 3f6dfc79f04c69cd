// Policy h2o: heavy hitters by accumulated attention, the recent half kept
// (runtime/kv/policy_h2o.cc).
#include "tests/unit/kv_policy_test_util.h"

namespace dmsrt {
namespace {

using kvpolicytest::Geo;
using kvpolicytest::Make;

KvPolicyConfig H2o(int32_t budget) {
  KvPolicyConfig c;
  c.kind = KvPolicyKind::kH2o;
  c.budget_tokens = budget;
  return c;
}

TEST(KvPolicyH2o, AccumulatesAndSparesTheRecentHalf) {
  auto p = Make(H2o(4), Geo(1));
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(p->reuse(), KvSlotReuse::kVictim);
  EXPECT_TRUE(p->slot_scores());
  EXPECT_TRUE(p->IndexSupport().ok());  // weights come through KvIndex::SetVictimWeights
  // One query head, 4 slots holding tokens 0, 1, 2, 3; the query is token 3, so tokens 2 and 3
  // are the recent half and cannot be evicted even though slot 3 scores lowest.
  std::vector<float> score = {0.5f, 0.1f, 0.2f, 0.0f};
  const float probs[] = {0.1f, 0.2f, 0.3f, 0.4f};
  const int32_t pos[] = {0, 1, 2, 3};
  KvVictimInputs in;
  in.probs = probs;
  in.group = 1;
  in.m = 4;
  in.pos = pos;
  in.score = score.data();
  in.t = 3;
  EXPECT_EQ(p->PickVictim(in), 1);
  EXPECT_FLOAT_EQ(score[0], 0.6f);
  EXPECT_FLOAT_EQ(score[1], 0.3f);
  EXPECT_FLOAT_EQ(score[3], 0.4f);
  in.m = 3;  // below the budget: scores still accumulate, nothing is evicted
  EXPECT_EQ(p->PickVictim(in), -1);
  EXPECT_FLOAT_EQ(score[0], 0.7f);
}

TEST(KvPolicyH2o, Validation) {
  auto bad = MakeKvPolicy(H2o(1), Geo(1));
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("h2o needs budget_tokens >= 2"), std::string::npos);
}

}  // namespace
}  // namespace dmsrt
