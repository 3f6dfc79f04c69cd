// The policy registry: names, parsing and construction come from one table
// (runtime/kv/policy_registry.cc).
#include <set>
#include <string>

#include "tests/unit/kv_policy_test_util.h"

namespace dmsrt {
namespace {

TEST(KvPolicyRegistry, EveryEntryRoundTripsAndBuildsItsKind) {
  std::set<std::string> names;
  for (const KvPolicyEntry* e : KvPolicies()) {
    EXPECT_TRUE(names.insert(e->name).second) << "duplicate name " << e->name;
    EXPECT_EQ(FindKvPolicy(e->kind), e);
    EXPECT_STREQ(KvPolicyName(e->kind), e->name);
    auto parsed = ParseKvPolicy(std::string(" ") + e->name + " ");
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    EXPECT_EQ(*parsed, e->kind);
  }
  EXPECT_EQ(names, (std::set<std::string>{"none", "dms", "forced", "window", "tova", "h2o",
                                          "threshold"}));
}

TEST(KvPolicyRegistry, UnknownNamesListTheRegisteredOnes) {
  auto bad = ParseKvPolicy("snapkv");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("none, dms, forced, window, tova, h2o"),
            std::string::npos);
}

TEST(KvPolicyRegistry, IndexSupportFollowsTheMechanism) {
  // An index never sees the keys: exactly threshold (which scores them) is refused. The victim
  // policies take their attention weights through KvIndex::SetVictimWeights.
  for (const KvPolicyEntry* e : KvPolicies()) {
    KvPolicyConfig c;
    c.kind = e->kind;
    c.window = 4;
    c.budget_tokens = 8;
    auto p = MakeKvPolicy(c, kvpolicytest::Geo(2));
    ASSERT_TRUE(p.ok()) << e->name << ": " << p.status();
    const bool needs_rows = e->kind == KvPolicyKind::kThreshold;
    EXPECT_EQ((*p)->IndexSupport().ok(), !needs_rows) << e->name;
  }
}

}  // namespace
}  // namespace dmsrt
