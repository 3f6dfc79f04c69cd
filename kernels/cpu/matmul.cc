// Quantized matmul kernels; see matmul.h for the algorithm and its invariants.
#include "kernels/cpu/matmul.h"

// GCC 12's AVX-512 headers trip -Wuninitialized on their own `__Y = __Y` idiom.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>

#include "kernels/reference/quant.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DMSRT_MM_AVX2 1
#endif
#if DMSRT_MM_AVX2 && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define DMSRT_MM_AVX512 1
#endif

namespace dmsrt {
namespace kernels {

namespace {

constexpr int kMaxRowTile = 4;    // weight rows per register tile
constexpr int kMaxTokTile = 4;    // tokens per register tile

inline float HalfToFloat(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  return Fp16ToFp32(h);
#endif
}

// Arguments of one register tile: R consecutive weight rows against T consecutive tokens.
struct TileArgs {
  const uint8_t* w;    // first weight row
  int64_t row_bytes;
  const int8_t* xq;    // first token's quantized activations [T, cols]
  const float* xd;     // [T, nb]
  const float* xs;     // [T, nb]
  const float* xf;     // first token's float activations [T, cols]
  int64_t cols;
  int64_t nb;          // blocks of 32 per row
  float* y;            // y[t * ldy + r]
  int64_t ldy;
};

#if DMSRT_MM_AVX2

inline float Hsum(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// Σ over groups of 4 of u8 * s8 products -> 8 int32 lanes.
inline __m256i DotU8S8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  const __m256i p = _mm256_maddubs_epi16(u, s);
  return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
#endif
}

// 16 bytes of packed nibbles -> 32 bytes: low nibbles (elements 0..15) then high (16..31).
inline __m256i UnpackNibbles(const uint8_t* qs) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(b), _mm_srli_epi16(b, 4), 1);
  return _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
}

// The integer dot products of four rows of 4-bit weights (u8 in 0..15) with one block of int8
// activations (-127..127), folded to [r0 r1 r2 r3 | r0 r1 r2 r3] (each lane the sum over the
// 16 bytes of that 128-bit half). Without VNNI the 16-bit pair sums of vpmaddubsw (at most
// 2 * 15 * 127 = 3810) are folded by two rounds of 16-bit horizontal adds (at most 4 * 3810,
// no overflow) before one widening vpmaddwd, instead of widening each row: 5 multiplies instead
// of 8. The sums are exact either way, so the result is the same bit for bit.
inline __m256i FoldQ4Rows(const __m256i* wq, __m256i xv) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) || defined(__AVXVNNI__)
  const __m256i h01 = _mm256_hadd_epi32(DotU8S8(wq[0], xv), DotU8S8(wq[1], xv));
  const __m256i h23 = _mm256_hadd_epi32(DotU8S8(wq[2], xv), DotU8S8(wq[3], xv));
  return _mm256_hadd_epi32(h01, h23);
#else
  const __m256i h01 = _mm256_hadd_epi16(_mm256_maddubs_epi16(wq[0], xv), _mm256_maddubs_epi16(wq[1], xv));
  const __m256i h23 = _mm256_hadd_epi16(_mm256_maddubs_epi16(wq[2], xv), _mm256_maddubs_epi16(wq[3], xv));
  return _mm256_madd_epi16(_mm256_hadd_epi16(h01, h23), _mm256_set1_epi16(1));
#endif
}

// Q4_0 / Q4_1 weights: unsigned nibbles q; value = q*d + m (Q4_1) or (q-8)*d (Q4_0, m = -8d).
// Σ_i value_i * x_i = d * dx * Σ q*xq + m * s  (s = dx * Σ xq).
//
// AVX2 has 16 vector registers, so a tile keeps one accumulator per token for all four rows
// instead of one per (row, token): the four rows' 8-lane integer dot products of a block are
// folded by two rounds of horizontal adds into one vector, lanes [r0 r1 r2 r3 | r0 r1 r2 r3] (the
// low and high halves of each row's block), converted once and scaled by [d_r * dx] in one
// multiply-add. The offset term m * s of the four rows is one 4-lane multiply-add per token.
// The integer sums are exact, so a row's result depends only on its own blocks: a tile of fewer
// rows repeats its first row in the unused lanes and computes the same values bit for bit.
// Decode streams every weight from memory once. A tile's rows are short (a row of 576 weights
// is 18 blocks), so prefetching along each row reaches only a few hundred bytes past the tile:
// instead each block step prefetches its share of the tile kPrefetchTilesAvx2 tiles ahead (the
// tiles of a chunk are consecutive rows, so that is the memory the chunk reads next).
constexpr int64_t kPrefetchTilesAvx2 = 2;

