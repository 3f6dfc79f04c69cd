// --threshold-rate: the threshold of the threshold KV policy that flags a target share of tokens,
// taken from the key-norm scores of a calibration text.
#pragma once

#include <string>

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

// Runs `text` through `model` on the CPU backend (nothing evicted) and returns the global
// `rate`-quantile of every (layer, KV head, token) key-norm score: the threshold under which
// that share of the calibration scores falls. One threshold for all layers and heads, as the
// policy takes one. `options` supplies threads and the policy's window and shift.
absl::StatusOr<ThresholdCalibration> CalibrateThreshold(const Model& model,
                                                        const Tokenizer& tokenizer,
                                                        const BackendOptions& options,
                                                        double rate, const std::string& text);

}  // namespace dmsrt
