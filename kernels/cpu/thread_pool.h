// A persistent pool of worker threads for the CPU kernels.
//
// Decode runs a few hundred short parallel regions per token (every matmul, every norm), so the
// pool never creates threads per call: workers spin for a short while after each region (a new
// region usually arrives within microseconds) and then sleep on a condition variable, so an idle
// pool costs nothing. The calling thread takes part as worker 0.
//
// Threading: Run() must be called from one thread at a time (the owner); it is not reentrant.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace dmsrt {
namespace kernels {

class ThreadPool {
 public:
  // `n_threads` workers in all, the caller included; <= 0 means std::thread::hardware_concurrency.
  explicit ThreadPool(int n_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_threads_; }

  // Runs fn(ith, nth) for ith = 0..nth-1, one call per worker (the caller runs ith = 0), and
  // returns when every call has returned. nth = size().
  void Run(const std::function<void(int ith, int nth)>& fn);

 private:
  void WorkerLoop(int ith);

  int n_threads_ = 1;
  std::vector<std::thread> workers_;
  const std::function<void(int, int)>* fn_ = nullptr;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::mutex mu_;
  std::condition_variable cv_;
  int sleepers_ = 0;  // guarded by mu_
  std::atomic<bool> stop_{false};
};

}  // namespace kernels
}  // namespace dmsrt
