// The capacity planner's outputs: JSON, the table and the throughput-latency plot (plan.h).
#include <algorithm>
#include <cmath>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "launch/eval/svg_plot.h"
#include "launch/figures.h"
#include "launch/plan/plan.h"

namespace dmsrt {

namespace {

nlohmann::json Num(double v) {
  if (!std::isfinite(v)) return nullptr;
  return v;
}

nlohmann::json SimJson(const PlanInputs& in, const SimResult& r) {
  nlohmann::json j = {{"jobs_per_hour", Num(r.jobs_per_hour)},
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
            {"host_beyond_device", r.seconds_host},
            {"sampling", r.seconds_sampling}}},
          {"simulated_seconds", r.sim_seconds},
          {"wall_seconds", r.wall_seconds}};
  if (!in.trace_path.empty()) {
    // Job by job, for laying beside a load generator's own records of the same trace.
    nlohmann::json done = nlohmann::json::array();
    for (double t : r.job_done) done.push_back(t >= 0 ? Num(t) : nullptr);
    j["job_done_s"] = std::move(done);
  }
  return j;
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
          {"host_per_decode_row_s", d.costs.host_per_decode_row},
          {"per_sampled_row_s", d.costs.per_sampled_row}}},
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
            {"step_scale", in.step_scale},
            {"bench_provenance", in.measured.provenance}};
  }
  if (!in.speed.empty()) {
    // A replay at a given machine speed over time: not a prediction made before the run.
    prov["step_scale_trace"] = {{"from_s", in.speed.from}, {"factor", in.speed.factor}};
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
        {"trace", in.trace_path.empty() ? nlohmann::json(nullptr) : nlohmann::json(in.trace_path)},
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
                                                    absl::StrFormat("%.0f%%", 100 * in.measured.fit_max_rel_error),
                                                    in.step_scale != 1.0
                                                        ? absl::StrFormat(", step times x %.3f (--step-scale)", in.step_scale)
                                                        : std::string(),
                                                    in.speed.empty()
                                                        ? std::string()
                                                        : absl::StrFormat(", and by time x %d factors (--step-scale-trace)",
                                                                          in.speed.from.size()))
                                           .c_str());
  if (in.trace_path.empty()) {
    absl::StrAppendFormat(&o, "workload: best-of-%d, prompt %s, reasoning %s; SLO p%g <= %.0f s\n\n",
                          in.workload.n, in.workload.prompt.ToString(),
                          in.workload.reasoning.ToString(), in.slo_percentile, in.slo_seconds);
  } else {
    absl::StrAppendFormat(&o, "workload: best-of-%d, %d jobs of trace %s (%.1f jobs/h); SLO p%g <= %.0f s\n\n",
                          in.workload.n, in.workload.arrivals.size(), in.trace_path,
                          in.target_jobs_per_hour, in.slo_percentile, in.slo_seconds);
  }
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
            "KV reads %.0f%%, prefill %.0f%%, host beyond device %.0f%%, sampling %.0f%%; preemptions %d, "
            "peak KV %.0f%%\n",
        d.tp, d.eviction_rate, s.steps, s.mean_batch, 100 * s.seconds_fixed / busy,
        100 * s.seconds_rows / busy, 100 * s.seconds_kv / busy, 100 * s.seconds_prefill / busy,
        100 * s.seconds_host / busy, 100 * s.seconds_sampling / busy, s.preemptions,
        100 * s.peak_kv_fraction);
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
