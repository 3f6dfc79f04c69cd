// The capacity planner (see plan.h).
#include "launch/plan/plan.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "launch/admission.h"
#include "launch/eval/svg_plot.h"
#include "launch/figures.h"
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
      c.costs.fixed /= tp;
      c.costs.per_decode_row /= tp;
      c.costs.per_kv_token /= tp;
      c.costs.prefill_fixed /= tp;
      c.costs.per_prefill_token /= tp;
      d->note = "TP step time scaled from the TP=1 profile (all-reduce unmeasured)";
    }
    m.kv_block_bytes = CpuKvBlockBytes(in.model.head_dim, in.block_tokens);
    m.kv_budget_bytes = in.cpu_kv_budget_bytes;
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
  ar.prompt_tokens = in.workload.prompt.Max();
  ar.max_tokens = static_cast<int32_t>(in.workload.reasoning.Max());
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
                                      static_cast<int64_t>(threads * d.memory.thread_tokens_full / 2), 0);
  if (step <= 0) return 1.0;
  const double tokens_per_s = threads / step;
  return std::max(1e-3, tokens_per_s * 3600.0 / (in.workload.n * mean_gen));
}

// One simulation at `jobs_per_hour`. With `judge` it may stop as soon as the SLO is certainly
// missed (the search and the sizing only need the verdict then).
absl::StatusOr<SimResult> RunAt(const PlanInputs& in, const SimReplicaConfig& c, int32_t replicas,
                                double jobs_per_hour, bool judge) {
  Workload w = in.workload;
  w.jobs_per_hour = jobs_per_hour;
  w.arrivals.clear();
  w.prompt_tokens.clear();
  w.generated_tokens.clear();
  SloStop stop{in.slo_percentile, in.slo_seconds};
  return Simulate(c, replicas, w, std::max(4.0 * in.slo_seconds, 60.0), judge ? &stop : nullptr);
}

std::string Binding(const PlanInputs& in, const DeploymentPlan& d) {
  if (d.capacity_jobs_per_hour <= 0 || d.unloaded_latency > 0.8 * in.slo_seconds) return "SLO";
  const SimResult& r = d.at_capacity;
  if (r.peak_kv_fraction >= 0.9 || r.preemptions > 0) return "memory";
  if (r.peak_running_threads >= in.max_running_threads) return "thread cap";
  if (r.seconds_host > 0.25 * r.busy_seconds) return "host";
  const double bw = r.seconds_fixed + r.seconds_kv;
  const double fl = r.seconds_rows + r.seconds_prefill;
  return bw >= fl ? "bandwidth" : "compute";
}

}  // namespace

