// Multi-rank tests of MpiComm, run by ctest under `mpirun -np 2/3/4` (label mpi).
//
// Inputs are small integers stored as float (or int64 values above 2^53), so every sum, minimum
// and gather is exact and compared with ==. Each collective runs in two modes: blocking MPI calls
// (no timeout) and the watchdog path (non-blocking calls polled against a deadline). A world
// timeout of 30 s guards every test, so a rank that fails an ASSERT and leaves early makes the
// others fail with DEADLINE_EXCEEDED rather than hang. Started without mpirun, every test skips.
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "parallel/comm.h"
#include "parallel/mpi/mpi_comm.h"
#include "parallel/world.h"

namespace dmsrt {
namespace {

MpiComm* g_world = nullptr;  // set by main under mpirun
constexpr absl::Duration kGuard = absl::Seconds(30);

class MpiTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (g_world == nullptr) {
      GTEST_SKIP() << "not started under mpirun (no OMPI_COMM_WORLD_SIZE/PMI_SIZE/PMIX_RANK); "
                      "run: mpirun -np 2 mpi_comm_test";
    }
    g_world->set_timeout(kGuard);
  }
  Communicator& world() { return *g_world; }
};

// Param: (count, watchdog).
class CollectiveTest : public ::testing::TestWithParam<std::tuple<int64_t, bool>> {
 protected:
  void SetUp() override {
    if (g_world == nullptr) {
      GTEST_SKIP() << "not started under mpirun; run: mpirun -np 2 mpi_comm_test";
    }
    count_ = std::get<0>(GetParam());
    g_world->set_timeout(std::get<1>(GetParam()) ? kGuard : absl::InfiniteDuration());
  }
  void TearDown() override {
    if (g_world != nullptr) g_world->set_timeout(kGuard);
  }
  Communicator& comm() { return *g_world; }
  int64_t count_ = 0;
};

std::string CollectiveName(const ::testing::TestParamInfo<std::tuple<int64_t, bool>>& info) {
  return absl::StrFormat("n%d_%s", std::get<0>(info.param),
                         std::get<1>(info.param) ? "watchdog" : "blocking");
}

TEST_P(CollectiveTest, AllReduceSumFloat) {
  const int n = comm().size(), r = comm().rank();
  std::vector<float> send(count_), recv(count_, -7.0f);
  for (int64_t i = 0; i < count_; ++i) send[i] = static_cast<float>(i % 7 + r + 1);
  ASSERT_TRUE(comm().AllReduce(send.data(), recv.data(), count_, ReduceOp::kSum).ok());
  int64_t wrong = 0;
  for (int64_t i = 0; i < count_; ++i) {
    const float want = static_cast<float>(n * (i % 7 + 1) + n * (n - 1) / 2);
    wrong += recv[i] != want;
  }
  EXPECT_EQ(wrong, 0);
  // In place.
  ASSERT_TRUE(comm().AllReduceSum(send.data(), count_).ok());
  EXPECT_EQ(send, recv);
}

TEST_P(CollectiveTest, AllReduceMinMaxInt64) {
  const int n = comm().size(), r = comm().rank();
  // Values above 2^53: a reduction that went through double would lose the low bits.
  const int64_t base = (int64_t{1} << 60) + 12345;
  std::vector<int64_t> v(count_), mn(count_), mx(count_);
  for (int64_t i = 0; i < count_; ++i) v[i] = base + i - (i % 2 == 0 ? r : -r) * 1000003;
  ASSERT_TRUE(comm().AllReduce(v.data(), mn.data(), count_, ReduceOp::kMin).ok());
  ASSERT_TRUE(comm().AllReduce(v.data(), mx.data(), count_, ReduceOp::kMax).ok());
  int64_t wrong = 0;
  for (int64_t i = 0; i < count_; ++i) {
    const int64_t lo = base + i - (i % 2 == 0 ? (n - 1) * 1000003 : 0);
    const int64_t hi = base + i + (i % 2 == 0 ? 0 : (n - 1) * 1000003);
    wrong += (mn[i] != lo) + (mx[i] != hi);
  }
  EXPECT_EQ(wrong, 0);
}

TEST_P(CollectiveTest, AllGatherFloatInRankOrder) {
  const int n = comm().size(), r = comm().rank();
  std::vector<float> send(count_), recv(count_ * n, -1.0f);
  for (int64_t i = 0; i < count_; ++i) send[i] = static_cast<float>(r * 1000 + i % 1000);
  ASSERT_TRUE(comm().AllGather(send.data(), count_, recv.data()).ok());
  int64_t wrong = 0;
  for (int q = 0; q < n; ++q) {
    for (int64_t i = 0; i < count_; ++i) {
      wrong += recv[q * count_ + i] != static_cast<float>(q * 1000 + i % 1000);
    }
  }
  EXPECT_EQ(wrong, 0);
  // In place: the rank's own slot already holds its contribution.
  std::vector<float> inplace(count_ * n, -1.0f);
  std::memcpy(inplace.data() + r * count_, send.data(), count_ * sizeof(float));
  ASSERT_TRUE(comm().AllGather(inplace.data() + r * count_, count_, inplace.data()).ok());
  EXPECT_EQ(inplace, recv);
}

