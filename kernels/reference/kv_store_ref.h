// Plain C++ references of kernels/kv_store.cuh (float storage instead of bf16).
#pragma once

#include <cstdint>

namespace dmsrt {
namespace kernels {

void KvCopyBlocksRef(const int32_t* pairs, int32_t n, int32_t block_tokens, int32_t head_dim,
                     float* k_pool, float* v_pool, int32_t* pos_pool, int32_t* last_vis_pool);
void KvWriteSlotsRef(const int32_t* writes, int32_t n, const float* k, const float* v,
                     int32_t n_kv_heads, int32_t head_dim, float* k_pool, float* v_pool,
                     int32_t* pos_pool);
void KvScatterInt32Ref(const int32_t* pairs, int32_t n, bool use_fill, int32_t fill, int32_t* dst);
void AddBiasRowsRef(float* x, const float* bias, int32_t rows, int32_t cols, int32_t ld);

// u in [-1, 1) for element i of stream `seed`: the value FillRandomBf16 rounds to bf16 (times its
// scale). Host and device compute it with the same integer hash.
float RandomUniformSigned(uint64_t seed, uint64_t i);

}  // namespace kernels
}  // namespace dmsrt
