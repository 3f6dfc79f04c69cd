// `dmsrt plan`: how many GPUs (or CPU replicas) a best-of-N workload needs at a latency SLO.
//
// For every deployment (TP degree x DMS eviction rate) the planner sizes the KV pool with the
// runtime's own sizing rules (runtime/kv/kv_sizing.h), then finds by bisection the highest
// Poisson arrival rate one replica sustains with the SLO percentile of job latency met, each
// candidate rate judged by a discrete-event simulation of the real scheduler (launch/plan/sim.h).
// With a target rate it then sizes the replica count and checks that count by simulating the
// whole deployment (the coordinator's placement spreads threads over replicas).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/status/statusor.h"
#include "launch/plan/profile.h"
#include "launch/plan/sim.h"
#include "launch/plan/trace.h"
#include "runtime/model/model.h"

namespace dmsrt {

struct PlanInputs {
  ModelConfig model;
  std::string model_name;            // as given (file or synthetic name)
  std::string profile_spec;          // a profile file, or a datasheet name
  Profile measured;                  // when profile_spec is a file
  bool datasheet = false;
  int32_t nodes = 1;
  int32_t gpus_per_node = 8;         // CPU profile: replicas (processes) per node
  std::vector<int32_t> tp_options = {1};
  std::vector<double> eviction_rates = {0.0};  // 0 = dense
  int32_t dms_window = 256;
  Workload workload;                 // jobs_per_hour: the target (0: capacity only)
  double target_jobs_per_hour = 0.0;
  double slo_percentile = 90.0;
  double slo_seconds = 120.0;
  int64_t cpu_kv_budget_bytes = 256ll << 20;  // per rank, CPU profiles (as serve --kv-budget)
  int32_t block_tokens = 16;
  int32_t prefill_chunk = 512;
  int32_t max_running_threads = 256;
  int32_t search_steps = 7;          // bisection rounds
  // > 0: no search; simulate this many replicas of each deployment at the target rate (to
  // predict a given deployment, e.g. before a real run with loadgen).
  int32_t fixed_replicas = 0;
  std::string model_path_for_command;  // for the printed launch command
  std::string trace_path;              // the jobs come from this trace (--trace), if set
  bool decode_spans = true;            // false: one engine step at a time (same results, slower)
  // With fixed_replicas: write every simulated step of the run at the target rate here, in the
  // columns `serve --step-log` writes (end_s on the simulated clock, from the first arrival's 0).
  std::string step_log_path;
  // With fixed_replicas: step times also times this trace's factor at each step (plan
  // --step-scale-trace; see trace.h).
  SpeedTrace speed;
  // Every step time of a measured profile times this (plan --step-scale): a measured overhead
  // of the serving process over `dmsrt bench`, whose engine runs alone.
  double step_scale = 1.0;
  // Whether the plan is for GPUs (a datasheet, or a profile of the CUDA backend).
  bool gpu() const { return datasheet || measured.backend == "cuda"; }
};

struct MemoryBreakdown {
  int64_t device_bytes = 0;          // per GPU (0 for CPU profiles)
  int64_t weight_bytes = 0;          // per GPU
  int64_t reserved_bytes = 0;        // context, workspace and the runtime's margin
  int64_t kv_budget_bytes = 0;       // per rank
  int64_t kv_block_bytes = 0;        // one block of one (layer, KV head)
  int64_t kv_tokens = 0;             // tokens the replica's pool holds (dense)
  double thread_tokens_full = 0.0;   // resident tokens of one thread at its mean full length
  double threads_fit = 0.0;          // kv_tokens / thread_tokens_full
};

struct SearchPoint {
  double offered_jobs_per_hour = 0.0;
  double sustained_jobs_per_hour = 0.0;
  double latency_slo_pct = 0.0;      // the SLO percentile of job latency
  bool ok = false;
  bool stopped = false;              // stopped once the miss was certain (figures partial)
};

struct DeploymentPlan {
  int32_t tp = 1;
  double eviction_rate = 0.0;
  bool runnable = true;
  std::string note;
  MemoryBreakdown memory;
  StepCosts costs;
  bool fits = true;                  // one thread at full length fits the pool
  std::string fit_message;
  // One replica at its capacity.
  double capacity_jobs_per_hour = 0.0;  // 0: the SLO is not met even at light load
  SimResult at_capacity;
  double unloaded_latency = 0.0;     // SLO percentile at light load
  std::string binding;               // memory, compute, bandwidth or SLO
  std::vector<SearchPoint> search;
  // Sized for the target rate (when given).
  int32_t replicas = 0;
  int32_t gpus = 0;
  bool meets_target = false;
  SimResult at_target;
  double gpu_hours_per_1000_jobs = 0.0;
};

struct PlanResult {
  std::vector<DeploymentPlan> deployments;  // sorted by GPU count, then rate
  int32_t winner = -1;                      // index of the cheapest deployment meeting the target
  std::string answer;                       // one sentence
  double wall_seconds = 0.0;
};

absl::StatusOr<PlanResult> RunPlan(const PlanInputs& in);

nlohmann::json PlanJson(const PlanInputs& in, const PlanResult& r);
std::string PlanTable(const PlanInputs& in, const PlanResult& r);
// Throughput against SLO latency per eviction rate, from the search points.
std::string PlanSvg(const PlanInputs& in, const PlanResult& r);

}  // namespace dmsrt
