// Discrete-event simulation of a deployment for the capacity planner.
//
// Every scheduling decision is the runtime's own code: each replica is a real Engine
// (runtime/engine/engine.h: admission against free blocks, prefill chunking, forks, preemption)
// over a SimBackend whose KV bookkeeping is the real KvIndex (runtime/kv/kv_cache.h: blocks,
// copy-on-write, the delayed-eviction rule at the stated rate), and jobs are admitted and their
// threads placed by the coordinator's rules (launch/admission.h). What is simulated is only the
// forward pass: the backend returns logits that continue or end a thread and advances the
// replica's clock by the profile's step time for what the step held.
//
// Simplification (documented in docs/planning.md): the KV index has one simulated layer whose H
// KV heads stand for the rank's n_layers x local KV heads (layer, head) pairs; each simulated
// block stands for that count / H real blocks, and the pool is the real pool in those units.
// Eviction under the forced rule is hashed per head, so each simulated head's flags differ as
// the real heads' do, and a thread's blocks grow in steps of 1/H of a row, as the real store's
// do head by head. H is 1 without eviction (every head holds the same slots) and otherwise a
// divisor of the pair count, up to 16 (SimReplicaConfig::max_sim_heads), large enough that a
// thread of the workload's mean length grows in steps of at most 1/32 of its blocks (sim.cc's
// SimHeads): short threads need many, long ones one. One head (a whole row at once) preempted
// one thread more per best-of-16 fork than serve in the validation scenario n16_forced875_tight;
// 9 heads or more match serve's count.
//
// Deterministic: the same inputs give the same result.
#pragma once

#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "launch/plan/profile.h"
#include "launch/plan/trace.h"
#include "runtime/engine/engine.h"
#include "runtime/kv/kv_cache.h"
#include "runtime/model/model.h"

