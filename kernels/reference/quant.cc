// Reference (scalar) dequantization and quantization of GGML block formats; see quant.h for the
// layouts. Written for clarity, not speed: the fast paths live in kernels/cpu/.
#include "kernels/reference/quant.h"

#include <algorithm>
#include <cmath>

namespace dmsrt {
namespace kernels {

bool QuantTypeKnown(int type) { return QuantBlockSize(type) > 0; }

int64_t QuantBlockSize(int type) {
  switch (type) {
    case kTypeF32:
    case kTypeF16:
    case kTypeBF16:
      return 1;
    case kTypeQ4_0:
    case kTypeQ4_1:
    case kTypeQ8_0:
    case kTypeQ8_1:
      return kQK;
    case kTypeQ6_K:
      return kQK_K;
    default:
      return 0;
  }
}

int64_t QuantBlockBytes(int type) {
  switch (type) {
    case kTypeF32: return 4;
    case kTypeF16: return 2;
    case kTypeBF16: return 2;
    case kTypeQ4_0: return sizeof(BlockQ4_0);
    case kTypeQ4_1: return sizeof(BlockQ4_1);
    case kTypeQ8_0: return sizeof(BlockQ8_0);
    case kTypeQ8_1: return sizeof(BlockQ8_1);
    case kTypeQ6_K: return sizeof(BlockQ6_K);
    default: return 0;
  }
}

float Fp16ToFp32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {
      // Subnormal half: normalise.
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while ((mant & 0x400u) == 0);
      mant &= 0x3FFu;
      bits = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | (mant << 13);
    }
  } else if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t Fp32ToFp16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t absx = x & 0x7FFFFFFFu;
  if (absx >= 0x7F800000u) {  // inf or nan
    return sign | 0x7C00u | (absx > 0x7F800000u ? 0x200u : 0u);
  }
  if (absx >= 0x477FF000u) return sign | 0x7C00u;  // rounds to >= 65536: overflow to inf
  if (absx < 0x38800000u) {                        // below the smallest normal half
    if (absx < 0x33000000u) return sign;           // rounds to zero
    // Value = mant * 2^(e-150) and the half subnormal unit is 2^-24, so q = mant >> (126 - e).
    const uint32_t e = absx >> 23;
    const uint32_t mant = (absx & 0x7FFFFFu) | 0x800000u;
    const uint32_t drop = 126u - e;  // 14..24
    uint32_t q = mant >> drop;
    const uint32_t rem = mant & ((1u << drop) - 1);
    const uint32_t half = 1u << (drop - 1);
    if (rem > half || (rem == half && (q & 1))) ++q;
    return sign | static_cast<uint16_t>(q);
  }
  // Normal: rebias exponent, round mantissa to 10 bits (carry may bump the exponent, fine).
  uint32_t h = ((absx >> 13) - ((127 - 15) << 10));
  const uint32_t rem = absx & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) ++h;
  return sign | static_cast<uint16_t>(h);
}

uint16_t Fp32ToBf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
  x += 0x7FFFu + ((x >> 16) & 1u);
  return static_cast<uint16_t>(x >> 16);
}

namespace {

void DequantQ4_0(const BlockQ4_0* b, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i) {
    const float d = Fp16ToFp32(b[i].d);
    for (int j = 0; j < kQK / 2; ++j) {
      y[i * kQK + j] = static_cast<float>((b[i].qs[j] & 0x0F) - 8) * d;
      y[i * kQK + j + kQK / 2] = static_cast<float>((b[i].qs[j] >> 4) - 8) * d;
    }
  }
}

void DequantQ4_1(const BlockQ4_1* b, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i) {
    const float d = Fp16ToFp32(b[i].d);
    const float m = Fp16ToFp32(b[i].m);
    for (int j = 0; j < kQK / 2; ++j) {
      y[i * kQK + j] = static_cast<float>(b[i].qs[j] & 0x0F) * d + m;
      y[i * kQK + j + kQK / 2] = static_cast<float>(b[i].qs[j] >> 4) * d + m;
    }
  }
}

void DequantQ8_0(const BlockQ8_0* b, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i) {
    const float d = Fp16ToFp32(b[i].d);
    for (int j = 0; j < kQK; ++j) y[i * kQK + j] = static_cast<float>(b[i].qs[j]) * d;
  }
}

void DequantQ8_1(const BlockQ8_1* b, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i) {
    const float d = Fp16ToFp32(b[i].d);
    for (int j = 0; j < kQK; ++j) y[i * kQK + j] = static_cast<float>(b[i].qs[j]) * d;
  }
}

