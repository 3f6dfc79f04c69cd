// Token sampler: greedy, temperature, top-k, top-p, min-p with a per-sequence seeded
// mt19937_64.
//
// Order of filters (the Hugging Face / vLLM convention): logits are divided by the temperature,
// then top-k keeps the k largest, min-p keeps tokens with p >= min_p * p_max, top-p keeps the
// smallest prefix of the remaining tokens (by descending probability) whose mass reaches top_p,
// and one token is drawn from what is left, renormalised. Candidates are ordered by (logit desc,
// id asc), so equal inputs give equal outputs on every platform: the uniform draw is built from
// the raw 64-bit engine output rather than std::uniform_real_distribution, whose algorithm is
// library-specific.
//
// Vocabularies reach 150K: top-k uses nth_element, top-p sorts a growing prefix only until it
// holds the required mass, and plain temperature sampling needs no sort at all.
//
// Log-probabilities (the chosen token's, and the top-n listing when asked) come from the raw
// logits, not from the filtered and tempered distribution the draw uses: that is what vLLM
// reports by default (its "raw_logprobs") and what the best-of-N selection by mean
// log-probability needs, a figure of the model that does not move with the sampling settings.
// The listing costs one extra pass over the vocabulary, and nothing when it is not asked for.
#include "runtime/engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace dmsrt {

namespace {

// (logit desc, id asc): a strict weak order that breaks ties towards the lower id.
inline bool Before(const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
  if (a.first != b.first) return a.first > b.first;
  return a.second < b.second;
}

int32_t Argmax(const float* logits, int32_t vocab) {
  int32_t best = 0;
  float bv = -std::numeric_limits<float>::infinity();
  for (int32_t i = 0; i < vocab; ++i) {
    if (logits[i] > bv) {  // strict: ties keep the lowest id; NaN never wins
      bv = logits[i];
      best = i;
    }
  }
  return best;
}

// log(sum(exp(logits))) in the form every log-probability here is computed from, so that the
// chosen token's log-probability and a listing's entries for the same token are the same float.
struct LogNormalizer {
  float max = -std::numeric_limits<float>::infinity();
  double log_sum = 0.0;
  float At(const float* logits, int32_t id) const {
    return static_cast<float>(static_cast<double>(logits[id] - max) - log_sum);
  }
};

LogNormalizer Normalizer(const float* logits, int32_t vocab) {
  LogNormalizer n;
  for (int32_t i = 0; i < vocab; ++i) n.max = std::max(n.max, logits[i]);
  double sum = 0.0;
  for (int32_t i = 0; i < vocab; ++i) sum += std::exp(static_cast<double>(logits[i] - n.max));
  n.log_sum = std::log(sum);
  return n;
}

// The n best (logit, id) pairs by Before, sorted: a sorted window that a candidate enters only
// when it beats the window's last entry, which for n << vocab is almost never.
void TopByLogit(const float* logits, int32_t vocab, int32_t n,
                std::vector<std::pair<float, int32_t>>* best) {
  best->clear();
  if (n <= 0) return;
  best->reserve(static_cast<size_t>(n) + 1);
  for (int32_t i = 0; i < vocab; ++i) {
    const std::pair<float, int32_t> c(logits[i], i);
    if (std::isnan(c.first)) continue;
    if (static_cast<int32_t>(best->size()) == n && !Before(c, best->back())) continue;
    best->insert(std::upper_bound(best->begin(), best->end(), c, Before), c);
    if (static_cast<int32_t>(best->size()) > n) best->pop_back();
  }
}

void FillTop(const float* logits, int32_t vocab, int32_t n, const LogNormalizer& norm,
             std::vector<TokenLogprob>* out) {
  std::vector<std::pair<float, int32_t>> best;
  TopByLogit(logits, vocab, std::min(n, vocab), &best);
  out->clear();
  for (const auto& [logit, id] : best) out->push_back(TokenLogprob{id, norm.At(logits, id)});
}

}  // namespace

kernels::SamplingRowParams CounterSampling(const SamplingParams& p, uint64_t counter) {
  kernels::SamplingRowParams r;
  r.temperature = p.temperature;
  r.top_k = p.top_k;
  r.top_p = p.top_p;
  r.min_p = p.min_p;
  r.seed = p.seed;
  r.counter = counter;
  return r;
}

Sampler::Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {}

void TopLogprobs(const float* logits, int32_t vocab, int32_t n, std::vector<TokenLogprob>* out) {
  out->clear();
  if (vocab <= 0 || n <= 0) return;
  FillTop(logits, vocab, n, Normalizer(logits, vocab), out);
}

