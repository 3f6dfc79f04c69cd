// CPU attention over a paged KV store (see paged_attention.h).
#include "kernels/cpu/paged_attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace dmsrt {
namespace kernels {
namespace {

// ---- small numeric helpers --------------------------------------------------------------------

// 8-float vectors through GCC/Clang vector extensions: portable (the compiler lowers them to
// AVX/AVX-512/NEON or scalar code) and free of intrinsics headers.
typedef float V8 __attribute__((vector_size(32)));

inline V8 Load8(const float* p) {
  V8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void Store8(float* p, V8 v) { std::memcpy(p, &v, sizeof(v)); }
inline float Sum8(V8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

inline float Dot(const float* a, const float* b, int32_t n) {
  V8 acc0 = {0, 0, 0, 0, 0, 0, 0, 0};
  V8 acc1 = acc0;
  int32_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 += Load8(a + i) * Load8(b + i);
    acc1 += Load8(a + i + 8) * Load8(b + i + 8);
  }
  for (; i + 8 <= n; i += 8) acc0 += Load8(a + i) * Load8(b + i);
  float s = Sum8(acc0 + acc1);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void Axpy(float alpha, const float* x, float* y, int32_t n) {
  int32_t i = 0;
  const V8 va = {alpha, alpha, alpha, alpha, alpha, alpha, alpha, alpha};
  for (; i + 8 <= n; i += 8) Store8(y + i, Load8(y + i) + va * Load8(x + i));
  for (; i < n; ++i) y[i] += alpha * x[i];
}

// Lane u = q . rows[u] for eight rows (n a multiple of 8).
inline V8 Dot8Keys(const float* q, const float* const* rows, int32_t n) {
  V8 a[8];
  for (int u = 0; u < 8; ++u) a[u] = V8{0, 0, 0, 0, 0, 0, 0, 0};
  for (int32_t i = 0; i < n; i += 8) {
    const V8 qv = Load8(q + i);
    for (int u = 0; u < 8; ++u) a[u] += qv * Load8(rows[u] + i);
  }
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
  // Transpose-add: after three rounds lane u holds the sum of a[u]'s lanes.
  V8 b[4];
  for (int u = 0; u < 4; ++u) {
    b[u] = __builtin_shufflevector(a[2 * u], a[2 * u + 1], 0, 8, 1, 9, 4, 12, 5, 13) +
           __builtin_shufflevector(a[2 * u], a[2 * u + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  const V8 c0 = __builtin_shufflevector(b[0], b[1], 0, 1, 8, 9, 4, 5, 12, 13) +
                __builtin_shufflevector(b[0], b[1], 2, 3, 10, 11, 6, 7, 14, 15);
  const V8 c1 = __builtin_shufflevector(b[2], b[3], 0, 1, 8, 9, 4, 5, 12, 13) +
                __builtin_shufflevector(b[2], b[3], 2, 3, 10, 11, 6, 7, 14, 15);
  return __builtin_shufflevector(c0, c1, 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(c0, c1, 4, 5, 6, 7, 12, 13, 14, 15);
#else  // compilers without __builtin_shufflevector (GCC < 12)
  V8 r;
  for (int u = 0; u < 8; ++u) r[u] = Sum8(a[u]);
  return r;
#endif
}

// out[0 .. 8*NV) += Σ_{c in [c0, c1)} p[c] * rows[c][0 .. 8*NV), accumulating in registers.
template <int NV>
inline void AccumulateRows(const float* p, const float* const* rows, int32_t c0, int32_t c1,
                           float* out) {
  V8 acc[NV];
  for (int u = 0; u < NV; ++u) acc[u] = Load8(out + 8 * u);
  for (int32_t c = c0; c < c1; ++c) {
    const float a = p[c];
    const V8 va = {a, a, a, a, a, a, a, a};
    const float* r = rows[c];
    for (int u = 0; u < NV; ++u) acc[u] += va * Load8(r + 8 * u);
  }
  for (int u = 0; u < NV; ++u) Store8(out + 8 * u, acc[u]);
}

typedef int32_t V8i __attribute__((vector_size(32)));

// exp(x) for x <= 0 (Cephes-style: x = n ln2 + r, degree-5 polynomial for e^r, scale by 2^n);
// about 1 ulp, with inputs below -87 clamped (their weight is below 1e-38 of the maximum).
inline V8 ExpNonPositive(V8 x) {
  const V8 lo = {-87.0f, -87.0f, -87.0f, -87.0f, -87.0f, -87.0f, -87.0f, -87.0f};
  x = x < lo ? lo : x;
  const V8 fx = x * 1.44269504088896341f + 0.5f;
  V8i n = __builtin_convertvector(fx, V8i);                // truncates toward zero
  n += (V8i)(__builtin_convertvector(n, V8) > fx);          // -1 where that rounded up: floor
  const V8 nf = __builtin_convertvector(n, V8);
  x = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  const V8 x2 = x * x;
  V8 y = x * 1.9875691500e-4f + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * x2 + x + 1.0f;
  const V8i e = (n + 127) << 23;
  return y * (V8)e;
}

// p[0..m) = exp(p - max) in place; returns the max and writes the sum of the exponentials.
float ExpShifted(float* p, int32_t m, float* sum_out) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int32_t c = 0; c < m; ++c) mx = std::max(mx, p[c]);
  const V8 vmx = {mx, mx, mx, mx, mx, mx, mx, mx};
  V8 vsum = {0, 0, 0, 0, 0, 0, 0, 0};
  int32_t c = 0;
  for (; c + 8 <= m; c += 8) {
    const V8 e = ExpNonPositive(Load8(p + c) - vmx);
    Store8(p + c, e);
    vsum += e;
  }
  float sum = Sum8(vsum);
  for (; c < m; ++c) {
    p[c] = std::exp(p[c] - mx);
    sum += p[c];
  }
  *sum_out = sum;
  return mx;
}

// Numerically stable softmax of p[0..m) in place (max subtraction, float sum).
inline void SoftmaxInPlace(float* p, int32_t m) {
  float sum = 0.0f;
  ExpShifted(p, m, &sum);
  const float inv = 1.0f / sum;
  for (int32_t c = 0; c < m; ++c) p[c] *= inv;
}

inline void Prefetch(const float* p, int32_t bytes) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int32_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 3);
}

}  // namespace

void GatherSlotRange(const PagedKvPool& pool, const int32_t* blocks, int32_t first, int32_t end,
                     const float** k_rows, const float** v_rows) {
  const int32_t bt = pool.block_tokens;
  const int64_t hd = pool.head_dim;
  for (int32_t sl = first; sl < end;) {  // one block at a time: no division per slot
    const int32_t off = sl % bt;
    const int32_t n = std::min(end - sl, bt - off);
    const float* kr = pool.key(blocks[sl / bt], off);
    for (int32_t i = 0; i < n; ++i, ++sl, kr += hd) {
      k_rows[sl] = kr;
      v_rows[sl] = kr + pool.v_offset;
    }
  }
}

void GatherSlotRows(const PagedKvPool& pool, const int32_t* blocks, int32_t n,
                    const float** k_rows, const float** v_rows) {
  GatherSlotRange(pool, blocks, 0, n, k_rows, v_rows);
}

namespace {

// p[h * ldp + c] = scale * q_h . k_c for the g query heads and the m keys.
void Scores(const float* qg, int32_t g, int32_t hd, float scale, const float* const* kp, int32_t m,
            float* p, int64_t ldp) {
  // Rows of consecutive slots are contiguous only inside a block, so hardware prefetchers stall
  // at every block edge: fetch a few rows ahead explicitly.
  constexpr int32_t kAhead = 6;
  const int32_t row_bytes = hd * static_cast<int32_t>(sizeof(float));
  int32_t c = 0;
  if (hd % 8 == 0) {
    // Eight keys at a time: each query chunk is loaded once per eight keys and the eight dot
    // products are reduced together (a transpose-add instead of eight horizontal sums).
    for (; c + 8 <= m; c += 8) {
      for (int32_t u = 0; u < 8; ++u) {
        if (c + kAhead + u < m) Prefetch(kp[c + kAhead + u], row_bytes);
      }
      for (int32_t h = 0; h < g; ++h) {
        Store8(p + h * ldp + c, Dot8Keys(qg + h * hd, kp + c, hd) * scale);
      }
    }
  }
  for (; c < m; ++c) {
    if (c + kAhead < m) Prefetch(kp[c + kAhead], row_bytes);
    const float* kr = kp[c];
    for (int32_t h = 0; h < g; ++h) p[h * ldp + c] = Dot(qg + h * hd, kr, hd) * scale;
  }
}

// outg[h] = Σ_c p[h * ldp + c] v_c, overwriting outg [g, hd].
void WeightedValues(const float* p, int64_t ldp, int32_t g, int32_t hd, const float* const* vp,
                    int32_t m, float* outg) {
  const int32_t row_bytes = hd * static_cast<int32_t>(sizeof(float));
  std::fill(outg, outg + static_cast<size_t>(g) * hd, 0.0f);
  // V in tiles of keys that stay in L1 while each query head of the group accumulates its
  // output in registers.
  constexpr int32_t kTile = 32;
  for (int32_t c0 = 0; c0 < m; c0 += kTile) {
    const int32_t c1 = std::min(m, c0 + kTile);
    for (int32_t c = c0; c < c1; ++c) Prefetch(vp[c], row_bytes);
    for (int32_t h = 0; h < g; ++h) {
      const float* ph = p + h * ldp;
      float* oh = outg + h * hd;
      if (hd == 64) {
        AccumulateRows<8>(ph, vp, c0, c1, oh);
      } else if (hd == 128) {
        AccumulateRows<16>(ph, vp, c0, c1, oh);
      } else {
        for (int32_t c = c0; c < c1; ++c) Axpy(ph[c], vp[c], oh, hd);
      }
    }
  }
}

}  // namespace

void AttendRows(const float* qg, int32_t g, int32_t hd, float scale, const float* const* kp,
                const float* const* vp, int32_t m, float* p, float* outg) {
  Scores(qg, g, hd, scale, kp, m, p, m);
  for (int32_t h = 0; h < g; ++h) SoftmaxInPlace(p + h * m, m);
  WeightedValues(p, m, g, hd, vp, m, outg);
}

void AttendKeyChunk(const float* qg, int32_t g, int32_t hd, float scale, const float* const* kp,
                    const float* const* vp, int32_t m, float* p, int64_t ldp, float* part) {
  Scores(qg, g, hd, scale, kp, m, p, ldp);
  for (int32_t h = 0; h < g; ++h) {
    float* stats = part + static_cast<int64_t>(g) * hd + 2 * h;
    stats[0] = ExpShifted(p + h * ldp, m, &stats[1]);
  }
  WeightedValues(p, ldp, g, hd, vp, m, part);
}

void CombineKeyChunks(const float* parts, int32_t n_parts, int32_t g, int32_t hd, float* outg) {
  const int64_t stride = KeyChunkFloats(g, hd);
  for (int32_t h = 0; h < g; ++h) {
    float mx = -std::numeric_limits<float>::infinity();
    for (int32_t k = 0; k < n_parts; ++k) mx = std::max(mx, parts[k * stride + g * hd + 2 * h]);
    float total = 0.0f;
    for (int32_t k = 0; k < n_parts; ++k) {
      const float* stats = parts + k * stride + g * hd + 2 * h;
      total += std::exp(stats[0] - mx) * stats[1];
    }
    float* oh = outg + h * hd;
    std::fill(oh, oh + hd, 0.0f);
    for (int32_t k = 0; k < n_parts; ++k) {
      const float* stats = parts + k * stride + g * hd + 2 * h;
      Axpy(std::exp(stats[0] - mx) / total, parts + k * stride + h * hd, oh, hd);
    }
  }
}

}  // namespace kernels
}  // namespace dmsrt
