#include "runtime/engine/engine_stats.h"

#include <algorithm>

namespace dmsrt {

void EngineCounters::RecordStep(double seconds, int64_t tokens) {
  if (!(seconds > 0.0)) return;
  rate_window_.emplace_back(seconds, tokens);
  while (rate_window_.size() > kRateWindow) rate_window_.pop_front();
}

void EngineCounters::NotePeaks(int64_t running_threads, int64_t kv_blocks_used) {
  peak_running_threads_ = std::max(peak_running_threads_, running_threads);
  peak_kv_blocks_used_ = std::max(peak_kv_blocks_used_, kv_blocks_used);
}

void EngineCounters::Fill(EngineStats* s) {
  double secs = 0.0;
  int64_t toks = 0;
  for (const auto& [sec, n] : rate_window_) {
    secs += sec;
    toks += n;
  }
  s->tokens_per_second = secs > 0.0 ? static_cast<double>(toks) / secs : 0.0;
  s->preemptions = preemptions;
  s->prompt_tokens_total = prompt_tokens_total;
  s->generation_tokens_total = generation_tokens_total;
  s->steps = steps;
  NotePeaks(s->running_threads, s->kv_blocks_used);
  s->peak_running_threads = peak_running_threads_;
  s->peak_kv_blocks_used = peak_kv_blocks_used_;
}

void FillKvStats(KvCache& kv, bool any_resident, EngineStats* s) {
  const KvGeometry& g = kv.geometry();
  s->kv_blocks_total = kv.total_blocks();
  s->kv_blocks_free = kv.free_blocks();
  s->kv_blocks_used = s->kv_blocks_total - s->kv_blocks_free;
  s->kv_block_bytes = kv.block_bytes();
  s->kv_block_tokens = g.block_tokens;
  s->blocks_per_token_dense = static_cast<int64_t>(g.n_layers) * g.n_kv_heads;
  if (!any_resident) return;
  const KvFigures f = kv.Figures();
  s->logical_tokens = f.logical_tokens;
  s->resident_tokens = f.resident_tokens;
  s->flagged_tokens = f.flagged_tokens;
  s->cache_cr = f.resident_tokens > 0 ? f.cache_cr() : 1.0;
  s->eviction_rate = f.logical_tokens > 0 ? f.eviction_rate() : 0.0;
}

}  // namespace dmsrt
