// Block formats of GGML quantized tensors and their plain C++ reference dequantization.
//
// Type ids mirror GGML's (they are what GGUF stores); kernels/ cannot see runtime/model/tensor.h, so this
// header keeps its own small enum with the same numbers. Everything here is scalar, readable code:
// it is the oracle the vectorised CPU kernels (kernels/cpu/) and the CUDA kernels are tested
// against.
//
// Block layouts (little-endian, packed, fp16 = IEEE half, bf16 = upper 16 bits of an f32):
//
//   F32   4 bytes/value.   F16  2 bytes/value.   BF16  2 bytes/value.
//
//   Q4_0  32 values, 18 bytes   { fp16 d; uint8 qs[16]; }
//         value[i]      = ((qs[i] & 0x0F) - 8) * d      i = 0..15   (low nibbles)
//         value[i + 16] = ((qs[i] >> 4)   - 8) * d      i = 0..15   (high nibbles)
//
//   Q4_1  32 values, 20 bytes   { fp16 d; fp16 m; uint8 qs[16]; }
//         value[i]      = (qs[i] & 0x0F) * d + m,  value[i + 16] = (qs[i] >> 4) * d + m
//
//   Q8_0  32 values, 34 bytes   { fp16 d; int8 qs[32]; }          value[i] = qs[i] * d
//
//   Q8_1  32 values, 36 bytes   { fp16 d; fp16 s; int8 qs[32]; }  value[i] = qs[i] * d,
//         s = d * sum(qs) (used only for activations: lets a Q4_1 dot fold its min term in)
//
//   Q6_K  256 values, 210 bytes { uint8 ql[128]; uint8 qh[64]; int8 scales[16]; fp16 d; }
//         Two halves of 128 values; half h uses ql[64h..], qh[32h..], scales[8h..].
//         For l = 0..31 within a half (is = l / 16):
//           q0 = (ql[l]      & 0xF) | ((qh[l] >> 0 & 3) << 4)   -> value[l]      * scales[is+0]
//           q1 = (ql[l + 32] & 0xF) | ((qh[l] >> 2 & 3) << 4)   -> value[l + 32] * scales[is+2]
//           q2 = (ql[l]      >> 4)  | ((qh[l] >> 4 & 3) << 4)   -> value[l + 64] * scales[is+4]
//           q3 = (ql[l + 32] >> 4)  | ((qh[l] >> 6 & 3) << 4)   -> value[l + 96] * scales[is+6]
//         value = d * scale * (q - 32)
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace dmsrt {
namespace kernels {

// GGML type ids of the formats the kernels handle.
enum QuantType : int {
  kTypeF32 = 0,
  kTypeF16 = 1,
  kTypeQ4_0 = 2,
  kTypeQ4_1 = 3,
  kTypeQ8_0 = 8,
  kTypeQ8_1 = 9,
  kTypeQ6_K = 14,
  kTypeBF16 = 30,
};

constexpr int kQK = 32;     // values per block of the 32-wide formats
constexpr int kQK_K = 256;  // values per K-quant superblock

struct BlockQ4_0 {
  uint16_t d;
  uint8_t qs[kQK / 2];
};
struct BlockQ4_1 {
  uint16_t d;
  uint16_t m;
  uint8_t qs[kQK / 2];
};
struct BlockQ8_0 {
  uint16_t d;
  int8_t qs[kQK];
};
struct BlockQ8_1 {
  uint16_t d;
  uint16_t s;
  int8_t qs[kQK];
};
struct BlockQ6_K {
  uint8_t ql[kQK_K / 2];
  uint8_t qh[kQK_K / 4];
  int8_t scales[kQK_K / 16];
  uint16_t d;
};
static_assert(sizeof(BlockQ4_0) == 18, "Q4_0 block size");
static_assert(sizeof(BlockQ4_1) == 20, "Q4_1 block size");
static_assert(sizeof(BlockQ8_0) == 34, "Q8_0 block size");
static_assert(sizeof(BlockQ8_1) == 36, "Q8_1 block size");
static_assert(sizeof(BlockQ6_K) == 210, "Q6_K block size");

// True for the type ids DequantizeRow handles.
bool QuantTypeKnown(int type);
// Values per block and bytes per block (element size for float types); 0 for unknown types.
int64_t QuantBlockSize(int type);
int64_t QuantBlockBytes(int type);
inline int64_t QuantRowBytes(int type, int64_t cols) {
  return cols / QuantBlockSize(type) * QuantBlockBytes(type);
}

// IEEE half <-> float (exact for every half, round-to-nearest-even for float -> half).
float Fp16ToFp32(uint16_t h);
uint16_t Fp32ToFp16(float f);
// bfloat16 <-> float (round-to-nearest-even, NaN kept quiet).
inline float Bf16ToFp32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint16_t Fp32ToBf16(float f);

// Dequantizes one row of `cols` values (a multiple of the block size) of type `type` from `src`
// into `dst` [cols]. Returns false for an unknown type or a bad column count (dst untouched).
bool DequantizeRow(int type, const void* src, float* dst, int64_t cols);

// Reference quantizers (round-to-nearest, GGML's choice of scale), used by tests and to
// quantize activations in the reference dot product. `cols` is a multiple of 32.
void QuantizeRowQ8_0Ref(const float* x, BlockQ8_0* y, int64_t cols);
void QuantizeRowQ8_1Ref(const float* x, BlockQ8_1* y, int64_t cols);
void QuantizeRowQ4_0Ref(const float* x, BlockQ4_0* y, int64_t cols);
void QuantizeRowQ4_1Ref(const float* x, BlockQ4_1* y, int64_t cols);

}  // namespace kernels
}  // namespace dmsrt
