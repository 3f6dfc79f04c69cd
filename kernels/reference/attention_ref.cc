// Attention references: one query row at a time, scores materialised, softmax in double.
#include "kernels/reference/attention_ref.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace dmsrt {
namespace kernels {
namespace {

// out[D] = softmax(scale * q·k_j) · v_j over the given key/value rows.
void AttendRow(const float* q, const std::vector<const float*>& keys,
               const std::vector<const float*>& values, int32_t d, float scale, float* out) {
  if (keys.empty()) {
    for (int32_t i = 0; i < d; ++i) out[i] = 0.f;
    return;
  }
  std::vector<double> s(keys.size());
  double mx = -INFINITY;
  for (size_t j = 0; j < keys.size(); ++j) {
    double acc = 0;
    for (int32_t i = 0; i < d; ++i) acc += static_cast<double>(q[i]) * keys[j][i];
    s[j] = acc * scale;
    mx = std::max(mx, s[j]);
  }
  double sum = 0;
  for (double& x : s) {
    x = std::exp(x - mx);
    sum += x;
  }
  for (int32_t i = 0; i < d; ++i) {
    double o = 0;
    for (size_t j = 0; j < keys.size(); ++j) o += s[j] * values[j][i];
    out[i] = static_cast<float>(o / sum);
  }
}

}  // namespace

void DecodeAttentionRef(int32_t batch, int32_t n_heads, int32_t n_kv_heads, int32_t head_dim,
                        int32_t block_tokens, int32_t max_blocks_per_head, float scale,
                        const float* q, const float* k_pool, const float* v_pool,
                        const int32_t* block_tables, const int32_t* lengths, float* out) {
  const int32_t g = n_heads / n_kv_heads;
  for (int32_t b = 0; b < batch; ++b) {
    for (int32_t j = 0; j < n_kv_heads; ++j) {
      const int32_t* table = block_tables + (static_cast<size_t>(b) * n_kv_heads + j) * max_blocks_per_head;
      const int32_t len = lengths[b * n_kv_heads + j];
      std::vector<const float*> keys, values;
      for (int32_t t = 0; t < len; ++t) {
        const size_t off = (static_cast<size_t>(table[t / block_tokens]) * block_tokens +
                            t % block_tokens) * head_dim;
        keys.push_back(k_pool + off);
        values.push_back(v_pool + off);
      }
      for (int32_t h = j * g; h < (j + 1) * g; ++h) {
        const size_t row = (static_cast<size_t>(b) * n_heads + h) * head_dim;
        AttendRow(q + row, keys, values, head_dim, scale, out + row);
      }
    }
  }
}

void DecodeSlotWeightsRef(int32_t batch, int32_t n_heads, int32_t n_kv_heads, int32_t head_dim,
                          int32_t block_tokens, int32_t max_blocks_per_head, float scale,
                          const float* q, const float* k_pool, const int32_t* block_tables,
                          const int32_t* lengths, float* out, int32_t ld) {
  const int32_t g = n_heads / n_kv_heads;
  for (int32_t b = 0; b < batch; ++b) {
    for (int32_t j = 0; j < n_kv_heads; ++j) {
      const int32_t* table = block_tables + (static_cast<size_t>(b) * n_kv_heads + j) * max_blocks_per_head;
      const int32_t len = lengths[b * n_kv_heads + j];
      std::vector<double> w(len, 0.0), s(len);
      for (int32_t h = j * g; h < (j + 1) * g; ++h) {
        const float* qh = q + (static_cast<size_t>(b) * n_heads + h) * head_dim;
        double mx = -INFINITY;
        for (int32_t t = 0; t < len; ++t) {
          const float* k = k_pool + (static_cast<size_t>(table[t / block_tokens]) * block_tokens +
                                     t % block_tokens) * head_dim;
          double acc = 0;
          for (int32_t i = 0; i < head_dim; ++i) acc += static_cast<double>(qh[i]) * k[i];
          s[t] = acc * scale;
          mx = std::max(mx, s[t]);
        }
        double sum = 0;
        for (int32_t t = 0; t < len; ++t) sum += std::exp(s[t] - mx);
        for (int32_t t = 0; t < len; ++t) w[t] += std::exp(s[t] - mx) / sum;
      }
      float* o = out + (static_cast<size_t>(b) * n_kv_heads + j) * ld;
      for (int32_t t = 0; t < std::min(len, ld); ++t) o[t] = static_cast<float>(w[t] / g);
    }
  }
}

void PrefillAttentionRef(int32_t n, int32_t q_pos0, int32_t n_heads, int32_t n_kv_heads,
                         int32_t head_dim, int32_t block_tokens, int32_t max_blocks_per_head,
                         float scale, const float* q, const float* k_new, const float* v_new,
                         const int32_t* last_vis_new, const float* k_pool, const float* v_pool,
                         const int32_t* pos_pool, const int32_t* last_vis_pool,
                         const int32_t* block_table, const int32_t* old_lengths, float* out) {
  const int32_t g = n_heads / n_kv_heads;
  for (int32_t h = 0; h < n_heads; ++h) {
    const int32_t j = h / g;
    const int32_t* table = block_table + static_cast<size_t>(j) * max_blocks_per_head;
    for (int32_t qi = 0; qi < n; ++qi) {
      const int64_t qpos = q_pos0 + qi;
      std::vector<const float*> keys, values;
      for (int32_t t = 0; t < old_lengths[j]; ++t) {
        const size_t slot = static_cast<size_t>(table[t / block_tokens]) * block_tokens + t % block_tokens;
        if (pos_pool[slot] <= qpos && qpos <= last_vis_pool[slot]) {
          keys.push_back(k_pool + slot * head_dim);
          values.push_back(v_pool + slot * head_dim);
        }
      }
      for (int32_t kj = 0; kj <= qi; ++kj) {
        if (qpos <= last_vis_new[static_cast<size_t>(kj) * n_kv_heads + j]) {
          keys.push_back(k_new + (static_cast<size_t>(kj) * n_kv_heads + j) * head_dim);
          values.push_back(v_new + (static_cast<size_t>(kj) * n_kv_heads + j) * head_dim);
        }
      }
      const size_t row = (static_cast<size_t>(qi) * n_heads + h) * head_dim;
      AttendRow(q + row, keys, values, head_dim, scale, out + row);
    }
  }
}

}  // namespace kernels
}  // namespace dmsrt
