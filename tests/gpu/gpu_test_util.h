// Helpers shared by the GPU tests: skip without a device, device buffers that are poisoned
// before each launch, bf16 random data with its exactly-representable float twin, and a
// relative-error measure that fails on NaN or unwritten (poisoned) outputs.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/reference/quant.h"
#include "tests/logits_test_util.h"

namespace dmsrt {
namespace gpu_test {

inline bool HaveDevice(std::string* why) {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    *why = std::string("no CUDA device: cudaGetDeviceCount: ") + cudaGetErrorString(err);
    return false;
  }
  if (n == 0) {
    *why = "no CUDA device: cudaGetDeviceCount returned 0";
    return false;
  }
  return true;
}

#define DMSRT_REQUIRE_GPU()                                    \
  do {                                                         \
    std::string dmsrt_why_;                                    \
    if (!::dmsrt::gpu_test::HaveDevice(&dmsrt_why_)) GTEST_SKIP() << dmsrt_why_; \
  } while (0)

#define ASSERT_CUDA_OK(expr)                                                           \
  do {                                                                                 \
    const cudaError_t dmsrt_e_ = (expr);                                               \
    ASSERT_EQ(dmsrt_e_, cudaSuccess) << #expr << ": " << cudaGetErrorString(dmsrt_e_); \
  } while (0)

// Byte patterns written over outputs before each launch: 0xFF makes bf16/fp32 NaN.
constexpr int kPoisonFloat = 0xFF;
constexpr int kPoisonInt = 0xA5;

template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t n) { Resize(n); }
  explicit DeviceBuffer(const std::vector<T>& host) {
    Resize(host.size());
    Upload(host);
  }
  ~DeviceBuffer() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void Resize(size_t n) {
    if (ptr_ != nullptr) cudaFree(ptr_);
    ptr_ = nullptr;
    n_ = n;
    if (n > 0 && cudaMalloc(&ptr_, n * sizeof(T)) != cudaSuccess) {
      ptr_ = nullptr;
      ADD_FAILURE() << "cudaMalloc of " << n * sizeof(T) << " bytes failed";
    }
  }
  void Upload(const std::vector<T>& host) {
    EXPECT_EQ(host.size(), n_);
    EXPECT_EQ(cudaMemcpy(ptr_, host.data(), n_ * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  }
  std::vector<T> Download() const {
    std::vector<T> host(n_);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(host.data(), ptr_, n_ * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return host;
  }
  void Poison(int byte) { EXPECT_EQ(cudaMemset(ptr_, byte, n_ * sizeof(T)), cudaSuccess); }
  T* get() const { return ptr_; }
  size_t size() const { return n_; }

 private:
  T* ptr_ = nullptr;
  size_t n_ = 0;
};

// Reinterprets bf16 bit storage for the launchers.
inline __nv_bfloat16* Bf(const DeviceBuffer<uint16_t>& b) {
  return reinterpret_cast<__nv_bfloat16*>(b.get());
}

inline float Bf16(uint16_t h) { return kernels::Bf16ToFp32(h); }

// n values ~ N(mean, stddev) rounded to bf16; `exact` receives the rounded values as floats.
inline std::vector<uint16_t> RandomBf16(size_t n, std::mt19937& rng, float stddev,
                                        std::vector<float>* exact, float mean = 0.f) {
  std::normal_distribution<float> dist(mean, stddev);
  std::vector<uint16_t> out(n);
  if (exact != nullptr) exact->resize(n);
  for (size_t i = 0; i < n; ++i) {
    out[i] = kernels::Fp32ToBf16(dist(rng));
    if (exact != nullptr) (*exact)[i] = Bf16(out[i]);
  }
  return out;
}

inline std::vector<float> Bf16ToFloat(const std::vector<uint16_t>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = Bf16(v[i]);
  return out;
}

using logits_test::RelError;  // tests/logits_test_util.h

// Largest |got - want| / (atol + rtol * |want|); <= 1 passes. NaN gives +inf.
inline double WorstScaledError(const std::vector<float>& got, const std::vector<float>& want,
                               double atol, double rtol, size_t* where = nullptr) {
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i])) {
      if (where) *where = i;
      return INFINITY;
    }
    const double e = std::fabs(static_cast<double>(got[i]) - want[i]) / (atol + rtol * std::fabs(want[i]));
    if (e > worst) {
      worst = e;
      if (where) *where = i;
    }
  }
  return worst;
}

inline int NumSms() {
  int dev = 0, sms = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  return sms;
}

}  // namespace gpu_test
}  // namespace dmsrt
