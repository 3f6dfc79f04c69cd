// GGUF tensor data -> bf16 on the device, for loading GGUF weights into the CUDA backend.
// Formats (kernels/reference/quant.h documents the block layouts, and its DequantizeRow is the
// reference): F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q6_K.
//   src [rows, row_bytes]  raw GGUF data, rows contiguous (QuantRowBytes(type, cols) each)
//   dst [rows, cols]       bf16
// cols must be a multiple of the format's block size. Returns cudaErrorInvalidValue for an
// unknown type or a bad column count.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace dmsrt {

cudaError_t DequantizeToBf16(int ggml_type, const void* src, int64_t rows, int64_t cols,
                             __nv_bfloat16* dst, cudaStream_t stream);

}  // namespace dmsrt
