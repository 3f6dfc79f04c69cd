// `dmsrt plan`: cluster capacity planning (launch/plan/plan.h).
//
//   dmsrt plan --model qwen3-8b --profile h100-sxm --gpus 8 --tp 1,2 --evict 0,0.875
//       --n 16 --prompt fixed:512 --reasoning lognormal:8192:0.3 --max-tokens 16384
//       --rate 1000 --slo p90=120 [--json] [--out plan.json] [--svg plan.svg]
#include <CLI/CLI.hpp>

#include <cstdio>
#include <fstream>
#include <iostream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "launch/commands.h"
#include "launch/plan/plan.h"
#include "launch/plan/plan_command.h"
#include "launch/plan/step_check.h"
#include "launch/plan/trace.h"
#include "launch/run_options.h"
#include "parallel/status_macros.h"
#include "runtime/model/synthetic_model.h"

namespace dmsrt {
namespace {

absl::Status ParseSlo(const std::string& s, double* pct, double* seconds) {
  std::vector<std::string> kv = absl::StrSplit(s, '=');
  if (kv.size() != 2 || kv[0].size() < 2 || (kv[0][0] != 'p' && kv[0][0] != 'P') ||
      !absl::SimpleAtod(kv[0].substr(1), pct) || !absl::SimpleAtod(kv[1], seconds) ||
      !(*pct > 0 && *pct <= 100) || !(*seconds > 0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--slo '", s, "': expected pPCT=SECONDS with 0 < PCT <= 100 and SECONDS > 0, e.g. p90=120"));
  }
  return absl::OkStatus();
}

absl::StatusOr<ModelConfig> PlanModel(const std::string& name) {
  absl::StatusOr<ModelConfig> syn = SyntheticConfig(name);
  if (syn.ok()) return syn;
  absl::StatusOr<std::unique_ptr<Model>> m = LoadModel(name);
  if (!m.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--model ", name, " is neither a synthetic model name nor a loadable model: ",
        m.status().message()));
  }
  return (*m)->config;
}

absl::Status WriteText(const std::string& path, const char* flag, const std::string& text) {
  std::ofstream f(path);
  if (!f || !(f << text)) {
    return absl::InvalidArgumentError(absl::StrCat("cannot write ", flag, " ", path));
  }
  return absl::OkStatus();
}

// --check-steps: a real run's logged steps against the profile's prediction.
absl::Status CheckStepLogs(const PlanCommandOptions& o) {
  for (const std::string& n : DatasheetNames()) {
    if (n == o.profile) {
      return absl::InvalidArgumentError(
          "--check-steps compares a real run's steps with a measured profile, not a datasheet");
    }
  }
  DMSRT_ASSIGN_OR_RETURN(Profile p, LoadProfile(o.profile));
  p.costs.ScaleAll(o.step_scale);
  DMSRT_ASSIGN_OR_RETURN(StepCheck c, CheckSteps(p.costs, o.check_steps));
  if (!o.out.empty()) DMSRT_RETURN_IF_ERROR(WriteText(o.out, "--out", StepCheckJson(c).dump(2) + "\n"));
  std::cout << (o.json ? StepCheckJson(c).dump() + "\n" : StepCheckTable(c)) << std::flush;
  return absl::OkStatus();
}

absl::Status Plan(const PlanCommandOptions& o) {
  if (o.profile.empty()) {
    return absl::InvalidArgumentError(
        "--profile is required: a profile written by `dmsrt bench --out FILE`, or a datasheet "
        "name (h100-sxm, h200)");
  }
  if (!o.check_steps.empty()) return CheckStepLogs(o);
  PlanInputs in;
  std::string model_name = o.model;
  if (model_name.empty()) {
    DMSRT_ASSIGN_OR_RETURN(model_name, DefaultModelPath());
  }
  DMSRT_ASSIGN_OR_RETURN(in.model, PlanModel(model_name));
  in.model_name = model_name;
  in.model_path_for_command = model_name;
  in.profile_spec = o.profile;
  bool ds = false;
  for (const std::string& n : DatasheetNames()) ds |= n == o.profile;
  in.datasheet = ds;
  if (!ds) {
    DMSRT_ASSIGN_OR_RETURN(in.measured, LoadProfile(o.profile));
    in.measured.costs.ScaleAll(o.step_scale);
    in.step_scale = o.step_scale;
  } else if (o.step_scale != 1.0) {
    return absl::InvalidArgumentError(
        "--step-scale scales a measured profile; a datasheet profile has no measured step times");
  }
  in.nodes = o.nodes;
  in.gpus_per_node = o.gpus;
  in.tp_options = o.tp;
  in.eviction_rates = o.evict;
  in.dms_window = o.dms_window;
  in.workload.n = o.n;
  DMSRT_ASSIGN_OR_RETURN(in.workload.prompt, ParseLengthDist(o.prompt, o.max_prompt));
  DMSRT_ASSIGN_OR_RETURN(in.workload.reasoning, ParseLengthDist(o.reasoning, o.max_tokens));
  in.workload.per_thread_lengths = o.per_thread_lengths;
  in.workload.jobs = o.jobs;
  in.workload.seed = static_cast<uint64_t>(o.seed);
  in.target_jobs_per_hour = o.rate;
  DMSRT_RETURN_IF_ERROR(ParseSlo(o.slo, &in.slo_percentile, &in.slo_seconds));
  in.cpu_kv_budget_bytes = o.kv_budget_bytes;
  in.block_tokens = o.kv_block;
  in.prefill_chunk = o.prefill_chunk;
  in.max_running_threads = o.max_threads;
  in.search_steps = o.search_steps;
  in.fixed_replicas = o.replicas;
  in.decode_spans = !o.step_by_step;
  in.step_log_path = o.step_log;
  if (!o.step_scale_trace.empty()) {
    DMSRT_ASSIGN_OR_RETURN(in.speed, ReadSpeedTrace(o.step_scale_trace));
  }
  if (!o.trace.empty()) {
    DMSRT_ASSIGN_OR_RETURN(JobTrace t, ReadJobTrace(o.trace));
    in.trace_path = o.trace;
    in.workload.arrivals = std::move(t.arrivals);
    in.workload.prompt_tokens = std::move(t.prompt_tokens);
    in.workload.generated_tokens = std::move(t.generated_tokens);
    in.workload.jobs = static_cast<int64_t>(in.workload.arrivals.size());
    // The trace's own rate, for the report (its arrivals are what is simulated).
    const double span = in.workload.arrivals.back();
    if (in.target_jobs_per_hour <= 0 && span > 0) {
      in.target_jobs_per_hour = static_cast<double>(in.workload.arrivals.size()) * 3600.0 / span;
    }
  }
  DMSRT_ASSIGN_OR_RETURN(PlanResult r, RunPlan(in));
  const nlohmann::json j = PlanJson(in, r);
  if (!o.out.empty()) DMSRT_RETURN_IF_ERROR(WriteText(o.out, "--out", j.dump(2) + "\n"));
  if (!o.svg.empty()) DMSRT_RETURN_IF_ERROR(WriteText(o.svg, "--svg", PlanSvg(in, r)));
  if (o.json) {
    std::cout << j.dump() << std::endl;
  } else {
    std::cout << PlanTable(in, r) << std::flush;
  }
  if (r.winner < 0) return absl::FailedPreconditionError(r.answer);
  return absl::OkStatus();
}

}  // namespace