namespace dmsrt {

// A token-length distribution, parsed from "fixed:N", "uniform:A:B" or "lognormal:MEDIAN:SIGMA"
// (heavy-tailed), each clipped to [1, max].
struct LengthDist {
  enum class Kind { kFixed, kUniform, kLognormal } kind = Kind::kFixed;
  double a = 1.0, b = 0.0;  // fixed: a; uniform: [a, b]; lognormal: median a, sigma b
  int64_t max = 1 << 30;
  int64_t Sample(std::mt19937_64& rng) const;
  // P(L >= k+1 | L >= k) complement: the probability that token number k (1-based) is the last.
  double Hazard(int64_t k) const;
  double Mean() const;  // of the clipped distribution (numerically)
  int64_t Max() const;  // the longest length it can draw
  std::string ToString() const;
};
absl::StatusOr<LengthDist> ParseLengthDist(const std::string& s, int64_t max);

struct Workload {
  double jobs_per_hour = 60.0;    // Poisson arrivals (ignored when `arrivals` is set)
  std::vector<double> arrivals;   // trace: arrival times in seconds (sorted), optional
  // Trace lengths per job (launch/plan/trace.h), one per arrival; empty: drawn from `prompt`
  // and `reasoning`.
  std::vector<int64_t> prompt_tokens, generated_tokens;
  int32_t n = 16;                 // threads per job (best-of-N)
  LengthDist prompt;              // prompt tokens per job
  LengthDist reasoning;           // generated tokens
  // false: one length per job, every thread runs to it (EOS ignored): what a load generator can
  // reproduce on any model. true: every thread draws its own length (stragglers).
  bool per_thread_lengths = false;
  int64_t jobs = 200;             // jobs submitted
  double warmup_fraction = 0.1;   // the first jobs are left out of latency percentiles
  uint64_t seed = 1;
};

// One replica (a TP group) as the simulator runs it.
struct SimReplicaConfig {
  ModelConfig model;               // the planned model (shapes, context length)
  int32_t tp = 1;
  int64_t kv_budget_bytes = 0;     // per rank, as --kv-budget
  int64_t kv_block_bytes = 0;      // one block of one (layer, KV head), as the backend sizes it
  int32_t block_tokens = 16;
  double eviction_rate = 0.0;      // 0: dense; otherwise the forced rule at this rate
  int32_t window = 0;              // DMS delay window (eviction_rate > 0)
  // The backend's store leaves evicted slots of shared blocks dead instead of copying the block
  // (the CPU store; runtime/kv/kv_store.h); false: the CUDA backend's copy-on-write.
  bool dead_slots = false;
  StepCosts costs;
  int32_t prefill_chunk = 256;
  int32_t max_running_threads = 256;
  // Advance runs of pure decode steps between events in bulk (Engine::StepMany), with the same
  // result as stepping one by one; false steps one by one (for checking that).
  bool decode_spans = true;
  // KV heads the simulated index keeps at most under the forced rule (sim.cc's SimHeads); the
  // rank's n_layers x local KV heads allows every (layer, head) pair (slower; for checking).
  int32_t max_sim_heads = 16;
  // When set, called after every simulated engine step with the replica, what the step held,
  // its seconds and when it ended on the simulated clock (the columns `serve --step-log`
  // writes, so a prediction's timeline can be laid beside a real run's). Decode spans are then
  // not used: every step is one call.
  std::function<void(int32_t replica, const StepShape&, double seconds, double end_s)> on_step;
  // Not empty: every step's time times the trace's factor at its start (a replay of a run whose
  // machine changed speed; see trace.h).
  SpeedTrace speed;
};

struct SimResult {
  int64_t jobs_submitted = 0;
  int64_t jobs_finished = 0;        // all, warm-up included
  int64_t jobs_failed = 0;          // a thread ended with an error (did not fit)
  double first_arrival = 0.0, last_arrival = 0.0, last_finish = 0.0;
  double sim_seconds = 0.0;
  std::vector<double> latency;      // measured jobs (after warm-up); +inf for unfinished
  std::vector<double> first_thread; // time to the first finished thread, measured jobs
  std::vector<double> job_done;     // every job's finish time in arrival order (-1: unfinished)
  double jobs_per_hour = 0.0;       // measured jobs finished / their span
  double threads_per_second = 0.0;
  double tokens_per_second = 0.0;   // generated
  int64_t preemptions = 0;
  int64_t peak_running_threads = 0; // per replica, the largest
  double peak_kv_fraction = 0.0;    // blocks used / total, the largest over replicas
  double mean_batch = 0.0;          // decode rows per step
  int64_t steps = 0;
  int64_t step_calls = 0;           // engine calls that ran them (fewer with decode spans)
  double busy_seconds = 0.0;        // summed over replicas
  double seconds_fixed = 0.0, seconds_rows = 0.0, seconds_kv = 0.0, seconds_prefill = 0.0;
  double seconds_host = 0.0;        // added by the host floor of host-bound steps
  double seconds_sampling = 0.0;    // the engine's sampling after the forward passes
  bool complete = true;             // every job finished before the cut-off
  bool stopped_at_miss = false;     // stopped once the SLO was certainly missed (SloStop)
  double wall_seconds = 0.0;        // host time the simulation took
};

// Percentile (0..100) of `v` by nearest rank; +inf entries count as the largest.
double Percentile(std::vector<double> v, double pct);

// A job-latency SLO at which a simulation may stop as soon as it is certainly missed (a job
// failed, or more measured jobs are over `seconds` than percentile `percentile` allows).
struct SloStop {
  double percentile = 90.0;
  double seconds = 0.0;
};

// Simulates `replicas` identical replicas under `w`. The run stops when every job has finished,
// or `cutoff_after_last_arrival` seconds after the last arrival (unfinished jobs then count
// with infinite latency and `complete` is false), or, given `stop`, as soon as that SLO is
// certainly missed (`stopped_at_miss`; the figures then cover the run so far).
absl::StatusOr<SimResult> Simulate(const SimReplicaConfig& cfg, int32_t replicas,
                                   const Workload& w, double cutoff_after_last_arrival,
                                   const SloStop* stop = nullptr);

}  // namespace dmsrt
