// The capacity planner (see plan.h).
#include "launch/plan/plan.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "launch/admission.h"
#include "launch/eval/svg_plot.h"
#include "launch/figures.h"
#include "launch/plan/step_check.h"
#include "parallel/status_macros.h"
#include "runtime/kv/kv_sizing.h"

namespace dmsrt {

namespace {

// What a GPU keeps besides weights and the KV pool before the runtime's own margin: the CUDA
// context and the backend's workspace (an assumption; unmeasured).
constexpr int64_t kGpuContextBytes = 1ll << 30;

absl::StatusOr<SimReplicaConfig> ReplicaConfig(const PlanInputs& in, int32_t tp, double rate,
                                               DeploymentPlan* d) {
  SimReplicaConfig c;
  c.model = in.model;
  c.tp = tp;
  c.block_tokens = in.block_tokens;
  c.eviction_rate = rate;
  c.window = in.dms_window;
  c.prefill_chunk = in.prefill_chunk;
  c.max_running_threads = in.max_running_threads;
  c.decode_spans = in.decode_spans;
  c.speed = in.speed;
  MemoryBreakdown& m = d->memory;
  // A GPU's pool: what the CUDA backend takes by default after bf16 weights and its context.
  auto gpu_memory = [&](int64_t device_bytes, int64_t weight_bytes) {
    m.device_bytes = device_bytes;
    m.weight_bytes = weight_bytes / tp;
    m.kv_block_bytes = CudaKvBlockBytes(in.model.head_dim, in.block_tokens);
    const int64_t free = m.device_bytes - m.weight_bytes - kGpuContextBytes;
    m.kv_budget_bytes = DeviceKvBudgetBytes(free, m.device_bytes);
    m.reserved_bytes = m.device_bytes - m.weight_bytes - std::max<int64_t>(0, m.kv_budget_bytes);
  };
  if (in.datasheet) {
    DMSRT_ASSIGN_OR_RETURN(Profile p, DatasheetProfile(in.profile_spec, in.model, tp));
    c.costs = p.costs;
    gpu_memory(p.device_memory_bytes, p.weight_bytes);
    d->runnable = tp == 1;
    if (tp > 1) {
      d->note = "GPU tensor parallelism is not runnable yet (planned from datasheet figures)";
    }
  } else if (in.measured.backend == "cuda") {
    if (tp > 1) {
      return absl::InvalidArgumentError(
          "a GPU profile file describes one GPU: plan it with --tp 1 (GPU tensor parallelism "
          "is planned from the datasheets only)");
    }
    c.costs = in.measured.costs;
    // The planned model's bf16 weights, as the CUDA backend holds them.
    gpu_memory(in.measured.device_memory_bytes,
               static_cast<int64_t>(2.0 * (MatrixParams(in.model) +
                                           static_cast<double>(in.model.vocab) * in.model.hidden)));
  } else {
    c.costs = in.measured.costs;
    if (tp > 1) {
      // CPU tensor parallelism: each rank computes 1/tp of the model; the all-reduces are not
      // in the profile (unmeasured).
      c.costs.ScaleForward(1.0 / tp);
      d->note = "TP step time scaled from the TP=1 profile (all-reduce unmeasured)";
    }
    m.kv_block_bytes = CpuKvBlockBytes(in.model.head_dim, in.block_tokens);
    m.kv_budget_bytes = in.cpu_kv_budget_bytes;
    c.dead_slots = true;  // the CPU store's (runtime/kv/kv_store.h)
    m.weight_bytes = in.measured.weight_bytes;
    d->runnable = true;
  }
  c.kv_budget_bytes = m.kv_budget_bytes;
  c.kv_block_bytes = m.kv_block_bytes;
  d->costs = c.costs;
  const int64_t row_blocks = static_cast<int64_t>(in.model.n_layers) * (in.model.n_kv_heads / tp);
  const int64_t rank_blocks = m.kv_budget_bytes > 0 ? m.kv_budget_bytes / m.kv_block_bytes : 0;
  m.kv_tokens = row_blocks > 0 ? rank_blocks / row_blocks * in.block_tokens : 0;
  const double full = in.workload.prompt.Mean() + in.workload.reasoning.Mean();
  m.thread_tokens_full =
      ExpectedResident(rate > 0 ? "forced" : "none", in.dms_window, rate, 0.0, full);
  m.threads_fit = m.thread_tokens_full > 0 ? m.kv_tokens / m.thread_tokens_full : 0.0;
  return c;
}

// The largest prompt and generated lengths a job of this workload can have.
std::pair<int64_t, int64_t> LongestJob(const PlanInputs& in) {
  const Workload& w = in.workload;
  if (!w.prompt_tokens.empty()) {
    return {*std::max_element(w.prompt_tokens.begin(), w.prompt_tokens.end()),
            *std::max_element(w.generated_tokens.begin(), w.generated_tokens.end())};
  }
  return {w.prompt.Max(), w.reasoning.Max()};
}

// Whether the longest job this workload can draw fits one replica (the coordinator's rule).
absl::Status CheckFits(const PlanInputs& in, const SimReplicaConfig& c, const DeploymentPlan& d) {
  if (d.memory.kv_budget_bytes <= 0) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "the weights (%s per GPU) leave no KV memory on a %s GPU", HumanBytes(d.memory.weight_bytes),
        HumanBytes(d.memory.device_bytes)));
  }
  ReplicaCapacity rc;
  rc.kv_policy = c.eviction_rate > 0 ? "forced" : "none";
  rc.kv_window = c.window;
  rc.kv_force_rate = c.eviction_rate;
  rc.kv_block_tokens = c.block_tokens;
  rc.blocks_per_token_dense = static_cast<int64_t>(in.model.n_layers) * in.model.n_kv_heads;
  rc.kv_blocks_total = d.memory.kv_tokens / std::max(1, c.block_tokens) * rc.blocks_per_token_dense;
  rc.kv_block_bytes = d.memory.kv_block_bytes;
  AdmissionRequest ar;
  const auto [prompt, generated] = LongestJob(in);
  ar.prompt_tokens = prompt;
  ar.max_tokens = static_cast<int32_t>(generated);
  ar.n = in.workload.n;
  ar.max_n = std::max(64, in.workload.n);
  return AdmitJob(ar, {rc}).status();
}