// The block step b of a tile of R rows (row_bytes apart) starting at w: prefetches bytes
// [b, b + 1) x R x block_bytes of the tile kPrefetchTilesAvx2 tiles further on.
inline void PrefetchTileAhead(const uint8_t* w, int R, int64_t row_bytes, int64_t b,
                              int64_t block_bytes) {
  const int64_t step = R * block_bytes;
  const char* p = reinterpret_cast<const char*>(w + kPrefetchTilesAvx2 * R * row_bytes + b * step);
  for (int64_t off = 0; off < step; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
}

template <int R, int T, bool kQ4_1>
void TileQ4(const TileArgs& a) {
  static_assert(R >= 1 && R <= 4, "row tile of 1 to 4 rows");
  const uint8_t* rows[4];
  for (int r = 0; r < 4; ++r) rows[r] = a.w + (r < R ? r : 0) * a.row_bytes;
  __m256 acc[T];
  __m128 macc[T];
  for (int t = 0; t < T; ++t) {
    acc[t] = _mm256_setzero_ps();
    macc[t] = _mm_setzero_ps();
  }
  constexpr int64_t kBlockBytes = kQ4_1 ? sizeof(BlockQ4_1) : sizeof(BlockQ4_0);
  for (int64_t b = 0; b < a.nb; ++b) {
    PrefetchTileAhead(a.w, R, a.row_bytes, b, kBlockBytes);
    __m256i wq[4];
    uint32_t head[4];  // Q4_1: d | m << 16 (fp16); Q4_0: d
    for (int r = 0; r < 4; ++r) {
      const uint8_t* blk = rows[r] + b * kBlockBytes;
      if (kQ4_1) {
        std::memcpy(&head[r], blk, 4);
        wq[r] = UnpackNibbles(reinterpret_cast<const BlockQ4_1*>(blk)->qs);
      } else {
        uint16_t d;
        std::memcpy(&d, blk, 2);
        head[r] = d;
        wq[r] = UnpackNibbles(reinterpret_cast<const BlockQ4_0*>(blk)->qs);
      }
    }
    const __m128i dm = _mm_setr_epi32(static_cast<int>(head[0]), static_cast<int>(head[1]),
                                      static_cast<int>(head[2]), static_cast<int>(head[3]));
    const __m256 dmf = _mm256_cvtph_ps(dm);  // d0 m0 d1 m1 d2 m2 d3 m3
    const __m256 dmp = _mm256_permutevar8x32_ps(dmf, _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
    const __m128 wd4 = _mm256_castps256_ps128(dmp);
    const __m128 wm4 = kQ4_1 ? _mm256_extractf128_ps(dmp, 1) : _mm_mul_ps(_mm_set1_ps(-8.0f), wd4);
    const __m256 wd8 = _mm256_set_m128(wd4, wd4);
    for (int t = 0; t < T; ++t) {
      const __m256i xv =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.xq + t * a.cols + b * kQK));
      const __m256 p = _mm256_cvtepi32_ps(FoldQ4Rows(wq, xv));
      const __m256 scale = _mm256_mul_ps(wd8, _mm256_broadcast_ss(a.xd + t * a.nb + b));
      acc[t] = _mm256_fmadd_ps(p, scale, acc[t]);
      macc[t] = _mm_fmadd_ps(wm4, _mm_broadcast_ss(a.xs + t * a.nb + b), macc[t]);
    }
  }
  for (int t = 0; t < T; ++t) {
    const __m128 sum = _mm_add_ps(_mm_add_ps(_mm256_castps256_ps128(acc[t]),
                                             _mm256_extractf128_ps(acc[t], 1)),
                                  macc[t]);
    float out[4];
    _mm_storeu_ps(out, sum);
    for (int r = 0; r < R; ++r) a.y[t * a.ldy + r] = out[r];
  }
}

