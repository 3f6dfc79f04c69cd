// Sampler: greedy ties, the sets kept by top-k / top-p / min-p, seeded reproducibility, the
// log-probability of the chosen token, and the sampling distribution against the softmax with a
// fixed seed (chi-square bound).
#include "runtime/engine/sampler.h"

#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <set>
#include <vector>

namespace dmsrt {
namespace {

std::set<int32_t> Support(const SamplingParams& p, const std::vector<float>& logits, int draws) {
  Sampler s(p);
  std::set<int32_t> seen;
  for (int i = 0; i < draws; ++i) seen.insert(s.Sample(logits.data(), static_cast<int32_t>(logits.size())));
  return seen;
}

TEST(Sampler, GreedyTakesLowestIdOnTies) {
  const std::vector<float> l = {0.5f, 2.0f, -1.0f, 2.0f, 2.0f};
  Sampler s(SamplingParams{});
  EXPECT_EQ(s.Sample(l.data(), 5), 1);
  const std::vector<float> all_equal(7, 3.0f);
  EXPECT_EQ(s.Sample(all_equal.data(), 7), 0);
}

TEST(Sampler, LogprobIsUnscaledSoftmax) {
  const std::vector<float> l = {1.0f, 2.0f, 3.0f};
  double z = std::exp(1.0) + std::exp(2.0) + std::exp(3.0);
  Sampler g(SamplingParams{});
  float lp = 0;
  EXPECT_EQ(g.Sample(l.data(), 3, &lp), 2);
  EXPECT_NEAR(lp, 3.0 - std::log(z), 1e-6);
  // At temperature 0.3 the draw is sharper, but the reported logprob stays at temperature 1.
  SamplingParams p;
  p.temperature = 0.3f;
  p.seed = 1;
  Sampler s(p);
  for (int i = 0; i < 20; ++i) {
    const int32_t t = s.Sample(l.data(), 3, &lp);
    EXPECT_NEAR(lp, l[t] - std::log(z), 1e-6);
  }
}

TEST(Sampler, TopKKeepsTheKLargest) {
  std::vector<float> l(1000);
  for (int i = 0; i < 1000; ++i) l[i] = static_cast<float>((i * 37) % 1000) * 0.001f;
  SamplingParams p;
  p.temperature = 5.0f;  // flat, so every survivor shows up
  p.top_k = 3;
  p.seed = 3;
  const auto seen = Support(p, l, 400);
  std::set<int32_t> expect;
  for (int i = 0; i < 1000; ++i) {
    if ((i * 37) % 1000 >= 997) expect.insert(i);
  }
  EXPECT_EQ(seen, expect);
  // top_k = 1 is greedy whatever the temperature, ties to the lowest id.
  std::vector<float> t = {1.0f, 4.0f, 4.0f, 0.0f};
  p.top_k = 1;
  EXPECT_EQ(Support(p, t, 50), std::set<int32_t>({1}));
}

TEST(Sampler, TopPKeepsTheSmallestPrefixReachingP) {
  // Probabilities 0.5, 0.25, 0.125, 0.0625, 0.0625.
  const std::vector<float> l = {std::log(0.0625f), std::log(0.5f), std::log(0.125f),
                                std::log(0.25f), std::log(0.0625f)};
  SamplingParams p;
  p.temperature = 1.0f;
  p.seed = 5;
  p.top_p = 0.7f;  // 0.5 < 0.7 <= 0.75: ids 1 and 3
  EXPECT_EQ(Support(p, l, 400), std::set<int32_t>({1, 3}));
  p.top_p = 0.8f;  // 0.75 < 0.8 <= 0.875: adds id 2
  EXPECT_EQ(Support(p, l, 600), std::set<int32_t>({1, 2, 3}));
  p.top_p = 0.3f;  // the first token alone
  EXPECT_EQ(Support(p, l, 100), std::set<int32_t>({1}));
}

TEST(Sampler, TopPOnALargeVocabulary) {
  // 150K tokens; a handful hold most of the mass, so the growing-prefix path is exercised.
  std::vector<float> l(150000, -5.0f);
  for (int i = 0; i < 600; ++i) l[i * 211] = 3.0f - i * 0.001f;
  SamplingParams p;
  p.temperature = 1.0f;
  p.top_p = 0.9f;
  p.seed = 11;
  // The 600 big tokens hold about 0.9 of the mass, so the nucleus needs a prefix longer than the
  // first partial sort; the draws must be reproducible and in range.
  Sampler a(p), b(p);
  for (int i = 0; i < 50; ++i) {
    const int32_t x = a.Sample(l.data(), 150000);
    EXPECT_EQ(x, b.Sample(l.data(), 150000));
    ASSERT_GE(x, 0);
    ASSERT_LT(x, 150000);
  }
}

TEST(Sampler, MinPKeepsTokensNearTheMax) {
  // p relative to max: 1, 0.5, 0.2, 0.05.
  const std::vector<float> l = {std::log(0.2f), std::log(1.0f), std::log(0.05f), std::log(0.5f)};
  SamplingParams p;
  p.temperature = 1.0f;
  p.min_p = 0.3f;
  p.seed = 2;
  EXPECT_EQ(Support(p, l, 400), std::set<int32_t>({1, 3}));
  p.min_p = 0.1f;
  EXPECT_EQ(Support(p, l, 800), std::set<int32_t>({0, 1, 3}));
}

TEST(Sampler, SameSeedSameSequence) {
  std::vector<float> l(5000);
  for (int i = 0; i < 5000; ++i) l[i] = std::sin(i * 0.37f) * 4.0f;
  for (int k : {0, 40}) {
    SamplingParams p;
    p.temperature = 0.8f;
    p.top_k = k;
    p.top_p = 0.95f;
    p.seed = 1234;
    Sampler a(p), b(p);
    std::vector<int32_t> sa, sb;
    for (int i = 0; i < 200; ++i) {
      sa.push_back(a.Sample(l.data(), 5000));
      sb.push_back(b.Sample(l.data(), 5000));
    }
    EXPECT_EQ(sa, sb);
    p.seed = 1235;
    Sampler c(p);
    std::vector<int32_t> sc;
    for (int i = 0; i < 200; ++i) sc.push_back(c.Sample(l.data(), 5000));
    EXPECT_NE(sa, sc);
  }
}

TEST(Sampler, DistributionMatchesSoftmax) {
  const std::vector<float> l = {0.0f, 1.0f, 2.0f, 0.5f, -1.0f, 1.5f};
  const double temp = 0.7;
  std::vector<double> prob(l.size());
  double z = 0;
  for (size_t i = 0; i < l.size(); ++i) z += prob[i] = std::exp(l[i] / temp);
  for (auto& v : prob) v /= z;
  SamplingParams p;
  p.temperature = static_cast<float>(temp);
  p.seed = 99;
  Sampler s(p);
  const int draws = 60000;
  std::vector<int> count(l.size(), 0);
  for (int i = 0; i < draws; ++i) ++count[s.Sample(l.data(), static_cast<int32_t>(l.size()))];
  double chi2 = 0;
  for (size_t i = 0; i < l.size(); ++i) {
    const double e = prob[i] * draws;
    chi2 += (count[i] - e) * (count[i] - e) / e;
  }
  // 5 degrees of freedom: P(chi2 > 25) is about 1e-4.
  EXPECT_LT(chi2, 25.0);
}

TEST(Sampler, NanLogitsAreNeverDrawn) {
  std::vector<float> l = {std::nanf(""), 1.0f, std::nanf(""), 1.0f};
  SamplingParams p;
  p.temperature = 1.0f;
  p.seed = 4;
  const auto seen = Support(p, l, 200);
  EXPECT_EQ(seen, std::set<int32_t>({1, 3}));
  Sampler g(SamplingParams{});
  EXPECT_EQ(g.Sample(l.data(), 4), 1);
}

}  // namespace
}  // namespace dmsrt