int32_t Sampler::Sample(const float* logits, int32_t vocab, float* logprob, int32_t top_n,
                        std::vector<TokenLogprob>* top) {
  if (top) top->clear();
  if (vocab <= 0) return -1;
  int32_t chosen;
  if (params_.temperature <= 0.0f) {
    chosen = Argmax(logits, vocab);
  } else {
    const float inv_t = 1.0f / params_.temperature;
    auto& c = scratch_;
    c.clear();
    c.reserve(vocab);
    for (int32_t i = 0; i < vocab; ++i) {
      const float l = logits[i];
      if (!std::isnan(l)) c.emplace_back(l * inv_t, i);
    }
    if (c.empty()) {
      chosen = Argmax(logits, vocab);
    } else {
      bool sorted = false;
      size_t n = c.size();
      // top-k
      if (params_.top_k > 0 && static_cast<size_t>(params_.top_k) < n) {
        std::nth_element(c.begin(), c.begin() + params_.top_k, c.end(), Before);
        n = params_.top_k;
        std::sort(c.begin(), c.begin() + n, Before);
        sorted = true;
      }
      // max logit of the survivors
      float mx = -std::numeric_limits<float>::infinity();
      for (size_t i = 0; i < n; ++i) mx = std::max(mx, c[i].first);
      // min-p: p >= min_p * p_max  <=>  logit >= mx + log(min_p). Keeps order.
      if (params_.min_p > 0.0f) {
        const float cut = mx + std::log(params_.min_p);
        size_t w = 0;
        for (size_t i = 0; i < n; ++i) {
          if (c[i].first >= cut) c[w++] = c[i];
        }
        n = w;
      }
      // Unnormalised probabilities relative to the max (reuse .first).
      double total = 0.0;
      for (size_t i = 0; i < n; ++i) {
        c[i].first = std::exp(c[i].first - mx);
        total += c[i].first;
      }
      // top-p over descending probabilities: sort a growing prefix until it holds the mass.
      if (params_.top_p < 1.0f && n > 1) {
        const double target = static_cast<double>(params_.top_p) * total;
        size_t k = std::min<size_t>(n, 256);
        for (;;) {
          if (!sorted) {
            if (k < n) {
              std::partial_sort(c.begin(), c.begin() + k, c.begin() + n, Before);
            } else {
              std::sort(c.begin(), c.begin() + n, Before);
            }
          }
          double cum = 0.0;
          size_t keep = 0;
          while (keep < k && cum < target) cum += c[keep++].first;
          if (cum >= target || k == n) {
            n = std::max<size_t>(keep, 1);
            total = 0.0;
            for (size_t i = 0; i < n; ++i) total += c[i].first;
            break;
          }
          k = std::min(n, k * 4);
          sorted = false;
        }
      }
      // Draw u in [0, total) from 53 random bits.
      const double u = static_cast<double>(rng_() >> 11) * (1.0 / 9007199254740992.0) * total;
      double cum = 0.0;
      chosen = c[n - 1].second;
      for (size_t i = 0; i < n; ++i) {
        cum += c[i].first;
        if (u < cum) {
          chosen = c[i].second;
          break;
        }
      }
    }
  }
  if (logprob || (top && top_n > 0)) {
    const LogNormalizer norm = Normalizer(logits, vocab);
    if (logprob) *logprob = norm.At(logits, chosen);
    if (top && top_n > 0) FillTop(logits, vocab, top_n, norm, top);
  }
  return chosen;
}

bool Sampler::Certain(const float* logits, int32_t vocab, int32_t* token) const {
  if (vocab <= 0) return false;
  if (params_.temperature <= 0.0f) {
    *token = Argmax(logits, vocab);
    return true;
  }
  // The same arithmetic as Sample: float logits over the temperature, exp relative to the max.
  const float inv_t = 1.0f / params_.temperature;
  float mx = -std::numeric_limits<float>::infinity();
  bool any = false;
  for (int32_t i = 0; i < vocab; ++i) {
    if (std::isnan(logits[i])) continue;
    any = true;
    mx = std::max(mx, logits[i] * inv_t);
  }
  if (!any) return false;  // Sample takes the argmax without a draw: not the case Skip counts
  if (!std::isfinite(mx)) return false;
  int32_t live = -1;
  for (int32_t i = 0; i < vocab; ++i) {
    if (std::isnan(logits[i])) continue;
    const float l = logits[i] * inv_t;
    if (std::exp(l - mx) == 0.0f) continue;
    if (live >= 0) return false;
    live = i;
  }
  if (live < 0) return false;
  *token = live;
  return true;
}

void Sampler::Skip(int64_t calls) {
  if (params_.temperature > 0.0f && calls > 0) rng_.discard(static_cast<unsigned long long>(calls));
}

}  // namespace dmsrt
