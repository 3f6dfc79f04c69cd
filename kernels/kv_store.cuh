// Data movement of the paged KV store on the device (runtime/kv/paged_kv.h decides it on the host),
// plus two helpers of the CUDA backend: bias add and seeded random fill for synthetic weights.
//
// Pools: k_pool/v_pool [num_blocks, block_tokens, head_dim] bf16, pos_pool/last_vis_pool
// [num_blocks, block_tokens] int32 (a slot index is block * block_tokens + offset).
//   KvCopyBlocks   pairs [n, 2] = (src, dst): every slot of src (K, V, pos, last_vis) -> dst.
//                  Sources are never destinations of the same call.
//   KvWriteSlots   writes [n, 4] = (row, head, slot, pos): k/v [rows, n_kv, head_dim] row `row`,
//                  head `head` -> the slot; pos_pool[slot] = pos.
//   KvScatterInt32 pairs [n, 2] = (index, value): dst[index] = value, or = fill when use_fill.
//   AddBiasRows    x[r, c] += bias[c] for r < rows, c < cols (row stride ld).
//   FillRandomBf16 dst[i] = scale * u(seed, i), u uniform in [-1, 1) from a counter hash
//                  (kernels/reference/kv_store_ref.h gives the same values on the host).
// All index arrays are device memory. Launchers allocate nothing and return the launch error.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace dmsrt {

cudaError_t KvCopyBlocks(const int32_t* pairs, int32_t n, int32_t block_tokens, int32_t head_dim,
                         __nv_bfloat16* k_pool, __nv_bfloat16* v_pool, int32_t* pos_pool,
                         int32_t* last_vis_pool, cudaStream_t stream);

cudaError_t KvWriteSlots(const int32_t* writes, int32_t n, const __nv_bfloat16* k,
                         const __nv_bfloat16* v, int32_t n_kv_heads, int32_t head_dim,
                         __nv_bfloat16* k_pool, __nv_bfloat16* v_pool, int32_t* pos_pool,
                         cudaStream_t stream);

cudaError_t KvScatterInt32(const int32_t* pairs, int32_t n, bool use_fill, int32_t fill,
                           int32_t* dst, cudaStream_t stream);

cudaError_t AddBiasRows(__nv_bfloat16* x, const __nv_bfloat16* bias, int32_t rows, int32_t cols,
                        int32_t ld, cudaStream_t stream);

cudaError_t FillRandomBf16(__nv_bfloat16* dst, int64_t n, uint64_t seed, float scale,
                           cudaStream_t stream);

}  // namespace dmsrt