absl::StatusOr<PlanResult> RunPlan(const PlanInputs& in) {
  const auto wall0 = std::chrono::steady_clock::now();
  if (!(in.slo_seconds > 0)) return absl::InvalidArgumentError("the SLO must be > 0 seconds");
  if (in.target_jobs_per_hour < 0) {
    return absl::InvalidArgumentError("the target rate must be >= 0 jobs/h");
  }
  const int32_t devices = in.nodes * in.gpus_per_node;
  if (devices < 1) return absl::InvalidArgumentError("nodes x GPUs must be >= 1");
  const int64_t ctx = in.model.max_positions;
  if (ctx > 0 && in.workload.prompt.Max() + in.workload.reasoning.Max() > ctx) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "the longest job (%d prompt + %d generated tokens) exceeds the model context of %d "
        "tokens: lower the distributions' max",
        in.workload.prompt.Max(), in.workload.reasoning.Max(), ctx));
  }
  PlanResult out;
  for (int32_t tp : in.tp_options) {
    if (tp < 1 || in.model.n_kv_heads % tp != 0) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "TP %d does not divide the model's %d KV heads", tp, in.model.n_kv_heads));
    }
    if (tp > devices) continue;
    for (double rate : in.eviction_rates) {
      DeploymentPlan d;
      d.tp = tp;
      d.eviction_rate = rate;
      DMSRT_ASSIGN_OR_RETURN(SimReplicaConfig c, ReplicaConfig(in, tp, rate, &d));
      absl::Status fits = CheckFits(in, c, d);
      if (!fits.ok()) {
        d.fits = false;
        d.fit_message = std::string(fits.message());
        d.binding = "memory";
        out.deployments.push_back(std::move(d));
        continue;
      }
      if (in.fixed_replicas > 0) {
        if (!(in.target_jobs_per_hour > 0)) {
          return absl::InvalidArgumentError("a fixed replica count needs a target rate (--rate)");
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
        out.deployments.push_back(std::move(d));
        continue;
      }
      // Light load: a few jobs far apart give the latency floor.
      {
        Workload w = in.workload;
        w.jobs = 8;
        w.warmup_fraction = 0.0;
        w.jobs_per_hour = 1e-3;
        w.arrivals.clear();
        for (int i = 0; i < 8; ++i) w.arrivals.push_back(1.0 + i * 1e6);
        DMSRT_ASSIGN_OR_RETURN(SimResult light, Simulate(c, 1, w, 1e7));
        d.unloaded_latency = SloLatency(in, light);
      }
      // Bisection on the offered rate for one replica.
      double lo = 0.0, hi = CapacityGuess(in, c, d) * 1.5;
      SimResult best;
      bool have = false;
      for (int grow = 0; grow < 6; ++grow) {
        DMSRT_ASSIGN_OR_RETURN(SimResult r, RunAt(in, c, 1, hi, true));
        const bool ok = MeetsSlo(in, r);
        d.search.push_back({hi, r.jobs_per_hour, SloLatency(in, r), ok, r.stopped_at_miss});
        if (!ok) break;
        lo = hi;
        best = r;
        have = true;
        hi *= 2.0;
      }
      for (int i = 0; i < in.search_steps; ++i) {
        const double mid = lo > 0 ? std::sqrt(lo * hi) : hi / 4.0;
        DMSRT_ASSIGN_OR_RETURN(SimResult r, RunAt(in, c, 1, mid, true));
        const bool ok = MeetsSlo(in, r);
        d.search.push_back({mid, r.jobs_per_hour, SloLatency(in, r), ok, r.stopped_at_miss});
        if (ok) {
          lo = mid;
          best = r;
          have = true;
        } else {
          hi = mid;
        }
      }
      if (have) {
        d.capacity_jobs_per_hour = lo;
        d.at_capacity = best;
      }
      d.binding = Binding(in, d);
      // Sized for the target rate, checked by simulating the whole deployment.
      if (in.target_jobs_per_hour > 0 && have) {
        int32_t reps = static_cast<int32_t>(std::ceil(in.target_jobs_per_hour / lo));
        for (int attempt = 0; attempt < 3 && reps * tp <= devices; ++attempt) {
          DMSRT_ASSIGN_OR_RETURN(SimResult r, RunAt(in, c, reps, in.target_jobs_per_hour, true));
          d.replicas = reps;
          d.at_target = r;
          d.meets_target = MeetsSlo(in, r);
          if (d.meets_target) break;
          ++reps;
        }
        if (d.replicas == 0) d.replicas = reps;
      } else {
        d.replicas = have ? std::max(1, devices / tp) : 0;
      }
      d.gpus = d.replicas * tp;
      const double sustained = in.target_jobs_per_hour > 0 && d.meets_target
                                   ? in.target_jobs_per_hour
                                   : d.capacity_jobs_per_hour * d.replicas;
      d.gpu_hours_per_1000_jobs = sustained > 0 ? d.gpus * 1000.0 / sustained : 0.0;
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
  for (size_t i = 0; i < out.deployments.size(); ++i) {
    const DeploymentPlan& d = out.deployments[i];
    any_fits |= d.fits;
    const bool ok = in.target_jobs_per_hour > 0 ? d.meets_target : d.capacity_jobs_per_hour > 0;
    if (!ok) continue;
    if (out.winner < 0) {
      out.winner = static_cast<int32_t>(i);
      continue;
    }
    const DeploymentPlan& w = out.deployments[out.winner];
    // Cheapest: fewest GPUs; then runnable; then the most capacity per GPU.
    if (d.gpus < w.gpus || (d.gpus == w.gpus && d.runnable && !w.runnable) ||
        (d.gpus == w.gpus && d.runnable == w.runnable &&
         d.capacity_jobs_per_hour / d.tp > w.capacity_jobs_per_hour / w.tp)) {
      out.winner = static_cast<int32_t>(i);
    }
  }
  if (!any_fits) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the model and workload fit no deployment: ", out.deployments.front().fit_message));
  }
  const char* unit = in.gpu() ? "GPU" : "CPU replica process";
  if (out.winner >= 0) {
    const DeploymentPlan& w = out.deployments[out.winner];
    out.answer = absl::StrFormat(
        "%d %s(s): %d replica(s) x TP %d, eviction rate %.3f, sustains %.1f jobs/h per replica "
        "with p%g job latency %.1f s <= %.1f s%s",
        w.gpus, unit, w.replicas, w.tp, w.eviction_rate, w.capacity_jobs_per_hour,
        in.slo_percentile, SloLatency(in, in.target_jobs_per_hour > 0 ? w.at_target : w.at_capacity),
        in.slo_seconds, w.runnable ? "" : " (not yet runnable: GPU TP)");
  } else {
    // The closest miss.
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
      out.answer = absl::StrFormat(
          "no deployment within %d %s(s) meets the SLO at %.1f jobs/h; the closest: TP %d at "
          "eviction rate %.3f sustains %.1f jobs/h per replica, %d replica(s) would be needed",
          devices, unit, in.target_jobs_per_hour, best->tp, best->eviction_rate,
          best->capacity_jobs_per_hour,
          static_cast<int>(std::ceil(in.target_jobs_per_hour / best->capacity_jobs_per_hour)));
    } else if (best != nullptr) {
      out.answer = absl::StrFormat(
          "no deployment meets p%g <= %.1f s; the closest miss: TP %d at eviction rate %.3f with "
          "p%g %.1f s even at light load",
          in.slo_percentile, in.slo_seconds, best->tp, best->eviction_rate, in.slo_percentile,
          best_lat);
    } else {
      out.answer = "no deployment meets the SLO";
    }
  }
  out.wall_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - wall0).count();
  return out;
}