double SloLatency(const PlanInputs& in, const SimResult& r) {
  return Percentile(r.latency, in.slo_percentile);
}

bool MeetsSlo(const PlanInputs& in, const SimResult& r) {
  return r.complete && r.jobs_failed == 0 && SloLatency(in, r) <= in.slo_seconds;
}

// A first guess of one replica's capacity (jobs/h): the threads the pool or the thread cap
// allows, at the step time of that batch.
double CapacityGuess(const PlanInputs& in, const SimReplicaConfig& c, const DeploymentPlan& d) {
  const double mean_gen = in.workload.reasoning.Mean();
  const double threads =
      std::max(1.0, std::min<double>(in.max_running_threads, d.memory.threads_fit));
  const double step = c.costs.Seconds(static_cast<int64_t>(threads),
                                      static_cast<int64_t>(threads * d.memory.thread_tokens_full / 2), 0,
                                      static_cast<int64_t>(threads));
  if (step <= 0) return 1.0;
  const double tokens_per_s = threads / step;
  return std::max(1e-3, tokens_per_s * 3600.0 / (in.workload.n * mean_gen));
}

// One simulation at `jobs_per_hour`. With `judge` it may stop as soon as the SLO is certainly
// missed (the search and the sizing only need the verdict then).
absl::StatusOr<SimResult> RunAt(const PlanInputs& in, const SimReplicaConfig& c, int32_t replicas,
                                double jobs_per_hour, bool judge) {
  Workload w = in.workload;
  if (w.arrivals.empty()) w.jobs_per_hour = jobs_per_hour;  // a trace keeps its own arrivals
  SloStop stop{in.slo_percentile, in.slo_seconds};
  return Simulate(c, replicas, w, std::max(4.0 * in.slo_seconds, 60.0), judge ? &stop : nullptr);
}

std::string Binding(const PlanInputs& in, const DeploymentPlan& d) {
  if (d.capacity_jobs_per_hour <= 0 || d.unloaded_latency > 0.8 * in.slo_seconds) return "SLO";
  const SimResult& r = d.at_capacity;
  if (r.peak_kv_fraction >= 0.9 || r.preemptions > 0) return "memory";
  if (r.peak_running_threads >= in.max_running_threads) return "thread cap";
  if (r.seconds_host + r.seconds_sampling > 0.25 * r.busy_seconds) return "host";
  const double bw = r.seconds_fixed + r.seconds_kv;
  const double fl = r.seconds_rows + r.seconds_prefill;
  return bw >= fl ? "bandwidth" : "compute";
}

