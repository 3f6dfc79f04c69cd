// The counter hash behind FillRandomBf16 (kernels/kv_store.cuh), shared by the device kernel
// and its host reference so both produce the same values.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DMSRT_HASH_INLINE __host__ __device__ __forceinline__
#else
#define DMSRT_HASH_INLINE inline
#endif

namespace dmsrt {
namespace kernels {

// u in [-1, 1) with 24 random bits (exact in float), for element i of stream `seed`.
DMSRT_HASH_INLINE float HashUniformSigned(uint64_t seed, uint64_t i) {
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + i + 0x632BE59BD9B4E019ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  x ^= x >> 31;
  return static_cast<float>(static_cast<int32_t>(x >> 40) - (1 << 23)) * (1.0f / (1 << 23));
}

}  // namespace kernels
}  // namespace dmsrt
