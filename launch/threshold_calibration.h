// --threshold-rate: the threshold of the threshold KV policy that flags a target share of tokens,
// taken from the key-norm scores of a calibration text.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/backend/backend.h"
#include "runtime/model/model.h"
#include "runtime/tokenizer/tokenizer.h"

namespace dmsrt {

// A short public-domain English text (the Gettysburg Address, 1863), the default calibration text.
const char* DefaultCalibrationText();

struct ThresholdCalibration {
  double threshold = 0.0;
  int64_t tokens = 0;  // calibration tokens
  int64_t scores = 0;  // scores the quantile was taken over (tokens x layers x KV heads)
};

// The key-norm scores of every (layer, KV head, token) of `text` run through `model` on the CPU
// backend with nothing evicted, sorted ascending. They depend on the policy's shift (in
// `options`), not on its window or threshold, so one collection serves every rate.
struct CalibrationScores {
  std::vector<float> sorted;
  int64_t tokens = 0;  // calibration tokens
};
absl::StatusOr<CalibrationScores> CollectCalibrationScores(const Model& model,
                                                           const Tokenizer& tokenizer,
                                                           const BackendOptions& options,
                                                           const std::string& text);

// The global `rate`-quantile of the scores: the threshold under which that share of them falls.
// One threshold for all layers and heads, as the policy takes one.
absl::StatusOr<ThresholdCalibration> ThresholdAtRate(const CalibrationScores& scores, double rate);

// Both in one: the threshold of --threshold-rate `rate` on `text`.
absl::StatusOr<ThresholdCalibration> CalibrateThreshold(const Model& model,
                                                        const Tokenizer& tokenizer,
                                                        const BackendOptions& options,
                                                        double rate, const std::string& text);

}  // namespace dmsrt