// Light load: a few jobs far apart give the latency floor.
absl::StatusOr<double> UnloadedLatency(const PlanInputs& in, const SimReplicaConfig& c) {
  Workload w = in.workload;
  w.jobs = 8;
  w.warmup_fraction = 0.0;
  w.jobs_per_hour = 1e-3;
  w.arrivals.clear();
  w.prompt_tokens.clear();
  w.generated_tokens.clear();
  for (int i = 0; i < 8; ++i) w.arrivals.push_back(1.0 + i * 1e6);
  DMSRT_ASSIGN_OR_RETURN(SimResult light, Simulate(c, 1, w, 1e7));
  return SloLatency(in, light);
}

// Bisection on the offered rate for one replica: the highest rate whose run meets the SLO.
absl::Status SearchCapacity(const PlanInputs& in, const SimReplicaConfig& c, DeploymentPlan* d,
                            bool* have) {
  double lo = 0.0, hi = CapacityGuess(in, c, *d) * 1.5;
  SimResult best;
  *have = false;
  auto probe = [&](double rate) -> absl::StatusOr<bool> {
    DMSRT_ASSIGN_OR_RETURN(SimResult r, RunAt(in, c, 1, rate, true));
    const bool ok = MeetsSlo(in, r);
    d->search.push_back({rate, r.jobs_per_hour, SloLatency(in, r), ok, r.stopped_at_miss});
    if (ok) {
      lo = rate;
      best = std::move(r);
      *have = true;
    } else {
      hi = rate;
    }
    return ok;
  };
  for (int grow = 0; grow < 6; ++grow) {
    const double rate = hi;
    DMSRT_ASSIGN_OR_RETURN(const bool ok, probe(rate));
    if (!ok) break;
    hi = 2.0 * rate;
  }
  for (int i = 0; i < in.search_steps; ++i) {
    DMSRT_RETURN_IF_ERROR(probe(lo > 0 ? std::sqrt(lo * hi) : hi / 4.0).status());
  }
  if (*have) {
    d->capacity_jobs_per_hour = lo;
    d->at_capacity = std::move(best);
  }
  return absl::OkStatus();
}

// Sized for the target rate, checked by simulating the whole deployment.
absl::Status SizeForTarget(const PlanInputs& in, const SimReplicaConfig& c, int32_t devices,
                           DeploymentPlan* d) {
  int32_t reps = static_cast<int32_t>(std::ceil(in.target_jobs_per_hour / d->capacity_jobs_per_hour));
  for (int attempt = 0; attempt < 3 && reps * d->tp <= devices; ++attempt) {
    DMSRT_ASSIGN_OR_RETURN(SimResult r, RunAt(in, c, reps, in.target_jobs_per_hour, true));
    d->replicas = reps;
    d->at_target = std::move(r);
    d->meets_target = MeetsSlo(in, d->at_target);
    if (d->meets_target) break;
    ++reps;
  }
  if (d->replicas == 0) d->replicas = reps;
  return absl::OkStatus();
}

