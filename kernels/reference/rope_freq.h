// RoPE inverse frequencies with Hugging Face's rope_scaling, one definition for the CPU backend,
// the CUDA RoPE kernel (kernels/dms.cu) and its reference (dms_ref.cc), so that every backend
// rotates by the same angles, bit for bit:
//   inv_freq_i = theta^(-2i / rot_dim)                                 i in [0, rot_dim / 2)
//   linear     inv_freq_i / factor
//   llama3     wavelength 2 pi / inv_freq_i above original / low_freq_factor: / factor;
//              below original / high_freq_factor: unchanged; between: a linear blend of the two
//              in (original / wavelength - low) / (high - low)
// Computed in double; the expressions keep the types of the CPU backend's first version.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DMSRT_ROPE_HD __host__ __device__
#else
#define DMSRT_ROPE_HD
#endif

namespace dmsrt {
namespace kernels {

struct RopeScalingParams {
  enum Type : int32_t { kNone = 0, kLinear = 1, kLlama3 = 2 };
  int32_t type = kNone;
  float factor = 1.0f;
  float low_freq_factor = 1.0f;
  float high_freq_factor = 4.0f;
  int32_t original_max_positions = 8192;
};

DMSRT_ROPE_HD inline double RopeInvFreq(float theta, const RopeScalingParams& s, int32_t i,
                                        int32_t rot_dim) {
  double f = pow(static_cast<double>(theta), -2.0 * i / rot_dim);
  if (s.type == RopeScalingParams::kLinear && s.factor > 0) {
    f /= s.factor;
  } else if (s.type == RopeScalingParams::kLlama3 && s.factor > 0) {
    const double low_wavelen = s.original_max_positions / s.low_freq_factor;
    const double high_wavelen = s.original_max_positions / s.high_freq_factor;
    const double wavelen = 2.0 * 3.14159265358979323846 / f;
    if (wavelen > low_wavelen) {
      f /= s.factor;
    } else if (wavelen >= high_wavelen) {
      const double smooth = (s.original_max_positions / wavelen - s.low_freq_factor) /
                            (s.high_freq_factor - s.low_freq_factor);
      f = (1.0 - smooth) * f / s.factor + smooth * f;
    }
  }
  return f;
}

}  // namespace kernels
}  // namespace dmsrt
