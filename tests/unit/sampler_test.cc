// Sampler: greedy ties, the sets kept by top-k / top-p / min-p, seeded reproducibility, the
// log-probability of the chosen token, the top-n log-probability listing, and the sampling
// distribution against the softmax with a fixed seed (chi-square bound).
#include "runtime/engine/sampler.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <random>
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

// Logits with ties, negative values and a spread like a model's, from a fixed seed.
std::vector<float> RandomLogits(int32_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, 3.0f);
  std::vector<float> l(vocab);
  for (float& x : l) x = d(rng);
  if (vocab > 10) l[7] = l[3];  // a tie the listing must order by id
  return l;
}

// log-softmax in double, independently of the sampler's code.
std::vector<double> LogSoftmax(const std::vector<float>& l) {
  double mx = -1e300;
  for (float x : l) mx = std::max(mx, static_cast<double>(x));
  double sum = 0.0;
  for (float x : l) sum += std::exp(static_cast<double>(x) - mx);
  std::vector<double> out;
  for (float x : l) out.push_back(static_cast<double>(x) - mx - std::log(sum));
  return out;
}

void ExpectValidListing(const std::vector<float>& l, const std::vector<TokenLogprob>& top,
                        size_t k) {
  const std::vector<double> ref = LogSoftmax(l);
  ASSERT_EQ(top.size(), k);
  std::set<int32_t> listed;
  double mass = 0.0;
  for (size_t i = 0; i < top.size(); ++i) {
    ASSERT_GE(top[i].token, 0);
    ASSERT_LT(top[i].token, static_cast<int32_t>(l.size()));
    EXPECT_TRUE(listed.insert(top[i].token).second) << "token " << top[i].token << " listed twice";
    EXPECT_NEAR(top[i].logprob, ref[top[i].token], 1e-5) << "entry " << i;
    EXPECT_LE(top[i].logprob, 0.0f);
    mass += std::exp(static_cast<double>(top[i].logprob));
    if (i > 0) {
      // Sorted descending; equal logits in id order.
      EXPECT_GE(top[i - 1].logprob, top[i].logprob) << "entry " << i;
      if (l[top[i - 1].token] == l[top[i].token]) {
        EXPECT_LT(top[i - 1].token, top[i].token);
      }
    }
  }
  EXPECT_LE(std::log(mass), 1e-6) << "the listed probabilities add up to more than 1";
  // Nothing left out is more likely than the last entry.
  const float last = l[top.back().token];
  for (int32_t id = 0; id < static_cast<int32_t>(l.size()); ++id) {
    if (!listed.count(id)) {
      EXPECT_LE(l[id], last) << "token " << id << " should be listed";
    }
  }
}

TEST(Sampler, TopLogprobs_vocab111_k1_5_20_SortedAndExact) {
  const std::vector<float> l = RandomLogits(111, 17);
  for (int32_t k : {1, 5, 20}) {
    std::vector<TokenLogprob> top;
    TopLogprobs(l.data(), 111, k, &top);
    ExpectValidListing(l, top, static_cast<size_t>(k));
  }
}

TEST(Sampler, TopLogprobs_GreedyChosenTokenIsFirstWithTheSameLogprob) {
  for (int32_t vocab : {19, 1000, 49152}) {
    const std::vector<float> l = RandomLogits(vocab, 3 + vocab);
    Sampler g(SamplingParams{});
    float lp = 1.0f;
    std::vector<TokenLogprob> top;
    const int32_t tok = g.Sample(l.data(), vocab, &lp, 20, &top);
    ExpectValidListing(l, top, std::min<size_t>(20, vocab));  // 19: the whole vocabulary
    EXPECT_EQ(top[0].token, tok) << "vocab " << vocab;
    EXPECT_EQ(top[0].logprob, lp) << "vocab " << vocab;  // the same float, not merely close
  }
  // Ties: greedy takes the lowest id, and so does the listing's first entry.
  const std::vector<float> tied = {0.5f, 2.0f, -1.0f, 2.0f, 2.0f};
  Sampler g(SamplingParams{});
  float lp = 0;
  std::vector<TokenLogprob> top;
  EXPECT_EQ(g.Sample(tied.data(), 5, &lp, 3, &top), 1);
  ASSERT_EQ(top.size(), 3u);
  EXPECT_EQ(top[0].token, 1);
  EXPECT_EQ(top[1].token, 3);
  EXPECT_EQ(top[2].token, 4);
  EXPECT_EQ(top[0].logprob, lp);
}

TEST(Sampler, TopLogprobs_SameListingWhateverTheSamplingSettings) {
  // The listing is the model's distribution: temperature, top-k and top-p change the draw only.
  const std::vector<float> l = RandomLogits(1000, 5);
  std::vector<TokenLogprob> greedy;
  TopLogprobs(l.data(), 1000, 8, &greedy);
  SamplingParams p;
  p.temperature = 0.4f;
  p.top_k = 50;
  p.top_p = 0.9f;
  p.seed = 9;
  Sampler s(p);
  for (int i = 0; i < 50; ++i) {
    float lp = 0;
    std::vector<TokenLogprob> top;
    const int32_t tok = s.Sample(l.data(), 1000, &lp, 8, &top);
    ASSERT_EQ(top.size(), greedy.size());
    for (size_t j = 0; j < top.size(); ++j) {
      EXPECT_EQ(top[j].token, greedy[j].token);
      EXPECT_EQ(top[j].logprob, greedy[j].logprob);
      if (top[j].token == tok) {
        EXPECT_EQ(top[j].logprob, lp) << "the chosen token's two figures differ";
      }
    }
  }
}

TEST(Sampler, TopLogprobs_MoreThanTheVocabularyListsItAll) {
  const std::vector<float> l = {1.0f, -2.0f, 0.25f};
  std::vector<TokenLogprob> top;
  TopLogprobs(l.data(), 3, 20, &top);
  ExpectValidListing(l, top, 3);
  double mass = 0.0;
  for (const TokenLogprob& t : top) mass += std::exp(static_cast<double>(t.logprob));
  EXPECT_NEAR(mass, 1.0, 1e-6);  // the whole distribution
}

TEST(Sampler, TopLogprobs_NotAskedComputesNothingAndSkipsNan) {
  const std::vector<float> l = RandomLogits(50, 2);
  Sampler g(SamplingParams{});
  std::vector<TokenLogprob> top = {{1, -1.0f}};
  float lp = 0;
  g.Sample(l.data(), 50, &lp, 0, &top);
  EXPECT_TRUE(top.empty());
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const std::vector<float> with_nan = {nan, 1.0f, nan, 3.0f, 2.0f};
  TopLogprobs(with_nan.data(), 5, 5, &top);
  ASSERT_EQ(top.size(), 3u);
  EXPECT_EQ(top[0].token, 3);
  EXPECT_EQ(top[1].token, 4);
  EXPECT_EQ(top[2].token, 1);
}

}  // namespace
}  // namespace dmsrt
