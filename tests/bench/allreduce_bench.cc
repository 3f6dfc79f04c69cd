// All-reduce benchmark in the language of nccl-tests' all_reduce_perf.
//
// For each message size (default 8 B .. 64 MiB, x2): out-of-place float32 sum all-reduce over the
// TP communicator of InitParallel (MPI on CPU under mpirun, NCCL on device buffers with --nccl).
// Warm up, then `reps` repetitions of `iters` back-to-back calls; the time per call is the median
// over repetitions of the slowest rank, the spread is (max - min) / median over repetitions.
//   algbw = bytes / time            busbw = algbw * 2 (n - 1) / n
// (busbw is the per-link traffic of a ring all-reduce, so it is comparable across rank counts and
// with the bandwidth of the link.) Inputs are small integers, so the result is exact and checked
// element by element: #wrong counts mismatches over all ranks. As a ceiling for the CPU path the
// bench also measures a single-thread memcpy of the largest message on rank 0.
//
// Usage: mpirun -np 2 allreduce_bench [-b 8] [-e 64M] [-f 2] [-n 20] [-w 5] [-r 5] [--nccl]
//                                     [--json out.json]
// Exit status: 0 when every size ran and #wrong is 0 everywhere.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "parallel/comm_factory.h"
#include "parallel/status_macros.h"

#ifdef DMSRT_HAVE_NCCL
#include <cuda_runtime.h>

#include "parallel/nccl/nccl_comm.h"
#endif

namespace dmsrt {
namespace {

struct Args {
  int64_t min_bytes = 8;
  int64_t max_bytes = int64_t{64} << 20;
  int64_t factor = 2;
  int iters = 20;
  int warmup = 5;
  int reps = 5;
  bool nccl = false;
  std::string json;
};

bool ParseSize(const char* s, int64_t* out) {
  std::string v(s);
  int64_t mult = 1;
  if (!v.empty()) {
    const char c = v.back();
    if (c == 'K' || c == 'k') mult = int64_t{1} << 10;
    if (c == 'M' || c == 'm') mult = int64_t{1} << 20;
    if (c == 'G' || c == 'g') mult = int64_t{1} << 30;
    if (mult != 1) v.pop_back();
  }
  int64_t n = 0;
  if (!absl::SimpleAtoi(v, &n) || n <= 0) return false;
  *out = n * mult;
  return true;
}

absl::StatusOr<Args> ParseArgs(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    auto value = [&]() -> const char* { return i + 1 < argc ? argv[++i] : nullptr; };
    const char* v = nullptr;
    int64_t n = 0;
    if (k == "--nccl") {
      a.nccl = true;
    } else if ((k == "-b" || k == "-e" || k == "-f" || k == "-n" || k == "-w" || k == "-r" ||
                k == "--json") &&
               (v = value()) != nullptr) {
      if (k == "--json") {
        a.json = v;
        continue;
      }
      if (!ParseSize(v, &n)) return absl::InvalidArgumentError("bad value for " + k + ": " + v);
      if (k == "-b") a.min_bytes = n;
      if (k == "-e") a.max_bytes = n;
      if (k == "-f") a.factor = n;
      if (k == "-n") a.iters = static_cast<int>(n);
      if (k == "-w") a.warmup = static_cast<int>(n);
      if (k == "-r") a.reps = static_cast<int>(n);
    } else {
      return absl::InvalidArgumentError(
          "usage: allreduce_bench [-b minbytes] [-e maxbytes] [-f factor] [-n iters] [-w warmup] "
          "[-r reps] [--nccl] [--json file]; unknown or incomplete argument: " + k);
    }
  }
  if (a.factor < 2) return absl::InvalidArgumentError("-f must be >= 2");
  if (a.min_bytes > a.max_bytes) return absl::InvalidArgumentError("-b must be <= -e");
  if (a.iters < 1 || a.reps < 1 || a.warmup < 0) {
    return absl::InvalidArgumentError("-n and -r must be >= 1, -w >= 0");
  }
  return a;
}

// Host or device buffers of one size.
class Buffers {
 public:
  Buffers(bool device, int64_t count) : device_(device), count_(count) {}
  ~Buffers() {
#ifdef DMSRT_HAVE_NCCL
    if (device_) {
      cudaFree(d_send_);
      cudaFree(d_recv_);
    }
#endif
  }
  absl::Status Init(int rank) {
    host_send_.resize(count_);
    host_recv_.resize(count_);
    for (int64_t i = 0; i < count_; ++i) host_send_[i] = static_cast<float>((rank + i) % 8 + 1);
    if (!device_) return absl::OkStatus();
#ifdef DMSRT_HAVE_NCCL
    DMSRT_CUDA_RETURN_IF_ERROR(cudaMalloc(&d_send_, count_ * sizeof(float)));
    DMSRT_CUDA_RETURN_IF_ERROR(cudaMalloc(&d_recv_, count_ * sizeof(float)));
    DMSRT_CUDA_RETURN_IF_ERROR(cudaMemcpy(d_send_, host_send_.data(), count_ * sizeof(float),
                                          cudaMemcpyHostToDevice));
#endif
    return absl::OkStatus();
  }
  float* send() { return device_ ? d_send_ : host_send_.data(); }
  float* recv() { return device_ ? d_recv_ : host_recv_.data(); }
  // Fills recv with NaN so an output the collective did not write fails the check.
  absl::Status Poison() {
    std::fill(host_recv_.begin(), host_recv_.end(), std::nanf(""));
#ifdef DMSRT_HAVE_NCCL
    if (device_) {
      DMSRT_CUDA_RETURN_IF_ERROR(cudaMemset(d_recv_, 0xFF, count_ * sizeof(float)));
    }
#endif
    return absl::OkStatus();
  }
  absl::StatusOr<const std::vector<float>*> Result() {
#ifdef DMSRT_HAVE_NCCL
    if (device_) {
      DMSRT_CUDA_RETURN_IF_ERROR(cudaMemcpy(host_recv_.data(), d_recv_, count_ * sizeof(float),
                                            cudaMemcpyDeviceToHost));
    }
#endif
    return &host_recv_;
  }

