#include "kernels/reference/kv_store_ref.h"

#include <algorithm>

#include "kernels/reference/random_hash.h"

namespace dmsrt {
namespace kernels {

void KvCopyBlocksRef(const int32_t* pairs, int32_t n, int32_t block_tokens, int32_t head_dim,
                     float* k_pool, float* v_pool, int32_t* pos_pool, int32_t* last_vis_pool) {
  const int64_t bt = block_tokens, row = static_cast<int64_t>(block_tokens) * head_dim;
  for (int32_t i = 0; i < n; ++i) {
    const int64_t src = pairs[2 * i], dst = pairs[2 * i + 1];
    std::copy_n(k_pool + src * row, row, k_pool + dst * row);
    std::copy_n(v_pool + src * row, row, v_pool + dst * row);
    std::copy_n(pos_pool + src * bt, bt, pos_pool + dst * bt);
    std::copy_n(last_vis_pool + src * bt, bt, last_vis_pool + dst * bt);
  }
}

void KvWriteSlotsRef(const int32_t* writes, int32_t n, const float* k, const float* v,
                     int32_t n_kv_heads, int32_t head_dim, float* k_pool, float* v_pool,
                     int32_t* pos_pool) {
  for (int32_t i = 0; i < n; ++i) {
    const int32_t* w = writes + 4 * i;
    const int64_t src = (static_cast<int64_t>(w[0]) * n_kv_heads + w[1]) * head_dim;
    const int64_t dst = static_cast<int64_t>(w[2]) * head_dim;
    std::copy_n(k + src, head_dim, k_pool + dst);
    std::copy_n(v + src, head_dim, v_pool + dst);
    pos_pool[w[2]] = w[3];
  }
}

void KvScatterInt32Ref(const int32_t* pairs, int32_t n, bool use_fill, int32_t fill, int32_t* dst) {
  for (int32_t i = 0; i < n; ++i) dst[pairs[2 * i]] = use_fill ? fill : pairs[2 * i + 1];
}

void AddBiasRowsRef(float* x, const float* bias, int32_t rows, int32_t cols, int32_t ld) {
  for (int32_t r = 0; r < rows; ++r) {
    for (int32_t c = 0; c < cols; ++c) x[static_cast<int64_t>(r) * ld + c] += bias[c];
  }
}

float RandomUniformSigned(uint64_t seed, uint64_t i) { return HashUniformSigned(seed, i); }

}  // namespace kernels
}  // namespace dmsrt