// Q8_0 weights: signed × signed via |w| (unsigned) and sign(x, w). The same register plan as
// TileQ4: four rows' block dot products folded into one vector [r0 r1 r2 r3 | r0 r1 r2 r3] by
// horizontal adds (exact integer sums), one conversion and one multiply-add per token and block,
// unused rows of a short tile repeating the first row (bit-identical per row).
template <int R, int T>
void TileQ8_0(const TileArgs& a) {
  static_assert(R >= 1 && R <= 4, "row tile of 1 to 4 rows");
  const uint8_t* rows[4];
  for (int r = 0; r < 4; ++r) rows[r] = a.w + (r < R ? r : 0) * a.row_bytes;
  __m256 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
  constexpr int64_t kBlockBytes = sizeof(BlockQ8_0);
  for (int64_t b = 0; b < a.nb; ++b) {
    PrefetchTileAhead(a.w, R, a.row_bytes, b, kBlockBytes);
    __m256i wq[4], wabs[4];
    uint16_t head[4];
    for (int r = 0; r < 4; ++r) {
      const uint8_t* blk = rows[r] + b * kBlockBytes;
      std::memcpy(&head[r], blk, 2);
      wq[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
      wabs[r] = _mm256_sign_epi8(wq[r], wq[r]);
    }
    const __m128 wd4 = _mm_cvtph_ps(_mm_setr_epi16(static_cast<short>(head[0]), static_cast<short>(head[1]),
                                                   static_cast<short>(head[2]), static_cast<short>(head[3]),
                                                   0, 0, 0, 0));
    const __m256 wd8 = _mm256_set_m128(wd4, wd4);
    for (int t = 0; t < T; ++t) {
      const __m256i xv =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.xq + t * a.cols + b * kQK));
      const __m256i h01 = _mm256_hadd_epi32(DotU8S8(wabs[0], _mm256_sign_epi8(xv, wq[0])),
                                            DotU8S8(wabs[1], _mm256_sign_epi8(xv, wq[1])));
      const __m256i h23 = _mm256_hadd_epi32(DotU8S8(wabs[2], _mm256_sign_epi8(xv, wq[2])),
                                            DotU8S8(wabs[3], _mm256_sign_epi8(xv, wq[3])));
      const __m256 p = _mm256_cvtepi32_ps(_mm256_hadd_epi32(h01, h23));
      const __m256 scale = _mm256_mul_ps(wd8, _mm256_broadcast_ss(a.xd + t * a.nb + b));
      acc[t] = _mm256_fmadd_ps(p, scale, acc[t]);
    }
  }
  for (int t = 0; t < T; ++t) {
    const __m128 sum = _mm_add_ps(_mm256_castps256_ps128(acc[t]), _mm256_extractf128_ps(acc[t], 1));
    float out[4];
    _mm_storeu_ps(out, sum);
    for (int r = 0; r < R; ++r) a.y[t * a.ldy + r] = out[r];
  }
}

#if DMSRT_MM_AVX512
// AVX-512 VNNI: two consecutive blocks per 512-bit register, so each vpdpbusd covers 64 weights.
// The per-block scales become "pair" vectors (8 lanes of block b, 8 lanes of block b+1). The
// Q4 offset term m * s is spread over the 8 lanes of its block (each lane adds m * s/8, exact
// scaling by a power of two). An odd last block takes the 256-bit path.
enum { kKindQ4_0 = 0, kKindQ4_1 = 1, kKindQ8_0 = 2 };

inline __m512 Pair(float lo, float hi) {
  return _mm512_insertf32x8(_mm512_set1_ps(lo), _mm256_set1_ps(hi), 1);
}

// Nibbles of two Q4 blocks -> 64 bytes: block 0 elements 0..31, then block 1 elements 0..31.
inline __m512i Unpack2Q4(const uint8_t* qs0, const uint8_t* qs1) {
  const __m256i v = _mm256_inserti128_si256(
      _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs0))),
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs1)), 1);
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i lo = _mm256_and_si256(v, m4);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
  const __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);  // lo0 lo1 hi0 hi1
  return _mm512_shuffle_i64x2(z, z, _MM_SHUFFLE(3, 1, 2, 0));               // lo0 hi0 lo1 hi1
}

