// DMS decisions (runtime/backend/dms_decisions.h) against a direct float64 evaluation of docs/dms-semantics.md §1:
// Variant A bits and the query after zeroing + rotate-half RoPE + zeroing again; Variant B bits
// from RMSNorm + linear with F32, F16 and BF16 adapter weights, per head and per layer.
#include "runtime/backend/dms_decisions.h"

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace dmsrt {
namespace {

// Rotate-half RoPE in float64 on one head: channel i pairs with i + hd/2.
void RopeHead(double* x, int32_t hd, int32_t pos, double theta) {
  const int32_t half = hd / 2;
  for (int32_t i = 0; i < half; ++i) {
    const double freq = std::pow(theta, -2.0 * i / hd);
    const double a = pos * freq, c = std::cos(a), s = std::sin(a);
    const double x0 = x[i], x1 = x[i + half];
    x[i] = x0 * c - x1 * s;
    x[i + half] = x1 * c + x0 * s;
  }
}

struct ACase {
  int32_t n, nh, nkv, hd;
  bool per_layer;
};

class VariantA : public ::testing::TestWithParam<ACase> {};

TEST_P(VariantA, BitsAndRotatedQueryMatchFloat64) {
  const ACase c = GetParam();
  const int32_t g = c.nh / c.nkv;
  DmsConfig cfg;
  cfg.enabled = true;
  cfg.window = 16;
  cfg.alpha_per_layer = c.per_layer;
  std::mt19937_64 rng(1000 + c.n * 7 + c.hd);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> q((size_t)c.n * c.nh * c.hd);
  for (auto& x : q) x = u(rng);
  // Put the decision channels around the threshold (offset / scale = 0.05), away from it by
  // more than float rounding.
  for (int32_t t = 0; t < c.n; ++t) {
    for (int32_t j = 0; j < c.nkv; ++j) {
      float v = 0.05f + 0.1f * u(rng);
      if (std::fabs(v - 0.05f) < 1e-3f) v += 0.01f;
      q[((size_t)t * c.nh + j * g) * c.hd + c.hd - 1] = v;
    }
  }
  const double theta = 10000.0;
  // Reference, float64: bits, zero, RoPE, zero.
  std::vector<double> ref(q.begin(), q.end());
  std::vector<uint8_t> ref_bits((size_t)c.n * c.nkv);
  for (int32_t t = 0; t < c.n; ++t) {
    for (int32_t j = 0; j < c.nkv; ++j) {
      const int32_t src = c.per_layer ? 0 : j;
      const double x = ref[((size_t)t * c.nh + src * g) * c.hd + c.hd - 1];
      ref_bits[(size_t)t * c.nkv + j] = x * 100.0 - 5.0 > 0.0;
    }
    for (int32_t j = 0; j < c.nkv; ++j) ref[((size_t)t * c.nh + j * g) * c.hd + c.hd - 1] = 0.0;
    for (int32_t h = 0; h < c.nh; ++h) RopeHead(&ref[((size_t)t * c.nh + h) * c.hd], c.hd, t + 3, theta);
    for (int32_t j = 0; j < c.nkv; ++j) ref[((size_t)t * c.nh + j * g) * c.hd + c.hd - 1] = 0.0;
  }
  // Implementation: decide (+ first zeroing), RoPE (float64 on the float values), zero again.
  std::vector<float> qi = q;
  std::vector<uint8_t> bits((size_t)c.n * c.nkv, 7);
  DmsDecideVariantA(cfg, c.n, c.nh, c.nkv, c.hd, qi.data(), bits.data());
  for (int32_t t = 0; t < c.n; ++t) {
    for (int32_t h = 0; h < c.nh; ++h) {
      float* head = &qi[((size_t)t * c.nh + h) * c.hd];
      std::vector<double> d(head, head + c.hd);
      RopeHead(d.data(), c.hd, t + 3, theta);
      for (int32_t i = 0; i < c.hd; ++i) head[i] = (float)d[i];
    }
  }
  DmsZeroAfterRope(c.n, c.nh, c.nkv, c.hd, qi.data());
  EXPECT_EQ(bits, ref_bits);
  int ones = 0;
  for (uint8_t b : bits) ones += b;
  if (bits.size() >= 16) {  // random decision channels give both outcomes
    EXPECT_GT(ones, 0);
    if (!c.per_layer) {
      EXPECT_LT(ones, (int)bits.size());
    }
  }
  for (size_t i = 0; i < qi.size(); ++i) {
    ASSERT_NEAR(qi[i], ref[i], 1e-5 * (1 + std::fabs(ref[i]))) << "element " << i;
  }
  // The decision channel is zero and its partner kept only its cosine term.
  const int32_t half = c.hd / 2;
  for (int32_t t = 0; t < c.n; ++t) {
    for (int32_t j = 0; j < c.nkv; ++j) {
      const size_t base = ((size_t)t * c.nh + j * g) * c.hd;
      EXPECT_EQ(qi[base + c.hd - 1], 0.0f);
      const double freq = std::pow(theta, -2.0 * (half - 1) / c.hd);
      EXPECT_NEAR(qi[base + half - 1], q[base + half - 1] * std::cos((t + 3) * freq), 1e-5);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, VariantA,
    ::testing::Values(ACase{1, 1, 1, 2, false}, ACase{19, 9, 3, 64, false},
                      ACase{7, 8, 2, 16, false}, ACase{33, 4, 4, 6, false},
                      ACase{11, 6, 3, 10, true}, ACase{5, 32, 8, 128, false}),
    [](const auto& info) {
      const ACase& c = info.param;
      return absl::StrCat("n", c.n, "_heads", c.nh, "_kv", c.nkv, "_dim", c.hd,
                          c.per_layer ? "_perlayer" : "_perhead");
    });

// Exact float -> F16 / BF16 for the test values (k / 256, |k| < 256, all normal in F16).
uint16_t ToHalf(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  if ((b & 0x7FFFFFFFu) == 0) return (uint16_t)(b >> 16);
  const uint32_t sign = (b >> 16) & 0x8000u;
  const int32_t exp = (int32_t)((b >> 23) & 0xFF) - 127 + 15;
  const uint32_t mant = (b >> 13) & 0x3FFu;
  return (uint16_t)(sign | ((uint32_t)exp << 10) | mant);
}
uint16_t ToBF16(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return (uint16_t)(b >> 16);
}

struct Tensor {
  std::vector<uint8_t> bytes;
  WeightTensor view;
};

Tensor MakeTensor(const std::vector<float>& vals, int64_t rows, int64_t cols, DType type) {
  Tensor t;
  const size_t es = type == DType::kF32 ? 4 : 2;
  t.bytes.resize(vals.size() * es);
  for (size_t i = 0; i < vals.size(); ++i) {
    if (type == DType::kF32) {
      std::memcpy(&t.bytes[i * 4], &vals[i], 4);
    } else {
      const uint16_t h = type == DType::kF16 ? ToHalf(vals[i]) : ToBF16(vals[i]);
      std::memcpy(&t.bytes[i * 2], &h, 2);
    }
  }
  t.view.type = type;
  t.view.rows = rows;
  t.view.cols = cols;
  t.view.shape = rows == 1 ? std::vector<int64_t>{cols} : std::vector<int64_t>{rows, cols};
  t.view.data = t.bytes.data();
  t.view.nbytes = t.bytes.size();
  return t;
}

struct BCase {
  int32_t n, hidden, n_kv_total, n_kv, offset;
  DType type;
  bool bias, per_layer;
};

class VariantB : public ::testing::TestWithParam<BCase> {};

TEST_P(VariantB, BitsMatchFloat64) {
  const BCase c = GetParam();
  std::mt19937_64 rng(77 + c.hidden + c.offset);
  std::uniform_int_distribution<int> k256(-255, 255);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  auto q8 = [&] { return (float)k256(rng) / 256.0f; };
  std::vector<float> wn(c.hidden), wa((size_t)c.n_kv_total * c.hidden), wb(c.n_kv_total);
  for (auto& x : wn) x = 0.5f + 0.5f * std::fabs(q8());
  for (auto& x : wa) x = q8() / 8.0f;
  for (auto& x : wb) x = q8() / 16.0f;
  Tensor tn = MakeTensor(wn, 1, c.hidden, c.type);
  Tensor ta = MakeTensor(wa, c.n_kv_total, c.hidden, c.type);
  Tensor tb = MakeTensor(wb, 1, c.n_kv_total, c.type);
  LayerWeights lw;
  lw.dms_alpha_norm = tn.view;
  lw.dms_alpha = ta.view;
  if (c.bias) lw.dms_alpha_bias = tb.view;
  DmsConfig cfg;
  cfg.enabled = true;
  cfg.separate_alpha = true;
  cfg.alpha_per_layer = c.per_layer;
  const float eps = 1e-6f;
  std::vector<float> x((size_t)c.n * c.hidden);
  for (auto& v : x) v = u(rng) * 3.0f;
  std::vector<uint8_t> bits((size_t)c.n * c.n_kv, 9);
  DmsDecideVariantB(cfg, lw, eps, c.n, c.hidden, c.n_kv, c.offset, x.data(), bits.data());
  int checked = 0, ones = 0;
  for (int32_t t = 0; t < c.n; ++t) {
    const float* xt = &x[(size_t)t * c.hidden];
    double ss = 0;
    for (int32_t i = 0; i < c.hidden; ++i) ss += (double)xt[i] * xt[i];
    const double inv = 1.0 / std::sqrt(ss / c.hidden + eps);
    for (int32_t j = 0; j < c.n_kv; ++j) {
      const int32_t row = c.per_layer ? 0 : c.offset + j;
      double logit = c.bias ? wb[row] : 0.0;
      for (int32_t i = 0; i < c.hidden; ++i) logit += (double)wa[(size_t)row * c.hidden + i] * xt[i] * inv * wn[i];
      const double z = logit * 100.0 - 5.0;
      ones += bits[(size_t)t * c.n_kv + j];
      if (std::fabs(z) < 1e-3) continue;  // too close to the threshold for float rounding
      ++checked;
      EXPECT_EQ(bits[(size_t)t * c.n_kv + j], z > 0 ? 1 : 0) << "token " << t << " head " << j;
    }
  }
  EXPECT_GT(checked, c.n * c.n_kv / 2);
  EXPECT_GT(ones, 0);
  EXPECT_LT(ones, c.n * c.n_kv);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, VariantB,
    ::testing::Values(BCase{23, 64, 4, 4, 0, DType::kF32, false, false},
                      BCase{17, 111, 6, 3, 3, DType::kF16, true, false},
                      BCase{31, 96, 8, 2, 4, DType::kBF16, false, false},
                      BCase{9, 576, 3, 3, 0, DType::kBF16, true, false},
                      BCase{40, 33, 1, 4, 0, DType::kF32, false, true}),
    [](const auto& info) {
      const BCase& c = info.param;
      return absl::StrCat("n", c.n, "_hidden", c.hidden, "_kv", c.n_kv, "of", c.n_kv_total,
                          "_offset", c.offset, "_", DTypeName(c.type), c.bias ? "_bias" : "",
                          c.per_layer ? "_perlayer" : "");
    });

}  // namespace
}  // namespace dmsrt
