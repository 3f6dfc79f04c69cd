// Token sampling on the device: one token per row, logits never leave the device in bulk.
//
// Per row: temperature 0 -> argmax (ties to the lowest id). Otherwise z = logit / temperature and
// the kept set is the intersection of three "top by value" sets:
//   top-k  (top_k > 0 and < vocab): values >= the k-th largest z
//   top-p  (0 < top_p < 1): the smallest top set of the top-k set whose probability mass is at
//          least top_p of the top-k set's mass
//   min-p  (min_p > 0): z >= max(z) + log(min_p)      (p >= min_p * p_max)
// Ties at a threshold are all kept. Masses are fixed-point integers (exp(z - max) * 2^40,
// truncated), so every sum is exact and independent of summation order: the same seed gives the
// same token on every run. The draw is u = CounterUniform(seed, counter) in [0, 1); the token is
// the first id (in id order) whose cumulative kept mass exceeds floor(u * kept mass).
// kernels/reference/sampling_ref.h implements the same rule on the host.
//
//   logits   [rows, ld] fp32
//   params   [rows]     device array
//   tokens   [rows]     int32 out
//   logprobs [rows]     optional fp32 out: log-softmax of the raw logits at the chosen token
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/reference/sampling_ref.h"

namespace dmsrt {

// {temperature, top_k, top_p, min_p, seed, counter}: shared with the host reference.
using DeviceSamplingParams = kernels::SamplingRowParams;

cudaError_t SampleTokens(const float* logits, int32_t rows, int32_t vocab, int32_t ld,
                         const DeviceSamplingParams* params, int32_t* tokens, float* logprobs,
                         cudaStream_t stream);

}  // namespace dmsrt
