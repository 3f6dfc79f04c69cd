// World (rank topology), launcher detection and LocalComm: no MPI needed.
#include "parallel/world.h"

#include <unistd.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "parallel/comm.h"
#include "parallel/comm_factory.h"

namespace dmsrt {
namespace {

// Sets environment variables for one test and restores them afterwards.
class ScopedEnv {
 public:
  ScopedEnv& Set(const char* name, const char* value) {
    const char* old = std::getenv(name);
    saved_.push_back({name, old != nullptr, old != nullptr ? old : ""});
    if (value == nullptr) {
      unsetenv(name);
    } else {
      setenv(name, value, 1);
    }
    return *this;
  }
  // Clears every launcher variable World reads, so tests do not depend on how ctest was started.
  ScopedEnv& ClearLauncher() {
    for (const char* v :
         {"OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_SIZE",
          "PMI_RANK", "MPI_LOCALRANKID", "PMIX_SIZE", "PMIX_RANK", "PMIX_LOCAL_RANK",
          "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "LOCAL_RANK"}) {
      Set(v, nullptr);
    }
    return *this;
  }
  ScopedEnv() = default;
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;
  ~ScopedEnv() {
    for (auto it = saved_.rbegin(); it != saved_.rend(); ++it) {
      if (it->had) {
        setenv(it->name.c_str(), it->value.c_str(), 1);
      } else {
        unsetenv(it->name.c_str());
      }
    }
  }

 private:
  struct Saved {
    std::string name;
    bool had;
    std::string value;
  };
  std::vector<Saved> saved_;
};

TEST(World, DefaultIsSingleRank) {
  World w;
  EXPECT_EQ(w.world_size(), 1);
  EXPECT_EQ(w.tp(), 1);
  EXPECT_EQ(w.rank(), 0);
  EXPECT_TRUE(w.leader());
  EXPECT_EQ(w.num_replicas(), 1);
}

TEST(World, World4Tp2LaysOutTwoReplicas) {
  const int want_replica[] = {0, 0, 1, 1};
  const int want_tp_rank[] = {0, 1, 0, 1};
  for (int r = 0; r < 4; ++r) {
    absl::StatusOr<World> w = World::Make(4, 2, r);
    ASSERT_TRUE(w.ok()) << w.status();
    EXPECT_EQ(w->replica(), want_replica[r]) << r;
    EXPECT_EQ(w->tp_rank(), want_tp_rank[r]) << r;
    EXPECT_EQ(w->leader(), want_tp_rank[r] == 0) << r;
    EXPECT_EQ(w->num_replicas(), 2);
    EXPECT_EQ(w->leader_rank(), want_replica[r] * 2);
    EXPECT_EQ(w->GroupMember(1), want_replica[r] * 2 + 1);
    EXPECT_EQ(w->device(), r);  // no device count: device = local rank = rank
  }
  EXPECT_EQ(World::Make(4, 2, 3)->ToString(), "rank 3/4 (replica 1/2, tp_rank 1/2, device 3)");
}

TEST(World, Tp3World3AndTp1World3) {
  absl::StatusOr<World> a = World::Make(3, 3, 2);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->replica(), 0);
  EXPECT_EQ(a->tp_rank(), 2);
  absl::StatusOr<World> b = World::Make(3, 1, 2);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b->replica(), 2);
  EXPECT_TRUE(b->leader());
}

TEST(World, DeviceFromLocalRankAndDeviceCount) {
  // 8 ranks on 2 nodes of 4 ranks, 2 GPUs per node: local ranks 0..3 -> devices 0,1,0,1.
  absl::StatusOr<World> w = World::Make(8, 4, 6, /*local_rank=*/2, /*devices_per_node=*/2);
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ(w->local_rank(), 2);
  EXPECT_EQ(w->device(), 0);
  w = World::Make(8, 4, 7, /*local_rank=*/3, /*devices_per_node=*/4);
  ASSERT_TRUE(w.ok());
  EXPECT_EQ(w->device(), 3);
  // Unknown local rank: rank % devices.
  w = World::Make(8, 2, 5, -1, 4);
  ASSERT_TRUE(w.ok());
  EXPECT_EQ(w->device(), 1);
}

TEST(World, RejectsInvalidShapes) {
  struct Case {
    int world, tp, rank, local, devices;
    const char* needle;
  };
  const Case cases[] = {
      {0, 1, 0, -1, 0, "world size"},   {4, 3, 0, -1, 0, "does not divide"},
      {4, 0, 0, -1, 0, "tensor-parallel"}, {2, 4, 0, -1, 0, "tensor-parallel"},
      {4, 2, 4, -1, 0, "rank 4 out of range"}, {4, 2, -1, -1, 0, "out of range"},
      {4, 2, 0, -2, 0, "local rank"},   {4, 2, 0, -1, -1, "devices"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<World> w = World::Make(c.world, c.tp, c.rank, c.local, c.devices);
    ASSERT_FALSE(w.ok()) << c.world << " " << c.tp << " " << c.rank;
    EXPECT_EQ(w.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(w.status().message().find(c.needle), std::string::npos) << w.status();
  }
}

TEST(WorldEnv, OutsideLauncherIsSingleRank) {
  ScopedEnv env;
  env.ClearLauncher();
  EXPECT_FALSE(InsideMpirun());
  absl::StatusOr<World> w = WorldFromEnv();
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ(*w, World());
  EXPECT_EQ(ReadLauncherEnv().source, "");
}

TEST(WorldEnv, ReadsOpenMpiVariables) {
  ScopedEnv env;
  env.ClearLauncher();
  env.Set("OMPI_COMM_WORLD_SIZE", "4").Set("OMPI_COMM_WORLD_RANK", "3").Set(
      "OMPI_COMM_WORLD_LOCAL_RANK", "1");
  EXPECT_TRUE(InsideMpirun());
  absl::StatusOr<World> w = WorldFromEnv(/*tp=*/2);
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ(w->world_size(), 4);
  EXPECT_EQ(w->rank(), 3);
  EXPECT_EQ(w->replica(), 1);
  EXPECT_EQ(w->local_rank(), 1);
  EXPECT_EQ(ReadLauncherEnv().source, "openmpi");
  // tp 0 = one replica of all ranks.
  EXPECT_EQ(WorldFromEnv(0)->tp(), 4);
}

TEST(WorldEnv, ReadsPmiAndPmixVariables) {
  {
    ScopedEnv env;
    env.ClearLauncher();
    env.Set("PMI_SIZE", "2").Set("PMI_RANK", "1");
    EXPECT_TRUE(InsideMpirun());
    absl::StatusOr<World> w = WorldFromEnv();
    ASSERT_TRUE(w.ok()) << w.status();
    EXPECT_EQ(w->world_size(), 2);
    EXPECT_EQ(w->rank(), 1);
  }
  {
    ScopedEnv env;
    env.ClearLauncher();
    env.Set("PMIX_RANK", "0");
    EXPECT_TRUE(InsideMpirun());
    // PMIX_RANK without a size: incomplete, reported rather than guessed.
    absl::StatusOr<World> w = WorldFromEnv();
    EXPECT_FALSE(w.ok());
    EXPECT_NE(w.status().message().find("incomplete"), std::string::npos) << w.status();
  }
}

TEST(WorldEnv, MalformedValuesAreNotZero) {
  ScopedEnv env;
  env.ClearLauncher();
  env.Set("OMPI_COMM_WORLD_SIZE", "four").Set("OMPI_COMM_WORLD_RANK", "1");
  absl::StatusOr<World> w = WorldFromEnv();
  EXPECT_FALSE(w.ok());
}

TEST(WorldEnv, TpMustDivideLauncherWorld) {
  ScopedEnv env;
  env.ClearLauncher();
  env.Set("OMPI_COMM_WORLD_SIZE", "3").Set("OMPI_COMM_WORLD_RANK", "0");
  absl::StatusOr<World> w = WorldFromEnv(2);
  ASSERT_FALSE(w.ok());
  EXPECT_NE(w.status().message().find("does not divide the world size 3"), std::string::npos);
}

TEST(LocalComm, CollectivesCopyAndCheckArguments) {
  LocalComm c;
  EXPECT_EQ(c.size(), 1);
  EXPECT_EQ(c.rank(), 0);
  std::vector<float> a = {1, 2, 3}, b(3, -1);
  ASSERT_TRUE(c.AllReduce(a.data(), b.data(), 3, ReduceOp::kSum).ok());
  EXPECT_EQ(a, b);
  ASSERT_TRUE(c.AllReduceSum(a.data(), 3).ok());
  EXPECT_EQ(a, (std::vector<float>{1, 2, 3}));
  std::vector<float> g(3, 0);
  ASSERT_TRUE(c.AllGather(a.data(), 3, g.data()).ok());
  EXPECT_EQ(g, a);
  int64_t v[2] = {5, -7};
  ASSERT_TRUE(c.AllReduceMin(v, 2).ok());
  EXPECT_EQ(v[1], -7);
  EXPECT_EQ(*c.AgreeMin(42), 42);
  std::string s = "plan";
  ASSERT_TRUE(c.BroadcastString(&s, 0).ok());
  EXPECT_EQ(s, "plan");
  std::vector<int32_t> vec = {1, 2};
  ASSERT_TRUE(c.BroadcastVector(&vec, 0).ok());
  EXPECT_EQ(vec.size(), 2u);
  EXPECT_TRUE(c.Barrier().ok());
  EXPECT_EQ(c.Broadcast(&s, 1, 1).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(c.AllReduce(a.data(), a.data(), -1, ReduceOp::kSum).code(),
            absl::StatusCode::kInvalidArgument);
  absl::StatusOr<std::unique_ptr<Communicator>> sub = c.Split(0, 0);
  ASSERT_TRUE(sub.ok());
  EXPECT_EQ((*sub)->size(), 1);
  EXPECT_FALSE(c.Split(-1, 0).ok());
}

TEST(LocalComm, AbortReturnsAbortedWithReason) {
  LocalComm c;
  testing::internal::CaptureStderr();
  absl::Status s = c.Abort("weights missing");
  const std::string err = testing::internal::GetCapturedStderr();
  EXPECT_EQ(s.code(), absl::StatusCode::kAborted);
  EXPECT_NE(err.find("dmsrt: rank 0 failed: weights missing"), std::string::npos) << err;
}

TEST(LocalComm, TpCommOfSingleRankWorld) {
  LocalComm c;
  absl::StatusOr<std::unique_ptr<Communicator>> tp = MakeTpComm(c, World());
  ASSERT_TRUE(tp.ok()) << tp.status();
  EXPECT_EQ((*tp)->size(), 1);
  // A World that does not describe this communicator is refused.
  EXPECT_FALSE(MakeTpComm(c, *World::Make(2, 2, 1)).ok());
}

TEST(CommFactory, SingleProcessGetsLocalCommunicators) {
  ScopedEnv env;
  env.ClearLauncher();
  int argc = 1;
  char arg0[] = "world_test";
  char* argv_arr[] = {arg0, nullptr};
  char** argv = argv_arr;
  ParallelOptions opts;
  opts.kind = CommKind::kLocal;
  absl::StatusOr<ParallelContext> par = InitParallel(&argc, &argv, opts);
  ASSERT_TRUE(par.ok()) << par.status();
  EXPECT_EQ(par->world, World());
  EXPECT_STREQ(par->tp_comm->kind(), "local");
  EXPECT_STREQ(par->world_comm->kind(), "local");
  char host[256] = {};
  ASSERT_EQ(gethostname(host, sizeof(host) - 1), 0);
  EXPECT_EQ(par->tp_hosts, std::vector<std::string>{host});
  EXPECT_EQ(TpSpanNote(par->world, par->tp_hosts), "");
  // tp 2 cannot run in one process.
  opts.tp = 2;
  EXPECT_FALSE(InitParallel(&argc, &argv, opts).ok());
}

// A TP group over two nodes says so, naming the group, its ranks and the nodes; one inside a
// node says nothing.
TEST(CommFactory, SpanNoteNamesTheNodes) {
  const World w = *World::Make(8, 4, 5);  // replica 1: world ranks 4..7
  EXPECT_EQ(TpSpanNote(w, {"dgx1", "dgx1", "dgx1", "dgx1"}), "");
  const std::string note = TpSpanNote(w, {"dgx1", "dgx1", "dgx2", "dgx2"});
  EXPECT_NE(note.find("group 1 (world ranks 4..7) spans 2 nodes (dgx1, dgx2)"), std::string::npos)
      << note;
  EXPECT_NE(note.find("cross the network"), std::string::npos) << note;
  EXPECT_EQ(DistinctHosts({"b", "a", "b", "c"}), (std::vector<std::string>{"b", "a", "c"}));
}

TEST(CommFactory, ParsesKinds) {
  EXPECT_EQ(*ParseCommKind("MPI"), CommKind::kMpi);
  EXPECT_EQ(*ParseCommKind("nccl"), CommKind::kNccl);
  EXPECT_EQ(*ParseCommKind("local"), CommKind::kLocal);
  EXPECT_EQ(*ParseCommKind("auto"), CommKind::kAuto);
  EXPECT_FALSE(ParseCommKind("gloo").ok());
  EXPECT_STREQ(CommKindName(CommKind::kNccl), "nccl");
}

}  // namespace
}  // namespace dmsrt
