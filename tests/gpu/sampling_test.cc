// Device sampler against the host rule (kernels/reference/sampling_ref.h): greedy is exact; for
// sampled rows the token must be in the reference's kept set and the reference's cumulative kept
// mass must bracket the same draw target (up to expf rounding differences between host and
// device); the same seed gives the same tokens twice; log-probabilities match.
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "kernels/reference/sampling_ref.h"
#include "kernels/sampling.cuh"
#include "tests/gpu/gpu_test_util.h"

namespace dmsrt {
namespace {

using gpu_test::DeviceBuffer;

std::vector<kernels::SamplingRowParams> ParamMix(int rows) {
  std::vector<kernels::SamplingRowParams> out;
  for (int r = 0; r < rows; ++r) {
    kernels::SamplingRowParams p;
    p.seed = 1000 + r;
    p.counter = 7 * r + 3;
    switch (r % 8) {
      case 0: p.temperature = 0.f; break;                                  // greedy
      case 1: p.temperature = 1.f; break;                                  // plain
      case 2: p.temperature = 0.7f; p.top_k = 1 + r; break;                // top-k
      case 3: p.temperature = 1.f; p.top_p = 0.9f; break;                  // top-p
      case 4: p.temperature = 0.6f; p.top_k = 20; p.top_p = 0.95f; break;  // Qwen3 thinking
      case 5: p.temperature = 1.2f; p.min_p = 0.05f; break;                // min-p
      case 6: p.temperature = 0.8f; p.top_k = 50; p.top_p = 0.8f; p.min_p = 0.1f; break;
      case 7: p.temperature = 2.f; p.top_k = 1; break;                     // degenerate top-k
    }
    out.push_back(p);
  }
  return out;
}

class SampleTokens : public testing::TestWithParam<int> {};

TEST_P(SampleTokens, FollowsReferenceRule) {
  DMSRT_REQUIRE_GPU();
  const int vocab = GetParam();
  const int rows = 24;
  std::mt19937 rng(21 + vocab);
  std::normal_distribution<float> nd(0.f, 3.f);
  std::vector<float> logits(static_cast<size_t>(rows) * vocab);
  for (auto& x : logits) x = nd(rng);
  const auto params = ParamMix(rows);
  DeviceBuffer<float> dl(logits), dlp(rows);
  DeviceBuffer<kernels::SamplingRowParams> dp(params);
  DeviceBuffer<int32_t> dt(rows);
  dt.Poison(gpu_test::kPoisonInt);
  dlp.Poison(gpu_test::kPoisonFloat);
  ASSERT_CUDA_OK(::dmsrt::SampleTokens(dl.get(), rows, vocab, vocab, dp.get(), dt.get(), dlp.get(), nullptr));
  const auto tokens = dt.Download();
  const auto logprobs = dlp.Download();
  // Same seeds, same tokens.
  dt.Poison(gpu_test::kPoisonInt);
  ASSERT_CUDA_OK(::dmsrt::SampleTokens(dl.get(), rows, vocab, vocab, dp.get(), dt.get(), nullptr, nullptr));
  EXPECT_EQ(dt.Download(), tokens);

  for (int r = 0; r < rows; ++r) {
    SCOPED_TRACE("row " + std::to_string(r) + " vocab " + std::to_string(vocab));
    const float* row = logits.data() + static_cast<size_t>(r) * vocab;
    const int tok = tokens[r];
    ASSERT_GE(tok, 0);
    ASSERT_LT(tok, vocab);
    EXPECT_NEAR(logprobs[r], kernels::LogProbRef(row, vocab, tok), 1e-3);
    if (params[r].temperature == 0.f) {
      EXPECT_EQ(tok, kernels::SampleRowRef(row, vocab, params[r]));
      continue;
    }
    const auto w = kernels::SamplingKeptWeightsRef(row, vocab, params[r]);
    ASSERT_GT(w[tok], 0u) << "token outside the kept set";
    uint64_t target = 0;
    kernels::SampleRowRef(row, vocab, params[r], &target);
    uint64_t total = 0, before = 0;
    for (int i = 0; i < vocab; ++i) {
      if (i < tok) before += w[i];
      total += w[i];
    }
    const double tol = 1e-5 * static_cast<double>(total);
    EXPECT_LE(static_cast<double>(before), static_cast<double>(target) + tol);
    EXPECT_GT(static_cast<double>(before + w[tok]) + tol, static_cast<double>(target));
    if (params[r].top_k == 1) {
      EXPECT_EQ(tok, kernels::SampleRowRef(row, vocab, kernels::SamplingRowParams{}));
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Vocab, SampleTokens, testing::Values(19, 1000, 49152, 151936),
                         [](const testing::TestParamInfo<int>& i) {
                           return "vocab" + std::to_string(i.param);
                         });

TEST(SampleTokensStats, FrequenciesFollowProbabilities) {
  DMSRT_REQUIRE_GPU();
  // One small distribution drawn 4096 times (different counters): empirical vs exact.
  const int vocab = 8, rows = 4096;
  const std::vector<float> base = {2.f, 1.f, 0.5f, 0.f, -1.f, 1.5f, -3.f, 0.25f};
  std::vector<float> logits;
  std::vector<kernels::SamplingRowParams> params(rows);
  for (int r = 0; r < rows; ++r) {
    logits.insert(logits.end(), base.begin(), base.end());
    params[r].temperature = 1.f;
    params[r].seed = 42;
    params[r].counter = r;
  }
  DeviceBuffer<float> dl(logits);
  DeviceBuffer<kernels::SamplingRowParams> dp(params);
  DeviceBuffer<int32_t> dt(rows);
  dt.Poison(gpu_test::kPoisonInt);
  ASSERT_CUDA_OK(::dmsrt::SampleTokens(dl.get(), rows, vocab, vocab, dp.get(), dt.get(), nullptr, nullptr));
  const auto tokens = dt.Download();
  std::vector<int> count(vocab, 0);
  for (int t : tokens) {
    ASSERT_GE(t, 0);
    ASSERT_LT(t, vocab);
    ++count[t];
  }
  double z = 0;
  for (float x : base) z += std::exp(x);
  for (int i = 0; i < vocab; ++i) {
    const double p = std::exp(base[i]) / z;
    const double sd = std::sqrt(rows * p * (1 - p));
    EXPECT_NEAR(count[i], rows * p, 5 * sd + 1) << "id " << i;
  }
}

}  // namespace
}  // namespace dmsrt
