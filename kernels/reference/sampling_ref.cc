// Host reference of the device sampler: sorts instead of radix selection, same thresholds.
#include "kernels/reference/sampling_ref.h"

#include <algorithm>
#include <cmath>

namespace dmsrt {
namespace kernels {
namespace {

int32_t Argmax(const float* x, int32_t n) {
  int32_t best = 0;
  for (int32_t i = 1; i < n; ++i) {
    if (x[i] > x[best]) best = i;
  }
  return best;
}

uint64_t Weight(float z, float m) {
  return static_cast<uint64_t>(static_cast<double>(std::exp(z - m)) * kSamplingMassScale);
}

}  // namespace

std::vector<uint64_t> SamplingKeptWeightsRef(const float* logits, int32_t vocab,
                                             const SamplingRowParams& p) {
  if (!(p.temperature > 0.f)) return {};
  const float inv_t = 1.f / p.temperature;
  std::vector<float> z(vocab);
  for (int32_t i = 0; i < vocab; ++i) z[i] = logits[i] * inv_t;
  const float m = logits[Argmax(logits, vocab)] * inv_t;
  std::vector<uint32_t> keys(vocab);
  for (int32_t i = 0; i < vocab; ++i) keys[i] = SamplingKey(z[i]);
  std::vector<uint32_t> sorted = keys;
  std::sort(sorted.begin(), sorted.end(), std::greater<uint32_t>());

  uint32_t tau = 0;
  if (p.min_p > 0.f) tau = SamplingKey(m + std::log(p.min_p));
  uint32_t k_floor = 0;
  if (p.top_k > 0 && p.top_k < vocab) {
    k_floor = sorted[p.top_k - 1];
    tau = std::max(tau, k_floor);
  }
  if (p.top_p > 0.f && p.top_p < 1.f) {
    // Weights by key, descending; mass of the top-k set first.
    std::vector<std::pair<uint32_t, uint64_t>> kw;
    uint64_t mk = 0;
    for (int32_t i = 0; i < vocab; ++i) {
      if (keys[i] >= k_floor) {
        kw.push_back({keys[i], Weight(z[i], m)});
        mk += kw.back().second;
      }
    }
    std::sort(kw.begin(), kw.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
    uint64_t need = static_cast<uint64_t>(
        std::ceil(static_cast<double>(p.top_p) * static_cast<double>(mk)));
    if (need < 1) need = 1;
    // Cumulative mass over groups of equal keys; the first group that reaches `need`.
    uint64_t c = 0;
    uint32_t tp = kw.back().first;
    for (size_t i = 0; i < kw.size();) {
      size_t j = i;
      while (j < kw.size() && kw[j].first == kw[i].first) c += kw[j++].second;
      if (c >= need) {
        tp = kw[i].first;
        break;
      }
      i = j;
    }
    tau = std::max(tau, tp);
  }
  std::vector<uint64_t> w(vocab, 0);
  for (int32_t i = 0; i < vocab; ++i) {
    if (keys[i] >= tau) w[i] = Weight(z[i], m);
  }
  return w;
}

int32_t SampleRowRef(const float* logits, int32_t vocab, const SamplingRowParams& p,
                     uint64_t* target_out) {
  if (!(p.temperature > 0.f)) return Argmax(logits, vocab);
  const std::vector<uint64_t> w = SamplingKeptWeightsRef(logits, vocab, p);
  uint64_t total = 0;
  for (uint64_t x : w) total += x;
  const double u = CounterUniform(p.seed, p.counter);
  uint64_t target = static_cast<uint64_t>(u * static_cast<double>(total));
  if (target >= total) target = total - 1;
  if (target_out != nullptr) *target_out = target;
  uint64_t c = 0;
  for (int32_t i = 0; i < vocab; ++i) {
    c += w[i];
    if (w[i] > 0 && c > target) return i;
  }
  return Argmax(logits, vocab);
}

float LogProbRef(const float* logits, int32_t vocab, int32_t token) {
  const float m = logits[Argmax(logits, vocab)];
  double s = 0;
  for (int32_t i = 0; i < vocab; ++i) s += std::exp(static_cast<double>(logits[i]) - m);
  return static_cast<float>(logits[token] - m - std::log(s));
}

}  // namespace kernels
}  // namespace dmsrt
