// The SplitMix64 finaliser, the one mixing function behind every counter-based random stream
// (the forced KV policy's bits, the sampler's uniforms, the synthetic weights and FillRandomBf16),
// and the counter hash behind FillRandomBf16 (kernels/kv_store.cuh). Host and device share it, so
// both produce the same values.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DMSRT_HASH_INLINE __host__ __device__ __forceinline__
#else
#define DMSRT_HASH_INLINE inline
#endif

namespace dmsrt {
namespace kernels {

// 2^64 / golden ratio: the SplitMix64 state increment.
constexpr uint64_t kSplitMixGamma = 0x9E3779B97F4A7C15ull;

// The SplitMix64 output function (Steele, Lea, Flood 2014): a bijection of 64-bit words whose
// every output bit depends on every input bit. Callers differ only in how they form its input.
DMSRT_HASH_INLINE uint64_t SplitMixFinalize(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// One SplitMix64 step from state x: the finaliser of x + gamma.
DMSRT_HASH_INLINE uint64_t SplitMix64(uint64_t x) { return SplitMixFinalize(x + kSplitMixGamma); }

// u in [-1, 1) with 24 random bits (exact in float), for element i of stream `seed`.
DMSRT_HASH_INLINE float HashUniformSigned(uint64_t seed, uint64_t i) {
  const uint64_t x = SplitMixFinalize(seed * kSplitMixGamma + i + 0x632BE59BD9B4E019ull);
  return static_cast<float>(static_cast<int32_t>(x >> 40) - (1 << 23)) * (1.0f / (1 << 23));
}

}  // namespace kernels
}  // namespace dmsrt
