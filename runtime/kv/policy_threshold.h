// Policy threshold (runtime/kv/policy_threshold.cc): the key-norm score it flags tokens by, and a
// process-wide observer of the scores it computes (threshold calibration, test dumps).
#pragma once

#include <cstdint>

namespace dmsrt {

// The delay window of the threshold policy when none is given. Measured (docs/quality.md, "The
// threshold policy's delay window"): on 4096 held-out tokens, at equal cache CR, the KL of
// key-norm eviction falls with every doubling of the window from 16 to 256 (at about 4x: 0.214,
// 0.156, 0.106, 0.065, 0.036). A window w caps the cache CR at about L / w, so 256 still reaches
// 8x from about 2.3K tokens on; kvpress's DMSPress defaults to 128.
inline constexpr int32_t kThresholdDefaultWindow = 256;

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
