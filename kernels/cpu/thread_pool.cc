// Spin-then-sleep thread pool; see thread_pool.h for why.
#include "kernels/cpu/thread_pool.h"

#include <chrono>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define DMSRT_CPU_RELAX() _mm_pause()
#else
#define DMSRT_CPU_RELAX() std::this_thread::yield()
#endif

namespace dmsrt {
namespace kernels {

namespace {
// How long an idle worker keeps polling before it sleeps. Long enough to bridge the gap between
// two matmuls of one forward pass (and between decode steps), short enough not to burn a core
// when the engine is idle.
constexpr auto kSpinTime = std::chrono::microseconds(300);
}  // namespace

ThreadPool::ThreadPool(int n_threads) {
  if (n_threads <= 0) n_threads = static_cast<int>(std::thread::hardware_concurrency());
  if (n_threads <= 0) n_threads = 1;
  n_threads_ = n_threads;
  workers_.reserve(n_threads_ - 1);
  for (int i = 1; i < n_threads_; ++i) workers_.emplace_back([this, i] { WorkerLoop(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_.store(true, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::Run(const std::function<void(int, int)>& fn) {
  if (n_threads_ == 1) {
    fn(0, 1);
    return;
  }
  fn_ = &fn;
  pending_.store(n_threads_ - 1, std::memory_order_relaxed);
  bool wake;
  {
    std::lock_guard<std::mutex> lock(mu_);
    generation_.fetch_add(1, std::memory_order_release);
    wake = sleepers_ > 0;
  }
  if (wake) cv_.notify_all();
  fn(0, n_threads_);
  // Wait for the others; they are usually a few microseconds behind.
  int spins = 0;
  while (pending_.load(std::memory_order_acquire) != 0) {
    if (++spins < (1 << 16)) {
      DMSRT_CPU_RELAX();
    } else {
      std::this_thread::yield();
    }
  }
  fn_ = nullptr;
}

void ThreadPool::WorkerLoop(int ith) {
  uint64_t seen = 0;
  for (;;) {
    // Spin for a while, then sleep until the generation moves.
    const auto spin_until = std::chrono::steady_clock::now() + kSpinTime;
    uint64_t gen = generation_.load(std::memory_order_acquire);
    int polls = 0;
    while (gen == seen) {
      DMSRT_CPU_RELAX();
      gen = generation_.load(std::memory_order_acquire);
      if (gen != seen) break;
      if ((++polls & 63) == 0 && std::chrono::steady_clock::now() > spin_until) {
        std::unique_lock<std::mutex> lock(mu_);
        ++sleepers_;
        cv_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        --sleepers_;
        gen = generation_.load(std::memory_order_acquire);
      }
    }
    seen = gen;
    // stop_ is stored before the generation bump (release); the acquire load above sees it.
    if (stop_.load(std::memory_order_relaxed)) return;
    (*fn_)(ith, n_threads_);
    pending_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

}  // namespace kernels
}  // namespace dmsrt
