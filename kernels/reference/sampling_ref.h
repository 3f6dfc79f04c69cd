// Host reference of the device sampler (kernels/sampling.cuh), and the pieces both share: the
// per-row parameters, the counter-based uniform draw and the order-preserving float key.
//
// The rule: temperature 0 -> argmax (lowest id on ties). Otherwise z = logit * (1/temperature);
// kept = top-k ∩ top-p (on the top-k set) ∩ min-p, each a "value >= threshold" set, ties kept;
// masses are exp(z - max z) * 2^40 truncated to integers; the token is the first id whose
// cumulative kept mass exceeds floor(u * kept mass), u = CounterUniform(seed, counter).
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels/reference/random_hash.h"

#if defined(__CUDACC__)
#define DMSRT_HOST_DEVICE __host__ __device__
#else
#define DMSRT_HOST_DEVICE
#endif

namespace dmsrt {
namespace kernels {

struct SamplingRowParams {
  float temperature = 0.f;  // 0 = greedy
  int32_t top_k = 0;        // 0 = off
  float top_p = 1.f;        // 1 = off
  float min_p = 0.f;        // 0 = off
  uint64_t seed = 0;
  uint64_t counter = 0;     // e.g. the position of the token being sampled
};

constexpr double kSamplingMassScale = 1099511627776.0;  // 2^40

// SplitMix64 finaliser of (seed, counter): 53 random bits -> [0, 1).
DMSRT_HOST_DEVICE inline double CounterUniform(uint64_t seed, uint64_t counter) {
  const uint64_t z = SplitMixFinalize(seed + kSplitMixGamma * (counter + 1));
  return static_cast<double>(z >> 11) * (1.0 / 9007199254740992.0);
}

// Monotonic map float -> uint32 (a < b  <=>  key(a) < key(b) for non-NaN values).
DMSRT_HOST_DEVICE inline uint32_t SamplingKey(float z) {
  uint32_t u;
#if defined(__CUDA_ARCH__)
  u = __float_as_uint(z);
#else
  std::memcpy(&u, &z, 4);
#endif
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Kept weights of one row: weights[i] = fixed-point mass of id i, 0 when filtered out. Empty for
// greedy rows.
std::vector<uint64_t> SamplingKeptWeightsRef(const float* logits, int32_t vocab,
                                             const SamplingRowParams& p);

// The token the rule picks. `target_out` (optional) receives floor(u * kept mass).
int32_t SampleRowRef(const float* logits, int32_t vocab, const SamplingRowParams& p,
                     uint64_t* target_out = nullptr);

// log-softmax of the raw logits at `token`.
float LogProbRef(const float* logits, int32_t vocab, int32_t token);

}  // namespace kernels
}  // namespace dmsrt
