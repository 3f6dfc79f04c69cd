// Token sampling on the host: greedy, temperature, top-k, top-p, min-p, seeded.
//
// One Sampler per sequence (it owns the RNG state), so the same seed and the same logits give
// the same tokens whatever else runs in the batch.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "kernels/reference/sampling_ref.h"

namespace dmsrt {

// Log-probability listings carry at most this many alternatives per token (OpenAI's limit).
constexpr int32_t kMaxTopLogprobs = 20;

// One entry of a log-probability listing.
struct TokenLogprob {
  int32_t token = -1;
  float logprob = 0.0f;
};

struct SamplingParams {
  float temperature = 0.0f;  // 0 = greedy (argmax; ties go to the lowest id)
  int32_t top_k = 0;         // 0 = off
  float top_p = 1.0f;        // 1 = off
  float min_p = 0.0f;        // 0 = off; keeps tokens with p >= min_p * p_max
  uint64_t seed = 0;
};

// The same settings as the counter-based draw of a backend (SeqChunk::sample,
// kernels/reference/sampling_ref.h) for the token at position `counter`.
kernels::SamplingRowParams CounterSampling(const SamplingParams& p, uint64_t counter);

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params);
  // Picks a token from `logits` [vocab].
  //
  // Log-probabilities are always those of the model's own distribution: the log-softmax of the
  // logits as given (temperature 1, before top-k, min-p and top-p), whatever the sampling
  // settings, so they measure the model's confidence and every token has a finite one. If
  // `logprob` is not null it receives the chosen token's. If `top` is not null it receives the
  // min(top_n, vocab) most likely tokens under that same distribution (TopLogprobs), so under
  // greedy sampling the chosen token is (*top)[0] with exactly *logprob. top_n <= 0 computes
  // nothing and leaves *top empty.
  int32_t Sample(const float* logits, int32_t vocab, float* logprob = nullptr, int32_t top_n = 0,
                 std::vector<TokenLogprob>* top = nullptr);
  // Whether Sample(logits, vocab) returns the same token whatever its random draw: greedy, or
  // one token holding all of the probability (every other one's exp(logit - max) is exactly 0).
  // Then `*token` is that token. Filters only remove candidates, and the certain one is the
  // largest, so they cannot change it.
  bool Certain(const float* logits, int32_t vocab, int32_t* token) const;
  // Advances the random state as `calls` calls of Sample on a row with at least one finite logit
  // would: one draw each unless greedy. With Certain(), `calls` samples of a certain row are
  // Skip(calls) and the certain token `calls` times.
  void Skip(int64_t calls);
  const SamplingParams& params() const { return params_; }

 private:
  SamplingParams params_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int32_t>> scratch_;
};

// The min(n, vocab) most likely tokens of `logits` [vocab] with their log-softmax values (the
// distribution Sampler reports), sorted by (logprob desc, id asc), the order greedy sampling
// breaks ties in. NaN logits are never listed. One pass over the vocabulary plus the selection,
// O(vocab * n) at worst; n <= 0 gives an empty list.
void TopLogprobs(const float* logits, int32_t vocab, int32_t n, std::vector<TokenLogprob>* out);

}  // namespace dmsrt
