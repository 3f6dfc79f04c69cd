// Reference dequantization of GGML block formats (kernels/reference/quant.h): hand-built blocks
// with values computed independently from the format description, fp16/bf16 converters against
// the F16C instructions and exhaustively round-tripped, reference quantizers, and random blocks
// against the `gguf` Python package's own dequantization (skipped when python3/gguf is absent).
#include "kernels/reference/quant.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace dmsrt {
namespace kernels {
namespace {

TEST(Fp16, EveryHalfRoundTrips) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = Fp16ToFp32(static_cast<uint16_t>(h));
    if (std::isnan(f)) {
      EXPECT_EQ((h & 0x7C00u), 0x7C00u);
      EXPECT_TRUE(std::isnan(Fp16ToFp32(Fp32ToFp16(f))));
      continue;
    }
    EXPECT_EQ(Fp32ToFp16(f), h) << "half 0x" << std::hex << h;
#if defined(__F16C__)
    EXPECT_EQ(f, _cvtsh_ss(static_cast<uint16_t>(h))) << "half 0x" << std::hex << h;
#endif
  }
  EXPECT_EQ(Fp16ToFp32(0x3C00), 1.0f);
  EXPECT_EQ(Fp16ToFp32(0xC000), -2.0f);
  EXPECT_EQ(Fp16ToFp32(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(Fp16ToFp32(0x7BFF), 65504.0f);
}

TEST(Fp16, RoundsToNearestEven) {
  EXPECT_EQ(Fp32ToFp16(1.0f + std::ldexp(1.0f, -11)), 0x3C00);  // tie -> even (down)
  EXPECT_EQ(Fp32ToFp16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3C02);  // tie -> even (up)
  EXPECT_EQ(Fp32ToFp16(70000.0f), 0x7C00);  // overflow -> inf
  EXPECT_EQ(Fp32ToFp16(std::ldexp(1.0f, -25)), 0x0000);  // tie to zero
  EXPECT_EQ(Fp32ToFp16(std::ldexp(1.5f, -25)), 0x0001);
#if defined(__F16C__)
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> mant(-1.0f, 1.0f);
  std::uniform_int_distribution<int> ex(-30, 17);
  for (int i = 0; i < 200000; ++i) {
    const float f = std::ldexp(mant(rng), ex(rng));
    ASSERT_EQ(Fp32ToFp16(f), _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT)) << f;
  }
#endif
}

TEST(Bf16, Conversions) {
  EXPECT_EQ(Bf16ToFp32(0x3F80), 1.0f);
  EXPECT_EQ(Bf16ToFp32(0xC040), -3.0f);
  EXPECT_EQ(Fp32ToBf16(1.0f), 0x3F80);
  EXPECT_EQ(Fp32ToBf16(1.0f + std::ldexp(1.0f, -8)), 0x3F80);      // tie -> even
  EXPECT_EQ(Fp32ToBf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3F82);  // tie -> even
  EXPECT_TRUE(std::isnan(Bf16ToFp32(Fp32ToBf16(std::nanf("")))));
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = Bf16ToFp32(static_cast<uint16_t>(h));
    if (!std::isnan(f)) {
      ASSERT_EQ(Fp32ToBf16(f), h);
    }
  }
}

TEST(Dequantize, Q4_0HandBuilt) {
  BlockQ4_0 b[2];
  for (int k = 0; k < 2; ++k) {
    b[k].d = Fp32ToFp16(k == 0 ? 0.5f : -0.25f);
    for (int j = 0; j < 16; ++j) b[k].qs[j] = static_cast<uint8_t>(j | ((15 - j) << 4));
  }
  std::vector<float> out(64);
  ASSERT_TRUE(DequantizeRow(kTypeQ4_0, b, out.data(), 64));
  for (int k = 0; k < 2; ++k) {
    const double d = k == 0 ? 0.5 : -0.25;
    for (int j = 0; j < 16; ++j) {
      EXPECT_EQ(out[k * 32 + j], (j - 8) * d);
      EXPECT_EQ(out[k * 32 + 16 + j], (15 - j - 8) * d);
    }
  }
}

TEST(Dequantize, Q4_1HandBuilt) {
  BlockQ4_1 b;
  b.d = Fp32ToFp16(0.25f);
  b.m = Fp32ToFp16(-1.5f);
  for (int j = 0; j < 16; ++j) b.qs[j] = static_cast<uint8_t>(((j * 5) % 16) | (j << 4));
  float out[32];
  ASSERT_TRUE(DequantizeRow(kTypeQ4_1, &b, out, 32));
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(out[j], ((j * 5) % 16) * 0.25 - 1.5);
    EXPECT_EQ(out[16 + j], j * 0.25 - 1.5);
  }
}

