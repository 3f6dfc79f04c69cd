// Quantized matrix products on the CPU: Y = X · Wᵀ for weights in GGML block formats.
//
//   W  [rows, cols]  one of F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q6_K (GGML type id, quant.h)
//   X  [n, cols]     float activations, row stride cols
//   Y  [n, ldy]      Y[t * ldy + r] = Σ_c W[r, c] · X[t, c]
//
// Why this way (the approach of llama.cpp's CPU backend): decode is y = W x with one token, so
// every weight is read once per token and the cost is converting and multiplying quantized
// weights. X is quantized once per call to 8-bit blocks of 32 (a float scale d and the scaled
// sum s = d·Σq per block), and each block of W is combined with it by an 8-bit integer dot
// product (AVX-512 VNNI `vpdpbusd` on two blocks per 512-bit register; AVX2 `vpmaddubsw` or
// AVX-VNNI on one block per 256-bit register; a scalar loop otherwise); Q4_1's min term and
// Q4_0's -8 offset fold in through s. Decode is bound by memory bandwidth, so the weight rows are
// software-prefetched a few blocks ahead. For several tokens (prefill) each unpacked weight block
// is reused against up to 4 tokens from registers (4 rows x 4 tokens tiles), so the per-token
// cost drops well below decode.
// F32/F16/BF16/Q6_K rows are converted to float (a small per-thread scratch) and use float dots.
//
// Work is split over output rows in chunks that workers take from a shared counter; each output
// element is computed by exactly one worker with the same instruction sequence whatever the
// chunking, so results are bit-identical for any number of threads.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/cpu/thread_pool.h"

namespace dmsrt {
namespace kernels {

// Scratch memory for a matmul call; grows to the largest call seen, never shrinks. One per
// caller thread (not shared between concurrent calls).
struct MatmulWorkspace {
  std::vector<int8_t> qs;  // [n, cols] activations quantized to int8
  std::vector<float> d;    // [n, cols/32] block scales
  std::vector<float> s;    // [n, cols/32] d * Σ q of each block
  std::vector<int64_t> chunks;  // work list of the current call: (spec, first row, end row)
};

// One product of a batch that shares the same activations X.
struct MatmulSpec {
  int type = 0;             // GGML type id of W
  const void* w = nullptr;  // [rows, cols] in that type's row layout
  int64_t rows = 0;
  float* y = nullptr;       // [n, ldy]; columns 0..rows-1 are written
  int64_t ldy = 0;
  // Bytes between consecutive rows of w; 0 = dense rows of `cols` values. A larger stride views
  // a block-aligned column slice of a wider matrix (a tensor-parallel shard of o_proj/down).
  int64_t w_stride = 0;
};

// The integer dot-product path this build uses for quantized weights: "avx512-vnni", "avx2"
// (with AVX-VNNI when the compiler targets it: "avx2-vnni") or "scalar". Chosen at compile time
// (-march), so a binary built on another machine may not match the CPU it runs on.
const char* MatmulPath();

// True when MatMul supports weights of `type` with `cols` columns.
bool MatMulSupported(int type, int64_t cols);

// Computes every product in `specs` (all with `cols` columns) for the n rows of `x`, on `pool`
// (nullptr = the calling thread alone). Quantizes X once for all of them. Returns false (and
// writes nothing) if a type is not supported or cols is not a multiple of its block size.
bool MatMulBatch(ThreadPool* pool, const MatmulSpec* specs, int n_specs, int64_t cols,
                 const float* x, int64_t n, MatmulWorkspace* ws);

inline bool MatMul(ThreadPool* pool, int type, const void* w, int64_t rows, int64_t cols,
                   const float* x, int64_t n, float* y, int64_t ldy, MatmulWorkspace* ws) {
  MatmulSpec spec{type, w, rows, y, ldy, 0};
  return MatMulBatch(pool, &spec, 1, cols, x, n, ws);
}

// Quantizes `n` rows of `cols` floats (cols a multiple of 32) to the activation format above.
void QuantizeActivations(const float* x, int64_t n, int64_t cols, int8_t* qs, float* d, float* s);

// Converts one row to float like reference DequantizeRow (bit-identical results), vectorised for
// F16 and BF16 (used for embedding lookups and the float matmul paths).
void DequantizeRowFast(int type, const void* src, float* dst, int64_t cols);

// Float dot product of length n (vectorised).
float DotF32(const float* a, const float* b, int64_t n);

}  // namespace kernels
}  // namespace dmsrt