// Software prefetch distance in blocks (measured on the default model, one thread: 8 cuts decode
// time by about a fifth against none; 4, 12, 16, 20 and 32 are all slower than 8).
constexpr int64_t kPrefetchBlocks = 8;

template <int R, int T, int kKind>
void Tile512(const TileArgs& a) {
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r) {
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  }
  const int64_t nb2 = a.nb & ~int64_t{1};
  for (int64_t b = 0; b < nb2; b += 2) {
    __m512i wq[R];
    __m512 wdv[R], wmv[R];
    __mmask64 neg[R];
    for (int r = 0; r < R; ++r) {
      const uint8_t* row = a.w + r * a.row_bytes;
      // Decode streams every weight from memory once: ask for the bytes a few blocks ahead.
      constexpr int64_t kBlockBytes = kKind == kKindQ8_0   ? sizeof(BlockQ8_0)
                                      : kKind == kKindQ4_1 ? sizeof(BlockQ4_1)
                                                           : sizeof(BlockQ4_0);
      _mm_prefetch(reinterpret_cast<const char*>(row + (b + kPrefetchBlocks) * kBlockBytes),
                   _MM_HINT_T0);
      if (kKind == kKindQ4_1) {
        const BlockQ4_1* b0 = reinterpret_cast<const BlockQ4_1*>(row) + b;
        wq[r] = Unpack2Q4(b0[0].qs, b0[1].qs);
        wdv[r] = Pair(HalfToFloat(b0[0].d), HalfToFloat(b0[1].d));
        wmv[r] = Pair(HalfToFloat(b0[0].m), HalfToFloat(b0[1].m));
      } else if (kKind == kKindQ4_0) {
        const BlockQ4_0* b0 = reinterpret_cast<const BlockQ4_0*>(row) + b;
        wq[r] = Unpack2Q4(b0[0].qs, b0[1].qs);
        const float d0 = HalfToFloat(b0[0].d), d1 = HalfToFloat(b0[1].d);
        wdv[r] = Pair(d0, d1);
        wmv[r] = Pair(-8.0f * d0, -8.0f * d1);
      } else {
        const BlockQ8_0* b0 = reinterpret_cast<const BlockQ8_0*>(row) + b;
        const __m512i w = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b0[0].qs))),
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b0[1].qs)), 1);
        neg[r] = _mm512_movepi8_mask(w);
        wq[r] = _mm512_abs_epi8(w);
        wdv[r] = Pair(HalfToFloat(b0[0].d), HalfToFloat(b0[1].d));
      }
    }
    for (int t = 0; t < T; ++t) {
      const __m512i xv = _mm512_loadu_si512(a.xq + t * a.cols + b * kQK);
      const float* xd = a.xd + t * a.nb + b;
      const __m512 dxv = Pair(xd[0], xd[1]);
      __m512 sxv = _mm512_setzero_ps();
      if (kKind != kKindQ8_0) {
        const float* xs = a.xs + t * a.nb + b;
        sxv = Pair(xs[0] * 0.125f, xs[1] * 0.125f);
      }
      for (int r = 0; r < R; ++r) {
        __m512i dot;
        if (kKind == kKindQ8_0) {
          const __m512i xsgn = _mm512_mask_sub_epi8(xv, neg[r], _mm512_setzero_si512(), xv);
          dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wq[r], xsgn);
        } else {
          dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wq[r], xv);
        }
        acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(wdv[r], dxv), acc[r][t]);
        if (kKind != kKindQ8_0) acc[r][t] = _mm512_fmadd_ps(wmv[r], sxv, acc[r][t]);
      }
    }
  }
  float tail[R][T];
  for (int r = 0; r < R; ++r) {
    for (int t = 0; t < T; ++t) tail[r][t] = 0.0f;
  }
  if (nb2 < a.nb) {
    const int64_t b = nb2;
    for (int r = 0; r < R; ++r) {
      const uint8_t* row = a.w + r * a.row_bytes;
      __m256i wq, wabs = _mm256_setzero_si256();
      float wd, wm = 0.0f;
      if (kKind == kKindQ4_1) {
        const BlockQ4_1* blk = reinterpret_cast<const BlockQ4_1*>(row) + b;
        wd = HalfToFloat(blk->d);
        wm = HalfToFloat(blk->m);
        wq = UnpackNibbles(blk->qs);
      } else if (kKind == kKindQ4_0) {
        const BlockQ4_0* blk = reinterpret_cast<const BlockQ4_0*>(row) + b;
        wd = HalfToFloat(blk->d);
        wm = -8.0f * wd;
        wq = UnpackNibbles(blk->qs);
      } else {
        const BlockQ8_0* blk = reinterpret_cast<const BlockQ8_0*>(row) + b;
        wd = HalfToFloat(blk->d);
        wq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk->qs));
        wabs = _mm256_sign_epi8(wq, wq);
      }
      for (int t = 0; t < T; ++t) {
        const __m256i xv =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.xq + t * a.cols + b * kQK));
        const float dx = a.xd[t * a.nb + b];
        __m256i dot;
        if (kKind == kKindQ8_0) {
          dot = DotU8S8(wabs, _mm256_sign_epi8(xv, wq));
        } else {
          dot = DotU8S8(wq, xv);
        }
        tail[r][t] = Hsum(_mm256_mul_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(wd * dx)));
        if (kKind != kKindQ8_0) tail[r][t] = std::fma(wm, a.xs[t * a.nb + b], tail[r][t]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int t = 0; t < T; ++t) a.y[t * a.ldy + r] = _mm512_reduce_add_ps(acc[r][t]) + tail[r][t];
  }
}
#endif  // DMSRT_MM_AVX512

