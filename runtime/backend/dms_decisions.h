// DMS eviction decisions (docs/dms-semantics.md §1): Variant A (repurposed query channel) and
// Variant B (adapter), per-head or per-layer. Pure functions on float buffers, called by every
// CPU forward pass; the CUDA kernels are checked against them.
//
// Shapes are those of the heads on this rank: a rank owns whole GQA groups, so local KV head j
// reads local query head j*g.
#pragma once

#include <cstdint>

#include "runtime/model/model.h"

namespace dmsrt {

// Variant A, steps 1-3 and the first zeroing of step 4. `q` [n, n_heads, head_dim] is the query
// after q_norm and before RoPE. Writes bits[t * n_kv + j] = (q[t][j*g][hd-1] * alpha_scale -
// initial_alpha_offset > 0) and sets that channel to 0. With alpha_per_layer, KV head 0's bit is
// copied to every head.
void DmsDecideVariantA(const DmsConfig& cfg, int32_t n, int32_t n_heads, int32_t n_kv,
                       int32_t head_dim, float* q, uint8_t* bits);

// Variant A, step 4: after RoPE, zero channel hd-1 of query heads j*g again.
void DmsZeroAfterRope(int32_t n, int32_t n_heads, int32_t n_kv, int32_t head_dim, float* q);

// Element i of a float adapter tensor (F32, F16 or BF16; 0 for other types, which the model
// loader refuses for adapters).
float AdapterWeightAt(const WeightTensor& w, int64_t i);

// Variant B: `x` [n, hidden] is the layer's input residual stream (before input_layernorm).
// logits = dms_alpha(RMSNorm(x; dms_alpha_norm)) (+ bias), rows kv_head_offset ..
// kv_head_offset+n_kv-1 of dms_alpha; bits as in Variant A.
void DmsDecideVariantB(const DmsConfig& cfg, const LayerWeights& lw, float rms_eps, int32_t n,
                       int32_t hidden, int32_t n_kv, int32_t kv_head_offset, const float* x,
                       uint8_t* bits);

}  // namespace dmsrt