 private:
  bool device_;
  int64_t count_;
  std::vector<float> host_send_, host_recv_;
  float* d_send_ = nullptr;  // [count]
  float* d_recv_ = nullptr;  // [count]
};

absl::Status Sync(Communicator& comm) {
#ifdef DMSRT_HAVE_NCCL
  if (comm.device_buffers()) return static_cast<NcclComm&>(comm).Synchronize();
#endif
  return absl::OkStatus();
}

struct Row {
  int64_t bytes, count;
  double time_us, algbw, busbw, spread_pct;
  int64_t wrong;
};

double MemcpyBandwidthGBs(int64_t bytes) {
  std::vector<char> a(bytes, 1), b(bytes, 0);
  std::vector<double> t;
  for (int i = 0; i < 5; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    std::memcpy(b.data(), a.data(), bytes);
    auto t1 = std::chrono::steady_clock::now();
    t.push_back(std::chrono::duration<double>(t1 - t0).count());
    a[i] = b[bytes - 1 - i];  // keep the copies observable
  }
  std::sort(t.begin(), t.end());
  return bytes / t[t.size() / 2] / 1e9;
}

#ifdef DMSRT_HAVE_NCCL
// Median of 5 device-to-device copies of `bytes`, timed with CUDA events.
absl::StatusOr<double> DeviceCopyBandwidthGBs(int64_t bytes) {
  void *a = nullptr, *b = nullptr;
  DMSRT_CUDA_RETURN_IF_ERROR(cudaMalloc(&a, bytes));
  DMSRT_CUDA_RETURN_IF_ERROR(cudaMalloc(&b, bytes));
  DMSRT_CUDA_RETURN_IF_ERROR(cudaMemset(a, 1, bytes));
  cudaEvent_t e0, e1;
  DMSRT_CUDA_RETURN_IF_ERROR(cudaEventCreate(&e0));
  DMSRT_CUDA_RETURN_IF_ERROR(cudaEventCreate(&e1));
  std::vector<float> ms(5);
  for (float& m : ms) {
    DMSRT_CUDA_RETURN_IF_ERROR(cudaEventRecord(e0));
    DMSRT_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice));
    DMSRT_CUDA_RETURN_IF_ERROR(cudaEventRecord(e1));
    DMSRT_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(e1));
    DMSRT_CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&m, e0, e1));
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  cudaFree(a);
  cudaFree(b);
  std::sort(ms.begin(), ms.end());
  return bytes / (ms[ms.size() / 2] * 1e-3) / 1e9;
}
#endif