#else  // scalar fallback

template <int R, int T, bool kQ4_1>
void TileQ4(const TileArgs& a) {
  for (int r = 0; r < R; ++r) {
    const uint8_t* row = a.w + r * a.row_bytes;
    for (int t = 0; t < T; ++t) {
      float acc = 0.0f;
      for (int64_t b = 0; b < a.nb; ++b) {
        const int8_t* xq = a.xq + t * a.cols + b * kQK;
        const uint8_t* qs;
        float d, m;
        if (kQ4_1) {
          const BlockQ4_1* blk = reinterpret_cast<const BlockQ4_1*>(row) + b;
          d = HalfToFloat(blk->d);
          m = HalfToFloat(blk->m);
          qs = blk->qs;
        } else {
          const BlockQ4_0* blk = reinterpret_cast<const BlockQ4_0*>(row) + b;
          d = HalfToFloat(blk->d);
          m = -8.0f * d;
          qs = blk->qs;
        }
        int32_t dot = 0;
        for (int j = 0; j < kQK / 2; ++j) {
          dot += (qs[j] & 0x0F) * xq[j] + (qs[j] >> 4) * xq[j + kQK / 2];
        }
        acc = std::fma(d * a.xd[t * a.nb + b], static_cast<float>(dot), acc);
        acc = std::fma(m, a.xs[t * a.nb + b], acc);
      }
      a.y[t * a.ldy + r] = acc;
    }
  }
}

template <int R, int T>
void TileQ8_0(const TileArgs& a) {
  for (int r = 0; r < R; ++r) {
    const uint8_t* row = a.w + r * a.row_bytes;
    for (int t = 0; t < T; ++t) {
      float acc = 0.0f;
      for (int64_t b = 0; b < a.nb; ++b) {
        const BlockQ8_0* blk = reinterpret_cast<const BlockQ8_0*>(row) + b;
        const int8_t* xq = a.xq + t * a.cols + b * kQK;
        int32_t dot = 0;
        for (int j = 0; j < kQK; ++j) dot += blk->qs[j] * xq[j];
        acc = std::fma(HalfToFloat(blk->d) * a.xd[t * a.nb + b], static_cast<float>(dot), acc);
      }
      a.y[t * a.ldy + r] = acc;
    }
  }
}

#endif  // DMSRT_MM_AVX2

}  // namespace

