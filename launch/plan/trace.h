// Job traces shared by `dmsrt plan --trace` and the load generator (tests/bench/loadgen.py
// --trace / --write-trace), so that a prediction and a real run see the same jobs.
//
// Format: text, one job per line, in arrival order:
//     ARRIVAL_SECONDS [PROMPT_TOKENS GENERATED_TOKENS]
// separated by blanks; '#' starts a comment; blank lines are skipped. Arrival times are seconds
// from the start of the run and never decrease. Either every job carries its two lengths or none
// does (then the planner draws them from --prompt/--reasoning with --seed, as loadgen draws them
// from its own generator: different lengths, which is why loadgen writes them).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace dmsrt {

struct JobTrace {
  std::vector<double> arrivals;            // seconds, non-decreasing
  std::vector<int64_t> prompt_tokens;      // empty, or one per job (>= 1)
  std::vector<int64_t> generated_tokens;   // empty, or one per job (>= 1): max_tokens, EOS ignored
};

// Parses a trace; errors name the line and what is wrong.
absl::StatusOr<JobTrace> ParseJobTrace(const std::string& text, const std::string& name);
absl::StatusOr<JobTrace> ReadJobTrace(const std::string& path);

// A step-speed trace (`dmsrt plan --step-scale-trace`): how much slower (> 1) or faster than the
// profile a run's steps were, by time. One change per line, in time order:
//     FROM_SECONDS FACTOR
// (the factor holds from that time until the next line's; before the first line, the first
// factor). Times are on the job trace's clock. Used to replay a real run with the speed its
// machine had at each moment (tests/bench/plan_validation.py derives one from a run's step log),
// which separates the planner's error from a machine's drifting speed.
struct SpeedTrace {
  std::vector<double> from;    // seconds, increasing
  std::vector<double> factor;  // > 0, one per `from`
  double At(double seconds) const;
  // The largest factor at `seconds` or later (a bound on every later step's factor).
  double MaxFrom(double seconds) const;
  bool empty() const { return from.empty(); }
};
absl::StatusOr<SpeedTrace> ParseSpeedTrace(const std::string& text, const std::string& name);
absl::StatusOr<SpeedTrace> ReadSpeedTrace(const std::string& path);

}  // namespace dmsrt
