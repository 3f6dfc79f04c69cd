// Spin-then-sleep thread pool with chunk claiming; see thread_pool.h for why.
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
// How long an idle worker keeps polling before it sleeps: long enough to bridge the gap between
// two matmuls of a forward pass and between decode steps, short enough not to burn a core when
// the engine is idle.
constexpr auto kSpinTime = std::chrono::microseconds(300);
// Regions run on the caller alone after a region whose wait for preempted workers exceeded its
// own run time (a few decode tokens' worth).
constexpr int kSoloRegions = 256;
}  // namespace

ThreadPool::ThreadPool(int n_threads) {
  if (n_threads <= 0) n_threads = static_cast<int>(std::thread::hardware_concurrency());
  if (n_threads <= 0) n_threads = 1;
  n_threads_ = n_threads;
  workers_.reserve(n_threads_ - 1);
  for (int i = 1; i < n_threads_; ++i) workers_.emplace_back([this] { WorkerLoop(); });
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

int64_t ThreadPool::Drain(uint32_t gen) {
  int64_t ran = 0;
  for (;;) {
    uint64_t t = ticket_.load(std::memory_order_acquire);
    if (static_cast<uint32_t>(t >> 32) != gen) return ran;  // a newer region (or none)
    const int64_t i = static_cast<int64_t>(t & 0xFFFFFFFFu);
    if (i >= n_chunks_.load(std::memory_order_relaxed)) return ran;
    if (!ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel)) continue;
    // Claimed chunk i of region gen: the region cannot end before done_ counts it, so fn_ is live.
    (*fn_)(i);
    done_.fetch_add(1, std::memory_order_acq_rel);
    ++ran;
  }
}

void ThreadPool::ParallelFor(int64_t n_chunks, const std::function<void(int64_t)>& fn) {
  if (n_chunks <= 0) return;
  if (n_threads_ == 1 || n_chunks == 1 || solo_left_ > 0) {
    if (solo_left_ > 0) --solo_left_;
    for (int64_t i = 0; i < n_chunks; ++i) fn(i);
    return;
  }
  const auto t_start = std::chrono::steady_clock::now();
  const uint32_t gen = generation_.load(std::memory_order_relaxed) + 1;
  fn_ = &fn;
  n_chunks_.store(n_chunks, std::memory_order_relaxed);
  done_.store(0, std::memory_order_relaxed);
  ticket_.store(static_cast<uint64_t>(gen) << 32, std::memory_order_release);
  bool wake;
  {
    std::lock_guard<std::mutex> lock(mu_);
    generation_.store(gen, std::memory_order_release);
    wake = sleepers_ > 0;
  }
  if (wake) cv_.notify_all();
  const int64_t mine = Drain(gen);
  // Chunks claimed by others are in flight; they finish within a chunk's time unless their
  // thread was preempted.
  int spins = 0;
  std::chrono::steady_clock::time_point t_wait;
  while (done_.load(std::memory_order_acquire) != n_chunks) {
    if (++spins < 4096) {
      if (spins == 1) t_wait = std::chrono::steady_clock::now();
      DMSRT_CPU_RELAX();
    } else {
      std::this_thread::yield();
    }
  }
  // Judge only regions whose workers were already awake: waking a sleeper takes longer than a
  // short region, which says nothing about the machine being busy.
  if (wake) {
    // no verdict
  } else if (mine == n_chunks && n_chunks >= 4) {
    solo_left_ = kSoloRegions;  // spinning workers never got a core
  } else if (spins > 0) {
    const auto t_end = std::chrono::steady_clock::now();
    if (t_end - t_wait > t_wait - t_start) solo_left_ = kSoloRegions;  // a worker was preempted
  }
  // Close the region so a late worker cannot claim from it.
  ticket_.store(static_cast<uint64_t>(gen) << 32 | 0xFFFFFFFFu, std::memory_order_release);
}

void ThreadPool::WorkerLoop() {
  uint32_t seen = 0;
  for (;;) {
    const auto spin_until = std::chrono::steady_clock::now() + kSpinTime;
    uint32_t gen = generation_.load(std::memory_order_acquire);
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
    if (stop_.load(std::memory_order_acquire)) return;
    Drain(gen);
  }
}

}  // namespace kernels
}  // namespace dmsrt
