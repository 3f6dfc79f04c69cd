// Tensor parallelism of the CPU backend, run under mpirun (label mpi): every rank builds its shard
// of a tiny f32 model and a full single-rank copy of the same model, TP rank 0 drives a scripted
// workload (create, chunked prefill, fork, batched decode of two sequences, free, reserve) through
// the leader backend while the other ranks follow, and then
//   * the leader's logits match the single-rank logits within f32 rounding (the only difference
//     is the order of the partial sums of o_proj and down_proj), and greedy choices agree;
//   * on every rank, the KV cache of each live sequence holds exactly the single-rank cache's
//     resident positions for the same global heads (eviction is local and bit-identical);
//   * the leader's free-block figure is tp x the minimum over the ranks (group units).
// Models: llama (HF) and qwen3 (GGUF, q/k norms) with 4 and 8 KV heads, policies none, forced DMS
// and the model's own DMS decisions (Variant A per head and per layer, and Variant B). Also: a
// TP degree that does not divide the KV heads is refused with the shard plan's message.
//
// Tiny models are written by tests/fixtures/make_tiny_model.py into $DMSRT_TP_MODELS (tp.cmake
// runs it as a fixture). Without mpirun every test skips with the reason.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <unistd.h>

#include "absl/time/clock.h"

#include "parallel/comm.h"
#include "parallel/comm_factory.h"
#include "parallel/world.h"
#include "tests/mpi/tp_test_util.h"
#include "runtime/backend/backend.h"
#include "runtime/model/model.h"
#include "runtime/engine/tp_replica.h"

