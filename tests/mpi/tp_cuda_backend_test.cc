// Tensor parallelism of the CUDA backend, run under mpirun (label mpi) on the emulated device
// (tests/cuda_emulator/: every rank is one device, NCCL runs over MPI). Every rank builds its
// shard of a tiny model on the device of its local rank with the group's NcclComm, and two
// single-rank references of the same model: the CUDA backend on the same device and the CPU
// backend. TP rank 0 drives a scripted workload (create, chunked prefill, fork, batched decode
// with device sampling, mixed prefill and decode, free, reserve) through the leader backend while
// the other ranks follow; the single-device CUDA run picks the tokens (greedy) and the other runs
// replay them. Then
//   * the leader's logits match the single-device CUDA logits closely (the only difference is the
//     order of o_proj's and down_proj's partial sums) and the CPU's within the tolerance of the
//     GPU tests (relative L2 error 0.03, bf16 activations); greedy choices agree except at near
//     ties; every sampled token is the argmax of its own logits row;
//   * on every rank, the KV cache of each live sequence holds exactly the single-device CUDA
//     cache's resident positions for the same global heads, bit for bit, under every policy (the
//     same as the CPU's for policies whose decisions do not come from activations);
//   * the leader's group figures are the single-device figures, head by head.
// Models (tests/cmake/tp_cuda.cmake writes them): llama (HF) with 4 KV heads and qwen3 (GGUF,
// q/k norms, an odd vocabulary) with 8, policies none, forced and tova; DMS Variant A (llama, one
// decision per head, and one per layer from global KV head 0, broadcast from rank 0) and
// Variant B (qwen2, Q/K/V biases) with 4 KV heads, policy dms; llama with Llama-3.1's RoPE
// frequency scaling, policy forced; llama under h2o. Also: a full pool on one rank
// fails the step on every rank; a degree that does not divide the KV heads and a host
// communicator are refused. Without mpirun every test skips with the reason. The same source is
// built against the real CUDA runtime and NCCL (tp_cuda_backend_gpu_np*, label gpu_tp, run by
// launch/gpu_check.sh on a machine with two or more GPUs); with fewer devices than ranks it skips.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "absl/time/time.h"
#include "parallel/comm.h"
#include "parallel/comm_factory.h"
#include "parallel/world.h"
#include "runtime/backend/backend.h"
#include "runtime/engine/tp_replica.h"
#include "runtime/model/model.h"
#include "tests/mpi/tp_test_util.h"