namespace {

nlohmann::json Num(double v) {
  if (!std::isfinite(v)) return nullptr;
  return v;
}

nlohmann::json SimJson(const PlanInputs& in, const SimResult& r) {
  return {{"jobs_per_hour", Num(r.jobs_per_hour)},
          {"threads_per_second", Num(r.threads_per_second)},
          {"tokens_per_second", Num(r.tokens_per_second)},
          {"latency_p50_s", Num(Percentile(r.latency, 50))},
          {"latency_p90_s", Num(Percentile(r.latency, 90))},
          {"latency_p99_s", Num(Percentile(r.latency, 99))},
          {"first_thread_p50_s", Num(Percentile(r.first_thread, 50))},
          {"complete", r.complete},
          {"stopped_at_miss", r.stopped_at_miss},
          {"jobs", r.jobs_submitted},
          {"jobs_failed", r.jobs_failed},
          {"preemptions", r.preemptions},
          {"peak_running_threads", r.peak_running_threads},
          {"peak_kv_fraction", r.peak_kv_fraction},
          {"mean_decode_batch", r.mean_batch},
          {"steps", r.steps},
          {"step_calls", r.step_calls},
          {"step_seconds",
           {{"fixed", r.seconds_fixed},
            {"decode_rows", r.seconds_rows},
            {"kv_reads", r.seconds_kv},
            {"prefill", r.seconds_prefill},
            {"host_beyond_device", r.seconds_host}}},
          {"simulated_seconds", r.sim_seconds},
          {"wall_seconds", r.wall_seconds}};
}

}  // namespace

