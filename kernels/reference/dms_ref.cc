// DMS references: direct transcriptions of docs/dms-semantics.md §1 and §4.
#include "kernels/reference/dms_ref.h"

#include <climits>
#include <cmath>
#include <cstring>

namespace dmsrt {
namespace kernels {

void DmsRingUpdateRef(int32_t batch, int32_t n_kv_heads, int32_t head_dim, int32_t window,
                      int32_t block_tokens, int32_t max_blocks_per_head,
                      const int32_t* positions, const uint8_t* bits, const uint16_t* k,
                      const uint16_t* v, const int32_t* spare_blocks, int32_t* lengths,
                      int32_t* block_tables, int32_t* ring_slot, uint8_t* ring_flag,
                      uint16_t* k_pool, uint16_t* v_pool, int32_t* pos_pool,
                      int32_t* last_vis_pool, int32_t* status) {
  const int32_t ring = window + 1, bt = block_tokens;
  for (int32_t b = 0; b < batch; ++b) {
    for (int32_t j = 0; j < n_kv_heads; ++j) {
      const int32_t hs = b * n_kv_heads + j;
      int32_t* table = block_tables + static_cast<size_t>(hs) * max_blocks_per_head;
      int32_t* rslot = ring_slot + static_cast<size_t>(hs) * ring;
      uint8_t* rflag = ring_flag + static_cast<size_t>(hs) * ring;
      const int32_t t = positions[b];
      const int32_t idx = t % ring;
      const int32_t n = lengths[hs];
      int32_t slot;
      int32_t st = 0;
      if (t >= ring && rflag[idx]) {
        slot = rslot[idx];
      } else {
        slot = n;
        if (n % bt == 0) {
          if (spare_blocks[hs] < 0 || n / bt >= max_blocks_per_head) {
            status[hs] = -1;
            continue;  // nothing changes for this head
          }
          table[n / bt] = spare_blocks[hs];
          st = 1;
        }
        lengths[hs] = n + 1;
      }
      status[hs] = st;
      if (t >= 1) {
        const int32_t prev = (t - 1) % ring;
        rflag[prev] = bits[hs];
        const int32_t ps = rslot[prev];
        if (last_vis_pool != nullptr && ps >= 0) {
          last_vis_pool[static_cast<size_t>(table[ps / bt]) * bt + ps % bt] =
              bits[hs] ? (t - 1) + window : INT_MAX;
        }
      }
      rslot[idx] = slot;
      rflag[idx] = 0;
      const size_t e = static_cast<size_t>(table[slot / bt]) * bt + slot % bt;
      if (pos_pool != nullptr) pos_pool[e] = t;
      if (last_vis_pool != nullptr) last_vis_pool[e] = INT_MAX;
      std::memcpy(k_pool + e * head_dim, k + static_cast<size_t>(hs) * head_dim, head_dim * 2);
      std::memcpy(v_pool + e * head_dim, v + static_cast<size_t>(hs) * head_dim, head_dim * 2);
    }
  }
}

namespace {
void RotateRow(float* x, int32_t head_dim, float theta, const RopeScalingParams& scaling,
               int32_t pos) {
  const int32_t half = head_dim / 2;
  for (int32_t i = 0; i < half; ++i) {
    const double inv_freq = RopeInvFreq(theta, scaling, i, head_dim);
    const double a = static_cast<double>(pos) * inv_freq;
    const float c = static_cast<float>(std::cos(a)), s = static_cast<float>(std::sin(a));
    const float lo = x[i], hi = x[i + half];
    x[i] = lo * c - hi * s;
    x[i + half] = hi * c + lo * s;
  }
}
}  // namespace

void RopeDmsVariantARef(int32_t n, int32_t n_heads, int32_t n_kv_heads, int32_t head_dim,
                        float theta, bool decide, float alpha_scale, float alpha_offset,
                        bool alpha_per_layer, const int32_t* positions, float* q, float* k,
                        uint8_t* bits, const RopeScalingParams& scaling) {
  const int32_t g = n_heads / n_kv_heads;
  for (int32_t t = 0; t < n; ++t) {
    for (int32_t h = 0; h < n_heads; ++h) {
      float* row = q + (static_cast<size_t>(t) * n_heads + h) * head_dim;
      const bool leader = decide && h % g == 0;
      if (leader) {
        const int32_t j = h / g;
        const uint8_t d = row[head_dim - 1] * alpha_scale - alpha_offset > 0.f ? 1 : 0;
        if (!alpha_per_layer) {
          bits[t * n_kv_heads + j] = d;
        } else if (j == 0) {
          for (int32_t jj = 0; jj < n_kv_heads; ++jj) bits[t * n_kv_heads + jj] = d;
        }
        row[head_dim - 1] = 0.f;
      }
      RotateRow(row, head_dim, theta, scaling, positions[t]);
      if (leader) row[head_dim - 1] = 0.f;
    }
    if (k != nullptr) {
      for (int32_t j = 0; j < n_kv_heads; ++j) {
        RotateRow(k + (static_cast<size_t>(t) * n_kv_heads + j) * head_dim, head_dim, theta,
                  scaling, positions[t]);
      }
    }
  }
}

void DmsThresholdRef(int32_t n, int32_t n_kv_heads, const float* logits, int32_t ld,
                     const float* bias, float alpha_scale, float alpha_offset,
                     bool alpha_per_layer, uint8_t* bits) {
  for (int32_t t = 0; t < n; ++t) {
    for (int32_t j = 0; j < n_kv_heads; ++j) {
      const int32_t c = alpha_per_layer ? 0 : j;
      const float x = logits[static_cast<size_t>(t) * ld + c] + (bias != nullptr ? bias[c] : 0.f);
      bits[t * n_kv_heads + j] = x * alpha_scale - alpha_offset > 0.f ? 1 : 0;
    }
  }
}

}  // namespace kernels
}  // namespace dmsrt
