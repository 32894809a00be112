// int8_gemm_avx2.cpp: AVX2 int8 panels x int8 tokens (built with -mavx2 -mfma -mf16c).
// A tile is one panel (8 rows) x T tokens. Per 32-byte load of 4 columns x 8 rows: |w| once
// (vpsignb w, w), then per token a broadcast of its 4 activations, sign(x, w) (vpmaddubsw
// needs one unsigned operand: |w| x sign(x, w) = w x x), vpmaddubsw, vpmaddwd into the 8
// int32 lanes = 8 rows. Per block of 32 columns the lanes are scaled by the 8 rows' fp16
// scales and fused into the float sums with the token's activation scale.
// Zen 3 runs vpsignb, vpmaddubsw and vpmaddwd on the same two pipes: 3 of them per 32 MACs
// is the ceiling (~21 MAC/cycle); the tile reaches ~19 at T = 8 against ~10 for the
// row-major kernel this replaced (horizontal sums per row and token).
#include <immintrin.h>

#include <cstring>

#include "int8_gemm.h"

namespace luthier {

namespace {

// panel wp [kp / 4, 8, 4] x tokens [t0, t0 + T) of xq [m, kp] -> out[t][8] (8 rows each);
// pf: the same bytes of a panel further on (prefetched block by block), or null
template <int T>
inline void panel_tile(const int8_t* wp, const uint16_t* sp, int64_t kp, const int8_t* xq,
                       const float* xs, int64_t t0, const int8_t* pf, __m256 out[T]) {
  const int64_t nb = kp / 32;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const int8_t* wb = wp + b * 256;  // block b: 8 loads of [8 rows, 4 columns]
    if (pf) for (int l = 0; l < 4; ++l) _mm_prefetch(reinterpret_cast<const char*>(pf + b * 256 + l * 64), _MM_HINT_T0);
    __m256i dot[T];
    for (int t = 0; t < T; ++t) dot[t] = _mm256_setzero_si256();
    for (int c = 0; c < 8; ++c) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + c * 32));
      const __m256i aw = _mm256_sign_epi8(wv, wv);
      for (int t = 0; t < T; ++t) {
        int32_t x4;  // columns [32b + 4c, +4) of token t0 + t
        std::memcpy(&x4, xq + (t0 + t) * kp + b * 32 + c * 4, 4);
        const __m256i sx = _mm256_sign_epi8(_mm256_set1_epi32(x4), wv);
        dot[t] = _mm256_add_epi32(dot[t], _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), ones));
      }
    }
    const __m256 ws = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sp + b * 8)));
    for (int t = 0; t < T; ++t)  // acc = fma(dot * wscale, xscale, acc): the generic kernel's rounding
      acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(dot[t]), ws),
                               _mm256_set1_ps(xs[(t0 + t) * nb + b]), acc[t]);
  }
  for (int t = 0; t < T; ++t) out[t] = acc[t];
}

template <int T>
inline void tile_store(const int8_t* wp, const uint16_t* sp, int64_t kp, const int8_t* xq,
                       const float* xs, int64_t t0, const int8_t* pf, float* y, int64_t ldy,
                       int64_t r0, int64_t rows) {
  __m256 out[T];
  panel_tile<T>(wp, sp, kp, xq, xs, t0, pf, out);
  for (int t = 0; t < T; ++t) {
    float* yr = y + (t0 + t) * ldy + r0;  // row t0 + t of y [m, ldy], columns [r0, r0 + rows)
    if (rows == 8) {
      _mm256_storeu_ps(yr, out[t]);
    } else {  // the last panel of an n that is not a multiple of 8
      alignas(32) float tmp[8];
      _mm256_store_ps(tmp, out[t]);
      std::memcpy(yr, tmp, size_t(rows) * sizeof(float));
    }
  }
}

}  // namespace

void int8_panels_avx2(const int8_t* w, const uint16_t* wscale, int64_t kp, const int8_t* xq,
                      const float* xs, int64_t m, float* y, int64_t ldy, int64_t n, int64_t p0,
                      int64_t p1) {
  const int64_t nb = kp / 32;
  int8_panel_walk(kp, m, n, p0, p1, w, [&](auto T, int64_t p, int64_t t, const int8_t* pf, int64_t rows) {
    // panel p of [P, kp / 4, 8, 4] and its scales [nb, 8]
    tile_store<decltype(T)::value>(w + p * 8 * kp, wscale + p * 8 * nb, kp, xq, xs, t, pf, y, ldy, p * 8, rows);
  });
}

}  // namespace luthier
