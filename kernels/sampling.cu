// Device sampling; see sampling.cuh for the rule. One CTA of 1024 threads per row. Thresholds
// are found by radix selection over order-preserving 32-bit keys of z (4 passes of 8-bit digits,
// histograms of counts and fixed-point masses in shared memory), so nothing is sorted and no
// scratch memory is needed; every pass re-reads the row (from L2 for any realistic batch).
#include "kernels/sampling.cuh"

#include <cfloat>
#include <cmath>

#include "kernels/cuda_check.h"
#include "kernels/reference/sampling_ref.h"

namespace dmsrt {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;

using kernels::SamplingKey;
using kernels::kSamplingMassScale;

__device__ __forceinline__ uint32_t Key(float z) { return SamplingKey(z); }

__device__ __forceinline__ uint64_t Weight(float z, float m) {
  return static_cast<uint64_t>(static_cast<double>(expf(z - m)) * kSamplingMassScale);
}

template <typename T, typename Op>
__device__ T BlockReduce(T v, Op op, T* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T t = scratch[0];
  for (int i = 1; i < kWarps; ++i) t = op(t, scratch[i]);
  return t;
}

struct RowShared {
  uint32_t cnt[256];
  unsigned long long mass[256];
  float fscratch[kWarps];
  unsigned long long uscratch[kWarps];
  uint32_t sel_prefix;
  uint32_t sel_done;
  int32_t token;
};

// Radix select: the key tau such that {key >= tau, key >= floor_key} is the smallest top set
// with count >= need_count (by_mass false) or mass >= need_mass (by_mass true).
__device__ uint32_t RadixSelect(const float* row, int vocab, float inv_t, float m,
                                uint32_t floor_key, bool by_mass, uint32_t need_count,
                                unsigned long long need_mass, RowShared& sh) {
  uint32_t prefix = 0, mask = 0;
  unsigned long long count_above = 0, mass_above = 0;
  for (int pass = 0; pass < 4; ++pass) {
    const int shift = 24 - 8 * pass;
    for (int i = threadIdx.x; i < 256; i += kThreads) {
      sh.cnt[i] = 0;
      sh.mass[i] = 0;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < vocab; i += kThreads) {
      const float z = row[i] * inv_t;
      const uint32_t key = Key(z);
      if (key < floor_key || (key & mask) != prefix) continue;
      const int d = (key >> shift) & 255;
      atomicAdd(&sh.cnt[d], 1u);
      if (by_mass) atomicAdd(&sh.mass[d], static_cast<unsigned long long>(Weight(z, m)));
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int sel = 0;
      for (int d = 255; d >= 0; --d) {
        const unsigned long long c = count_above + sh.cnt[d];
        const unsigned long long ms = mass_above + sh.mass[d];
        if (by_mass ? (ms >= need_mass) : (c >= need_count)) {
          sel = d;
          break;
        }
        count_above = c;
        mass_above = ms;
      }
      sh.sel_prefix = prefix | (static_cast<uint32_t>(sel) << shift);
      // count_above/mass_above only matter to thread 0; the others read sel_prefix.
    }
    __syncthreads();
    prefix = sh.sel_prefix;
    mask |= 255u << shift;
  }
  return prefix;
}

__global__ void __launch_bounds__(kThreads)
SampleKernel(const float* __restrict__ logits, int32_t vocab, int32_t ld,
             const DeviceSamplingParams* __restrict__ params, int32_t* __restrict__ tokens,
             float* __restrict__ logprobs) {
  __shared__ RowShared sh;
  const float* row = logits + static_cast<size_t>(blockIdx.x) * ld;
  const DeviceSamplingParams prm = params[blockIdx.x];
  const int tid = threadIdx.x;

  // Raw max (and argmax with the lowest id on ties): needed by greedy and by logprobs.
  float best = -INFINITY;
  int best_i = 0x7fffffff;
  for (int i = tid; i < vocab; i += kThreads) {
    const float x = row[i];
    if (x > best) { best = x; best_i = i; }  // ascending i: keeps the lowest id on ties
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ob = __shfl_xor_sync(0xffffffffu, best, o);
    const int oi = __shfl_xor_sync(0xffffffffu, best_i, o);
    if (ob > best || (ob == best && oi < best_i)) { best = ob; best_i = oi; }
  }
  __shared__ float s_best[kWarps];
  __shared__ int s_best_i[kWarps];
  if (tid % 32 == 0) { s_best[tid / 32] = best; s_best_i[tid / 32] = best_i; }
  __syncthreads();
  best = s_best[0];
  best_i = s_best_i[0];
  for (int w = 1; w < kWarps; ++w) {
    if (s_best[w] > best || (s_best[w] == best && s_best_i[w] < best_i)) {
      best = s_best[w];
      best_i = s_best_i[w];
    }
  }
  if (best_i == 0x7fffffff) best_i = 0;  // all NaN: return id 0

  int token = best_i;
  if (prm.temperature > 0.f) {
    const float inv_t = 1.f / prm.temperature;
    const float m = best * inv_t;
    uint32_t tau = 0;
    if (prm.min_p > 0.f) tau = Key(m + logf(prm.min_p));
    uint32_t k_floor = 0;  // top-k threshold; top-p is defined on the top-k set
    if (prm.top_k > 0 && prm.top_k < vocab) {
      k_floor = RadixSelect(row, vocab, inv_t, m, 0u, false, static_cast<uint32_t>(prm.top_k),
                            0ull, sh);
      tau = max(tau, k_floor);
    }
    if (prm.top_p > 0.f && prm.top_p < 1.f) {
      unsigned long long mk = 0;
      for (int i = tid; i < vocab; i += kThreads) {
        const float z = row[i] * inv_t;
        if (Key(z) >= k_floor) mk += Weight(z, m);
      }
      mk = BlockReduce(mk, [](unsigned long long a, unsigned long long b) { return a + b; },
                       sh.uscratch);
      unsigned long long need = static_cast<unsigned long long>(
          ceil(static_cast<double>(prm.top_p) * static_cast<double>(mk)));
      if (need < 1) need = 1;
      const uint32_t tp = RadixSelect(row, vocab, inv_t, m, k_floor, true, 0u, need, sh);
      tau = max(tau, tp);
    }
    // Draw: the first id whose cumulative kept mass exceeds floor(u * kept mass). Each thread
    // owns a contiguous segment of ids so that id order is thread order.
    const int seg = (vocab + kThreads - 1) / kThreads;
    const int lo = min(vocab, tid * seg), hi = min(vocab, lo + seg);
    unsigned long long mine = 0;
    for (int i = lo; i < hi; ++i) {
      const float z = row[i] * inv_t;
      if (Key(z) >= tau) mine += Weight(z, m);
    }
    // Exclusive scan across the block.
    unsigned long long incl = mine;
    const int lane = tid % 32, warp = tid / 32;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const unsigned long long y = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += y;
    }
    __syncthreads();
    if (lane == 31) sh.uscratch[warp] = incl;
    __syncthreads();
    unsigned long long warp_base = 0, total = 0;
    for (int w = 0; w < kWarps; ++w) {
      if (w < warp) warp_base += sh.uscratch[w];
      total += sh.uscratch[w];
    }
    const unsigned long long excl = warp_base + incl - mine;
    const double u = kernels::CounterUniform(prm.seed, prm.counter);
    unsigned long long target = static_cast<unsigned long long>(u * static_cast<double>(total));
    if (target >= total) target = total - 1;
    if (tid == 0) sh.token = best_i;  // fallback (total == 0 cannot happen: the max has weight)
    __syncthreads();
    if (total > 0 && mine > 0 && target >= excl && target < excl + mine) {
      unsigned long long c = excl;
      for (int i = lo; i < hi; ++i) {
        const float z = row[i] * inv_t;
        if (Key(z) < tau) continue;
        c += Weight(z, m);
        if (c > target) { sh.token = i; break; }
      }
    }
    __syncthreads();
    token = sh.token;
  }

  if (logprobs != nullptr) {
    float s = 0.f;
    for (int i = tid; i < vocab; i += kThreads) s += expf(row[i] - best);
    s = BlockReduce(s, [](float a, float b) { return a + b; }, sh.fscratch);
    if (tid == 0) logprobs[blockIdx.x] = row[token] - best - logf(s);
  }
  if (tid == 0) tokens[blockIdx.x] = token;
}

}  // namespace

cudaError_t SampleTokens(const float* logits, int32_t rows, int32_t vocab, int32_t ld,
                         const DeviceSamplingParams* params, int32_t* tokens, float* logprobs,
                         cudaStream_t stream) {
  if (rows < 0 || vocab <= 0 || ld < vocab) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  SampleKernel<<<rows, kThreads, 0, stream>>>(logits, vocab, ld, params, tokens, logprobs);
  DMSRT_LAUNCH_CHECK(stream);
  return cudaSuccess;
}

}  // namespace dmsrt