TEST_P(CollectiveTest, BroadcastFromLastRank) {
  const int n = comm().size(), root = n - 1;
  std::vector<uint8_t> buf(count_, 0xAB);
  if (comm().rank() == root) {
    for (int64_t i = 0; i < count_; ++i) buf[i] = static_cast<uint8_t>(i % 251);
  }
  ASSERT_TRUE(comm().Broadcast(buf.data(), count_, root).ok());
  int64_t wrong = 0;
  for (int64_t i = 0; i < count_; ++i) wrong += buf[i] != static_cast<uint8_t>(i % 251);
  EXPECT_EQ(wrong, 0);
}

INSTANTIATE_TEST_SUITE_P(Sizes, CollectiveTest,
                         ::testing::Combine(::testing::Values<int64_t>(1, 19, 111, 4096, 1 << 20),
                                            ::testing::Bool()),
                         CollectiveName);

TEST_F(MpiTest, WorldMatchesMpiAndEnvironment) {
  absl::StatusOr<World> w = WorldFromMpi();
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ(w->world_size(), world().size());
  EXPECT_EQ(w->rank(), world().rank());
  absl::StatusOr<World> e = WorldFromEnv();
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->world_size(), w->world_size());
  EXPECT_EQ(e->rank(), w->rank());
  EXPECT_TRUE(InsideMpirun());
  EXPECT_EQ(g_world->members().size(), static_cast<size_t>(world().size()));
}

TEST_F(MpiTest, GatherBytesOfOddSize) {
  const int n = world().size(), r = world().rank();
  char mine[7];
  for (int i = 0; i < 7; ++i) mine[i] = static_cast<char>('a' + r + i);
  std::vector<char> all(7 * n, '?');
  ASSERT_TRUE(world().AllGatherBytes(mine, 7, all.data()).ok());
  for (int q = 0; q < n; ++q) {
    for (int i = 0; i < 7; ++i) EXPECT_EQ(all[q * 7 + i], static_cast<char>('a' + q + i));
  }
}

TEST_F(MpiTest, BroadcastStringAndVectorFromNonZeroRoot) {
  const int root = world().size() - 1;
  std::string s = world().rank() == root ? std::string(1000, 'x') + "end" : "stale";
  ASSERT_TRUE(world().BroadcastString(&s, root).ok());
  EXPECT_EQ(s, std::string(1000, 'x') + "end");
  std::string empty = world().rank() == root ? "" : "not empty";
  ASSERT_TRUE(world().BroadcastString(&empty, root).ok());
  EXPECT_EQ(empty, "");
  std::vector<int32_t> v;
  if (world().rank() == root) v = {3, -1, 4, 1, -5, 9};
  ASSERT_TRUE(world().BroadcastVector(&v, root).ok());
  EXPECT_EQ(v, (std::vector<int32_t>{3, -1, 4, 1, -5, 9}));
}

TEST_F(MpiTest, AgreeMinFreeBlocks) {
  // Each rank evicts differently, so each has a different free-block count.
  const int64_t mine = 1000 + 37 * ((world().rank() * 5 + 3) % world().size());
  absl::StatusOr<int64_t> agreed = world().AgreeMin(mine);
  ASSERT_TRUE(agreed.ok()) << agreed.status();
  EXPECT_EQ(*agreed, 1000);
}

