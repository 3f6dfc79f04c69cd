// Token sampling on the host: greedy, temperature, top-k, top-p, min-p, seeded.
//
// One Sampler per sequence (it owns the RNG state), so the same seed and the same logits give
// the same tokens whatever else runs in the batch.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

namespace dmsrt {

struct SamplingParams {
  float temperature = 0.0f;  // 0 = greedy (argmax; ties go to the lowest id)
  int32_t top_k = 0;         // 0 = off
  float top_p = 1.0f;        // 1 = off
  float min_p = 0.0f;        // 0 = off; keeps tokens with p >= min_p * p_max
  uint64_t seed = 0;
};

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params);
  // Picks a token from `logits` [vocab]. If `logprob` is not null it receives the log-probability
  // of the chosen token under the unfiltered softmax at temperature 1.
  int32_t Sample(const float* logits, int32_t vocab, float* logprob = nullptr);
  // Whether Sample(logits, vocab) returns the same token whatever its random draw: greedy, or
  // one token holding all of the probability (every other one's exp(logit - max) is exactly 0).
  // Then `*token` is that token. Filters only remove candidates, and the certain one is the
  // largest, so they cannot change it.
  bool Certain(const float* logits, int32_t vocab, int32_t* token) const;
  // Advances the random state as `calls` calls of Sample on a row with at least one finite logit
  // would: one draw each unless greedy. With Certain(), `calls` samples of a certain row are
  // Skip(calls) and the certain token `calls` times.
  void Skip(int64_t calls);

 private:
  SamplingParams params_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int32_t>> scratch_;
};

}  // namespace dmsrt