nlohmann::json PlanJson(const PlanInputs& in, const PlanResult& r) {
  nlohmann::json deps = nlohmann::json::array();
  for (const DeploymentPlan& d : r.deployments) {
    nlohmann::json search = nlohmann::json::array();
    for (const SearchPoint& p : d.search) {
      search.push_back({{"offered_jobs_per_hour", p.offered_jobs_per_hour},
                        {"sustained_jobs_per_hour", Num(p.sustained_jobs_per_hour)},
                        {"latency_slo_pct_s", Num(p.latency_slo_pct)},
                        {"meets_slo", p.ok},
                        {"stopped_at_miss", p.stopped}});
    }
    nlohmann::json j = {
        {"tp", d.tp},
        {"eviction_rate", d.eviction_rate},
        {"runnable", d.runnable},
        {"note", d.note},
        {"fits", d.fits},
        {"fit_message", d.fit_message},
        {"replicas", d.replicas},
        {"gpus", d.gpus},
        {"capacity_jobs_per_hour_per_replica", d.capacity_jobs_per_hour},
        {"unloaded_latency_s", Num(d.unloaded_latency)},
        {"binding", d.binding},
        {"meets_target", d.meets_target},
        {"gpu_hours_per_1000_jobs", d.gpu_hours_per_1000_jobs},
        {"memory",
         {{"device_bytes", d.memory.device_bytes},
          {"weight_bytes_per_gpu", d.memory.weight_bytes},
          {"reserved_bytes", d.memory.reserved_bytes},
          {"kv_budget_bytes_per_rank", d.memory.kv_budget_bytes},
          {"kv_block_bytes", d.memory.kv_block_bytes},
          {"kv_tokens_per_replica", d.memory.kv_tokens},
          {"thread_resident_tokens_at_mean_length", d.memory.thread_tokens_full},
          {"threads_fit", d.memory.threads_fit}}},
        {"step_model",
         {{"fixed_s", d.costs.fixed},
          {"per_decode_row_s", d.costs.per_decode_row},
          {"per_kv_token_s", d.costs.per_kv_token},
          {"prefill_fixed_s", d.costs.prefill_fixed},
          {"per_prefill_token_s", d.costs.per_prefill_token},
          {"allreduce_per_step_s", d.costs.allreduce_per_step},
          {"host_fixed_s", d.costs.host_fixed},
          {"host_per_decode_row_s", d.costs.host_per_decode_row}}},
        {"at_capacity", SimJson(in, d.at_capacity)},
        {"search", search}};
    if (in.target_jobs_per_hour > 0) j["at_target"] = SimJson(in, d.at_target);
    deps.push_back(j);
  }
  nlohmann::json prov;
  if (in.datasheet) {
    prov = {{"profile", in.profile_spec}, {"measured", false},
            {"note", "every figure below is derived from datasheet peaks: unmeasured"}};
  } else {
    prov = {{"profile", in.profile_spec},
            {"measured", !in.measured.partly_derived},
            {"partly_derived", in.measured.partly_derived},
            {"backend", in.measured.backend},
            {"device", in.measured.device},
            {"profiled_model", in.measured.model},
            {"fit_max_rel_error", in.measured.fit_max_rel_error},
            {"bench_provenance", in.measured.provenance}};
  }
  nlohmann::json j = {
      {"schema_version", 1},
      {"model", in.model_name},
      {"provenance", prov},
      {"devices", in.nodes * in.gpus_per_node},
      {"workload",
       {{"n", in.workload.n},
        {"prompt", in.workload.prompt.ToString()},
        {"reasoning", in.workload.reasoning.ToString()},
        {"per_thread_lengths", in.workload.per_thread_lengths},
        {"jobs_per_simulation", in.workload.jobs},
        {"target_jobs_per_hour", in.target_jobs_per_hour}}},
      {"slo", {{"percentile", in.slo_percentile}, {"seconds", in.slo_seconds}}},
      {"deployments", deps},
      {"winner", r.winner},
      {"answer", r.answer},
      {"wall_seconds", r.wall_seconds}};
  return j;
}

