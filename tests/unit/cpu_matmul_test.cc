// CPU kernels: quantized/float matmul against a float64 reference on dequantized weights for
// every weight type at awkward sizes; bit-identical results for any thread count and for batched
// versus one-token calls; poisoned outputs outside the written range stay untouched; the thread
// pool; RMSNorm, RoPE and SwiGLU helpers.
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <chrono>
#include <vector>

#include "kernels/cpu/matmul.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/reference/quant.h"

namespace dmsrt {
namespace kernels {
namespace {

const char* TypeName(int t) {
  switch (t) {
    case kTypeF32: return "F32";
    case kTypeF16: return "F16";
    case kTypeBF16: return "BF16";
    case kTypeQ4_0: return "Q4_0";
    case kTypeQ4_1: return "Q4_1";
    case kTypeQ8_0: return "Q8_0";
    case kTypeQ6_K: return "Q6_K";
    default: return "?";
  }
}

// Random weights of `type` [rows, cols] as raw bytes.
std::vector<uint8_t> MakeWeights(int type, int64_t rows, int64_t cols, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const int64_t rb = QuantRowBytes(type, cols);
  std::vector<uint8_t> w(rows * rb);
  std::vector<float> row(cols);
  for (int64_t r = 0; r < rows; ++r) {
    for (auto& v : row) v = nd(rng) * 0.1f + 0.02f;  // a bias so Q4_1 mins matter
    uint8_t* dst = w.data() + r * rb;
    switch (type) {
      case kTypeF32: std::memcpy(dst, row.data(), cols * 4); break;
      case kTypeF16:
        for (int64_t i = 0; i < cols; ++i) reinterpret_cast<uint16_t*>(dst)[i] = Fp32ToFp16(row[i]);
        break;
      case kTypeBF16:
        for (int64_t i = 0; i < cols; ++i) reinterpret_cast<uint16_t*>(dst)[i] = Fp32ToBf16(row[i]);
        break;
      case kTypeQ4_0: QuantizeRowQ4_0Ref(row.data(), reinterpret_cast<BlockQ4_0*>(dst), cols); break;
      case kTypeQ4_1: QuantizeRowQ4_1Ref(row.data(), reinterpret_cast<BlockQ4_1*>(dst), cols); break;
      case kTypeQ8_0: QuantizeRowQ8_0Ref(row.data(), reinterpret_cast<BlockQ8_0*>(dst), cols); break;
      case kTypeQ6_K: {
        BlockQ6_K* b = reinterpret_cast<BlockQ6_K*>(dst);
        for (int64_t k = 0; k < cols / 256; ++k) {
          for (auto& v : b[k].ql) v = static_cast<uint8_t>(rng());
          for (auto& v : b[k].qh) v = static_cast<uint8_t>(rng());
          for (auto& v : b[k].scales) v = static_cast<int8_t>(static_cast<int>(rng() % 200) - 100);
          b[k].d = Fp32ToFp16(0.0005f * (1 + static_cast<int>(rng() % 4)));
        }
        break;
      }
    }
  }
  return w;
}

struct Case {
  int type;
  int64_t rows, cols, n;
};

std::string CaseName(const Case& c) {
  return std::string(TypeName(c.type)) + "/rows" + std::to_string(c.rows) + "_cols" +
         std::to_string(c.cols) + "_n" + std::to_string(c.n);
}

void CheckCase(const Case& c, ThreadPool* pool2, ThreadPool* pool3) {
  SCOPED_TRACE(CaseName(c));
  std::mt19937 rng(static_cast<uint32_t>(c.type * 1000 + c.rows * 7 + c.cols + c.n));
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const std::vector<uint8_t> w = MakeWeights(c.type, c.rows, c.cols, rng);
  std::vector<float> x(c.n * c.cols);
  for (auto& v : x) v = nd(rng);
  const int64_t ldy = c.rows + 3;  // columns past `rows` must stay poisoned
  const float kPoison = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> y1(c.n * ldy, kPoison), y2(c.n * ldy, kPoison), y3(c.n * ldy, kPoison);
  MatmulWorkspace ws;
  ASSERT_TRUE(MatMul(nullptr, c.type, w.data(), c.rows, c.cols, x.data(), c.n, y1.data(), ldy, &ws));
  ASSERT_TRUE(MatMul(pool2, c.type, w.data(), c.rows, c.cols, x.data(), c.n, y2.data(), ldy, &ws));
  ASSERT_TRUE(MatMul(pool3, c.type, w.data(), c.rows, c.cols, x.data(), c.n, y3.data(), ldy, &ws));

  const bool qact = c.type == kTypeQ4_0 || c.type == kTypeQ4_1 || c.type == kTypeQ8_0;
  std::vector<float> wrow(c.cols);
  const int64_t rb = QuantRowBytes(c.type, c.cols);
  for (int64_t t = 0; t < c.n; ++t) {
    // One-token call gives the same bits as the batched call.
    std::vector<float> yt(ldy, kPoison);
    ASSERT_TRUE(MatMul(pool2, c.type, w.data(), c.rows, c.cols, &x[t * c.cols], 1, yt.data(), ldy, &ws));
    const float* xt = &x[t * c.cols];
    for (int64_t r = 0; r < c.rows; ++r) {
      ASSERT_TRUE(DequantizeRow(c.type, w.data() + r * rb, wrow.data(), c.cols));
      double ref = 0, mag = 0, qbound = 0;
      for (int64_t i = 0; i < c.cols; ++i) {
        ref += static_cast<double>(wrow[i]) * xt[i];
        mag += std::fabs(static_cast<double>(wrow[i]) * xt[i]);
      }
      if (qact) {
        // 8-bit activations: each x moves by at most half a step, amax(block) / 254.
        for (int64_t b = 0; b < c.cols / 32; ++b) {
          double amax = 0, wsum = 0;
          for (int j = 0; j < 32; ++j) {
            amax = std::max(amax, std::fabs(static_cast<double>(xt[b * 32 + j])));
            wsum += std::fabs(static_cast<double>(wrow[b * 32 + j]));
          }
          qbound += wsum * amax / 254.0;
        }
      }
      const double tol = 1.01 * qbound + 2e-5 * mag + 1e-6;
      const float got = y1[t * ldy + r];
      ASSERT_NEAR(got, ref, tol) << "token " << t << " row " << r;
      ASSERT_EQ(std::memcmp(&got, &y2[t * ldy + r], 4), 0) << "2 threads differ, row " << r;
      ASSERT_EQ(std::memcmp(&got, &y3[t * ldy + r], 4), 0) << "3 threads differ, row " << r;
      ASSERT_EQ(std::memcmp(&got, &yt[r], 4), 0) << "single-token call differs, row " << r;
    }
    for (int64_t r = c.rows; r < ldy; ++r) {
      ASSERT_TRUE(std::isnan(y1[t * ldy + r]));
      ASSERT_TRUE(std::isnan(y2[t * ldy + r]));
    }
  }
}

TEST(CpuMatmul, AllTypesAwkwardSizes) {
  ThreadPool pool2(2), pool3(3);
  const int types[] = {kTypeF32, kTypeF16, kTypeBF16, kTypeQ4_0, kTypeQ4_1, kTypeQ8_0, kTypeQ6_K};
  for (int type : types) {
    const std::vector<int64_t> cols_list =
        type == kTypeQ6_K ? std::vector<int64_t>{256, 512, 1536} : std::vector<int64_t>{32, 64, 96, 576, 1536};
    for (int64_t cols : cols_list) {
      for (int64_t rows : {1, 19, 111}) {
        for (int64_t n : {1, 3, 5, 8}) {
          if (cols == 1536 && rows == 111 && n == 8 && type != kTypeQ4_1) continue;  // keep it quick
          CheckCase({type, rows, cols, n}, &pool2, &pool3);
          if (HasFatalFailure()) return;
        }
      }
    }
  }
}

TEST(CpuMatmul, BatchOfSpecsEqualsSeparateCalls) {
  ThreadPool pool(2);
  std::mt19937 rng(9);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const int64_t cols = 576, n = 6;
  const auto wa = MakeWeights(kTypeQ4_1, 64, cols, rng);
  const auto wb = MakeWeights(kTypeQ8_0, 19, cols, rng);
  const auto wc = MakeWeights(kTypeF16, 7, cols, rng);
  std::vector<float> x(n * cols);
  for (auto& v : x) v = nd(rng);
  std::vector<float> ya(n * 64), yb(n * 19), yc(n * 7), za(n * 64), zb(n * 19), zc(n * 7);
  MatmulWorkspace ws;
  const MatmulSpec specs[3] = {{kTypeQ4_1, wa.data(), 64, ya.data(), 64, 0},
                               {kTypeQ8_0, wb.data(), 19, yb.data(), 19, 0},
                               {kTypeF16, wc.data(), 7, yc.data(), 7, 0}};
  ASSERT_TRUE(MatMulBatch(&pool, specs, 3, cols, x.data(), n, &ws));
  ASSERT_TRUE(MatMul(&pool, kTypeQ4_1, wa.data(), 64, cols, x.data(), n, za.data(), 64, &ws));
  ASSERT_TRUE(MatMul(&pool, kTypeQ8_0, wb.data(), 19, cols, x.data(), n, zb.data(), 19, &ws));
  ASSERT_TRUE(MatMul(&pool, kTypeF16, wc.data(), 7, cols, x.data(), n, zc.data(), 7, &ws));
  EXPECT_EQ(std::memcmp(ya.data(), za.data(), ya.size() * 4), 0);
  EXPECT_EQ(std::memcmp(yb.data(), zb.data(), yb.size() * 4), 0);
  EXPECT_EQ(std::memcmp(yc.data(), zc.data(), yc.size() * 4), 0);
}

TEST(CpuMatmul, ColumnSliceWithStride) {
  // A [rows, 64] window starting at column 64 of a [rows, 160] Q4_1 matrix.
  std::mt19937 rng(4);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const int64_t rows = 19, full = 160, cols = 64, col0 = 64;
  const auto w = MakeWeights(kTypeQ4_1, rows, full, rng);
  std::vector<float> x(cols);
  for (auto& v : x) v = nd(rng);
  const int64_t rb = QuantRowBytes(kTypeQ4_1, full);
  MatmulSpec spec{kTypeQ4_1, w.data() + col0 / 32 * sizeof(BlockQ4_1), rows, nullptr, rows, rb};
  std::vector<float> y(rows);
  spec.y = y.data();
  MatmulWorkspace ws;
  ASSERT_TRUE(MatMulBatch(nullptr, &spec, 1, cols, x.data(), 1, &ws));
  std::vector<float> wrow(full);
  for (int64_t r = 0; r < rows; ++r) {
    DequantizeRow(kTypeQ4_1, w.data() + r * rb, wrow.data(), full);
    double ref = 0, mag = 0;
    for (int64_t i = 0; i < cols; ++i) {
      ref += static_cast<double>(wrow[col0 + i]) * x[i];
      mag += std::fabs(static_cast<double>(wrow[col0 + i]) * x[i]);
    }
    EXPECT_NEAR(y[r], ref, 0.02 * mag + 1e-5) << "row " << r;
  }
}

TEST(CpuMatmul, RejectsUnsupported) {
  MatmulWorkspace ws;
  float x[48] = {1.0f}, y[2] = {0, 0};
  uint8_t w[256] = {0};
  EXPECT_FALSE(MatMul(nullptr, 12 /*Q4_K*/, w, 1, 256, x, 1, y, 1, &ws));
  EXPECT_FALSE(MatMul(nullptr, kTypeQ4_0, w, 1, 48, x, 1, y, 1, &ws));  // not whole blocks
  EXPECT_TRUE(MatMulSupported(kTypeF32, 48));
  EXPECT_FALSE(MatMulSupported(kTypeQ6_K, 576));
}

TEST(ThreadPool, EveryChunkRunsOnce) {
  for (int nth : {1, 2, 3, 5}) {
    ThreadPool pool(nth);
    ASSERT_EQ(pool.size(), nth);
    const int reps = nth <= 2 ? 2000 : 200;
    for (int64_t chunks : {1, 2, 7, 64}) {
      std::vector<std::atomic<int>> hits(chunks);
      for (int rep = 0; rep < reps; ++rep) {
        pool.ParallelFor(chunks, [&](int64_t i) { hits[i].fetch_add(1); });
      }
      for (int64_t i = 0; i < chunks; ++i) {
        EXPECT_EQ(hits[i].load(), reps) << "threads " << nth << " chunk " << i;
      }
    }
  }
  ThreadPool def(0);
  EXPECT_GE(def.size(), 1);
  int calls = 0;
  def.ParallelFor(0, [&](int64_t) { ++calls; });
  EXPECT_EQ(calls, 0);
  // Run: each ith exactly once per region.
  ThreadPool three(3);
  std::vector<std::atomic<int>> per(3);
  for (int rep = 0; rep < 100; ++rep) {
    three.Run([&](int ith, int nth) {
      ASSERT_EQ(nth, 3);
      per[ith].fetch_add(1);
    });
  }
  for (int i = 0; i < 3; ++i) EXPECT_EQ(per[i].load(), 100);
}

TEST(ThreadPool, WakesAfterSleepingAndUsesWorkers) {
  ThreadPool pool(2);
  std::atomic<int64_t> sum{0};
  for (int rep = 0; rep < 3; ++rep) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));  // long past the spin window
    pool.ParallelFor(10, [&](int64_t i) { sum.fetch_add(i + 1); });
  }
  EXPECT_EQ(sum.load(), 3 * 55);
  // With chunks that take a while, a second thread joins in (unless the machine never schedules
  // it: then the caller does everything, which is still correct).
  std::atomic<int> other{0};
  const auto me = std::this_thread::get_id();
  pool.ParallelFor(16, [&](int64_t) {
    if (std::this_thread::get_id() != me) other.fetch_add(1);
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  });
  EXPECT_GE(other.load(), 0);
  RecordProperty("chunks_on_worker", other.load());
}

