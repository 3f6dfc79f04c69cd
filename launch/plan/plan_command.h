// The `dmsrt plan` subcommand's options (launch/plan/cmd_plan.cc).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "launch/cli.h"

namespace dmsrt {

struct PlanCommandOptions {
  std::string model;
  std::string profile;
  double step_scale = 1.0;
  std::string step_scale_trace;  // FILE: step times by time (trace.h's SpeedTrace)
  int32_t nodes = 1;
  int32_t gpus = 8;
  std::vector<int32_t> tp = {1};
  std::vector<double> evict = {0.0};
  int32_t dms_window = 256;
  int32_t n = 16;
  std::string prompt = "fixed:512";
  std::string reasoning = "fixed:1024";
  int64_t max_prompt = 4096;
  int64_t max_tokens = 8192;
  bool per_thread_lengths = false;
  double rate = 0.0;
  std::string slo = "p90=120";
  int64_t jobs = 200;
  int64_t seed = 1;
  int64_t kv_budget_bytes = 256ll << 20;
  int32_t kv_block = 16;
  int32_t prefill_chunk = 512;
  int32_t max_threads = 256;
  int32_t search_steps = 7;
  int32_t replicas = 0;
  std::string trace;
  std::vector<std::string> check_steps;  // serve --step-log files: check them, plan nothing
  bool step_by_step = false;
  std::string step_log;  // with --replicas: the simulated steps, as serve --step-log writes them
  bool json = false;
  std::string out, svg;
};
void SetupPlan(CLI::App& app, PlanCommandOptions& o);
int RunPlanCommand(const PlanCommandOptions& o, ProcessArgs& args);

}  // namespace dmsrt