absl::Status Run(int argc, char** argv, int* exit_code) {
  DMSRT_ASSIGN_OR_RETURN(Args args, ParseArgs(argc, argv));
  ParallelOptions opts;
  opts.kind = args.nccl ? CommKind::kNccl : CommKind::kAuto;
  opts.gpu = args.nccl;
  opts.timeout = absl::Seconds(120);
  // NCCL: time enqueue + completion of the whole batch, like nccl-tests (no per-call wait).
  opts.nccl_sync = false;
  DMSRT_ASSIGN_OR_RETURN(ParallelContext par, InitParallel(&argc, &argv, opts));
  Communicator& comm = *par.tp_comm;
  Communicator& host = *comm.host();
  const int n = comm.size(), rank = comm.rank();
  const bool device = comm.device_buffers();
  Communicator& c = comm;
  if (rank == 0) {
    std::printf("# dmsrt allreduce_bench: %d ranks, %s, float32 sum, out-of-place, %d warmup, "
                "%d reps x %d iters\n",
                n, c.Describe().c_str(), args.warmup, args.reps, args.iters);
    std::printf("# time = median over reps of the slowest rank; busbw = algbw * 2(n-1)/n\n#\n");
    std::printf("# %12s %12s %6s %6s %11s %9s %9s %7s %8s\n", "size", "count", "type", "redop",
                "time", "algbw", "busbw", "#wrong", "spread");
    std::printf("# %12s %12s %6s %6s %11s %9s %9s %7s %8s\n", "(B)", "(elements)", "", "", "(us)",
                "(GB/s)", "(GB/s)", "", "(%)");
  }
  std::vector<Row> rows;
  int64_t total_wrong = 0;
  for (int64_t bytes = args.min_bytes; bytes <= args.max_bytes; bytes *= args.factor) {
    const int64_t count = std::max<int64_t>(1, bytes / static_cast<int64_t>(sizeof(float)));
    const int64_t real_bytes = count * static_cast<int64_t>(sizeof(float));
    Buffers buf(device, count);
    DMSRT_RETURN_IF_ERROR(buf.Init(rank));
    for (int i = 0; i < args.warmup; ++i) {
      DMSRT_RETURN_IF_ERROR(c.AllReduce(buf.send(), buf.recv(), count, ReduceOp::kSum));
    }
    DMSRT_RETURN_IF_ERROR(Sync(c));
    std::vector<int64_t> rep_ns(args.reps);
    for (int r = 0; r < args.reps; ++r) {
      DMSRT_RETURN_IF_ERROR(host.Barrier());
      auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < args.iters; ++i) {
        DMSRT_RETURN_IF_ERROR(c.AllReduce(buf.send(), buf.recv(), count, ReduceOp::kSum));
      }
      DMSRT_RETURN_IF_ERROR(Sync(c));
      auto t1 = std::chrono::steady_clock::now();
      rep_ns[r] = std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - t0).count();
    }
    // Slowest rank per repetition.
    DMSRT_RETURN_IF_ERROR(host.AllReduce(rep_ns.data(), rep_ns.data(), args.reps, ReduceOp::kMax));
    std::vector<int64_t> sorted = rep_ns;
    std::sort(sorted.begin(), sorted.end());
    const double median_ns = static_cast<double>(sorted[sorted.size() / 2]) / args.iters;
    const double spread = (sorted.back() - sorted.front()) / static_cast<double>(args.iters);

    // Correctness: one more call into a poisoned output.
    DMSRT_RETURN_IF_ERROR(buf.Poison());
    DMSRT_RETURN_IF_ERROR(c.AllReduce(buf.send(), buf.recv(), count, ReduceOp::kSum));
    DMSRT_RETURN_IF_ERROR(Sync(c));
    DMSRT_ASSIGN_OR_RETURN(const std::vector<float>* out, buf.Result());
    int64_t wrong = 0;
    for (int64_t i = 0; i < count; ++i) {
      int64_t want = 0;
      for (int q = 0; q < n; ++q) want += (q + i) % 8 + 1;
      wrong += (*out)[i] != static_cast<float>(want);
    }
    DMSRT_RETURN_IF_ERROR(host.AllReduce(&wrong, &wrong, 1, ReduceOp::kSum));
    total_wrong += wrong;

    Row row;
    row.bytes = real_bytes;
    row.count = count;
    row.time_us = median_ns / 1e3;
    row.algbw = real_bytes / median_ns;  // bytes/ns = GB/s
    row.busbw = row.algbw * 2.0 * (n - 1) / n;
    row.spread_pct = 100.0 * spread / median_ns;
    row.wrong = wrong;
    rows.push_back(row);
    if (rank == 0) {
      std::printf("  %12lld %12lld %6s %6s %11.2f %9.3f %9.3f %7lld %8.1f\n",
                  static_cast<long long>(row.bytes), static_cast<long long>(row.count), "float",
                  "sum", row.time_us, row.algbw, row.busbw, static_cast<long long>(row.wrong),
                  row.spread_pct);
      std::fflush(stdout);
    }
    if (args.max_bytes / args.factor < bytes) break;  // next step would overflow past -e
  }
  if (rank == 0) {
    double avg = 0;
    for (const Row& r : rows) avg += r.busbw;
    avg /= std::max<size_t>(1, rows.size());
    std::printf("# Out of bounds values : %lld %s\n", static_cast<long long>(total_wrong),
                total_wrong == 0 ? "OK" : "FAILED");
    std::printf("# Avg bus bandwidth    : %.3f GB/s\n", avg);
    if (!device && !rows.empty()) {
      std::printf("# Ceiling: single-thread memcpy of %lld B on rank 0: %.2f GB/s\n",
                  static_cast<long long>(rows.back().bytes), MemcpyBandwidthGBs(rows.back().bytes));
    }
#ifdef DMSRT_HAVE_NCCL
    if (device && !rows.empty()) {
      DMSRT_ASSIGN_OR_RETURN(double gbs, DeviceCopyBandwidthGBs(rows.back().bytes));
      std::printf("# Ceiling: device-to-device cudaMemcpy of %lld B on rank 0: %.2f GB/s\n",
                  static_cast<long long>(rows.back().bytes), gbs);
    }
#endif
    if (!args.json.empty()) {
      FILE* f = std::fopen(args.json.c_str(), "w");
      if (f == nullptr) return absl::NotFoundError("cannot write " + args.json);
      std::fprintf(f, "{\"bench\": \"allreduce\", \"ranks\": %d, \"comm\": \"%s\", \"type\": "
                      "\"float\", \"redop\": \"sum\", \"rows\": [",
                   n, c.kind());
      for (size_t i = 0; i < rows.size(); ++i) {
        const Row& r = rows[i];
        std::fprintf(f,
                     "%s\n  {\"bytes\": %lld, \"count\": %lld, \"time_us\": %.3f, \"algbw_gbs\": "
                     "%.4f, \"busbw_gbs\": %.4f, \"spread_pct\": %.2f, \"wrong\": %lld}",
                     i == 0 ? "" : ",", static_cast<long long>(r.bytes),
                     static_cast<long long>(r.count), r.time_us, r.algbw, r.busbw, r.spread_pct,
                     static_cast<long long>(r.wrong));
      }
      std::fprintf(f, "\n]}\n");
      std::fclose(f);
    }
  }
  *exit_code = total_wrong == 0 ? 0 : 3;
  return absl::OkStatus();
}

}  // namespace
}  // namespace dmsrt

int main(int argc, char** argv) {
  int code = 1;
  absl::Status s = dmsrt::Run(argc, argv, &code);
  if (!s.ok()) {
    std::fprintf(stderr, "allreduce_bench: %s\n", s.ToString().c_str());
    return 1;
  }
  return code;
}