TEST(Dequantize, Q8_0HandBuilt) {
  BlockQ8_0 b;
  b.d = Fp32ToFp16(0.125f);
  for (int j = 0; j < 32; ++j) b.qs[j] = static_cast<int8_t>(j * 8 - 128);
  float out[32];
  ASSERT_TRUE(DequantizeRow(kTypeQ8_0, &b, out, 32));
  for (int j = 0; j < 32; ++j) EXPECT_EQ(out[j], (j * 8 - 128) * 0.125);
}

// Packs 256 six-bit values into a Q6_K block from the element's point of view (the inverse of the
// format description in quant.h): element i lives in half h = i / 128; l = i % 128 is in group
// g = l / 32 at position p = l % 32. Low 4 bits: ql[64h + p + 32 (g odd)], low nibble for g < 2.
// High 2 bits: qh[32h + p] bits 2g..2g+1. Scale: scales[8h + 2g + p / 16].
void PackQ6K(const int* q6, BlockQ6_K* b) {
  std::memset(b->ql, 0, sizeof(b->ql));
  std::memset(b->qh, 0, sizeof(b->qh));
  for (int i = 0; i < 256; ++i) {
    const int h = i / 128, l = i % 128, g = l / 32, p = l % 32;
    uint8_t& ql = b->ql[64 * h + p + ((g & 1) ? 32 : 0)];
    ql |= static_cast<uint8_t>((q6[i] & 0xF) << (g < 2 ? 0 : 4));
    b->qh[32 * h + p] |= static_cast<uint8_t>(((q6[i] >> 4) & 3) << (2 * g));
  }
}
int Q6KScaleIndex(int i) {
  const int h = i / 128, l = i % 128, g = l / 32, p = l % 32;
  return 8 * h + 2 * g + p / 16;
}

TEST(Dequantize, Q6_KHandBuilt) {
  std::mt19937 rng(3);
  BlockQ6_K b[2];
  std::vector<double> expect(512);
  for (int k = 0; k < 2; ++k) {
    int q6[256];
    for (int i = 0; i < 256; ++i) q6[i] = static_cast<int>(rng() % 64);
    PackQ6K(q6, &b[k]);
    for (int s = 0; s < 16; ++s) b[k].scales[s] = static_cast<int8_t>(static_cast<int>(rng() % 255) - 127);
    const float d = k == 0 ? 0.0078125f : -0.03125f;
    b[k].d = Fp32ToFp16(d);
    for (int i = 0; i < 256; ++i) {
      expect[k * 256 + i] = static_cast<double>(d) * b[k].scales[Q6KScaleIndex(i)] * (q6[i] - 32);
    }
  }
  std::vector<float> out(512);
  ASSERT_TRUE(DequantizeRow(kTypeQ6_K, b, out.data(), 512));
  for (int i = 0; i < 512; ++i) ASSERT_EQ(out[i], static_cast<float>(expect[i])) << "element " << i;
}

TEST(Dequantize, FloatTypesAndBadInput) {
  const float f[3] = {1.5f, -2.0f, 0.25f};
  uint16_t h[3], bf[3];
  for (int i = 0; i < 3; ++i) {
    h[i] = Fp32ToFp16(f[i]);
    bf[i] = Fp32ToBf16(f[i]);
  }
  float out[3];
  ASSERT_TRUE(DequantizeRow(kTypeF16, h, out, 3));
  for (int i = 0; i < 3; ++i) EXPECT_EQ(out[i], f[i]);
  ASSERT_TRUE(DequantizeRow(kTypeBF16, bf, out, 3));
  for (int i = 0; i < 3; ++i) EXPECT_EQ(out[i], f[i]);
  ASSERT_TRUE(DequantizeRow(kTypeF32, f, out, 3));
  for (int i = 0; i < 3; ++i) EXPECT_EQ(out[i], f[i]);
  EXPECT_FALSE(DequantizeRow(kTypeQ4_0, h, out, 31));  // not a whole block
  EXPECT_FALSE(DequantizeRow(12, h, out, 256));         // Q4_K: not handled
  EXPECT_EQ(QuantBlockBytes(kTypeQ6_K), 210);
  EXPECT_EQ(QuantRowBytes(kTypeQ4_1, 576), 18 * 20);
}