void DequantizeRowFast(int type, const void* src, float* dst, int64_t cols) {
  int64_t i = 0;
  if (type == kTypeF16) {
    const uint16_t* h = static_cast<const uint16_t*>(src);
#if defined(__AVX512F__)
    for (; i + 16 <= cols; i += 16) {
      _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + i))));
    }
#elif defined(__F16C__)
    for (; i + 8 <= cols; i += 8) {
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
    }
#endif
    for (; i < cols; ++i) dst[i] = HalfToFloat(h[i]);
    return;
  }
  if (type == kTypeBF16) {
    const uint16_t* h = static_cast<const uint16_t*>(src);
#if DMSRT_MM_AVX2
    for (; i + 8 <= cols; i += 8) {
      const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i)));
      _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
    }
#endif
    for (; i < cols; ++i) dst[i] = Bf16ToFp32(h[i]);
    return;
  }
  DequantizeRow(type, src, dst, cols);
}

namespace {

// Float-converted rows (F32, F16, BF16, Q6_K): one row at a time into a per-thread scratch,
// then a float dot against each token.
template <int R, int T>
void TileFloat(const TileArgs& a, int type) {
  thread_local std::vector<float> scratch;
  for (int r = 0; r < R; ++r) {
    const uint8_t* row = a.w + r * a.row_bytes;
    const float* wf;
    if (type == kTypeF32) {
      wf = reinterpret_cast<const float*>(row);
    } else {
      if (static_cast<int64_t>(scratch.size()) < a.cols) scratch.resize(a.cols);
      DequantizeRowFast(type, row, scratch.data(), a.cols);
      wf = scratch.data();
    }
    for (int t = 0; t < T; ++t) a.y[t * a.ldy + r] = DotF32(wf, a.xf + t * a.cols, a.cols);
  }
}

using TileFn = void (*)(const TileArgs&);

#if DMSRT_MM_AVX512
template <int R, int T>
void TileQ4_0(const TileArgs& a) { Tile512<R, T, kKindQ4_0>(a); }
template <int R, int T>
void TileQ4_1(const TileArgs& a) { Tile512<R, T, kKindQ4_1>(a); }
template <int R, int T>
void TileQ8_0x(const TileArgs& a) { Tile512<R, T, kKindQ8_0>(a); }
#else
template <int R, int T>
void TileQ4_0(const TileArgs& a) { TileQ4<R, T, false>(a); }
template <int R, int T>
void TileQ4_1(const TileArgs& a) { TileQ4<R, T, true>(a); }
template <int R, int T>
void TileQ8_0x(const TileArgs& a) { TileQ8_0<R, T>(a); }
#endif
template <int R, int T>
void TileF32(const TileArgs& a) { TileFloat<R, T>(a, kTypeF32); }
template <int R, int T>
void TileF16(const TileArgs& a) { TileFloat<R, T>(a, kTypeF16); }
template <int R, int T>
void TileBF16(const TileArgs& a) { TileFloat<R, T>(a, kTypeBF16); }
template <int R, int T>
void TileQ6_K(const TileArgs& a) { TileFloat<R, T>(a, kTypeQ6_K); }

// Table [row tile 1 or 4][tokens 1..4].
struct TileTable {
  TileFn fn[2][kMaxTokTile];
};

#define DMSRT_TILE_TABLE(F)                                                       \
  TileTable{{{F<1, 1>, F<1, 2>, F<1, 3>, F<1, 4>}, {F<4, 1>, F<4, 2>, F<4, 3>, F<4, 4>}}}

const TileTable* TableFor(int type) {
  static const TileTable kQ4_0 = DMSRT_TILE_TABLE(TileQ4_0);
  static const TileTable kQ4_1 = DMSRT_TILE_TABLE(TileQ4_1);
  static const TileTable kQ8_0 = DMSRT_TILE_TABLE(TileQ8_0x);
  static const TileTable kF32 = DMSRT_TILE_TABLE(TileF32);
  static const TileTable kF16 = DMSRT_TILE_TABLE(TileF16);
  static const TileTable kBF16 = DMSRT_TILE_TABLE(TileBF16);
  static const TileTable kQ6_K = DMSRT_TILE_TABLE(TileQ6_K);
  switch (type) {
    case kTypeQ4_0: return &kQ4_0;
    case kTypeQ4_1: return &kQ4_1;
    case kTypeQ8_0: return &kQ8_0;
    case kTypeF32: return &kF32;
    case kTypeF16: return &kF16;
    case kTypeBF16: return &kBF16;
    case kTypeQ6_K: return &kQ6_K;
    default: return nullptr;
  }
}

bool UsesQuantizedActs(int type) {
  return type == kTypeQ4_0 || type == kTypeQ4_1 || type == kTypeQ8_0;
}

// A chunk of rows of one spec.
struct Chunk {
  int spec;
  int64_t r0, r1;
};

}  // namespace

