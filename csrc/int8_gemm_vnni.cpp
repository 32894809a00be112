// int8_gemm_vnni.cpp: int8 panels x int8 tokens with AVX-512 VNNI (built with -mavx512f
// -mavx512bw -mavx512vl -mavx512vnni -mfma -mf16c; int8_gemm.cpp calls it for the "avx512"
// ISA when the CPU has VNNI).
// Same tiles as int8_gemm_avx2.cpp (one panel of 8 rows x T tokens), but one vpdpbusd per
// token and 32-byte load does the 32 multiply-adds that took vpsignb + vpmaddubsw +
// vpmaddwd + vpaddd there. vpdpbusd multiplies unsigned by signed bytes, so the weights are
// biased once per load (w + 128 = w ^ 0x80, shared by the T tokens) and each block's dot
// loses 128 * sum(x over the block), computed once per call. The integer dot is exact
// either way and the float steps are the AVX2 kernel's, so outputs are bit-identical.
#include <immintrin.h>

#include <cstring>
#include <vector>

#include "int8_gemm.h"

namespace luthier {

namespace {

// panel wp [kp / 4, 8, 4] x tokens [t0, t0 + T) of xq [m, kp] -> out[t][8] (8 rows each);
// xsum128 [m, nb]: 128 * sum of each token's block; pf: bytes to prefetch, or null
template <int T>
inline void panel_tile(const int8_t* wp, const uint16_t* sp, int64_t kp, const int8_t* xq,
                       const float* xs, const int32_t* xsum128, int64_t t0, const int8_t* pf,
                       __m256 out[T]) {
  const int64_t nb = kp / 32;
  const __m256i bias = _mm256_set1_epi8(char(0x80));
  __m256 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const int8_t* wb = wp + b * 256;  // block b: 8 loads of [8 rows, 4 columns]
    if (pf) for (int l = 0; l < 4; ++l) _mm_prefetch(reinterpret_cast<const char*>(pf + b * 256 + l * 64), _MM_HINT_T0);
    __m256i dot[T];
    for (int t = 0; t < T; ++t) dot[t] = _mm256_set1_epi32(-xsum128[(t0 + t) * nb + b]);
    for (int c = 0; c < 8; ++c) {
      const __m256i wu = _mm256_xor_si256(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + c * 32)), bias);  // w + 128
      for (int t = 0; t < T; ++t) {
        int32_t x4;  // columns [32b + 4c, +4) of token t0 + t
        std::memcpy(&x4, xq + (t0 + t) * kp + b * 32 + c * 4, 4);
        dot[t] = _mm256_dpbusd_epi32(dot[t], wu, _mm256_set1_epi32(x4));
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
                       const float* xs, const int32_t* xsum128, int64_t t0, const int8_t* pf,
                       float* y, int64_t ldy, int64_t r0, int64_t rows) {
  __m256 out[T];
  panel_tile<T>(wp, sp, kp, xq, xs, xsum128, t0, pf, out);
  const __mmask8 keep = rows == 8 ? __mmask8(0xFF) : __mmask8((1u << rows) - 1);
  for (int t = 0; t < T; ++t)  // row t0 + t of y [m, ldy], columns [r0, r0 + rows)
    _mm256_mask_storeu_ps(y + (t0 + t) * ldy + r0, keep, out[t]);
}

}  // namespace

void int8_panels_vnni(const int8_t* w, const uint16_t* wscale, int64_t kp, const int8_t* xq,
                      const float* xs, int64_t m, float* y, int64_t ldy, int64_t n, int64_t p0,
                      int64_t p1) {
  const int64_t nb = kp / 32;
  // 128 * sum of each token's block of 32 activations: the bias the weights' +128 adds
  thread_local std::vector<int32_t> xsum128;
  xsum128.resize(size_t(m * nb));
  for (int64_t i = 0; i < m * nb; ++i) {  // block i of xq viewed as [m * nb, 32]
    int32_t s = 0;
    for (int c = 0; c < 32; ++c) s += xq[i * 32 + c];
    xsum128[size_t(i)] = 128 * s;
  }
  const int32_t* xb = xsum128.data();
  int8_panel_walk(kp, m, n, p0, p1, w, [&](auto T, int64_t p, int64_t t, const int8_t* pf, int64_t rows) {
    // panel p of [P, kp / 4, 8, 4] and its scales [nb, 8]
    tile_store<decltype(T)::value>(w + p * 8 * kp, wscale + p * 8 * nb, kp, xq, xs, xb, t, pf, y, ldy, p * 8, rows);
  });
}

}  // namespace luthier
