// NcclComm on the emulated device (tests/cuda_emulator/nccl_api.cc), under mpirun (label mpi):
// every rank is one device of a node with as many GPUs as ranks, the TP communicator that
// InitParallel makes with ParallelOptions::gpu is an NcclComm bootstrapped over MPI, and its
// collectives run over MPI on the host memory behind the device buffers. Checked on exactly
// representable inputs, as comm.h asks: all-reduce (sum, min, max; float and int64; in place),
// all-gather in rank order (in place too), broadcast from the last rank, a split, collectives
// ordered with kernels on a bound compute stream (UseStream, asynchronous), a host pointer
// refused as NCCL refuses it, and the watchdog: a rank that never joins gives the others
// DEADLINE_EXCEEDED, not a hang. Without mpirun every test skips with the reason.
#include <cuda_runtime.h>

#include <cstdio>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "absl/time/time.h"
#include "parallel/comm_factory.h"
#include "parallel/nccl/nccl_comm.h"

namespace dmsrt {
namespace {

ParallelContext* g_par = nullptr;

// A device buffer of T.
template <typename T>
class Device {
 public:
  explicit Device(size_t n) : n_(n) { EXPECT_EQ(cudaMalloc(&p_, std::max<size_t>(n, 1) * sizeof(T)), cudaSuccess); }
  ~Device() { cudaFree(p_); }
  T* get() const { return p_; }
  void Put(const std::vector<T>& v) {
    ASSERT_EQ(cudaMemcpy(p_, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  }
  std::vector<T> Get() const {
    std::vector<T> v(n_);
    EXPECT_EQ(cudaMemcpy(v.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return v;
  }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

class NcclEmulated : public ::testing::Test {
 protected:
  void SetUp() override {
    if (g_par == nullptr) GTEST_SKIP() << "not under mpirun (run with mpirun -np 2 or 3)";
    comm_ = dynamic_cast<NcclComm*>(g_par->tp_comm.get());
    ASSERT_NE(comm_, nullptr) << g_par->tp_comm->Describe();
    ASSERT_EQ(cudaSetDevice(comm_->device()), cudaSuccess);
  }
  NcclComm* comm_ = nullptr;
};

TEST_F(NcclEmulated, EachRankHasTheDeviceOfItsLocalRank) {
  const LauncherEnv env = ReadLauncherEnv();
  ASSERT_TRUE(env.local_rank.has_value());
  int devices = 0;
  ASSERT_EQ(cudaGetDeviceCount(&devices), cudaSuccess);
  EXPECT_EQ(comm_->device(), *env.local_rank % devices);
  EXPECT_NE(comm_->Describe().find("nccl[device"), std::string::npos) << comm_->Describe();
}

TEST_F(NcclEmulated, AllReduceSumMinMax) {
  const int n = comm_->size(), r = comm_->rank();
  for (int64_t count : {1, 19, 1000}) {
    SCOPED_TRACE("count " + std::to_string(count));
    std::vector<float> f(count);
    std::vector<int64_t> i(count);
    for (int64_t k = 0; k < count; ++k) {
      f[k] = static_cast<float>((r + 1) * (k % 7 + 1));  // small integers: exact sums
      i[k] = (int64_t{1} << 40) * (r + 1) + k - 3 * r;
    }
    Device<float> df(count), dout(count);
    Device<int64_t> di(count);
    df.Put(f);
    di.Put(i);
    ASSERT_TRUE(comm_->AllReduce(df.get(), dout.get(), count, ReduceOp::kSum).ok());
    ASSERT_TRUE(comm_->AllReduce(di.get(), di.get(), count, ReduceOp::kMin).ok());  // in place
    const std::vector<float> sum = dout.Get();
    const std::vector<int64_t> mn = di.Get();
    for (int64_t k = 0; k < count; ++k) {
      EXPECT_EQ(sum[k], static_cast<float>(n * (n + 1) / 2 * (k % 7 + 1))) << k;
      EXPECT_EQ(mn[k], (int64_t{1} << 40) + k) << k;  // rank 0's term is the smallest
    }
    ASSERT_TRUE(comm_->AllReduce(df.get(), df.get(), count, ReduceOp::kMax).ok());
    const std::vector<float> mx = df.Get();
    for (int64_t k = 0; k < count; ++k) EXPECT_EQ(mx[k], static_cast<float>(n * (k % 7 + 1)));
  }
}

TEST_F(NcclEmulated, AllGatherInRankOrderAndInPlace) {
  const int n = comm_->size(), r = comm_->rank();
  const int64_t count = 37;
  std::vector<float> mine(count);
  for (int64_t k = 0; k < count; ++k) mine[k] = static_cast<float>(r * 1000 + k);
  Device<float> send(count), recv(count * n), in_place(count * n);
  send.Put(mine);
  ASSERT_TRUE(comm_->AllGather(send.get(), count, recv.get()).ok());
  // In place: this rank's slot of the receive buffer is the send buffer.
  ASSERT_EQ(cudaMemcpy(in_place.get() + r * count, send.get(), count * sizeof(float),
                       cudaMemcpyDeviceToDevice), cudaSuccess);
  ASSERT_TRUE(comm_->AllGather(in_place.get() + r * count, count, in_place.get()).ok());
  const std::vector<float> a = recv.Get(), b = in_place.Get();
  for (int q = 0; q < n; ++q) {
    for (int64_t k = 0; k < count; ++k) {
      EXPECT_EQ(a[q * count + k], static_cast<float>(q * 1000 + k));
      EXPECT_EQ(b[q * count + k], static_cast<float>(q * 1000 + k));
    }
  }
}

TEST_F(NcclEmulated, BroadcastFromTheLastRank) {
  const int n = comm_->size(), r = comm_->rank();
  std::vector<int64_t> v(11, r == n - 1 ? 77 : -1);
  Device<int64_t> d(v.size());
  d.Put(v);
  ASSERT_TRUE(comm_->Broadcast(d.get(), v.size() * sizeof(int64_t), n - 1).ok());
  EXPECT_EQ(d.Get(), std::vector<int64_t>(11, 77));
}

TEST_F(NcclEmulated, SplitMakesSmallerGroups) {
  const int r = comm_->rank();
  absl::StatusOr<std::unique_ptr<Communicator>> sub = comm_->Split(r % 2, r);
  ASSERT_TRUE(sub.ok()) << sub.status();
  EXPECT_STREQ((*sub)->kind(), "nccl");
  EXPECT_EQ((*sub)->size(), (comm_->size() + 1 - r % 2) / 2);
  EXPECT_EQ((*sub)->rank(), r / 2);
  Device<float> d(3);
  d.Put({1.f, 2.f, static_cast<float>(r)});
  ASSERT_TRUE((*sub)->AllReduceSum(d.get(), 3).ok());
  const std::vector<float> got = d.Get();
  EXPECT_EQ(got[0], static_cast<float>((*sub)->size()));
  float ranks = 0;
  for (int q = r % 2; q < comm_->size(); q += 2) ranks += static_cast<float>(q);
  EXPECT_EQ(got[2], ranks);
}

// Bound to a compute stream, collectives return once queued and are ordered with the kernels
// and copies around them by the stream alone; Synchronize waits for that stream.
TEST_F(NcclEmulated, CollectivesOnABoundStreamAreOrderedWithItsWork) {
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  comm_->UseStream(stream, /*sync=*/false);
  const int n = comm_->size(), r = comm_->rank();
  std::vector<float> in(64, static_cast<float>(r + 1)), out(64, 0.f);
  float* pinned = nullptr;
  ASSERT_EQ(cudaMallocHost(&pinned, 64 * sizeof(float)), cudaSuccess);
  std::copy(in.begin(), in.end(), pinned);
  Device<float> d(64);
  ASSERT_EQ(cudaMemcpyAsync(d.get(), pinned, 64 * sizeof(float), cudaMemcpyHostToDevice, stream),
            cudaSuccess);
  ASSERT_TRUE(comm_->AllReduceSum(d.get(), 64).ok());
  ASSERT_TRUE(comm_->AllReduceSum(d.get(), 64).ok());  // twice: n * sum over ranks
  ASSERT_EQ(cudaMemcpyAsync(pinned, d.get(), 64 * sizeof(float), cudaMemcpyDeviceToHost, stream),
            cudaSuccess);
  ASSERT_TRUE(comm_->Synchronize().ok());
  for (int k = 0; k < 64; ++k) {
    EXPECT_EQ(pinned[k], static_cast<float>(n * n * (n + 1) / 2)) << k;
  }
  comm_->UseStream(nullptr, true);
  cudaFreeHost(pinned);
  cudaStreamDestroy(stream);
}

TEST_F(NcclEmulated, HostPointersAreRefused) {
  std::vector<float> host(8, 1.f);
  absl::Status s = comm_->AllReduceSum(host.data(), 8);
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal) << s;
  EXPECT_NE(s.message().find("invalid argument"), std::string::npos) << s;
}

// Rank 0 skips a collective: the others get DEADLINE_EXCEEDED naming the group, not a hang.
// Rank 0 then issues it late, so that the abandoned collective completes.
TEST_F(NcclEmulated, WatchdogReportsAMissingRank) {
  if (comm_->size() < 2) GTEST_SKIP() << "needs 2 ranks";
  const int r = comm_->rank();
  absl::StatusOr<std::unique_ptr<Communicator>> sub = comm_->Split(0, r);
  ASSERT_TRUE(sub.ok()) << sub.status();
  (*sub)->set_timeout(absl::Milliseconds(300));
  Device<float> d(19);
  d.Put(std::vector<float>(19, 1.f));
  if (r != 0) {
    absl::Status s = (*sub)->AllReduceSum(d.get(), 19);
    EXPECT_EQ(s.code(), absl::StatusCode::kDeadlineExceeded) << s;
    EXPECT_NE(s.message().find("did not complete within"), std::string::npos) << s;
    EXPECT_NE(s.message().find("nccl[device"), std::string::npos) << s;
    EXPECT_EQ((*sub)->AllReduceSum(d.get(), 19).code(), absl::StatusCode::kFailedPrecondition);
  }
  ASSERT_TRUE(comm_->host()->Barrier().ok());
  if (r == 0) {
    (*sub)->set_timeout(absl::Seconds(30));
    EXPECT_TRUE((*sub)->AllReduceSum(d.get(), 19).ok());
  }
  ASSERT_TRUE(comm_->host()->Barrier().ok());
}

}  // namespace
}  // namespace dmsrt

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  std::unique_ptr<dmsrt::ParallelContext> par;
  if (dmsrt::InsideMpirun()) {
    dmsrt::ParallelOptions opts;
    opts.gpu = true;
    opts.timeout = absl::Seconds(60);
    absl::StatusOr<dmsrt::ParallelContext> p = dmsrt::InitParallel(&argc, &argv, opts);
    if (!p.ok()) {
      std::fprintf(stderr, "InitParallel: %s\n", p.status().ToString().c_str());
      return 1;
    }
    par = std::make_unique<dmsrt::ParallelContext>(std::move(*p));
    dmsrt::g_par = par.get();
  }
  const int rc = RUN_ALL_TESTS();
  dmsrt::g_par = nullptr;
  return rc;
}
