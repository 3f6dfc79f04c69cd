// The one SplitMix64 finaliser (kernels/reference/random_hash.h) and the streams built on it:
// pinned to the values they had before they shared it.
#include <cstdint>
#include <cstring>

#include "gtest/gtest.h"
#include "kernels/reference/random_hash.h"
#include "kernels/reference/sampling_ref.h"

namespace dmsrt {
namespace kernels {
namespace {

TEST(RandomHash, SplitMix64IsTheReferenceGenerator) {
  // The first outputs of the SplitMix64 generator seeded with 0 (Vigna's splitmix64.c).
  uint64_t state = 0;
  EXPECT_EQ(SplitMix64(state), 0xE220A8397B1DCDAFull);
  state += kSplitMixGamma;
  EXPECT_EQ(SplitMix64(state), 0x6E789E6AA1B965F4ull);
}

TEST(RandomHash, SamplerUniformsArePinned) {
  uint64_t acc = 0;
  for (uint64_t c = 0; c < 1000; ++c) {
    const double u = CounterUniform(12345 + c * 7, c);
    uint64_t b;
    std::memcpy(&b, &u, 8);
    acc = acc * 31 + b;
  }
  EXPECT_EQ(acc, 0x44c29442791db12eull);
  EXPECT_EQ(CounterUniform(0, 0), 0.88331080821364261);
}

TEST(RandomHash, SyntheticWeightStreamIsPinned) {
  uint64_t acc = 0;
  for (uint64_t i = 0; i < 1000; ++i) {
    const float f = HashUniformSigned(99 + i / 10, i);
    uint32_t b;
    std::memcpy(&b, &f, 4);
    acc = acc * 31 + b;
  }
  EXPECT_EQ(acc, 0xc3f474e5d030ebfcull);
  EXPECT_EQ(HashUniformSigned(0, 0), -0.142859221f);
}

}  // namespace
}  // namespace kernels
}  // namespace dmsrt
