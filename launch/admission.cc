// Admission and placement rules of the coordinator (see admission.h).
#include "launch/admission.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_format.h"

namespace dmsrt {

double ExpectedResident(const std::string& p, int32_t window, double force_rate,
                        double measured_rate, double len) {
  double rate = 0.0;
  if (p == "forced") rate = force_rate;
  if (p == "dms") rate = measured_rate;
  if (p == "window") return std::min(len, static_cast<double>(window) + 4.0);
  if (rate <= 0.0) return len;
  const double w = std::max(0, window);
  if (len <= w) return len;
  return w + (1.0 - rate) * (len - w);
}

double ExpectedResident(const ReplicaCapacity& r, double len) {
  return ExpectedResident(r.kv_policy, r.kv_window, r.kv_force_rate, r.eviction_rate, len);
}

absl::StatusOr<int32_t> AdmitJob(const AdmissionRequest& req,
                                 const std::vector<ReplicaCapacity>& alive) {
  if (alive.empty()) {
    return absl::UnavailableError(
        "no replica is registered with the coordinator: start `dmsrt serve` and retry");
  }
  for (const ReplicaCapacity& r : alive) {
    if (!req.policy.empty() && req.policy != r.kv_policy) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "dms.policy = %s but replica %d runs --kv-policy %s: leave dms.policy unset or start the "
          "replicas with --kv-policy %s",
          req.policy, r.id, r.kv_policy, req.policy));
    }
  }
  // The replica with the most blocks decides whether one thread can fit at all.
  const ReplicaCapacity* big = &alive.front();
  for (const ReplicaCapacity& r : alive) {
    if (r.kv_blocks_total > big->kv_blocks_total) big = &r;
  }
  const ReplicaCapacity& bi = *big;
  const double bt = std::max(1, bi.kv_block_tokens);
  const double per_tok_blocks = static_cast<double>(bi.blocks_per_token_dense);
  const double prompt = static_cast<double>(req.prompt_tokens);
  const double full_len = prompt + req.max_tokens;
  const double thread_blocks = std::ceil(ExpectedResident(bi, full_len) / bt + 1) * per_tok_blocks;
  if (thread_blocks > static_cast<double>(bi.kv_blocks_total)) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "one thread of %d prompt + %d generated tokens needs about %.0f KV blocks (%.1f MiB) but "
        "the largest replica holds %d blocks: lower stopping.max_tokens, shorten the prompt, or "
        "raise the replicas' --kv-budget",
        req.prompt_tokens, req.max_tokens, thread_blocks,
        thread_blocks * bi.kv_block_bytes / 1048576.0, bi.kv_blocks_total));
  }
  int32_t n = req.n;
  if (n == 0) {
    // Budget mode: the prompt once, then as many threads as the budget holds. Each thread's
    // resident set at its full length is estimated with the policy's eviction rate (the
    // configured rate for forced, the observed or calibrated one for dms), so a compressing
    // policy buys more threads in the same bytes. Without eviction the prompt's full blocks stay
    // shared by all threads (a fork copies only the last, partial block). With eviction:
    //  - dead slots (the CPU store): the prompt's resident blocks stay shared (a prompt token
    //    leaving a thread's view leaves a dead slot), so the prompt counts once at its resident
    //    size and a thread holds the resident part of its own tokens;
    //  - otherwise a thread writes its new tokens into the slots of evicted ones, prompt tokens
    //    included, and each such write into a shared block copies it: in the long run every
    //    thread holds its whole resident set itself, so nothing of the prompt is shared.
    // The extra block per (layer, head) covers the partly filled last block of each head.
    const double bb = static_cast<double>(bi.kv_block_bytes);
    const double resident_full = ExpectedResident(bi, full_len);
    const bool evicts = resident_full < full_len;
    const bool shares = evicts && bi.dead_slots;
    const double prompt_bytes =
        (shares ? std::ceil(ExpectedResident(bi, prompt) / bt) + 1 : std::ceil(prompt / bt)) *
        per_tok_blocks * bb;
    const double shared_tokens = evicts ? 0.0 : std::floor(prompt / bt) * bt;
    const double own_tokens =
        std::max(1.0, shares ? ExpectedResident(bi, req.max_tokens) : resident_full - shared_tokens);
    const double per_thread_bytes = (std::ceil(own_tokens / bt) + 1) * per_tok_blocks * bb;
    const double avail = static_cast<double>(req.kv_budget_bytes) - prompt_bytes;
    const int64_t fit = avail > 0 ? static_cast<int64_t>(avail / per_thread_bytes) : 0;
    if (fit < 1) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "kv.kv_budget_bytes = %d holds no thread: the prompt takes about %.0f bytes and each "
          "thread about %.0f bytes: raise the budget to at least %.0f",
          req.kv_budget_bytes, prompt_bytes, per_thread_bytes, prompt_bytes + per_thread_bytes));
    }
    n = static_cast<int32_t>(std::min<int64_t>(fit, req.max_n));
  }
  return n;
}

std::map<int32_t, std::vector<int32_t>> PlaceThreads(const std::vector<int32_t>& indices,
                                                     std::vector<ReplicaCapacity>& alive) {
  std::map<int32_t, std::vector<int32_t>> plan;
  if (alive.empty()) return plan;
  for (int32_t idx : indices) {
    ReplicaCapacity* best = nullptr;
    double best_load = 0;
    for (ReplicaCapacity& r : alive) {
      const double cap = std::max<int64_t>(1, r.kv_blocks_total);
      const double load = static_cast<double>(r.assigned_open) / cap;
      if (best == nullptr || load < best_load) {
        best = &r;
        best_load = load;
      }
    }
    ++best->assigned_open;
    plan[best->id].push_back(idx);
  }
  return plan;
}

}  // namespace dmsrt