float DotF32(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  for (; i + 32 <= n; i += 32) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
  }
  for (; i + 16 <= n; i += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
  float sum = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
#elif DMSRT_MM_AVX2
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  float sum = Hsum(_mm256_add_ps(s0, s1));
#else
  float sum = 0.0f;
#endif
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

void QuantizeActivations(const float* x, int64_t n, int64_t cols, int8_t* qs, float* d,
                         float* s) {
  const int64_t nb = cols / kQK;
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + t * cols + b * kQK;
      int8_t* qb = qs + t * cols + b * kQK;
#if DMSRT_MM_AVX2
      __m256 v[4];
      __m256 amax = _mm256_setzero_ps();
      const __m256 sign_mask = _mm256_set1_ps(-0.0f);
      for (int j = 0; j < 4; ++j) {
        v[j] = _mm256_loadu_ps(xb + 8 * j);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_mask, v[j]));
      }
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
      const float am = _mm_cvtss_f32(m4);
      const float db = am / 127.0f;
      const float id = db != 0.0f ? 1.0f / db : 0.0f;
      const __m256 idv = _mm256_set1_ps(id);
      __m256i q[4];
      for (int j = 0; j < 4; ++j) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], idv));
      // Sum of the 32 quantized values.
      __m256i qsum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
      __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(qsum), _mm256_extracti128_si256(qsum, 1));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
      const int32_t sum = _mm_cvtsi128_si32(s4);
      // Pack 32 int32 -> 32 int8 in element order (packs work per 128-bit lane; fix with a
      // permute).
      const __m256i p01 = _mm256_packs_epi32(q[0], q[1]);
      const __m256i p23 = _mm256_packs_epi32(q[2], q[3]);
      __m256i p = _mm256_packs_epi16(p01, p23);
      p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb), p);
#else
      float am = 0.0f;
      for (int j = 0; j < kQK; ++j) am = std::max(am, std::fabs(xb[j]));
      const float db = am / 127.0f;
      const float id = db != 0.0f ? 1.0f / db : 0.0f;
      int32_t sum = 0;
      for (int j = 0; j < kQK; ++j) {
        const int q = static_cast<int>(std::nearbyint(xb[j] * id));
        qb[j] = static_cast<int8_t>(q);
        sum += q;
      }
#endif
      d[t * nb + b] = db;
      s[t * nb + b] = db * static_cast<float>(sum);
    }
  }
}

const char* MatmulPath() {
#if DMSRT_MM_AVX512
  return "avx512-vnni";
#elif DMSRT_MM_AVX2 && defined(__AVXVNNI__)
  return "avx2-vnni";
#elif DMSRT_MM_AVX2
  return "avx2";
#else
  return "scalar";
#endif
}

bool MatMulSupported(int type, int64_t cols) {
  if (TableFor(type) == nullptr || cols <= 0) return false;
  const int64_t bs = QuantBlockSize(type);
  if (cols % bs != 0) return false;
  if (UsesQuantizedActs(type) && cols % kQK != 0) return false;
  return true;
}