TEST(Quantize, ReferenceQuantizersRoundTrip) {
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const int cols = 96;
  std::vector<float> x(cols), y(cols);
  for (auto& v : x) v = nd(rng);
  auto max_err = [&]() {
    double e = 0;
    for (int i = 0; i < cols; ++i) e = std::max(e, std::fabs(static_cast<double>(x[i]) - y[i]));
    return e;
  };
  float amax = 0;
  for (float v : x) amax = std::max(amax, std::fabs(v));
  std::vector<BlockQ8_0> q8(cols / 32);
  QuantizeRowQ8_0Ref(x.data(), q8.data(), cols);
  DequantizeRow(kTypeQ8_0, q8.data(), y.data(), cols);
  EXPECT_LT(max_err(), amax / 127 * 0.51 + 1e-3);
  std::vector<BlockQ8_1> q81(cols / 32);
  QuantizeRowQ8_1Ref(x.data(), q81.data(), cols);
  DequantizeRow(kTypeQ8_1, q81.data(), y.data(), cols);
  EXPECT_LT(max_err(), amax / 127 * 0.51 + 1e-3);
  for (int b = 0; b < cols / 32; ++b) {  // s = d * Σq
    double s = 0;
    for (int j = 0; j < 32; ++j) s += q81[b].qs[j];
    EXPECT_NEAR(Fp16ToFp32(q81[b].s), s * Fp16ToFp32(q81[b].d), 1e-2 * std::fabs(s) * Fp16ToFp32(q81[b].d) + 1e-3);
  }
  std::vector<BlockQ4_0> q40(cols / 32);
  QuantizeRowQ4_0Ref(x.data(), q40.data(), cols);
  DequantizeRow(kTypeQ4_0, q40.data(), y.data(), cols);
  EXPECT_LT(max_err(), amax / 8 * 0.51 + 1e-3);
  std::vector<BlockQ4_1> q41(cols / 32);
  QuantizeRowQ4_1Ref(x.data(), q41.data(), cols);
  DequantizeRow(kTypeQ4_1, q41.data(), y.data(), cols);
  EXPECT_LT(max_err(), 2 * amax / 15 * 0.51 + 1e-2);
}

// Random blocks (bytes, with finite fp16 scales) dequantized by the gguf Python package.
TEST(Dequantize, MatchesGgufPython) {
  if (std::system("python3 -c 'import gguf.quants, numpy' >/dev/null 2>&1") != 0) {
    GTEST_SKIP() << "python3 with the gguf and numpy packages is not available";
  }
  char tmpl[] = "/tmp/dmsrt_quant_XXXXXX";
  const std::string dir = mkdtemp(tmpl);
  const std::string script = dir + "/gen.py";
  {
    std::ofstream py(script);
    py << R"PY(
import sys, numpy as np, gguf
from gguf.quants import dequantize
from gguf import GGMLQuantizationType as T
out = sys.argv[1]
rng = np.random.default_rng(1234)
# (type, name, byte offsets of fp16 scale fields inside a block)
specs = [(T.Q4_0, "q4_0", [0]), (T.Q4_1, "q4_1", [0, 2]), (T.Q8_0, "q8_0", [0]), (T.Q6_K, "q6_k", [208])]
for t, name, scale_offs in specs:
    bs, ts = gguf.GGML_QUANT_SIZES[t]
    rows, nblk = 3, 4
    raw = rng.integers(0, 256, size=(rows, nblk, ts), dtype=np.uint8)
    for off in scale_offs:
        sc = (rng.standard_normal((rows, nblk)) * 0.05).astype(np.float16)
        raw[:, :, off:off + 2] = sc.view(np.uint8).reshape(rows, nblk, 2)
    raw = raw.reshape(rows, nblk * ts)
    deq = dequantize(raw, t).astype(np.float32)
    raw.tofile(f"{out}/{name}.bin")
    deq.tofile(f"{out}/{name}.f32")
)PY";
  }
  ASSERT_EQ(std::system(("python3 " + script + " " + dir).c_str()), 0);
  struct Case {
    int type;
    const char* name;
  } cases[] = {{kTypeQ4_0, "q4_0"}, {kTypeQ4_1, "q4_1"}, {kTypeQ8_0, "q8_0"}, {kTypeQ6_K, "q6_k"}};
  for (const Case& c : cases) {
    auto read = [](const std::string& p) {
      std::ifstream f(p, std::ios::binary);
      return std::vector<char>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    };
    const std::vector<char> raw = read(dir + "/" + c.name + ".bin");
    const std::vector<char> deq = read(dir + "/" + c.name + ".f32");
    const int64_t cols = 4 * QuantBlockSize(c.type);
    const int64_t rows = 3;
    ASSERT_EQ(static_cast<int64_t>(raw.size()), rows * QuantRowBytes(c.type, cols)) << c.name;
    ASSERT_EQ(static_cast<int64_t>(deq.size()), rows * cols * 4) << c.name;
    const float* expect = reinterpret_cast<const float*>(deq.data());
    std::vector<float> got(cols);
    for (int64_t r = 0; r < rows; ++r) {
      ASSERT_TRUE(DequantizeRow(c.type, raw.data() + r * QuantRowBytes(c.type, cols), got.data(), cols));
      for (int64_t i = 0; i < cols; ++i) {
        const float e = expect[r * cols + i];
        ASSERT_NEAR(got[i], e, 1e-6f * std::fabs(e) + 1e-9f) << c.name << " row " << r << " elem " << i;
      }
    }
  }
  std::system(("rm -rf " + dir).c_str());
}

}  // namespace
}  // namespace kernels
}  // namespace dmsrt
