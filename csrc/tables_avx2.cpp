// tables_avx2.cpp: the entries of fast-mode tables (tables.cpp) with AVX2 (built with
// -mavx2 -mfma; called only when dispatch.cpp finds AVX2). Per kgroup of 4 activations,
// the 8 independent entries come from one chain of FMAs on broadcasts, in the same order
// as the scalar half_table (so the bytes are identical), then are rounded, packed to int8
// and mirrored (T[15 - c] = -T[c]) with two pack instructions and one shuffle.
#include <immintrin.h>

#include "lut_gemm.h"

namespace luthier {

void fast_group_entries_avx2(const float* xg, int64_t kgroups, float inv, uint8_t* out) {
  // sign of x_j in entry c: bit j of c (x3 always -1)
  const __m256 s0 = _mm256_setr_ps(-1, 1, -1, 1, -1, 1, -1, 1);
  const __m256 s1 = _mm256_setr_ps(-1, -1, 1, 1, -1, -1, 1, 1);
  const __m256 s2 = _mm256_setr_ps(-1, -1, -1, -1, 1, 1, 1, 1);
  const __m256 vinv = _mm256_set1_ps(inv);
  const __m128i rev16 = _mm_setr_epi8(14, 15, 12, 13, 10, 11, 8, 9, 6, 7, 4, 5, 2, 3, 0, 1);
  for (int64_t j = 0; j < kgroups; ++j) {
    const float* x = xg + j * kG;  // kgroup j: x[0..3]
    // ((-x3 + s0 x0) + s1 x1) + s2 x2: the scalar order, each product exact (s = +-1)
    __m256 t = _mm256_fmadd_ps(_mm256_set1_ps(x[0]), s0, _mm256_set1_ps(-x[3]));
    t = _mm256_fmadd_ps(_mm256_set1_ps(x[1]), s1, t);
    t = _mm256_fmadd_ps(_mm256_set1_ps(x[2]), s2, t);
    // round to nearest even, as nearbyint in the default mode; |t * inv| <= 127 by amax
    const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(t, vinv));
    const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));  // T0..T7
    const __m128i neg = _mm_shuffle_epi8(_mm_sub_epi16(_mm_setzero_si128(), q16), rev16);  // -T7..-T0
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + j * kTableBytes), _mm_packs_epi16(q16, neg));
  }
}

}  // namespace luthier
