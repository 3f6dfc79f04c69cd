// What an engine reports about itself (Engine::Stats), and the running counters it keeps on its
// stepping thread to fill that snapshot.
#pragma once

#include <cstdint>
#include <deque>
#include <utility>

#include "runtime/kv/kv_cache.h"

namespace dmsrt {

struct EngineStats {
  int64_t running_threads = 0;   // resident (hold KV)
  int64_t waiting_threads = 0;   // admitted later (new, or preempted for recompute)
  int64_t running_jobs = 0;
  int64_t waiting_jobs = 0;
  int64_t kv_blocks_total = 0;
  int64_t kv_blocks_free = 0;
  int64_t kv_blocks_used = 0;
  int64_t kv_block_bytes = 0;
  int32_t kv_block_tokens = 0;
  int64_t blocks_per_token_dense = 0;  // n_layers * n_kv_heads (blocks per block_tokens tokens)
  int64_t logical_tokens = 0;
  int64_t resident_tokens = 0;
  int64_t flagged_tokens = 0;
  double cache_cr = 1.0;
  double eviction_rate = 0.0;
  double tokens_per_second = 0.0;  // generated tokens per second over the last steps (0 when idle 2 s)
  int64_t preemptions = 0;
  int64_t prompt_tokens_total = 0;
  int64_t generation_tokens_total = 0;
  int64_t steps = 0;
  // Highest values since the engine started, sampled at every forward step (so the blocks a step
  // filled are counted before finished threads free them).
  int64_t peak_running_threads = 0;
  int64_t peak_kv_blocks_used = 0;
};

// The engine's cumulative counters, its peaks and the tokens/s over its last steps. Used on the
// stepping thread only.
class EngineCounters {
 public:
  int64_t preemptions = 0;
  int64_t prompt_tokens_total = 0;
  int64_t generation_tokens_total = 0;
  int64_t steps = 0;

  // A step (or a span of steps run as one) took `seconds` and generated `tokens`; the rate is
  // taken over the last 32 such records. A record of 0 seconds is no work and is not kept.
  void RecordStep(double seconds, int64_t tokens);
  // Raises the peaks to these samples.
  void NotePeaks(int64_t running_threads, int64_t kv_blocks_used);
  // Copies the counters, the peaks (after noting the snapshot's own running threads and blocks
  // used) and the rate into `s`.
  void Fill(EngineStats* s);

 private:
  static constexpr size_t kRateWindow = 32;
  int64_t peak_running_threads_ = 0;
  int64_t peak_kv_blocks_used_ = 0;
  std::deque<std::pair<double, int64_t>> rate_window_;  // (seconds, tokens) of recent steps
};

// The pool's shape and, when any sequence is resident, the §6 figures of the KV store: blocks
// (total, free, used, bytes, tokens per block, dense blocks per token) and tokens (logical,
// resident, flagged; cache CR and eviction rate).
void FillKvStats(KvCache& kv, bool any_resident, EngineStats* s);

}  // namespace dmsrt
