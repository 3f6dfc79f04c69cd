// DMS eviction decisions (docs/dms-semantics.md §1), plain loops on float buffers.
//
// Variant A reads one query channel (the last channel of the first query head of each GQA group,
// before RoPE) and zeroes it before and after RoPE. Variant B runs a tiny adapter (RMSNorm over
// the residual stream, then a linear to one logit per KV head). Adapter weights are F32, F16 or
// BF16 and converted per element here (they are a few KB per layer, so no dequantised copy is
// kept). The threshold is evaluated in float: logit * alpha_scale - offset > 0, as the reference
// does in the model's compute type.
//
// dms_alpha_per == "layer": Variant A copies the bit of LOCAL KV head 0 (the header's contract);
// under tensor parallelism a rank whose first KV head is not global head 0 therefore needs that
// bit from rank 0. Variant B reads global row 0 of the adapter on every rank, so ranks agree.
// Per-layer Variant A together with TP > 1 is not handled here.
#include "runtime/backend/dms_decisions.h"

#include <cmath>
#include <cstring>

namespace dmsrt {
namespace {

float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t mant = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: value = mant * 2^-24
      const float f = static_cast<float>(mant) * (1.0f / 16777216.0f);
      std::memcpy(&bits, &f, 4);
      bits |= sign;
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

float BF16ToFloat(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

inline uint8_t Threshold(const DmsConfig& cfg, float logit) {
  return logit * cfg.alpha_scale - cfg.initial_alpha_offset > 0.0f ? 1 : 0;
}

}  // namespace

float AdapterWeightAt(const WeightTensor& w, int64_t i) {
  switch (w.type) {
    case DType::kF32: {
      float f;
      std::memcpy(&f, w.data + 4 * i, 4);
      return f;
    }
    case DType::kF16: {
      uint16_t h;
      std::memcpy(&h, w.data + 2 * i, 2);
      return HalfToFloat(h);
    }
    case DType::kBF16: {
      uint16_t h;
      std::memcpy(&h, w.data + 2 * i, 2);
      return BF16ToFloat(h);
    }
    default:
      return 0.0f;
  }
}


void DmsDecideVariantA(const DmsConfig& cfg, int32_t n, int32_t n_heads, int32_t n_kv,
                       int32_t head_dim, float* q, uint8_t* bits) {
  const int32_t g = n_heads / n_kv;
  for (int32_t t = 0; t < n; ++t) {
    float* qt = q + static_cast<int64_t>(t) * n_heads * head_dim;  // [n_heads, head_dim]
    for (int32_t j = 0; j < n_kv; ++j) {
      float& ch = qt[static_cast<int64_t>(j) * g * head_dim + head_dim - 1];
      bits[static_cast<int64_t>(t) * n_kv + j] = Threshold(cfg, ch);
      ch = 0.0f;
    }
    if (cfg.alpha_per_layer) {
      for (int32_t j = 1; j < n_kv; ++j) {
        bits[static_cast<int64_t>(t) * n_kv + j] = bits[static_cast<int64_t>(t) * n_kv];
      }
    }
  }
}

void DmsZeroAfterRope(int32_t n, int32_t n_heads, int32_t n_kv, int32_t head_dim, float* q) {
  const int32_t g = n_heads / n_kv;
  for (int32_t t = 0; t < n; ++t) {
    float* qt = q + static_cast<int64_t>(t) * n_heads * head_dim;
    for (int32_t j = 0; j < n_kv; ++j) qt[static_cast<int64_t>(j) * g * head_dim + head_dim - 1] = 0.0f;
  }
}

void DmsDecideVariantB(const DmsConfig& cfg, const LayerWeights& lw, float rms_eps, int32_t n,
                       int32_t hidden, int32_t n_kv, int32_t kv_head_offset, const float* x,
                       uint8_t* bits) {
  const bool has_norm = lw.dms_alpha_norm.present();
  const bool has_bias = lw.dms_alpha_bias.present();
  // With dms_alpha_per == "layer" the adapter may have a single output row; every head then
  // takes the bit of global row 0, so all tensor-parallel ranks agree.
  const bool per_layer = cfg.alpha_per_layer;
  for (int32_t t = 0; t < n; ++t) {
    const float* xt = x + static_cast<int64_t>(t) * hidden;  // [hidden]
    double ss = 0.0;
    for (int32_t c = 0; c < hidden; ++c) ss += static_cast<double>(xt[c]) * xt[c];
    const float inv_rms =
        1.0f / std::sqrt(static_cast<float>(ss / hidden) + rms_eps);
    for (int32_t j = 0; j < n_kv; ++j) {
      const int64_t row = per_layer ? 0 : static_cast<int64_t>(kv_head_offset) + j;
      if (per_layer && j > 0) {
        bits[static_cast<int64_t>(t) * n_kv + j] = bits[static_cast<int64_t>(t) * n_kv];
        continue;
      }
      float acc = 0.0f;
      const int64_t base = row * hidden;
      for (int32_t c = 0; c < hidden; ++c) {
        const float norm_w = has_norm ? AdapterWeightAt(lw.dms_alpha_norm, c) : 1.0f;
        const float y = xt[c] * inv_rms * norm_w;
        acc += AdapterWeightAt(lw.dms_alpha, base + c) * y;
      }
      if (has_bias) acc += AdapterWeightAt(lw.dms_alpha_bias, row);
      bits[static_cast<int64_t>(t) * n_kv + j] = Threshold(cfg, acc);
    }
  }
}

}  // namespace dmsrt