void SetupPlan(CLI::App& app, PlanCommandOptions& o) {
  app.add_option("--model", o.model,
                 "model file or directory, or a synthetic model name (qwen3-8b, ...) for its shapes")
      ->type_name("PATH|NAME");
  app.add_option("--step-scale", o.step_scale,
                 "multiply every step time of the measured profile by this (a measured overhead of "
                 "the serving process over bench's engine alone; marked in the provenance)")
      ->check(CLI::Range(0.1, 10.0));
  app.add_option("--step-scale-trace", o.step_scale_trace,
                 "with --replicas and --trace: also multiply each step's time by the factor of "
                 "this file at the step's start (lines 'FROM_SECONDS FACTOR' on the trace's "
                 "clock): a replay of a run whose machine changed speed during it")
      ->type_name("FILE")
      ->check(CLI::ExistingFile);
  app.add_option("--profile", o.profile,
                 "(required) a profile written by `dmsrt bench --out`, or a datasheet: h100-sxm, h200")
      ->type_name("FILE|NAME");
  app.add_option("--nodes", o.nodes, "nodes")->transform(Integer(1));
  app.add_option("--gpus", o.gpus, "GPUs per node (CPU profile: replica processes per node)")
      ->transform(Integer(1));
  app.add_option("--tp", o.tp, "tensor-parallel degrees to consider")
      ->delimiter(',')
      ->check(CLI::Range(1, 64));
  app.add_option("--evict", o.evict,
                 "DMS eviction rates to consider (0 = dense; a measured rate from `dmsrt eval`, or "
                 "a stated one: 0.875 is 8x compression)")
      ->delimiter(',')
      ->check(CLI::Range(0.0, 0.99));
  app.add_option("--dms-window", o.dms_window, "DMS delay window (tokens)")->transform(Integer(1));
  app.add_option("--n", o.n, "threads per job (best-of-N)")->transform(Integer(1, 1024));
  app.add_option("--prompt", o.prompt, "prompt length: fixed:N, uniform:A:B or lognormal:MEDIAN:SIGMA");
  app.add_option("--reasoning", o.reasoning, "generated length, same forms");
  app.add_option("--max-prompt", o.max_prompt, "prompt lengths are clipped to this")
      ->transform(Integer(1));
  app.add_option("--max-tokens", o.max_tokens, "generated lengths are clipped to this")
      ->transform(Integer(1));
  app.add_flag("--per-thread-lengths", o.per_thread_lengths,
               "every thread draws its own length (stragglers); default: one length per job");
  app.add_option("--rate", o.rate, "target jobs per hour (0: report each deployment's capacity)")
      ->transform(Number(0.0));
  app.add_option("--slo", o.slo, "job latency SLO: pPCT=SECONDS");
  app.add_option("--jobs", o.jobs, "jobs per simulated run")->transform(Integer(10));
  app.add_option("--seed", o.seed, "seed of arrivals and lengths")->transform(Integer(0));
  AddByteSizeOption(app, "--kv-budget", &o.kv_budget_bytes,
                    "CPU profiles: KV bytes per rank (as serve --kv-budget)", "256MiB");
  app.add_option("--kv-block", o.kv_block, "KV block size in token slots")->transform(Integer(1, 4096));
  app.add_option("--prefill-chunk", o.prefill_chunk, "prefill tokens per step (serve's --prefill-chunk)")->transform(Integer(1));
  app.add_option("--max-threads", o.max_threads, "resident threads per replica at most")
      ->transform(Integer(1));
  app.add_option("--search-steps", o.search_steps, "bisection rounds of the capacity search")
      ->transform(Integer(1, 30));
  app.add_option("--replicas", o.replicas,
                 "no search: predict this many replicas of each deployment at --rate")
      ->transform(Integer(0));
  app.add_option("--trace", o.trace,
                 "with --replicas: simulate these jobs (lines 'ARRIVAL_S [PROMPT GENERATED]', as "
                 "tests/bench/loadgen.py --write-trace writes them) instead of drawing them")
      ->type_name("FILE");
  app.add_option("--check-steps", o.check_steps,
                 "plan nothing: predict each step these `serve --step-log` files logged from the "
                 "profile (times --step-scale) and print measured against predicted time by kind "
                 "of step")
      ->type_name("FILE...")
      ->check(CLI::ExistingFile);
  app.add_option("--step-log", o.step_log,
                 "with --replicas (one --tp, one --evict): write every simulated step here in the "
                 "columns `serve --step-log` writes, end_s on the simulated clock from the "
                 "trace's 0, to lay the prediction's timeline beside a real run's")
      ->type_name("FILE");
  app.add_flag("--step-by-step", o.step_by_step,
               "simulate one engine step at a time instead of advancing runs of decode steps "
               "between events as one (the same result, slower; for checking)");
  app.add_flag("--json", o.json, "print JSON instead of the table");
  app.add_option("--out", o.out, "also write the JSON here")->type_name("FILE");
  app.add_option("--svg", o.svg, "write the throughput-latency plot here")->type_name("FILE");
}

int RunPlanCommand(const PlanCommandOptions& o, ProcessArgs& args) {
  (void)args;
  absl::Status s = Plan(o);
  if (s.ok()) return 0;
  std::fprintf(stderr, "dmsrt plan: %s\n", std::string(s.message()).c_str());
  return 1;
}

}  // namespace dmsrt
