// A real run's engine steps against the planner's step-time model: `dmsrt plan --profile P
// --check-steps LOG...` reads the CSV lines `dmsrt serve --step-log` writes (decode rows, prefill
// tokens, the decode rows' KV tokens, sampled rows, retries, seconds; newer logs add end_s, when
// the step ended, which the check validates and leaves to timeline tools), predicts each step with
// the profile's StepCosts::Seconds (what the simulator advances its clock by) and sums measured
// and predicted time by kind of step, so that the terms the model gets wrong show up.
#pragma once

#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/status/statusor.h"
#include "launch/plan/profile.h"
#include "runtime/engine/engine.h"

namespace dmsrt {

struct StepGroup {
  std::string kind;  // "decode 1-4" .. "decode >32", "prefill only", "mixed"
  int64_t steps = 0;
  double measured_s = 0.0;
  double predicted_s = 0.0;
};

struct StepCheck {
  std::vector<StepGroup> groups;  // in the order above; kinds without steps left out
  StepGroup all;
};

// Reads the logs (a header line, repeated by later serves appending to the same file, and a
// last line still being written are skipped); an unreadable file or a malformed line is an
// error naming the file and line.
absl::StatusOr<StepCheck> CheckSteps(const StepCosts& costs, const std::vector<std::string>& logs);

// The step log's format, as `serve --step-log` (a real run) and `plan --step-log` (a simulated
// one) write it: the header, then one line per step with end_s the seconds since the log opened
// (serve) or on the simulated clock (plan).
inline constexpr char kStepLogHeader[] =
    "decode_rows,prefill_tokens,kv_tokens,sampled_rows,retries,seconds,end_s\n";
void WriteStepLogLine(std::FILE* f, const StepShape& s, double seconds, double end_s);
using StepLogFile = std::unique_ptr<std::FILE, int (*)(std::FILE*)>;
// Opens `path` with fopen's `mode` ("a": serve, whose restarts append; "w": plan) and writes the
// header; the error names the option and the path.
absl::StatusOr<StepLogFile> OpenStepLog(const std::string& path, const char* mode);

std::string StepCheckTable(const StepCheck& c);
nlohmann::json StepCheckJson(const StepCheck& c);

}  // namespace dmsrt
