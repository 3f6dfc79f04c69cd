// Policy threshold (runtime/kv/policy_threshold.cc): the key-norm score it flags tokens by, and a
// process-wide observer of the scores it computes (threshold calibration, test dumps).
#pragma once

#include <cstdint>

namespace dmsrt {

// The importance score of one key (after RoPE): minus its L2 norm, as kvpress's KnormPress. A
// higher score means more important; a token whose score is below the threshold is flagged, so
// a large key norm means evict and the threshold is minus a norm (e.g. -20 flags keys with norm
// above 20).
float KeyNormScore(const float* k, int32_t head_dim);

class ThresholdScoreObserver {
 public:
  virtual ~ThresholdScoreObserver() = default;
  // flag(token) of (layer, global KV head) was decided: `score` against the threshold.
  virtual void Observe(int32_t layer, int32_t head, int64_t token, float score, bool flagged) = 0;
};

// Installs `observer` (nullptr removes it); the caller keeps it alive while installed. Calls are
// serialised. Without one, DMSRT_THRESHOLD_DUMP=FILE writes "layer head token score flag" lines
// to FILE (a test-only dump).
void SetThresholdScoreObserver(ThresholdScoreObserver* observer);

}  // namespace dmsrt