void DequantQ6_K(const BlockQ6_K* b, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i) {
    const float d = Fp16ToFp32(b[i].d);
    const uint8_t* ql = b[i].ql;
    const uint8_t* qh = b[i].qh;
    const int8_t* sc = b[i].scales;
    float* out = y + i * kQK_K;
    for (int half = 0; half < 2; ++half) {
      for (int l = 0; l < 32; ++l) {
        const int is = l / 16;
        const int q0 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
        const int q1 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
        const int q2 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
        const int q3 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
        out[l + 0] = d * static_cast<float>(sc[is + 0]) * static_cast<float>(q0);
        out[l + 32] = d * static_cast<float>(sc[is + 2]) * static_cast<float>(q1);
        out[l + 64] = d * static_cast<float>(sc[is + 4]) * static_cast<float>(q2);
        out[l + 96] = d * static_cast<float>(sc[is + 6]) * static_cast<float>(q3);
      }
      out += 128;
      ql += 64;
      qh += 32;
      sc += 8;
    }
  }
}

}  // namespace

bool DequantizeRow(int type, const void* src, float* dst, int64_t cols) {
  const int64_t bs = QuantBlockSize(type);
  if (bs == 0 || cols < 0 || cols % bs != 0) return false;
  const int64_t nb = cols / bs;
  switch (type) {
    case kTypeF32:
      std::memcpy(dst, src, static_cast<size_t>(cols) * 4);
      return true;
    case kTypeF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < cols; ++i) dst[i] = Fp16ToFp32(s[i]);
      return true;
    }
    case kTypeBF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < cols; ++i) dst[i] = Bf16ToFp32(s[i]);
      return true;
    }
    case kTypeQ4_0: DequantQ4_0(static_cast<const BlockQ4_0*>(src), dst, nb); return true;
    case kTypeQ4_1: DequantQ4_1(static_cast<const BlockQ4_1*>(src), dst, nb); return true;
    case kTypeQ8_0: DequantQ8_0(static_cast<const BlockQ8_0*>(src), dst, nb); return true;
    case kTypeQ8_1: DequantQ8_1(static_cast<const BlockQ8_1*>(src), dst, nb); return true;
    case kTypeQ6_K: DequantQ6_K(static_cast<const BlockQ6_K*>(src), dst, nb); return true;
    default: return false;
  }
}

void QuantizeRowQ8_0Ref(const float* x, BlockQ8_0* y, int64_t cols) {
  for (int64_t i = 0; i < cols / kQK; ++i) {
    float amax = 0.0f;
    for (int j = 0; j < kQK; ++j) amax = std::max(amax, std::fabs(x[i * kQK + j]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    y[i].d = Fp32ToFp16(d);
    for (int j = 0; j < kQK; ++j) {
      y[i].qs[j] = static_cast<int8_t>(std::nearbyint(x[i * kQK + j] * id));
    }
  }
}

void QuantizeRowQ8_1Ref(const float* x, BlockQ8_1* y, int64_t cols) {
  for (int64_t i = 0; i < cols / kQK; ++i) {
    float amax = 0.0f;
    for (int j = 0; j < kQK; ++j) amax = std::max(amax, std::fabs(x[i * kQK + j]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    int sum = 0;
    for (int j = 0; j < kQK; ++j) {
      const int q = static_cast<int>(std::nearbyint(x[i * kQK + j] * id));
      y[i].qs[j] = static_cast<int8_t>(q);
      sum += q;
    }
    y[i].d = Fp32ToFp16(d);
    y[i].s = Fp32ToFp16(static_cast<float>(sum) * d);
  }
}

void QuantizeRowQ4_0Ref(const float* x, BlockQ4_0* y, int64_t cols) {
  for (int64_t i = 0; i < cols / kQK; ++i) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < kQK; ++j) {
      const float v = x[i * kQK + j];
      if (std::fabs(v) > amax) {
        amax = std::fabs(v);
        max = v;
      }
    }
    const float d = max / -8.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    y[i].d = Fp32ToFp16(d);
    for (int j = 0; j < kQK / 2; ++j) {
      const int q0 = std::min(15, static_cast<int>(x[i * kQK + j] * id + 8.5f));
      const int q1 = std::min(15, static_cast<int>(x[i * kQK + j + kQK / 2] * id + 8.5f));
      y[i].qs[j] = static_cast<uint8_t>(q0 | (q1 << 4));
    }
  }
}

void QuantizeRowQ4_1Ref(const float* x, BlockQ4_1* y, int64_t cols) {
  for (int64_t i = 0; i < cols / kQK; ++i) {
    float mn = x[i * kQK], mx = x[i * kQK];
    for (int j = 1; j < kQK; ++j) {
      mn = std::min(mn, x[i * kQK + j]);
      mx = std::max(mx, x[i * kQK + j]);
    }
    const float d = (mx - mn) / 15.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    y[i].d = Fp32ToFp16(d);
    y[i].m = Fp32ToFp16(mn);
    for (int j = 0; j < kQK / 2; ++j) {
      const int q0 = std::min(15, static_cast<int>((x[i * kQK + j] - mn) * id + 0.5f));
      const int q1 = std::min(15, static_cast<int>((x[i * kQK + j + kQK / 2] - mn) * id + 0.5f));
      y[i].qs[j] = static_cast<uint8_t>(q0 | (q1 << 4));
    }
  }
}

}  // namespace kernels
}  // namespace dmsrt
