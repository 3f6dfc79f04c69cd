// Shared helpers of the KV-store tests: random token streams (q/k/v/bits), a float64 reference
// of attention under the visibility rule of docs/dms-semantics.md §3, and a driver that feeds a
// stream into a KvCache in chunks of given sizes.
#pragma once

#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "runtime/kv/kv_cache.h"

namespace dmsrt {
namespace kvtest {

// A geometry with every head local (no tensor parallelism).
inline KvGeometry Geo(int32_t layers, int32_t nkv, int32_t nh, int32_t hd, int32_t block) {
  KvGeometry g;
  g.n_layers = layers;
  g.n_kv_heads = nkv;
  g.n_heads = nh;
  g.head_dim = hd;
  g.block_tokens = block;
  return g;
}

// A stream of T tokens for one layer-stack: per layer, q [T, nh, hd], k/v [T, nkv, hd],
// bits [T, nkv]. Values are uniform in [-1, 1) (never all zero); keys get a per-token scale so
// that softmax weights are far from uniform.
struct Stream {
  int32_t T = 0, n_layers = 0, nh = 0, nkv = 0, hd = 0;
  std::vector<std::vector<float>> q, k, v;  // [layer][...]
  std::vector<std::vector<uint8_t>> bits;   // [layer][T * nkv]

  const float* qt(int32_t l, int32_t t) const { return q[l].data() + (int64_t)t * nh * hd; }
  const float* kt(int32_t l, int32_t t) const { return k[l].data() + (int64_t)t * nkv * hd; }
  const float* vt(int32_t l, int32_t t) const { return v[l].data() + (int64_t)t * nkv * hd; }
  const uint8_t* bt(int32_t l, int32_t t) const { return bits[l].data() + (int64_t)t * nkv; }
};

inline Stream MakeStream(int32_t T, int32_t n_layers, int32_t nh, int32_t nkv, int32_t hd,
                         uint64_t seed, double bit_prob) {
  Stream s;
  s.T = T;
  s.n_layers = n_layers;
  s.nh = nh;
  s.nkv = nkv;
  s.hd = hd;
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::bernoulli_distribution b(bit_prob);
  for (int32_t l = 0; l < n_layers; ++l) {
    std::vector<float> q((size_t)T * nh * hd), k((size_t)T * nkv * hd), v((size_t)T * nkv * hd);
    for (auto& x : q) x = u(rng) * 2.0f;
    for (int32_t t = 0; t < T; ++t) {
      const float sc = 0.5f + 1.5f * (u(rng) + 1.0f);
      for (int32_t i = 0; i < nkv * hd; ++i) k[(size_t)t * nkv * hd + i] = u(rng) * sc;
    }
    for (auto& x : v) x = u(rng);
    std::vector<uint8_t> bits((size_t)T * nkv);
    for (auto& x : bits) x = b(rng) ? 1 : 0;
    s.q.push_back(std::move(q));
    s.k.push_back(std::move(k));
    s.v.push_back(std::move(v));
    s.bits.push_back(std::move(bits));
  }
  return s;
}

// flag(k) of KV head j in layer l as known once token `upto` has arrived: d[k+1] if k+1 <= upto.
inline bool RefFlag(const Stream& s, int32_t l, int32_t j, int32_t k, int32_t upto) {
  return k + 1 <= upto && s.bits[l][(size_t)(k + 1) * s.nkv + j] != 0;
}

// §3: does query qp see key kp (DMS with window w)?
inline bool DmsVisible(const Stream& s, int32_t l, int32_t j, int32_t kp, int32_t qp, int32_t w) {
  return kp <= qp && (!RefFlag(s, l, j, kp, qp) || qp - kp <= w);
}

// R(p) of §3, sorted.
inline std::vector<int32_t> DmsResident(const Stream& s, int32_t l, int32_t j, int32_t p,
                                        int32_t w) {
  std::vector<int32_t> r;
  for (int32_t k = 0; k <= p; ++k) {
    if (DmsVisible(s, l, j, k, p, w)) r.push_back(k);
  }
  return r;
}

// float64 attention of query token qp (all nh heads) of layer l over the keys `visible(j, kp)`
// selects; result [nh, hd].
inline std::vector<double> RefAttention(const Stream& s, int32_t l, int32_t qp,
                                        const std::function<bool(int32_t, int32_t)>& visible) {
  const int32_t g = s.nh / s.nkv;
  std::vector<double> out((size_t)s.nh * s.hd, 0.0);
  const double scale = 1.0 / std::sqrt((double)s.hd);
  for (int32_t h = 0; h < s.nh; ++h) {
    const int32_t j = h / g;
    const float* q = s.qt(l, qp) + (size_t)h * s.hd;
    std::vector<int32_t> keys;
    std::vector<double> sc;
    double mx = -1e300;
    for (int32_t kp = 0; kp <= qp; ++kp) {
      if (!visible(j, kp)) continue;
      const float* k = s.kt(l, kp) + (size_t)j * s.hd;
      double d = 0;
      for (int32_t c = 0; c < s.hd; ++c) d += (double)q[c] * (double)k[c];
      keys.push_back(kp);
      sc.push_back(d * scale);
      mx = std::max(mx, d * scale);
    }
    double sum = 0;
    for (double& x : sc) {
      x = std::exp(x - mx);
      sum += x;
    }
    for (size_t i = 0; i < keys.size(); ++i) {
      const float* v = s.vt(l, keys[i]) + (size_t)j * s.hd;
      for (int32_t c = 0; c < s.hd; ++c) out[(size_t)h * s.hd + c] += sc[i] / sum * v[c];
    }
  }
  return out;
}

// Feeds tokens [from, from + n) of the stream as one step (all layers) into `cache`; outputs go
// to out[l] [n, nh, hd]. `with_bits` passes the stream's bits as `evict`.
inline absl::Status FeedChunk(KvCache& cache, SeqId seq, const Stream& s, int32_t from,
                              int32_t n, bool with_bits,
                              std::vector<std::vector<float>>* out = nullptr) {
  absl::Status st = cache.Reserve(seq, n);
  if (!st.ok()) return st;
  std::vector<float> o((size_t)n * s.nh * s.hd);
  if (out) out->assign(s.n_layers, {});
  for (int32_t l = 0; l < s.n_layers; ++l) {
    std::fill(o.begin(), o.end(), 12345.0f);  // poison: unwritten outputs fail loudly
    cache.AttendAndAppend(seq, l, n, s.qt(l, from), s.kt(l, from), s.vt(l, from),
                          with_bits ? s.bt(l, from) : nullptr, o.data());
    if (out) (*out)[l] = o;
  }
  return absl::OkStatus();
}

// Max over elements of |a - b| / (1 + |b|).
inline double MaxRelErr(const float* a, const double* b, size_t n) {
  double e = 0;
  for (size_t i = 0; i < n; ++i) e = std::max(e, std::fabs((double)a[i] - b[i]) / (1.0 + std::fabs(b[i])));
  return e;
}

}  // namespace kvtest
}  // namespace dmsrt