TEST_F(MpiTest, BarrierAndBadArguments) {
  EXPECT_TRUE(world().Barrier().ok());
  char c = 0;
  EXPECT_EQ(world().Broadcast(&c, 1, world().size()).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(world().Broadcast(&c, 1, -1).code(), absl::StatusCode::kInvalidArgument);
  float f = 0;
  EXPECT_EQ(world().AllReduce(&f, &f, -1, ReduceOp::kSum).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(world().Split(-1, 0).status().code(), absl::StatusCode::kInvalidArgument);
  // The communicator is still usable after rejected arguments.
  EXPECT_TRUE(world().Barrier().ok());
}

// Every tp that divides the world size: replicas of tp consecutive ranks, each with its own
// communicator (world 4 = 2 replicas x tp 2 among them).
TEST_F(MpiTest, TpGroupsPerReplica) {
  const int n = world().size(), r = world().rank();
  for (int tp = 1; tp <= n; ++tp) {
    if (n % tp != 0) continue;
    SCOPED_TRACE(absl::StrFormat("world %d tp %d", n, tp));
    absl::StatusOr<World> w = World::Make(n, tp, r);
    ASSERT_TRUE(w.ok()) << w.status();
    absl::StatusOr<std::unique_ptr<Communicator>> group = MakeTpComm(world(), *w);
    ASSERT_TRUE(group.ok()) << group.status();
    Communicator& g = **group;
    EXPECT_EQ(g.size(), tp);
    EXPECT_EQ(g.rank(), w->tp_rank());
    // Sum of the world ranks of the group: replica*tp*tp + tp*(tp-1)/2.
    float sum = static_cast<float>(r);
    ASSERT_TRUE(g.AllReduceSum(&sum, 1).ok());
    EXPECT_EQ(sum, static_cast<float>(w->replica() * tp * tp + tp * (tp - 1) / 2));
    // Gather order is TP rank order = consecutive world ranks.
    int32_t me = r;
    std::vector<int32_t> ranks(tp, -1);
    ASSERT_TRUE(g.AllGatherBytes(&me, sizeof(me), ranks.data()).ok());
    for (int t = 0; t < tp; ++t) EXPECT_EQ(ranks[t], w->GroupMember(t));
    // Broadcast from the group's last member reaches only its group.
    std::string msg = g.rank() == tp - 1 ? absl::StrFormat("replica %d", w->replica()) : "";
    ASSERT_TRUE(g.BroadcastString(&msg, tp - 1).ok());
    EXPECT_EQ(msg, absl::StrFormat("replica %d", w->replica()));
    EXPECT_NE(g.Describe().find(absl::StrFormat("%d", w->leader_rank())), std::string::npos);
  }
}

// Rank 0 skips a collective: the others get DEADLINE_EXCEEDED (not a hang) naming the collective
// and the group. Rank 0 then issues the collective late so the abandoned requests complete and the
// communicator can be freed cleanly.
TEST_F(MpiTest, WatchdogReportsMissingRank) {
  if (world().size() < 2) GTEST_SKIP() << "needs at least 2 ranks";
  absl::StatusOr<std::unique_ptr<Communicator>> sub = world().Split(0, world().rank());
  ASSERT_TRUE(sub.ok()) << sub.status();
  (*sub)->set_timeout(absl::Milliseconds(300));
  std::vector<float> buf(19, 1.0f);
  if (world().rank() != 0) {
    absl::Status s = (*sub)->AllReduceSum(buf.data(), buf.size());
    EXPECT_EQ(s.code(), absl::StatusCode::kDeadlineExceeded) << s;
    EXPECT_NE(s.message().find("MPI_Iallreduce"), std::string::npos) << s;
    EXPECT_NE(s.message().find("mpi["), std::string::npos) << s;
    // Broken from now on: fails fast instead of posting another collective.
    EXPECT_EQ((*sub)->Barrier().code(), absl::StatusCode::kFailedPrecondition);
  }
  ASSERT_TRUE(world().Barrier().ok());
  if (world().rank() == 0) {
    (*sub)->set_timeout(kGuard);
    EXPECT_TRUE((*sub)->AllReduceSum(buf.data(), buf.size()).ok());
    EXPECT_EQ(buf[0], static_cast<float>(world().size()));
  }
  ASSERT_TRUE(world().Barrier().ok());
  sub->reset();
}

// Prints failures of ranks other than 0 with the rank, without repeating the full report.
class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (!r.failed()) return;
    std::fprintf(stderr, "[rank %d] %s:%d: failure\n%s\n", rank_,
                 r.file_name() ? r.file_name() : "?", r.line_number(), r.summary());
  }

 private:
  int rank_;
};

}  // namespace
}  // namespace dmsrt

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  std::unique_ptr<dmsrt::MpiRuntime> runtime;
  std::unique_ptr<dmsrt::MpiComm> world;
  std::unique_ptr<dmsrt::MpiComm> verdict;  // separate, so it never matches a test's collective
  if (dmsrt::InsideMpirun()) {
    absl::StatusOr<std::unique_ptr<dmsrt::MpiRuntime>> rt = dmsrt::MpiRuntime::Init(&argc, &argv);
    if (!rt.ok()) {
      std::fprintf(stderr, "MPI init failed: %s\n", rt.status().ToString().c_str());
      return 1;
    }
    runtime = std::move(*rt);
    absl::StatusOr<std::unique_ptr<dmsrt::MpiComm>> wc = dmsrt::MpiComm::WorldDup();
    if (!wc.ok()) {
      std::fprintf(stderr, "MPI world communicator: %s\n", wc.status().ToString().c_str());
      return 1;
    }
    world = std::move(*wc);
    wc = dmsrt::MpiComm::WorldDup();
    if (!wc.ok()) {
      std::fprintf(stderr, "MPI verdict communicator: %s\n", wc.status().ToString().c_str());
      return 1;
    }
    verdict = std::move(*wc);
    dmsrt::g_world = world.get();
    if (world->rank() != 0) {
      ::testing::TestEventListeners& ls = ::testing::UnitTest::GetInstance()->listeners();
      delete ls.Release(ls.default_result_printer());
      ls.Append(new dmsrt::RankFailurePrinter(world->rank()));
    }
  }
  int rc = RUN_ALL_TESTS();
  if (verdict != nullptr) {
    // Every rank exits with the worst result, so mpirun reports a failure seen on any rank.
    int64_t worst = rc;
    verdict->set_timeout(dmsrt::kGuard);
    absl::Status s = verdict->AllReduce(&worst, &worst, 1, dmsrt::ReduceOp::kMax);
    rc = s.ok() ? static_cast<int>(worst) : 1;
    dmsrt::g_world = nullptr;
    verdict.reset();
    world.reset();
  }
  runtime.reset();
  return rc;
}