bool MatMulBatch(ThreadPool* pool, const MatmulSpec* specs, int n_specs, int64_t cols,
                 const float* x, int64_t n, MatmulWorkspace* ws) {
  bool need_q = false;
  int64_t total_rows = 0;
  for (int i = 0; i < n_specs; ++i) {
    if (!MatMulSupported(specs[i].type, cols)) return false;
    need_q = need_q || UsesQuantizedActs(specs[i].type);
    total_rows += specs[i].rows;
  }
  if (n <= 0 || total_rows == 0) return true;
  const int nth = pool ? pool->size() : 1;
  const int64_t nb = cols / kQK;

  if (need_q) {
    if (static_cast<int64_t>(ws->qs.size()) < n * cols) ws->qs.resize(n * cols);
    if (static_cast<int64_t>(ws->d.size()) < n * nb) {
      ws->d.resize(n * nb);
      ws->s.resize(n * nb);
    }
    int8_t* qs = ws->qs.data();
    float* d = ws->d.data();
    float* s = ws->s.data();
    if (pool == nullptr || n < 8) {
      QuantizeActivations(x, n, cols, qs, d, s);
    } else {
      const int64_t per = (n + 2 * nth - 1) / (2 * nth);
      pool->ParallelFor((n + per - 1) / per, [&](int64_t c) {
        const int64_t t0 = c * per, t1 = std::min(n, t0 + per);
        QuantizeActivations(x + t0 * cols, t1 - t0, cols, qs + t0 * cols, d + t0 * nb,
                            s + t0 * nb);
      });
    }
  }

  // Chunks: about 8 per worker so a preempted worker does not hold up the others; a multiple
  // of the row tile so most rows go through the 4-row kernels.
  int64_t chunk_rows = (total_rows + 8 * nth - 1) / (8 * nth);
  if (n > 1) chunk_rows = std::max<int64_t>(chunk_rows, 16);
  chunk_rows = std::max<int64_t>(kMaxRowTile, (chunk_rows + kMaxRowTile - 1) / kMaxRowTile * kMaxRowTile);
  std::vector<int64_t>& chunks = ws->chunks;  // reused: no allocation per call once warm
  chunks.clear();
  for (int i = 0; i < n_specs; ++i) {
    for (int64_t r = 0; r < specs[i].rows; r += chunk_rows) {
      chunks.insert(chunks.end(), {i, r, std::min(specs[i].rows, r + chunk_rows)});
    }
  }
  const int64_t n_chunks = static_cast<int64_t>(chunks.size()) / 3;
  const int8_t* qs = need_q ? ws->qs.data() : nullptr;
  const float* xd = need_q ? ws->d.data() : nullptr;
  const float* xs = need_q ? ws->s.data() : nullptr;

  auto work = [&](int64_t c) {
    const Chunk ch{static_cast<int>(chunks[3 * c]), chunks[3 * c + 1], chunks[3 * c + 2]};
    const MatmulSpec& sp = specs[ch.spec];
    const TileTable* table = TableFor(sp.type);
    const int64_t row_bytes = sp.w_stride > 0 ? sp.w_stride : QuantRowBytes(sp.type, cols);
    const uint8_t* w = static_cast<const uint8_t*>(sp.w);
    for (int64_t t0 = 0; t0 < n; t0 += kMaxTokTile) {
      const int T = static_cast<int>(std::min<int64_t>(kMaxTokTile, n - t0));
      TileArgs a;
      a.row_bytes = row_bytes;
      a.xq = qs ? qs + t0 * cols : nullptr;
      a.xd = xd ? xd + t0 * nb : nullptr;
      a.xs = xs ? xs + t0 * nb : nullptr;
      a.xf = x + t0 * cols;
      a.cols = cols;
      a.nb = nb;
      a.ldy = sp.ldy;
      int64_t r = ch.r0;
      for (; r + kMaxRowTile <= ch.r1; r += kMaxRowTile) {
        a.w = w + r * row_bytes;
        a.y = sp.y + t0 * sp.ldy + r;
        table->fn[1][T - 1](a);
      }
      for (; r < ch.r1; ++r) {
        a.w = w + r * row_bytes;
        a.y = sp.y + t0 * sp.ldy + r;
        table->fn[0][T - 1](a);
      }
    }
  };
  if (pool == nullptr) {
    for (int64_t c = 0; c < n_chunks; ++c) work(c);
  } else {
    pool->ParallelFor(n_chunks, work);
  }
  return true;
}

}  // namespace kernels
}  // namespace dmsrt
