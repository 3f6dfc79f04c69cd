// A persistent pool of worker threads for the CPU kernels.
//
// Decode runs a few hundred short parallel regions per token (every matmul), so the pool never
// creates threads per call: workers spin for a short while after each region (the next one
// usually arrives within microseconds) and then sleep on a condition variable, so an idle pool
// costs nothing. The calling thread takes part.
//
// Work is a list of chunks that threads claim one at a time. A region ends when every chunk is
// done, not when every worker has checked in: on a busy machine a descheduled worker simply
// claims nothing, and the caller does its share instead of waiting for it. Claims carry the
// region's generation, so a worker that wakes up late can never touch a finished region.
//
// On an oversubscribed machine a worker can also be preempted in the middle of a chunk it
// claimed, and the caller then waits a whole scheduler time slice for it. The pool watches for
// that, and the opposite sign of a busy machine (the workers claimed nothing at all while the
// caller ran every chunk: they were not scheduled, and when they are, they only spin on the
// caller's core). After such a region the next kSoloRegions regions run on the caller alone
// (idle workers go to sleep and give their core back), then the workers are tried again.
//
// Threading: ParallelFor must be called from one thread at a time (the owner); not reentrant.
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
  // `n_threads` threads in all, the caller included; <= 0 means std::thread::hardware_concurrency.
  explicit ThreadPool(int n_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_threads_; }

  // Calls fn(i) once for every i in [0, n_chunks), spread over the pool's threads (the caller
  // included), and returns when all calls have returned. n_chunks < 2^31.
  void ParallelFor(int64_t n_chunks, const std::function<void(int64_t)>& fn);

  // Calls fn(ith, nth) once for every ith in [0, nth), nth = size(), as chunks of ParallelFor:
  // no two calls with the same ith run at once (so per-ith scratch is safe), but one thread may
  // run several ith one after another.
  void Run(const std::function<void(int ith, int nth)>& fn) {
    const int nth = n_threads_;
    ParallelFor(nth, [&](int64_t i) { fn(static_cast<int>(i), nth); });
  }

 private:
  void WorkerLoop();
  // Claims and runs chunks of region `gen` until none are left; returns how many it ran.
  int64_t Drain(uint32_t gen);

  int n_threads_ = 1;
  std::vector<std::thread> workers_;
  // The current region. fn_ and n_chunks_ are written before ticket_ is published (release).
  const std::function<void(int64_t)>* fn_ = nullptr;
  std::atomic<int64_t> n_chunks_{0};
  std::atomic<uint64_t> ticket_{0};  // (generation << 32) | next unclaimed chunk
  std::atomic<int64_t> done_{0};     // chunks finished in the current region
  std::atomic<uint32_t> generation_{0};
  std::atomic<bool> stop_{false};
  std::mutex mu_;
  std::condition_variable cv_;
  int sleepers_ = 0;  // guarded by mu_
  int solo_left_ = 0; // regions still to run on the caller alone (owner thread only)
};

}  // namespace kernels
}  // namespace dmsrt