// One deployment (TP degree x eviction rate): memory, fit, then a prediction of the given
// replica count, or the capacity search and the sizing for the target.
absl::StatusOr<DeploymentPlan> PlanDeployment(const PlanInputs& in, int32_t tp, double rate,
                                              int32_t devices) {
  DeploymentPlan d;
  d.tp = tp;
  d.eviction_rate = rate;
  DMSRT_ASSIGN_OR_RETURN(SimReplicaConfig c, ReplicaConfig(in, tp, rate, &d));
  absl::Status fits = CheckFits(in, c, d);
  if (!fits.ok()) {
    d.fits = false;
    d.fit_message = std::string(fits.message());
    d.binding = "memory";
    return d;
  }
  if (in.fixed_replicas > 0) {
    StepLogFile log(nullptr, &std::fclose);
    if (!in.step_log_path.empty()) {
      DMSRT_ASSIGN_OR_RETURN(log, OpenStepLog(in.step_log_path, "w"));
      std::FILE* f = log.get();
      c.on_step = [f](int32_t, const StepShape& s, double seconds, double end_s) {
        WriteStepLogLine(f, s, seconds, end_s);
      };
    }
    DMSRT_ASSIGN_OR_RETURN(SimResult r, RunAt(in, c, in.fixed_replicas, in.target_jobs_per_hour, false));
    d.replicas = in.fixed_replicas;
    d.gpus = d.replicas * tp;
    d.at_target = r;
    d.at_capacity = r;
    d.meets_target = MeetsSlo(in, r);
    d.capacity_jobs_per_hour = d.meets_target ? in.target_jobs_per_hour / d.replicas : 0.0;
    d.binding = Binding(in, d);
    d.gpu_hours_per_1000_jobs = r.jobs_per_hour > 0 ? d.gpus * 1000.0 / r.jobs_per_hour : 0.0;
    return d;
  }
  DMSRT_ASSIGN_OR_RETURN(d.unloaded_latency, UnloadedLatency(in, c));
  bool have = false;
  DMSRT_RETURN_IF_ERROR(SearchCapacity(in, c, &d, &have));
  d.binding = Binding(in, d);
  if (in.target_jobs_per_hour > 0 && have) {
    DMSRT_RETURN_IF_ERROR(SizeForTarget(in, c, devices, &d));
  } else {
    d.replicas = have ? std::max(1, devices / tp) : 0;
  }
  d.gpus = d.replicas * tp;
  const double sustained = in.target_jobs_per_hour > 0 && d.meets_target
                               ? in.target_jobs_per_hour
                               : d.capacity_jobs_per_hour * d.replicas;
  d.gpu_hours_per_1000_jobs = sustained > 0 ? d.gpus * 1000.0 / sustained : 0.0;
  return d;
}

// The cheapest deployment that does the job: fewest GPUs; then runnable; then the most
// capacity per GPU.
int32_t ChooseWinner(const PlanInputs& in, const std::vector<DeploymentPlan>& deps) {
  int32_t winner = -1;
  for (size_t i = 0; i < deps.size(); ++i) {
    const DeploymentPlan& d = deps[i];
    const bool ok = in.target_jobs_per_hour > 0 ? d.meets_target : d.capacity_jobs_per_hour > 0;
    if (!ok) continue;
    if (winner < 0) {
      winner = static_cast<int32_t>(i);
      continue;
    }
    const DeploymentPlan& w = deps[winner];
    if (d.gpus < w.gpus || (d.gpus == w.gpus && d.runnable && !w.runnable) ||
        (d.gpus == w.gpus && d.runnable == w.runnable &&
         d.capacity_jobs_per_hour / d.tp > w.capacity_jobs_per_hour / w.tp)) {
      winner = static_cast<int32_t>(i);
    }
  }
  return winner;
}

// One sentence: the winner, or the closest miss.
std::string Answer(const PlanInputs& in, const PlanResult& out, int32_t devices) {
  const char* unit = in.gpu() ? "GPU" : "CPU replica process";
  if (out.winner >= 0) {
    const DeploymentPlan& w = out.deployments[out.winner];
    return absl::StrFormat(
        "%d %s(s): %d replica(s) x TP %d, eviction rate %.3f, sustains %.1f jobs/h per replica "
        "with p%g job latency %.1f s <= %.1f s%s",
        w.gpus, unit, w.replicas, w.tp, w.eviction_rate, w.capacity_jobs_per_hour,
        in.slo_percentile, SloLatency(in, in.target_jobs_per_hour > 0 ? w.at_target : w.at_capacity),
        in.slo_seconds, w.runnable ? "" : " (not yet runnable: GPU TP)");
  }
  const DeploymentPlan* best = nullptr;
  double best_lat = std::numeric_limits<double>::infinity();
  for (const DeploymentPlan& d : out.deployments) {
    for (const SearchPoint& p : d.search) {
      if (p.latency_slo_pct < best_lat) {
        best_lat = p.latency_slo_pct;
        best = &d;
      }
    }
    if (d.fits && d.unloaded_latency < best_lat) {
      best_lat = d.unloaded_latency;
      best = &d;
    }
  }
  if (best != nullptr && in.target_jobs_per_hour > 0 && best->capacity_jobs_per_hour > 0) {
    return absl::StrFormat(
        "no deployment within %d %s(s) meets the SLO at %.1f jobs/h; the closest: TP %d at "
        "eviction rate %.3f sustains %.1f jobs/h per replica, %d replica(s) would be needed",
        devices, unit, in.target_jobs_per_hour, best->tp, best->eviction_rate,
        best->capacity_jobs_per_hour,
        static_cast<int>(std::ceil(in.target_jobs_per_hour / best->capacity_jobs_per_hour)));
  }
  if (best != nullptr) {
    return absl::StrFormat(
        "no deployment meets p%g <= %.1f s; the closest miss: TP %d at eviction rate %.3f with "
        "p%g %.1f s even at light load",
        in.slo_percentile, in.slo_seconds, best->tp, best->eviction_rate, in.slo_percentile,
        best_lat);
  }
  return "no deployment meets the SLO";
}