TEST(CpuOps, RmsNormRopeSilu) {
  std::mt19937 rng(2);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const int64_t n = 3, dim = 70;
  std::vector<float> x(n * dim), w(dim), out(n * dim);
  for (auto& v : x) v = nd(rng);
  for (auto& v : w) v = nd(rng);
  RmsNorm(x.data(), w.data(), n, dim, 1e-5f, out.data());
  for (int64_t t = 0; t < n; ++t) {
    double ss = 0;
    for (int64_t i = 0; i < dim; ++i) ss += static_cast<double>(x[t * dim + i]) * x[t * dim + i];
    const double s = 1.0 / std::sqrt(ss / dim + 1e-5);
    for (int64_t i = 0; i < dim; ++i) EXPECT_NEAR(out[t * dim + i], x[t * dim + i] * s * w[i], 1e-5);
  }

  // RoPE: 2 tokens, 3 heads of 8 with rope_dim 8, row stride 24 + 5 (padding untouched).
  const int64_t heads = 3, hd = 8, stride = heads * hd + 5;
  std::vector<float> q(2 * stride), q0;
  for (auto& v : q) v = nd(rng);
  q0 = q;
  std::vector<float> cs(2 * 4 * 2);
  const double pos[2] = {3, 17};
  for (int t = 0; t < 2; ++t) {
    for (int i = 0; i < 4; ++i) {
      const double a = pos[t] * std::pow(10000.0, -2.0 * i / hd);
      cs[(t * 4 + i) * 2] = static_cast<float>(std::cos(a));
      cs[(t * 4 + i) * 2 + 1] = static_cast<float>(std::sin(a));
    }
  }
  RopeNeox(q.data(), 2, heads, hd, hd, stride, cs.data());
  for (int t = 0; t < 2; ++t) {
    for (int h = 0; h < heads; ++h) {
      for (int i = 0; i < 4; ++i) {
        const double a = pos[t] * std::pow(10000.0, -2.0 * i / hd);
        const double x0 = q0[t * stride + h * hd + i], x1 = q0[t * stride + h * hd + i + 4];
        EXPECT_NEAR(q[t * stride + h * hd + i], x0 * std::cos(a) - x1 * std::sin(a), 1e-5);
        EXPECT_NEAR(q[t * stride + h * hd + i + 4], x1 * std::cos(a) + x0 * std::sin(a), 1e-5);
      }
    }
    for (int64_t i = heads * hd; i < stride; ++i) EXPECT_EQ(q[t * stride + i], q0[t * stride + i]);
  }

  const int64_t m = 1000;
  std::vector<float> g(m), u(m), o(m);
  for (int64_t i = 0; i < m; ++i) {
    g[i] = (static_cast<float>(i) - 500.0f) * 0.05f;  // -25 .. 25
    u[i] = nd(rng);
  }
  g[0] = -200.0f;  // far past the exp clamp
  g[1] = 200.0f;
  SiluMul(g.data(), u.data(), o.data(), m);
  for (int64_t i = 0; i < m; ++i) {
    const double e = g[i] / (1.0 + std::exp(-static_cast<double>(g[i]))) * u[i];
    EXPECT_NEAR(o[i], e, 2e-6 * std::fabs(e) + 1e-30) << "i " << i;
  }
}

}  // namespace
}  // namespace kernels
}  // namespace dmsrt
