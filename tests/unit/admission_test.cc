// The coordinator's admission and placement rules (launch/admission.h) without gRPC: the policy
// check, a thread that cannot fit the largest replica, budget mode with and without eviction,
// and least-loaded placement.
#include "launch/admission.h"

#include <gtest/gtest.h>

namespace dmsrt {
namespace {

ReplicaCapacity Replica(int32_t id, int64_t blocks, const std::string& policy = "none",
                        double rate = 0.0) {
  ReplicaCapacity r;
  r.id = id;
  r.kv_policy = policy;
  r.kv_window = 16;
  r.kv_force_rate = policy == "forced" ? rate : 0.0;
  r.eviction_rate = policy == "dms" ? rate : 0.0;
  r.kv_blocks_total = blocks;
  r.kv_block_tokens = 16;
  r.blocks_per_token_dense = 30 * 3;  // SmolLM2-135M: 30 layers x 3 KV heads
  r.kv_block_bytes = 16 * 64 * 2 * 4;
  return r;
}

TEST(AdmissionTest, NoReplicaIsUnavailable) {
  AdmissionRequest req;
  req.prompt_tokens = 10;
  req.max_tokens = 10;
  req.n = 1;
  EXPECT_TRUE(absl::IsUnavailable(AdmitJob(req, {}).status()));
}

TEST(AdmissionTest, PolicyMismatchNamesTheReplica) {
  AdmissionRequest req;
  req.prompt_tokens = 10;
  req.max_tokens = 10;
  req.n = 2;
  req.policy = "dms";
  auto r = AdmitJob(req, {Replica(0, 10000), Replica(3, 10000, "forced", 0.5)});
  ASSERT_TRUE(absl::IsInvalidArgument(r.status()));
  EXPECT_NE(r.status().message().find("replica 0 runs --kv-policy none"), std::string::npos)
      << r.status();
}

TEST(AdmissionTest, ThreadLargerThanTheLargestReplicaIsRefused) {
  AdmissionRequest req;
  req.prompt_tokens = 111;
  req.max_tokens = 1000;
  req.n = 4;
  // ceil(1111 / 16 + 1) = 71 block rows of 90 blocks = 6390 blocks.
  EXPECT_TRUE(absl::IsResourceExhausted(AdmitJob(req, {Replica(0, 6389)}).status()));
  auto ok = AdmitJob(req, {Replica(0, 100), Replica(1, 6390)});
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(*ok, 4);
  // With 7/8 of tokens evicted after a window of 16 the same thread needs far less.
  auto dms = AdmitJob(req, {Replica(0, 2000, "forced", 0.875)});
  EXPECT_TRUE(dms.ok()) << dms.status();
}

TEST(AdmissionTest, BudgetModeCountsThreadsAndEvictionBuysMore) {
  AdmissionRequest req;
  req.prompt_tokens = 19;
  req.max_tokens = 237;
  req.n = 0;
  req.max_n = 64;
  const ReplicaCapacity dense = Replica(0, 1 << 20);
  const int64_t bb = dense.kv_block_bytes * dense.blocks_per_token_dense;  // one block row
  // Dense: prompt 2 block rows; each thread holds 256 - 16 shared = 240 own tokens: 15 + 1 rows.
  req.kv_budget_bytes = 2 * bb + 3 * 16 * bb;
  auto n = AdmitJob(req, {dense});
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_EQ(*n, 3);
  req.kv_budget_bytes = 2 * bb + 16 * bb - 1;
  EXPECT_TRUE(absl::IsResourceExhausted(AdmitJob(req, {dense}).status()));
  // Forced 0.75: 16 + 0.25 * 240 = 76 resident tokens, 5 + 1 rows per thread.
  req.kv_budget_bytes = 2 * bb + 3 * 16 * bb;
  auto forced = AdmitJob(req, {Replica(0, 1 << 20, "forced", 0.75)});
  ASSERT_TRUE(forced.ok()) << forced.status();
  EXPECT_EQ(*forced, 8);
  // Capped by max_n.
  req.max_n = 5;
  EXPECT_EQ(*AdmitJob(req, {Replica(0, 1 << 20, "forced", 0.75)}), 5);
}

// A replica whose store leaves dead slots (the CPU store) keeps the prompt shared under eviction:
// the prompt counts once at its resident size and a thread holds only its own resident tokens.
TEST(AdmissionTest, BudgetModeWithDeadSlotsCountsThePromptOnce) {
  AdmissionRequest req;
  req.prompt_tokens = 496;
  req.max_tokens = 240;
  req.n = 0;
  req.max_n = 64;
  ReplicaCapacity cow = Replica(0, 1 << 20, "forced", 0.75);
  ReplicaCapacity dead = cow;
  dead.dead_slots = true;
  const int64_t bb = cow.kv_block_bytes * cow.blocks_per_token_dense;  // one block row
  req.kv_budget_bytes = 200 * bb;
  // Copy-on-write: prompt 31 rows; a thread's whole resident set, 16 + 0.25 * 720 = 196 tokens:
  // 13 + 1 rows. (200 - 31) / 14 = 12.
  EXPECT_EQ(*AdmitJob(req, {cow}), 12);
  // Dead slots: the prompt's resident 16 + 0.25 * 480 = 136 tokens: 9 + 1 rows, once; a thread's
  // own 16 + 0.25 * 224 = 72 tokens: 5 + 1 rows. (200 - 10) / 6 = 31.
  EXPECT_EQ(*AdmitJob(req, {dead}), 31);
  // Without eviction nothing changes.
  ReplicaCapacity dense = Replica(0, 1 << 20);
  const int32_t n_dense = *AdmitJob(req, {dense});
  dense.dead_slots = true;
  EXPECT_EQ(*AdmitJob(req, {dense}), n_dense);
}

TEST(AdmissionTest, ExpectedResidentFollowsThePolicy) {
  EXPECT_DOUBLE_EQ(ExpectedResident("none", 16, 0, 0, 100), 100);
  EXPECT_DOUBLE_EQ(ExpectedResident("forced", 16, 0.5, 0.9, 116), 16 + 50);
  EXPECT_DOUBLE_EQ(ExpectedResident("dms", 16, 0.5, 0.75, 116), 16 + 25);
  EXPECT_DOUBLE_EQ(ExpectedResident("dms", 16, 0.5, 0.75, 10), 10);
  EXPECT_DOUBLE_EQ(ExpectedResident("window", 16, 0, 0, 100), 20);
}

TEST(AdmissionTest, PlacementFillsTheLeastLoadedPerBlock) {
  std::vector<ReplicaCapacity> alive = {Replica(0, 1000), Replica(1, 3000)};
  auto plan = PlaceThreads({0, 1, 2, 3, 4, 5, 6, 7}, alive);
  // Replica 1 has 3x the blocks, so it takes 3 threads for each one of replica 0's.
  EXPECT_EQ(plan[0].size(), 2u);
  EXPECT_EQ(plan[1].size(), 6u);
  EXPECT_EQ(alive[0].assigned_open, 2);
  EXPECT_EQ(alive[1].assigned_open, 6);
  // Ties go to the first replica listed.
  std::vector<ReplicaCapacity> two = {Replica(5, 100), Replica(6, 100)};
  auto p2 = PlaceThreads({7}, two);
  ASSERT_EQ(p2.size(), 1u);
  EXPECT_EQ(p2.begin()->first, 5);
  std::vector<ReplicaCapacity> none;
  EXPECT_TRUE(PlaceThreads({0}, none).empty());
}

}  // namespace
}  // namespace dmsrt