absl::Status CheckInputs(const PlanInputs& in) {
  if (!(in.slo_seconds > 0)) return absl::InvalidArgumentError("the SLO must be > 0 seconds");
  if (in.target_jobs_per_hour < 0) {
    return absl::InvalidArgumentError("the target rate must be >= 0 jobs/h");
  }
  if (in.nodes * in.gpus_per_node < 1) return absl::InvalidArgumentError("nodes x GPUs must be >= 1");
  if (in.fixed_replicas > 0 && !(in.target_jobs_per_hour > 0) && in.workload.arrivals.empty()) {
    return absl::InvalidArgumentError("a fixed replica count needs a target rate (--rate) or a trace");
  }
  if (!in.speed.empty() && in.fixed_replicas < 1) {
    return absl::InvalidArgumentError(
        "--step-scale-trace replays a given deployment: add --replicas N and a --trace");
  }
  if (!in.step_log_path.empty() &&
      (in.fixed_replicas < 1 || in.tp_options.size() != 1 || in.eviction_rates.size() != 1)) {
    return absl::InvalidArgumentError(
        "--step-log writes the steps of one predicted deployment: give --replicas N, one --tp "
        "and one --evict");
  }
  if (!in.workload.arrivals.empty() && in.fixed_replicas < 1) {
    return absl::InvalidArgumentError(
        "a trace (--trace) predicts a given deployment: add --replicas N (the capacity search "
        "varies the arrival rate, which a trace fixes)");
  }
  const int64_t ctx = in.model.max_positions;
  const auto [prompt, generated] = LongestJob(in);
  if (ctx > 0 && prompt + generated > ctx) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "the longest job (%d prompt + %d generated tokens) exceeds the model context of %d "
        "tokens: lower the distributions' max or shorten the trace's jobs",
        prompt, generated, ctx));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<PlanResult> RunPlan(const PlanInputs& in) {
  const auto wall0 = std::chrono::steady_clock::now();
  DMSRT_RETURN_IF_ERROR(CheckInputs(in));
  const int32_t devices = in.nodes * in.gpus_per_node;
  PlanResult out;
  for (int32_t tp : in.tp_options) {
    if (tp < 1 || in.model.n_kv_heads % tp != 0) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "TP %d does not divide the model's %d KV heads", tp, in.model.n_kv_heads));
    }
    if (tp > devices) continue;
    for (double rate : in.eviction_rates) {
      DMSRT_ASSIGN_OR_RETURN(DeploymentPlan d, PlanDeployment(in, tp, rate, devices));
      out.deployments.push_back(std::move(d));
    }
  }
  if (out.deployments.empty()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "no TP option fits in %d device(s): offer smaller --tp values", devices));
  }
  std::stable_sort(out.deployments.begin(), out.deployments.end(),
                   [](const DeploymentPlan& a, const DeploymentPlan& b) {
                     if (a.gpus != b.gpus) return a.gpus < b.gpus;
                     return a.capacity_jobs_per_hour * a.replicas > b.capacity_jobs_per_hour * b.replicas;
                   });
  bool any_fits = false;
  for (const DeploymentPlan& d : out.deployments) any_fits |= d.fits;
  if (!any_fits) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the model and workload fit no deployment: ", out.deployments.front().fit_message));
  }
  out.winner = ChooseWinner(in, out.deployments);
  out.answer = Answer(in, out, devices);
  out.wall_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - wall0).count();
  return out;
}

}  // namespace dmsrt
