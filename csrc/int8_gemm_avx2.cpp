// int8_gemm_avx2.cpp: AVX2 int8 x int8 rows (built with -mavx2 -mfma). Per block of 32:
// |w| (u8) x sign(x, w) (s8) with vpmaddubsw (the sign trick: maddubs needs one unsigned
// operand), pairs summed to int32 with vpmaddwd, then one float multiply-add by the
// block's activation scale.
#include <immintrin.h>

#include "int8_gemm.h"

namespace luthier {

void int8_rows_avx2(const int8_t* w, const uint16_t* wscale, int64_t kp, const int8_t* xq,
                    const float* xs, int64_t m, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t nb = kp / 32;
  for (int64_t r = n0; r < n1; ++r) {
    const int8_t* wr = w + r * kp;  // row r of [n, kp]
    _mm_prefetch(reinterpret_cast<const char*>(wr + 4 * kp), _MM_HINT_T0);
    for (int64_t i = 0; i < m; ++i) {
      const int8_t* xr = xq + i * kp;  // token i of [m, kp]
      const float* sr = xs + i * nb;
      // four accumulators: one chain of FMAs would wait on its own latency every block
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      auto block = [&](int64_t b, __m256& a) {
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + b * 32));
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + b * 32));
        const __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
        const __m256i p32 = _mm256_madd_epi16(p16, ones);
        const float sc = sr[b] * _cvtsh_ss(wscale[r * nb + b]);  // activation x weight block scale
        a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p32), _mm256_set1_ps(sc), a);
      };
      int64_t b = 0;
      for (; b + 4 <= nb; b += 4) {
        block(b, acc[0]);
        block(b + 1, acc[1]);
        block(b + 2, acc[2]);
        block(b + 3, acc[3]);
      }
      for (; b < nb; ++b) block(b, acc[0]);
      acc[0] = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
      // horizontal sum of 8 lanes
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[0]), _mm256_extractf128_ps(acc[0], 1));
      h = _mm_add_ps(h, _mm_movehl_ps(h, h));
      h = _mm_add_ss(h, _mm_movehdup_ps(h));
      y[i * ldy + r] = _mm_cvtss_f32(h);
    }
  }
}

}  // namespace luthier
