// Budget mode's prior for a dms replica (launch/service/admission.h: CapacityOf): a replica that
// holds no threads reports an observed eviction rate of 0, so admission plans it with the rate
// its adapter was calibrated at (ReplicaInfo.dms_expected_eviction_rate); once it holds threads,
// with the rate it observes. gRPC build only (CapacityOf reads the protobuf registration).
#include <gtest/gtest.h>

#ifdef DMSRT_HAVE_GRPC
#include "launch/admission.h"
#include "launch/service/admission.h"

namespace dmsrt {
namespace {

// SmolLM2-135M's KV geometry (30 layers x 3 KV heads, blocks of 16 tokens, f32 K and V of 64).
v1::ReplicaInfo Info(const std::string& policy, double calibrated_rate) {
  v1::ReplicaInfo info;
  info.set_kv_policy(policy);
  info.set_kv_window(32);
  info.set_kv_blocks_total(100000);
  info.set_kv_block_tokens(16);
  info.set_blocks_per_token_dense(30 * 3);
  info.set_kv_block_bytes(16 * 64 * 2 * 4);
  info.set_dms_expected_eviction_rate(calibrated_rate);
  return info;
}

int32_t BudgetModeThreads(const ReplicaCapacity& r) {
  AdmissionRequest req;
  req.prompt_tokens = 491;
  req.max_tokens = 512;
  req.kv_budget_bytes = 96ll << 20;
  auto n = AdmitJob(req, {r});
  EXPECT_TRUE(n.ok()) << n.status();
  return n.ok() ? *n : 0;
}

TEST(AdmissionPrior, IdleDmsReplicaIsPlannedWithTheCalibratedRate) {
  const v1::ReplicaStats idle;  // no threads: logical_tokens 0, eviction_rate 0
  const ReplicaCapacity c = CapacityOf(1, Info("dms", 0.875), idle, 0);
  EXPECT_DOUBLE_EQ(c.eviction_rate, 0.875);
  const ReplicaCapacity dense = CapacityOf(2, Info("none", 0.0), idle, 0);
  const ReplicaCapacity unrated = CapacityOf(3, Info("dms", 0.0), idle, 0);
  // The figures of tests/bench/bestofn_equal_memory.py's default: a 491-token prompt, 512 tokens
  // at most, 96 MiB. Dense holds 3 threads; dms without a prior is planned as dense; with the
  // calibrated 0.875 (w = 32) a thread is planned at 32 + 0.125 x 971 = 153 resident tokens.
  EXPECT_EQ(BudgetModeThreads(dense), 3);
  EXPECT_EQ(BudgetModeThreads(unrated), 3);
  EXPECT_GE(BudgetModeThreads(c), 3 * BudgetModeThreads(dense));
}

TEST(AdmissionPrior, ObservedRateWinsOnceTheReplicaHoldsThreads) {
  v1::ReplicaStats busy;
  busy.set_logical_tokens(5000);
  busy.set_eviction_rate(0.5);
  EXPECT_DOUBLE_EQ(CapacityOf(1, Info("dms", 0.875), busy, 4).eviction_rate, 0.5);
  // Policies other than dms ignore the rate: forced plans with its configured rate, none with 0.
  const v1::ReplicaStats idle;
  ReplicaCapacity forced = CapacityOf(2, Info("forced", 0.0), idle, 0);
  forced.kv_force_rate = 0.875;
  const ReplicaCapacity dense = CapacityOf(3, Info("none", 0.0), idle, 0);
  EXPECT_DOUBLE_EQ(ExpectedResident(dense, 1000), 1000);
  EXPECT_DOUBLE_EQ(ExpectedResident(forced, 1000), 32 + 0.125 * (1000 - 32));
}

}  // namespace
}  // namespace dmsrt
#else
TEST(AdmissionPrior, NeedsGrpc) { GTEST_SKIP() << "built without gRPC: no coordinator"; }
#endif