namespace dmsrt {
namespace {

using tptest::ApplyPolicy;
using tptest::Argmax;
using tptest::Case;
using tptest::g_par;
using tptest::RunScript;
using tptest::Script;

// The CPU backend's run of the script: 14 steps, the parent freed before step 9.
constexpr tptest::ScriptShape kShape{14, 9, false};

std::string ModelDir(const std::string& name) {
  return tptest::ModelDir("DMSRT_TP_MODELS", "tp_models", name);
}

class TpBackendTest : public ::testing::TestWithParam<Case> {};

TEST_P(TpBackendTest, MatchesSingleRank) {
  if (g_par == nullptr) GTEST_SKIP() << "not under mpirun (run with mpirun -np 2 or 4)";
  Communicator* comm = g_par->tp_comm.get();
  const int tp = comm->size();
  const int rank = comm->rank();
  const Case& tc = GetParam();

  absl::StatusOr<std::unique_ptr<Model>> model = LoadModel(ModelDir(tc.model) + (tc.file.empty() ? "" : "/" + tc.file));
  ASSERT_TRUE(model.ok()) << model.status();
  if ((*model)->config.n_kv_heads % tp != 0) {
    GTEST_SKIP() << tc.model << " has " << (*model)->config.n_kv_heads << " KV heads, not "
                 << "divisible by " << tp;
  }
  BackendOptions opts;
  opts.threads = 1;
  opts.kv_budget_bytes = 4 << 20;
  opts.kv_block_tokens = 4;
  if (tc.policy == "dms") {
    ASSERT_TRUE((*model)->config.dms.enabled) << tc.model << " has no DMS fields";
  }
  ApplyPolicy(tc, **model, &opts);

  // Single-rank reference on every rank (deterministic, so identical everywhere).
  absl::StatusOr<std::unique_ptr<Backend>> ref = MakeCpuBackend(**model, opts);
  ASSERT_TRUE(ref.ok()) << ref.status();
  Script want;
  absl::Status s = RunScript(**ref, kShape, nullptr, &want);
  ASSERT_TRUE(s.ok()) << s;

  BackendOptions topts = opts;
  topts.comm = comm;
  absl::StatusOr<std::unique_ptr<Backend>> shard = MakeCpuBackend(**model, topts);
  ASSERT_TRUE(shard.ok()) << shard.status();
  const KvGeometry geo = (*shard)->kv().geometry();
  EXPECT_EQ(geo.n_kv_heads * tp, (*model)->config.n_kv_heads);
  EXPECT_EQ(geo.kv_head_offset, rank * geo.n_kv_heads);

  Backend* local = shard->get();
  std::unique_ptr<Backend> leader;
  Script got;
  if (rank == 0) {
    absl::StatusOr<std::unique_ptr<Backend>> l = MakeTpLeaderBackend(std::move(*shard), comm);
    ASSERT_TRUE(l.ok()) << l.status();
    leader = std::move(*l);
    s = RunScript(*leader, kShape, &want.chosen, &got);
    ASSERT_TRUE(s.ok()) << s;
    // The leader's view of the cache is the group's: geometry and figures of every head.
    EXPECT_EQ(leader->kv().geometry().n_kv_heads, (*model)->config.n_kv_heads);
    for (SeqId seq : want.live) {
      const KvFigures gf = leader->kv().Figures(seq);
      const KvFigures rf = (*ref)->kv().Figures(seq);
      EXPECT_EQ(gf.logical_tokens, rf.logical_tokens);
      EXPECT_EQ(gf.resident_tokens, rf.resident_tokens);
      EXPECT_EQ(gf.flagged_tokens, rf.flagged_tokens);
      EXPECT_EQ(gf.kv_reads, rf.kv_reads);
      ASSERT_EQ(gf.per_head.size(), rf.per_head.size());
      for (size_t h = 0; h < rf.per_head.size(); ++h) {
        EXPECT_EQ(gf.per_head[h].resident, rf.per_head[h].resident) << "head index " << h;
        EXPECT_EQ(gf.per_head[h].flagged, rf.per_head[h].flagged) << "head index " << h;
      }
      ASSERT_EQ(gf.per_layer.size(), rf.per_layer.size());
      for (size_t l = 0; l < rf.per_layer.size(); ++l) {
        EXPECT_EQ(gf.per_layer[l].resident, rf.per_layer[l].resident) << "layer " << l;
      }
    }
    const int64_t leader_free = leader->kv().free_blocks();
    const int64_t leader_total = leader->kv().total_blocks();
    ASSERT_TRUE(ShutdownTpFollowers(*leader).ok());
    // The facade counts blocks over the group: tp x the fullest rank's free blocks.
    int64_t v = local->kv().free_blocks(), min_free = 0;
    ASSERT_TRUE(comm->AllReduce(&v, &min_free, 1, ReduceOp::kMin).ok());
    EXPECT_EQ(leader_free, min_free * comm->size());
    EXPECT_EQ(leader_total, local->kv().total_blocks() * comm->size());

    // Logits: same rows, f32 rounding only.
    ASSERT_EQ(got.logits.size(), want.logits.size());
    double max_abs = 0, max_ref = 0;
    int greedy_diff = 0;
    for (size_t i = 0; i < want.logits.size(); ++i) {
      ASSERT_EQ(got.logits[i].size(), want.logits[i].size()) << "step " << i;
      for (size_t j = 0; j < want.logits[i].size(); ++j) {
        const double d = std::fabs(got.logits[i][j] - want.logits[i][j]);
        max_abs = std::max(max_abs, d);
        max_ref = std::max(max_ref, std::fabs(static_cast<double>(want.logits[i][j])));
        EXPECT_LE(d, 1e-4 * std::max(1.0, std::fabs(static_cast<double>(want.logits[i][j]))))
            << "step " << i << " element " << j;
        if (d > 1e-3) break;  // one report per row is enough
      }
    }
    // Greedy: the TP run's own argmax equals the replayed single-rank choice at every decode row.
    for (size_t i = 1; i < want.logits.size(); ++i) {
      const int32_t vocab = (*model)->config.vocab;
      const size_t rows = got.logits[i].size() / vocab;
      for (size_t row = 0; row < rows; ++row) {
        if (Argmax(got.logits[i].data() + row * vocab, vocab) !=
            Argmax(want.logits[i].data() + row * vocab, vocab)) {
          ++greedy_diff;
        }
      }
    }
    EXPECT_EQ(greedy_diff, 0);
    std::printf("[tp %d] %s/%s: max |dlogit| %.3g (max |logit| %.3g), greedy rows differing %d\n",
                tp, tc.model.c_str(), tc.policy.c_str(), max_abs, max_ref, greedy_diff);
  } else {
    s = RunTpFollower(**shard, comm);
    ASSERT_TRUE(s.ok()) << s;
    int64_t v = (*shard)->kv().free_blocks(), min_free = 0;
    ASSERT_TRUE(comm->AllReduce(&v, &min_free, 1, ReduceOp::kMin).ok());
  }

  // Residents per (layer, local head) equal the single-rank cache's for the same global head.
  const KvCache& tkv = rank == 0 ? leader->kv() : (*shard)->kv();
  const KvCache& rkv = (*ref)->kv();
  int64_t compared = 0, evicted = 0;
  for (SeqId seq : want.live) {
    ASSERT_EQ(tkv.Length(seq), rkv.Length(seq));
    for (int32_t l = 0; l < geo.n_layers; ++l) {
      for (int32_t j = 0; j < geo.n_kv_heads; ++j) {
        const std::vector<int32_t> a = tkv.ResidentPositions(seq, l, j);
        const std::vector<int32_t> b = rkv.ResidentPositions(seq, l, geo.kv_head_offset + j);
        EXPECT_EQ(a, b) << "rank " << rank << " seq " << seq << " layer " << l << " local head "
                        << j << " (global " << geo.kv_head_offset + j << ")";
        ++compared;
        evicted += rkv.Length(seq) - static_cast<int64_t>(b.size());
      }
    }
  }
  if (tc.policy != "none") {
    EXPECT_GT(evicted, 0) << "the policy evicted nothing";
  }
  EXPECT_GT(compared, 0);
  ASSERT_TRUE(comm->Barrier().ok());
}

INSTANTIATE_TEST_SUITE_P(
    Models, TpBackendTest,
    ::testing::Values(Case{"llama_hf_kv4", "", "none"}, Case{"llama_hf_kv4", "", "forced"},
                      Case{"qwen3_gguf_kv8", "model.gguf", "none"},
                      Case{"qwen3_gguf_kv8", "model.gguf", "forced"},
                      Case{"llama_dmsA_kv4", "", "dms"}, Case{"qwen3_dmsB_kv4", "", "dms"},
                      Case{"llama_dmsAL_kv4", "", "dms"}),
    tptest::CaseName);

// A full KV cache on any rank fails the step on every rank alike (tptest::ExpectFullPoolFails-
// Everywhere).
TEST(TpBackendCapacity, FullCacheFailsTheStepEverywhere) {
  if (g_par == nullptr) GTEST_SKIP() << "not under mpirun";
  Communicator* comm = g_par->tp_comm.get();
  absl::StatusOr<std::unique_ptr<Model>> model = LoadModel(ModelDir("llama_hf_kv4"));
  ASSERT_TRUE(model.ok()) << model.status();
  if ((*model)->config.n_kv_heads % comm->size() != 0) GTEST_SKIP() << "degree does not divide";
  BackendOptions opts;
  opts.threads = 1;
  opts.kv_budget_bytes = 24 << 10;
  opts.kv_block_tokens = 4;
  opts.kv_policy.kind = KvPolicyKind::kForced;  // ranks evict different amounts
  opts.kv_policy.force_rate = 0.5;
  opts.kv_policy.window = 2;
  opts.comm = comm;
  tptest::ExpectFullPoolFailsEverywhere(**model, opts, MakeCpuBackend);
}

// An idle leader keeps its followers inside the communicator's watchdog with keepalive plans:
// with a 2 s timeout, 3 s of idling (a ping every 0.5 s) ends with a working group.
TEST(TpBackendKeepalive, PingsKeepIdleFollowersWithinTheTimeout) {
  if (g_par == nullptr) GTEST_SKIP() << "not under mpirun";
  Communicator* comm = g_par->tp_comm.get();
  absl::StatusOr<std::unique_ptr<Model>> model = LoadModel(ModelDir("llama_hf_kv4"));
  ASSERT_TRUE(model.ok()) << model.status();
  if ((*model)->config.n_kv_heads % comm->size() != 0) GTEST_SKIP() << "degree does not divide";
  BackendOptions opts;
  opts.threads = 1;
  opts.kv_budget_bytes = 1 << 20;
  opts.comm = comm;
  absl::StatusOr<std::unique_ptr<Backend>> shard = MakeCpuBackend(**model, opts);
  ASSERT_TRUE(shard.ok()) << shard.status();
  const absl::Duration saved = comm->timeout();
  comm->set_timeout(absl::Seconds(2));
  if (comm->rank() != 0) {
    absl::Status s = RunTpFollower(**shard, comm);
    EXPECT_TRUE(s.ok()) << s;
  } else {
    absl::StatusOr<std::unique_ptr<Backend>> l = MakeTpLeaderBackend(std::move(*shard), comm);
    ASSERT_TRUE(l.ok()) << l.status();
    for (int i = 0; i < 6; ++i) {
      absl::SleepFor(absl::Milliseconds(500));
      absl::Status s = PingTpFollowers(**l);
      ASSERT_TRUE(s.ok()) << s;
    }
    EXPECT_TRUE(TpGroupHealth(**l).ok());
    absl::StatusOr<SeqId> seq = (*l)->kv().Create();
    ASSERT_TRUE(seq.ok()) << seq.status();
    SeqChunk chunk;
    chunk.seq = *seq;
    chunk.tokens = {5, 6, 7};
    chunk.logits = SeqChunk::Logits::kLast;
    absl::StatusOr<ForwardResult> r = (*l)->Forward({chunk});
    EXPECT_TRUE(r.ok()) << r.status();
    ASSERT_TRUE(ShutdownTpFollowers(**l).ok());
    BackendOptions single;
    single.threads = 1;
    single.kv_budget_bytes = 1 << 20;
    std::unique_ptr<Backend> plain = MakeCpuBackend(**model, single).value();
    EXPECT_TRUE(absl::IsInvalidArgument(PingTpFollowers(*plain)));
    EXPECT_TRUE(absl::IsInvalidArgument(TpGroupHealth(*plain)));
  }
  comm->set_timeout(saved);
  ASSERT_TRUE(comm->Barrier().ok());
}

// Every rank knows the host of each rank of its group (all one node here, so nothing to say).
TEST(TpBackendHosts, EveryRankKnowsItsGroupsHosts) {
  if (g_par == nullptr) GTEST_SKIP() << "not under mpirun";
  ASSERT_EQ(static_cast<int>(g_par->tp_hosts.size()), g_par->world.tp());
  char host[256] = {};
  ASSERT_EQ(gethostname(host, sizeof(host) - 1), 0);
  for (const std::string& h : g_par->tp_hosts) EXPECT_EQ(h, host);
  EXPECT_EQ(TpSpanNote(g_par->world, g_par->tp_hosts), "");
}

TEST(TpBackendRefusal, DegreeMustDivideKvHeads) {
  if (g_par == nullptr) GTEST_SKIP() << "not under mpirun";
  Communicator* comm = g_par->tp_comm.get();
  if (comm->size() < 3) GTEST_SKIP() << "needs at least 3 ranks";
  // Three ranks of a model with 4 KV heads.
  absl::StatusOr<std::unique_ptr<Communicator>> sub =
      comm->Split(comm->rank() < 3 ? 0 : 1, comm->rank());
  ASSERT_TRUE(sub.ok()) << sub.status();
  if (comm->rank() < 3) {
    absl::StatusOr<std::unique_ptr<Model>> model = LoadModel(ModelDir("llama_hf_kv4"));
    ASSERT_TRUE(model.ok()) << model.status();
    BackendOptions opts;
    opts.threads = 1;
    opts.kv_budget_bytes = 1 << 20;
    opts.comm = sub->get();
    absl::StatusOr<std::unique_ptr<Backend>> b = MakeCpuBackend(**model, opts);
    ASSERT_FALSE(b.ok());
    EXPECT_TRUE(absl::IsInvalidArgument(b.status())) << b.status();
    EXPECT_NE(b.status().message().find("does not divide the model's 4 KV heads"),
              std::string::npos)
        << b.status();
    EXPECT_NE(b.status().message().find("valid degrees for this model: 1, 2, 4"),
              std::string::npos)
        << b.status();
  }
  ASSERT_TRUE(comm->Barrier().ok());
}

}  // namespace
}  // namespace dmsrt

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  dmsrt::ParallelOptions opts;
  opts.timeout = absl::Seconds(120);
  return dmsrt::tptest::RunTpTests(&argc, &argv, opts);
}
