// Element types of model tensors and the byte layout of quantized rows.
//
// Type ids are GGML's (they are what GGUF files store), so a GGUF tensor type converts with a
// range check. Quantized types pack `BlockSize(t)` consecutive values of one row into
// `BlockBytes(t)` bytes; a row of `cols` values (cols a multiple of the block size) takes
// RowBytes(t, cols) bytes. Block formats are documented in kernels/reference/quant.h.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace dmsrt {

enum class DType : int32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ8_1 = 9,
  kQ2_K = 10,
  kQ3_K = 11,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kQ8_K = 15,
  kBF16 = 30,
};

// Name as GGML prints it ("F32", "Q4_1", ...); "type#<id>" for ids we do not know.
std::string DTypeName(DType t);
// True for the types the runtime can compute with (load and use directly).
bool DTypeSupported(DType t);
// Values per block (1 for plain float types).
int64_t BlockSize(DType t);
// Bytes per block (the element size for plain float types).
int64_t BlockBytes(DType t);
// Bytes of one row of `cols` values; cols must be a multiple of BlockSize(t).
inline int64_t RowBytes(DType t, int64_t cols) { return cols / BlockSize(t) * BlockBytes(t); }

// A read-only view of one weight tensor. The data is owned by the Model (memory-mapped file or a
// buffer the loader made). Shapes are outermost-first: a linear layer with `out` outputs and `in`
// inputs is [out, in] (GGUF stores it as ne = {in, out}); `rows` x `cols` is the 2-D view
// (rows = product of all but the last dimension, cols = the last dimension).
struct WeightTensor {
  std::string name;
  DType type = DType::kF32;
  std::vector<int64_t> shape;  // outermost first
  int64_t rows = 0;
  int64_t cols = 0;
  const uint8_t* data = nullptr;
  size_t nbytes = 0;

  bool present() const { return data != nullptr; }
  int64_t numel() const { return rows * cols; }
  const uint8_t* row(int64_t r) const { return data + r * RowBytes(type, cols); }
};

}  // namespace dmsrt