namespace dmsrt {
namespace {

using tptest::Agreement;
using tptest::ApplyPolicy;
using tptest::Case;
using tptest::Flatten;
using tptest::g_par;
using tptest::GreedyAgreement;
using tptest::RelError;
using tptest::RunScript;
using tptest::Script;

// The CUDA backend's run of the script: 10 steps, the parent freed before step 7, the fork's
// tokens sampled on the device.
constexpr tptest::ScriptShape kShape{10, 7, true};

std::string ModelDir(const std::string& name) {
  return tptest::ModelDir("DMSRT_TP_CUDA_MODELS", "tp_cuda_models", name);
}

BackendOptions Options(const Case& tc, const Model& model) {
  BackendOptions o;
  o.threads = 1;
  o.kv_budget_bytes = 2 << 20;
  o.kv_block_tokens = 4;
  ApplyPolicy(tc, model, &o);
  return o;
}

// Whether the policy's decisions follow the model's activations (bf16 on the device, fp32 on the
// CPU), so that a near-tie may go the other way on the CPU backend.
bool BitsFromActivations(const Case& tc) {
  return tc.policy == "dms" || tc.policy == "tova" || tc.policy == "h2o";
}

class TpCudaBackendTest : public ::testing::TestWithParam<Case> {};

TEST_P(TpCudaBackendTest, MatchesSingleDevice) {
  if (g_par == nullptr) GTEST_SKIP() << "not under mpirun (run with mpirun -np 2 or 4)";
  Communicator* comm = g_par->tp_comm.get();
  const int tp = comm->size();
  const int rank = comm->rank();
  const Case& tc = GetParam();
  absl::StatusOr<std::unique_ptr<Model>> model =
      LoadModel(ModelDir(tc.model) + (tc.file.empty() ? "" : "/" + tc.file));
  ASSERT_TRUE(model.ok()) << model.status();
  const ModelConfig& cfg = (*model)->config;
  if (cfg.n_kv_heads % tp != 0) {
    GTEST_SKIP() << tc.model << " has " << cfg.n_kv_heads << " KV heads, not divisible by " << tp;
  }
  if (tc.policy == "dms") {
    ASSERT_TRUE(cfg.dms.enabled) << tc.model << " has no DMS fields";
  }
  const BackendOptions opts = Options(tc, **model);

  // The single-device references on every rank (deterministic, so identical everywhere).
  absl::StatusOr<std::unique_ptr<Backend>> one = MakeCudaBackend(**model, opts);
  ASSERT_TRUE(one.ok()) << one.status();
  Script want;
  absl::Status s = RunScript(**one, kShape, nullptr, &want);
  ASSERT_TRUE(s.ok()) << s;
  absl::StatusOr<std::unique_ptr<Backend>> cpu = MakeCpuBackend(**model, opts);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  Script on_cpu;
  s = RunScript(**cpu, kShape, &want.chosen, &on_cpu);
  ASSERT_TRUE(s.ok()) << s;

  BackendOptions topts = opts;
  topts.comm = comm;
  absl::StatusOr<std::unique_ptr<Backend>> shard = MakeCudaBackend(**model, topts);
  ASSERT_TRUE(shard.ok()) << shard.status();
  const KvGeometry geo = (*shard)->kv().geometry();
  EXPECT_EQ(geo.n_kv_heads * tp, cfg.n_kv_heads);
  EXPECT_EQ(geo.kv_head_offset, rank * geo.n_kv_heads);

  Backend* local = shard->get();
  std::unique_ptr<Backend> leader;
  if (rank == 0) {
    absl::StatusOr<std::unique_ptr<Backend>> l = MakeTpLeaderBackend(std::move(*shard), comm);
    ASSERT_TRUE(l.ok()) << l.status();
    leader = std::move(*l);
    Script got;
    s = RunScript(*leader, kShape, &want.chosen, &got);
    ASSERT_TRUE(s.ok()) << s;
    for (SeqId seq : want.live) {
      const KvFigures gf = leader->kv().Figures(seq);
      const KvFigures rf = (*one)->kv().Figures(seq);
      EXPECT_EQ(gf.logical_tokens, rf.logical_tokens);
      EXPECT_EQ(gf.resident_tokens, rf.resident_tokens);
      EXPECT_EQ(gf.flagged_tokens, rf.flagged_tokens);
      ASSERT_EQ(gf.per_head.size(), rf.per_head.size());
      for (size_t h = 0; h < rf.per_head.size(); ++h) {
        EXPECT_EQ(gf.per_head[h].resident, rf.per_head[h].resident) << "head index " << h;
      }
    }
    const int64_t leader_free = leader->kv().free_blocks();
    ASSERT_TRUE(ShutdownTpFollowers(*leader).ok());
    int64_t v = local->kv().free_blocks(), min_free = 0;
    ASSERT_TRUE(comm->host()->AllReduce(&v, &min_free, 1, ReduceOp::kMin).ok());
    EXPECT_EQ(leader_free, min_free * tp);

    ASSERT_EQ(got.logits.size(), want.logits.size());
    for (size_t i = 0; i < want.logits.size(); ++i) {
      ASSERT_EQ(got.logits[i].size(), want.logits[i].size()) << "step " << i;
    }
    const double rel_one = RelError(Flatten(got), Flatten(want));
    const double rel_cpu = RelError(Flatten(got), Flatten(on_cpu));
    EXPECT_LT(rel_one, 1e-2) << "logits against the single-device CUDA backend";
    // Where decisions follow bf16 activations, a near-tie may evict another token than the
    // CPU does and the logits part from there; the resident sets are compared below.
    if (!BitsFromActivations(tc)) {
      EXPECT_LT(rel_cpu, 0.03) << "logits against the CPU backend";
    }
    const Agreement a_one = GreedyAgreement(got, want, cfg.vocab, 0.05);
    const Agreement a_cpu = GreedyAgreement(got, on_cpu, cfg.vocab, 0.25);
    EXPECT_EQ(a_one.agree, a_one.decisive) << "greedy choice differs from the single device";
    EXPECT_EQ(a_cpu.agree, a_cpu.decisive) << "greedy choice differs from the CPU at a decisive row";
    EXPECT_GT(a_one.decisive, 0);
    EXPECT_GT(got.sampled, 0);
    EXPECT_EQ(got.sampled_wrong, 0) << "a device sample is not its row's argmax";
    std::printf("[tp %d] %s/%s: logits rel err %.2g vs cuda tp 1, %.3f vs cpu; greedy %d/%d "
                "(cuda), %d/%d (cpu); %d samples\n",
                tp, tc.model.c_str(), tc.policy.c_str(), rel_one, rel_cpu, a_one.agree,
                a_one.decisive, a_cpu.agree, a_cpu.decisive, got.sampled);
  } else {
    s = RunTpFollower(**shard, comm);
    ASSERT_TRUE(s.ok()) << s;
    int64_t v = (*shard)->kv().free_blocks(), min_free = 0;
    ASSERT_TRUE(comm->host()->AllReduce(&v, &min_free, 1, ReduceOp::kMin).ok());
  }

  // Residents per (layer, local head): the single device's for the same global head, bit for
  // bit; the CPU's too, unless the decisions come from bf16 activations (dms, tova, h2o).
  const KvCache& tkv = rank == 0 ? leader->kv() : (*shard)->kv();
  int64_t compared = 0, evicted = 0, cpu_differ = 0;
  for (SeqId seq : want.live) {
    ASSERT_EQ(tkv.Length(seq), (*one)->kv().Length(seq));
    for (int32_t l = 0; l < geo.n_layers; ++l) {
      for (int32_t j = 0; j < geo.n_kv_heads; ++j) {
        const int32_t global = geo.kv_head_offset + j;
        const std::vector<int32_t> got = tkv.ResidentPositions(seq, l, j);
        const std::vector<int32_t> ref = (*one)->kv().ResidentPositions(seq, l, global);
        EXPECT_EQ(got, ref) << "rank " << rank << " seq " << seq << " layer " << l
                            << " local head " << j << " (global " << global << ")";
        cpu_differ += got != (*cpu)->kv().ResidentPositions(seq, l, global);
        ++compared;
        evicted += (*one)->kv().Length(seq) - static_cast<int64_t>(ref.size());
      }
    }
  }
  EXPECT_GT(compared, 0);
  if (tc.policy != "none") {
    EXPECT_GT(evicted, 0) << "the policy evicted nothing";
  }
  if (tc.policy == "dms") {
    EXPECT_LE(cpu_differ, 1) << "resident sets against the CPU backend";
  } else if (BitsFromActivations(tc)) {
    // A victim picked at a near-tie changes every later choice of that head. Over the group:
    int64_t mine[2] = {cpu_differ, compared}, all[2] = {0, 0};
    ASSERT_TRUE(comm->host()->AllReduce(mine, all, 2, ReduceOp::kSum).ok());
    EXPECT_LE(all[0], all[1] / 4) << "resident sets against the CPU backend";
    if (rank == 0) {
      std::printf("[tp %d] %s: resident sets differ from the CPU's in %lld of %lld heads\n", tp,
                  tc.policy.c_str(), static_cast<long long>(all[0]),
                  static_cast<long long>(all[1]));
    }
  } else {
    EXPECT_EQ(cpu_differ, 0) << "resident sets against the CPU backend";
  }
  ASSERT_TRUE(comm->Barrier().ok());
}

INSTANTIATE_TEST_SUITE_P(
    Models, TpCudaBackendTest,
    ::testing::Values(Case{"llama_kv4", "", "none"}, Case{"llama_kv4", "", "forced"},
                      Case{"qwen3_kv8", "model.gguf", "none"},
                      Case{"qwen3_kv8", "model.gguf", "forced"}, Case{"llama_dmsA_kv4", "", "dms"},
                      Case{"qwen2_dmsB_kv4", "", "dms"}, Case{"llama_rope3_kv4", "", "forced"},
                      Case{"llama_dmsAL_kv4", "", "dms"},
                      Case{"llama_kv4", "", "h2o"}, Case{"qwen3_kv8", "model.gguf", "tova"}),
    tptest::CaseName);

// Each rank drives the device of its local rank, and so does its communicator.
TEST(TpCudaDevices, EachRankTakesTheDeviceOfItsLocalRank) {
  if (g_par == nullptr) GTEST_SKIP() << "not under mpirun";
  EXPECT_EQ(g_par->kind, CommKind::kNccl);
  EXPECT_STREQ(g_par->tp_comm->kind(), "nccl");
  EXPECT_TRUE(g_par->tp_comm->device_buffers());
  const LauncherEnv env = ReadLauncherEnv();
  ASSERT_TRUE(env.local_rank.has_value());
  int devices = 0;
  ASSERT_EQ(cudaGetDeviceCount(&devices), cudaSuccess);
  EXPECT_EQ(g_par->world.device(), *env.local_rank % devices);
}

// A full KV pool on any rank fails the step on every rank alike (tptest::ExpectFullPoolFails-
// Everywhere).
TEST(TpCudaCapacity, FullPoolFailsTheStepEverywhere) {
  if (g_par == nullptr) GTEST_SKIP() << "not under mpirun";
  Communicator* comm = g_par->tp_comm.get();
  absl::StatusOr<std::unique_ptr<Model>> model = LoadModel(ModelDir("llama_kv4"));
  ASSERT_TRUE(model.ok()) << model.status();
  if ((*model)->config.n_kv_heads % comm->size() != 0) GTEST_SKIP() << "degree does not divide";
  BackendOptions opts;
  opts.kv_budget_bytes = 40 << 10;
  opts.kv_block_tokens = 4;
  opts.kv_policy.kind = KvPolicyKind::kForced;  // ranks evict different amounts
  opts.kv_policy.force_rate = 0.5;
  opts.kv_policy.window = 2;
  opts.comm = comm;
  tptest::ExpectFullPoolFailsEverywhere(**model, opts, MakeCudaBackend);
}

// A degree that does not divide the KV heads, and a host communicator, are refused.
TEST(TpCudaRefusal, DegreeAndCommunicator) {
  if (g_par == nullptr) GTEST_SKIP() << "not under mpirun";
  Communicator* comm = g_par->tp_comm.get();
  absl::StatusOr<std::unique_ptr<Model>> model = LoadModel(ModelDir("llama_kv4"));
  ASSERT_TRUE(model.ok()) << model.status();
  BackendOptions opts;
  opts.kv_budget_bytes = 1 << 20;
  opts.comm = comm->host();
  absl::StatusOr<std::unique_ptr<Backend>> b = MakeCudaBackend(**model, opts);
  ASSERT_FALSE(b.ok());
  EXPECT_TRUE(absl::IsInvalidArgument(b.status())) << b.status();
  EXPECT_NE(b.status().message().find("needs an NCCL communicator"), std::string::npos)
      << b.status();
  if (comm->size() >= 3) {
    // Three ranks (an NCCL split) of a model with 4 KV heads.
    absl::StatusOr<std::unique_ptr<Communicator>> sub =
        comm->Split(comm->rank() < 3 ? 0 : 1, comm->rank());
    ASSERT_TRUE(sub.ok()) << sub.status();
    if (comm->rank() < 3) {
      opts.comm = sub->get();
      b = MakeCudaBackend(**model, opts);
      ASSERT_FALSE(b.ok());
      EXPECT_TRUE(absl::IsInvalidArgument(b.status())) << b.status();
      EXPECT_NE(b.status().message().find("does not divide the model's 4 KV heads"),
                std::string::npos)
          << b.status();
      EXPECT_NE(b.status().message().find("valid degrees for this model: 1, 2, 4"),
                std::string::npos)
          << b.status();
    }
  }
  ASSERT_TRUE(comm->Barrier().ok());
}

}  // namespace
}  // namespace dmsrt

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  // One device per rank on one node (the emulated build: DMSRT_CUDA_EMULATOR_DEVICES), else every
  // test skips: the same decision on every rank, before any of them starts MPI.
  int devices = 0;
  const bool enough = cudaGetDeviceCount(&devices) == cudaSuccess &&
                      devices >= dmsrt::ReadLauncherEnv().world_size.value_or(1);
  if (dmsrt::InsideMpirun() && !enough) {
    std::printf("SKIPPED: %d CUDA device(s) for %d ranks; this test needs one device per rank\n",
                devices, dmsrt::ReadLauncherEnv().world_size.value_or(1));
    return 0;
  }
  dmsrt::ParallelOptions opts;
  opts.gpu = true;  // the TP communicator: NCCL on the device of the local rank
  opts.timeout = absl::Seconds(120);
  return dmsrt::tptest::RunTpTests(&argc, &argv, opts);
}