std::string PlanTable(const PlanInputs& in, const PlanResult& r) {
  std::string o;
  const bool ds = in.gpu();
  const std::string summary = in.measured.provenance.is_object()
                                  ? in.measured.provenance.value("summary", std::string())
                                  : std::string();
  absl::StrAppendFormat(&o, "profile: %s (%s)\n", in.profile_spec,
                        in.datasheet ? "datasheet peaks: every figure below is UNMEASURED"
                                     : absl::StrCat(summary.empty() ? "measured on " : summary + "; ",
                                                    in.measured.device, ", step-model fit within ",
                                                    absl::StrFormat("%.0f%%", 100 * in.measured.fit_max_rel_error))
                                           .c_str());
  absl::StrAppendFormat(&o, "workload: best-of-%d, prompt %s, reasoning %s; SLO p%g <= %.0f s\n\n",
                        in.workload.n, in.workload.prompt.ToString(),
                        in.workload.reasoning.ToString(), in.slo_percentile, in.slo_seconds);
  absl::StrAppendFormat(&o, "%-5s %-4s %-6s %-8s %-8s %-10s %-8s %-8s %-8s %-10s %-11s %s\n",
                        ds ? "GPUs" : "procs", "TP", "evict", "threads", "jobs/h", "jobs/h/rep",
                        "p50 s", "p90 s", "p99 s", ds ? "GPU-h/1k" : "proc-h/1k", "binding", "note");
  for (const DeploymentPlan& d : r.deployments) {
    const SimResult& s = in.target_jobs_per_hour > 0 && d.replicas > 0 ? d.at_target : d.at_capacity;
    const double jobs_h = in.target_jobs_per_hour > 0 ? s.jobs_per_hour : d.capacity_jobs_per_hour * d.replicas;
    if (!d.fits) {
      absl::StrAppendFormat(&o, "%-5s %-4d %-6.3f does not fit: %s\n", "-", d.tp, d.eviction_rate,
                            d.fit_message);
      continue;
    }
    absl::StrAppendFormat(&o, "%-5d %-4d %-6.3f %-8d %-8.1f %-10.1f %-8.1f %-8.1f %-8.1f %-10.2f %-11s %s%s\n",
                          d.gpus, d.tp, d.eviction_rate, s.peak_running_threads, jobs_h,
                          d.capacity_jobs_per_hour, Percentile(s.latency, 50),
                          Percentile(s.latency, 90), Percentile(s.latency, 99),
                          d.gpu_hours_per_1000_jobs, d.binding,
                          in.target_jobs_per_hour > 0 ? (d.meets_target ? "meets target" : "misses target") : "",
                          d.note.empty() ? "" : absl::StrCat("; ", d.note));
  }
  absl::StrAppend(&o, "\nmemory per deployment (per rank):\n");
  for (const DeploymentPlan& d : r.deployments) {
    absl::StrAppendFormat(
        &o, "  TP %d evict %.3f: device %s, weights %s, reserved %s, KV pool %s (%d tokens/replica); "
            "a thread at mean length holds %.0f tokens: %.1f threads fit\n",
        d.tp, d.eviction_rate, d.memory.device_bytes > 0 ? HumanBytes(d.memory.device_bytes) : "-",
        HumanBytes(d.memory.weight_bytes), HumanBytes(d.memory.reserved_bytes),
        HumanBytes(d.memory.kv_budget_bytes), d.memory.kv_tokens, d.memory.thread_tokens_full,
        d.memory.threads_fit);
  }
  absl::StrAppend(&o, "\nstep time at capacity (share of busy time):\n");
  for (const DeploymentPlan& d : r.deployments) {
    const SimResult& s = d.at_capacity;
    const double busy = std::max(1e-12, s.busy_seconds);
    absl::StrAppendFormat(
        &o, "  TP %d evict %.3f: %d steps, mean decode batch %.1f; weights %.0f%%, per-row %.0f%%, "
            "KV reads %.0f%%, prefill %.0f%%, host beyond device %.0f%%; preemptions %d, peak KV %.0f%%\n",
        d.tp, d.eviction_rate, s.steps, s.mean_batch, 100 * s.seconds_fixed / busy,
        100 * s.seconds_rows / busy, 100 * s.seconds_kv / busy, 100 * s.seconds_prefill / busy,
        100 * s.seconds_host / busy, s.preemptions, 100 * s.peak_kv_fraction);
  }
  absl::StrAppendFormat(&o, "\nanswer: %s\n", r.answer);
  if (r.winner >= 0) {
    const DeploymentPlan& w = r.deployments[r.winner];
    if (w.runnable) {
      std::string policy = w.eviction_rate > 0
                               ? absl::StrFormat(" --kv-policy dms  # measured eviction rate %.3f (or --kv-policy forced --dms-force-rate %.3f on a model without DMS)",
                                                 w.eviction_rate, w.eviction_rate)
                               : "";
      absl::StrAppendFormat(&o, "launch: mpirun -np %d build/bin/dmsrt serve --model %s --tp %d --backend %s%s%s\n",
                            w.replicas * w.tp, in.model_path_for_command, w.tp,
                            ds ? "cuda" : "cpu",
                            ds ? "" : absl::StrCat(" --kv-budget ", in.cpu_kv_budget_bytes).c_str(),
                            policy);
    } else {
      absl::StrAppend(&o, "launch: none printed: GPU tensor parallelism is not runnable yet\n");
    }
  }
  absl::StrAppendFormat(&o, "planned in %.1f s\n", r.wall_seconds);
  return o;
}

std::string PlanSvg(const PlanInputs& in, const PlanResult& r) {
  PlotPanel p;
  p.title = absl::StrFormat("one replica: sustained jobs/h against p%g job latency", in.slo_percentile);
  p.x_label = "sustained jobs/h per replica";
  p.y_label = absl::StrFormat("p%g job latency (s)", in.slo_percentile);
  for (const DeploymentPlan& d : r.deployments) {
    PlotSeries s;
    s.name = absl::StrFormat("TP %d, eviction %.3f", d.tp, d.eviction_rate);
    for (const SearchPoint& sp : d.search) {
      if (!sp.stopped && std::isfinite(sp.latency_slo_pct) && sp.sustained_jobs_per_hour > 0) {
        s.points.emplace_back(sp.sustained_jobs_per_hour, sp.latency_slo_pct);
      }
    }
    std::sort(s.points.begin(), s.points.end());
    if (!s.points.empty()) p.series.push_back(std::move(s));
  }
  return RenderSvg(absl::StrCat("dmsrt plan: ", in.model_name,
                                in.datasheet ? " (datasheet, unmeasured)" : " (profile file)"),
                   {p});
}

}  // namespace dmsrt
