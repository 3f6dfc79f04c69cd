// RMSNorm, SiLU-mul, residual add, embedding gather, GGUF dequantization and the cuBLAS bf16
// GEMM wrapper against their references, on awkward shapes (1, 19, 111 rows; widths that are
// and are not multiples of the vector width).
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <cublas_v2.h>
#include <gtest/gtest.h>

#include "kernels/dequant.cuh"
#include "kernels/elementwise.cuh"
#include "kernels/gemm.cuh"
#include "kernels/reference/elementwise_ref.h"
#include "kernels/reference/quant.h"
#include "tests/gpu/gpu_test_util.h"

namespace dmsrt {
namespace {

using gpu_test::Bf;
using gpu_test::DeviceBuffer;

double Rms(const std::vector<float>& v) {
  double s = 0;
  for (float x : v) s += static_cast<double>(x) * x;
  return std::sqrt(s / std::max<size_t>(1, v.size()));
}

TEST(RmsNorm, MatchesReference) {
  DMSRT_REQUIRE_GPU();
  std::mt19937 rng(11);
  for (int rows : {1, 19, 111}) {
    for (int dim : {19, 128, 576, 4096}) {
      SCOPED_TRACE("RmsNorm/rows" + std::to_string(rows) + "_dim" + std::to_string(dim));
      std::vector<float> xf, wf;
      const auto x = gpu_test::RandomBf16(static_cast<size_t>(rows) * dim, rng, 3.f, &xf, 0.5f);
      const auto w = gpu_test::RandomBf16(dim, rng, 0.2f, &wf, 1.f);
      DeviceBuffer<uint16_t> dx(x), dw(w), dout(x.size());
      dout.Poison(gpu_test::kPoisonFloat);
      ASSERT_CUDA_OK(RmsNorm(Bf(dx), Bf(dw), rows, dim, 1e-6f, Bf(dout), nullptr));
      std::vector<float> want(x.size());
      kernels::RmsNormRef(xf.data(), wf.data(), rows, dim, 1e-6f, want.data());
      const auto got = gpu_test::Bf16ToFloat(dout.Download());
      EXPECT_LE(gpu_test::WorstScaledError(got, want, 1e-3 * Rms(want), 8e-3), 1.0);
    }
  }
}

TEST(SiluMul, MatchesReference) {
  DMSRT_REQUIRE_GPU();
  std::mt19937 rng(12);
  for (int rows : {1, 19, 111}) {
    for (int ffn : {19, 1536}) {
      SCOPED_TRACE("SiluMul/rows" + std::to_string(rows) + "_ffn" + std::to_string(ffn));
      std::vector<float> inf;
      const auto in = gpu_test::RandomBf16(static_cast<size_t>(rows) * 2 * ffn, rng, 2.f, &inf);
      DeviceBuffer<uint16_t> din(in), dout(static_cast<size_t>(rows) * ffn);
      dout.Poison(gpu_test::kPoisonFloat);
      // gate = first half of each row, up = second half (a fused gate_up projection).
      ASSERT_CUDA_OK(SiluMul(Bf(din), Bf(din) + ffn, rows, ffn, 2 * ffn, Bf(dout), ffn, nullptr));
      std::vector<float> want(static_cast<size_t>(rows) * ffn);
      kernels::SiluMulRef(inf.data(), inf.data() + ffn, rows, ffn, 2 * ffn, want.data(), ffn);
      const auto got = gpu_test::Bf16ToFloat(dout.Download());
      EXPECT_LE(gpu_test::WorstScaledError(got, want, 1e-3 * Rms(want), 8e-3), 1.0);
    }
  }
}

TEST(ResidualAdd, MatchesReference) {
  DMSRT_REQUIRE_GPU();
  std::mt19937 rng(13);
  for (int n : {1, 19, 111 * 576}) {
    SCOPED_TRACE("ResidualAdd/n" + std::to_string(n));
    std::vector<float> xf, yf;
    const auto x = gpu_test::RandomBf16(n, rng, 1.f, &xf);
    const auto y = gpu_test::RandomBf16(n, rng, 1.f, &yf, 0.25f);
    DeviceBuffer<uint16_t> dx(x), dy(y);
    ASSERT_CUDA_OK(ResidualAdd(Bf(dx), Bf(dy), n, nullptr));
    std::vector<float> want(n);
    for (int i = 0; i < n; ++i) want[i] = kernels::Bf16ToFp32(kernels::Fp32ToBf16(xf[i] + yf[i]));
    EXPECT_EQ(gpu_test::Bf16ToFloat(dx.Download()), want);
  }
}

// The fp32 partial sums of a tensor-parallel o_proj/down_proj: rounded to bf16 first, as the
// single-device GEMM rounds its output, then added.
TEST(ResidualAddF32, RoundsThenAdds) {
  DMSRT_REQUIRE_GPU();
  std::mt19937 rng(15);
  std::uniform_real_distribution<float> u(-2.f, 2.f);
  for (int n : {1, 19, 111 * 576}) {
    SCOPED_TRACE("ResidualAddF32/n" + std::to_string(n));
    std::vector<float> xf, yf(n);
    const auto x = gpu_test::RandomBf16(n, rng, 1.f, &xf);
    for (float& v : yf) v = u(rng);
    DeviceBuffer<uint16_t> dx(x);
    DeviceBuffer<float> dy(yf);
    ASSERT_CUDA_OK(ResidualAddF32(Bf(dx), dy.get(), n, nullptr));
    std::vector<float> want(n);
    for (int i = 0; i < n; ++i) {
      const float yb = kernels::Bf16ToFp32(kernels::Fp32ToBf16(yf[i]));
      want[i] = kernels::Bf16ToFp32(kernels::Fp32ToBf16(xf[i] + yb));
    }
    EXPECT_EQ(gpu_test::Bf16ToFloat(dx.Download()), want);
  }
}

TEST(EmbeddingGather, MatchesReferenceIncludingOutOfRangeIds) {
  DMSRT_REQUIRE_GPU();
  std::mt19937 rng(14);
  const int vocab = 1000, hidden = 576;
  std::vector<float> tf;
  const auto table = gpu_test::RandomBf16(static_cast<size_t>(vocab) * hidden, rng, 1.f, &tf);
  std::vector<int32_t> ids = {0, 999, 17, -1, 1000, 17, 523};
  for (int i = 0; i < 104; ++i) ids.push_back(static_cast<int32_t>(rng() % vocab));
  DeviceBuffer<uint16_t> dt(table), dout(ids.size() * hidden);
  DeviceBuffer<int32_t> di(ids);
  dout.Poison(gpu_test::kPoisonFloat);
  ASSERT_CUDA_OK(EmbeddingGather(Bf(dt), vocab, hidden, di.get(), static_cast<int>(ids.size()), Bf(dout), nullptr));
  std::vector<float> want(ids.size() * hidden);
  kernels::EmbeddingGatherRef(tf.data(), vocab, hidden, ids.data(), static_cast<int>(ids.size()), want.data());
  EXPECT_EQ(gpu_test::Bf16ToFloat(dout.Download()), want);
}

// Random GGUF data of `type` for rows x cols, with sane scales (random bytes elsewhere).
std::vector<uint8_t> RandomQuant(int type, int rows, int cols, std::mt19937& rng) {
  namespace q = kernels;
  const size_t bytes = static_cast<size_t>(rows) * q::QuantRowBytes(type, cols);
  std::vector<uint8_t> data(bytes);
  for (auto& b : data) b = static_cast<uint8_t>(rng());
  std::uniform_real_distribution<float> scale(0.001f, 0.05f), val(-3.f, 3.f);
  auto put16 = [&](size_t off, uint16_t h) { std::memcpy(&data[off], &h, 2); };
  const int64_t bb = q::QuantBlockBytes(type);
  const int64_t blocks = static_cast<int64_t>(bytes) / bb;
  for (int64_t b = 0; b < blocks; ++b) {
    const size_t o = static_cast<size_t>(b * bb);
    switch (type) {
      case q::kTypeF32: { const float f = val(rng); std::memcpy(&data[o], &f, 4); break; }
      case q::kTypeF16: put16(o, q::Fp32ToFp16(val(rng))); break;
      case q::kTypeBF16: put16(o, q::Fp32ToBf16(val(rng))); break;
      case q::kTypeQ4_0: case q::kTypeQ8_0: put16(o, q::Fp32ToFp16(scale(rng))); break;
      case q::kTypeQ4_1: put16(o, q::Fp32ToFp16(scale(rng))); put16(o + 2, q::Fp32ToFp16(-val(rng) * 0.1f)); break;
      case q::kTypeQ6_K: put16(o + 208, q::Fp32ToFp16(scale(rng) * 0.1f)); break;
      default: break;
    }
  }
  return data;
}

TEST(Dequantize, EveryFormatMatchesDequantizeRow) {
  DMSRT_REQUIRE_GPU();
  namespace q = kernels;
  std::mt19937 rng(15);
  for (int type : {q::kTypeF32, q::kTypeF16, q::kTypeBF16, q::kTypeQ4_0, q::kTypeQ4_1,
                   q::kTypeQ8_0, q::kTypeQ6_K}) {
    for (int rows : {1, 19}) {
      for (int cols : {256, 4096}) {
        SCOPED_TRACE("Dequantize/type" + std::to_string(type) + "_rows" + std::to_string(rows) +
                     "_cols" + std::to_string(cols));
        const auto data = RandomQuant(type, rows, cols, rng);
        DeviceBuffer<uint8_t> dsrc(data);
        DeviceBuffer<uint16_t> dout(static_cast<size_t>(rows) * cols);
        dout.Poison(gpu_test::kPoisonFloat);
        ASSERT_CUDA_OK(DequantizeToBf16(type, dsrc.get(), rows, cols, Bf(dout), nullptr));
        std::vector<float> want(static_cast<size_t>(rows) * cols);
        const size_t row_bytes = q::QuantRowBytes(type, cols);
        for (int r = 0; r < rows; ++r) {
          ASSERT_TRUE(q::DequantizeRow(type, data.data() + r * row_bytes, want.data() + static_cast<size_t>(r) * cols, cols));
        }
        const auto got = gpu_test::Bf16ToFloat(dout.Download());
        // bf16 rounding of the reference, plus one ulp for fused multiply-add on the device.
        EXPECT_LE(gpu_test::WorstScaledError(got, want, 1e-30, 1.0 / 128), 1.0);
      }
    }
  }
  DeviceBuffer<uint16_t> dummy(64);
  EXPECT_EQ(DequantizeToBf16(q::kTypeQ8_1, dummy.get(), 1, 32, Bf(dummy), nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(DequantizeToBf16(q::kTypeQ6_K, dummy.get(), 1, 32, Bf(dummy), nullptr), cudaErrorInvalidValue);
}

TEST(GemmBf16, MatchesDoubleReference) {
  DMSRT_REQUIRE_GPU();
  cublasHandle_t handle;
  ASSERT_EQ(cublasCreate(&handle), CUBLAS_STATUS_SUCCESS);
  std::mt19937 rng(16);
  for (int m : {1, 19, 111}) {
    for (int n : {19, 256}) {
      for (int k : {64, 576}) {
        for (GemmOut ot : {GemmOut::kBf16, GemmOut::kF32}) {
          SCOPED_TRACE("Gemm/m" + std::to_string(m) + "_n" + std::to_string(n) + "_k" +
                       std::to_string(k) + (ot == GemmOut::kBf16 ? "_bf16" : "_f32"));
          std::vector<float> af, wf;
          const auto a = gpu_test::RandomBf16(static_cast<size_t>(m) * k, rng, 1.f, &af);
          const auto w = gpu_test::RandomBf16(static_cast<size_t>(n) * k, rng, 0.05f, &wf, 0.01f);
          DeviceBuffer<uint16_t> da(a), dw(w);
          std::vector<float> want(static_cast<size_t>(m) * n);
          for (int i = 0; i < m; ++i) {
            for (int j = 0; j < n; ++j) {
              double s = 0;
              for (int kk = 0; kk < k; ++kk) s += static_cast<double>(af[i * k + kk]) * wf[j * k + kk];
              want[i * n + j] = static_cast<float>(s);
            }
          }
          std::vector<float> got;
          if (ot == GemmOut::kBf16) {
            DeviceBuffer<uint16_t> dc(static_cast<size_t>(m) * n);
            dc.Poison(gpu_test::kPoisonFloat);
            ASSERT_CUDA_OK(GemmBf16(handle, m, n, k, Bf(da), k, Bf(dw), k, dc.get(), n, ot, 1.f, 0.f, nullptr));
            got = gpu_test::Bf16ToFloat(dc.Download());
          } else {
            DeviceBuffer<float> dc(static_cast<size_t>(m) * n);
            dc.Poison(gpu_test::kPoisonFloat);
            ASSERT_CUDA_OK(GemmBf16(handle, m, n, k, Bf(da), k, Bf(dw), k, dc.get(), n, ot, 1.f, 0.f, nullptr));
            got = dc.Download();
          }
          EXPECT_LT(gpu_test::RelError(got, want), ot == GemmOut::kBf16 ? 6e-3 : 1e-4);
        }
      }
    }
  }
  cublasDestroy(handle);
}

}  // namespace
}  // namespace dmsrt
