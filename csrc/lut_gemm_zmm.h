// lut_gemm_zmm.h: the float epilogue and the row stores that the two AVX-512 LUT kernels
// (lut_gemm_avx512.cpp, lut_gemm_vbmi.cpp) share. Only those files include it: the helpers
// have internal linkage, so each file's copy is compiled with that file's own flags (an
// inline function merged across the two could carry VBMI into the plain AVX-512 kernel).
#pragma once
#include <immintrin.h>

#include "lut_gemm.h"

namespace luthier {
namespace {

// Group g's scaling of tokens [mi, mi + NT), rows vector e: y += s * (acc * ts / 2 + coef *
// xsum), with s the rows' scales and coef = cb - zero. The same operations in the same order
// as the AVX2 kernel per lane: the x86 kernels' outputs are bit-identical.
template <int NT>
inline void scale_rows(const GemmArgs& a, int64_t mi, int64_t g, int e, __m512 s, __m512 coef,
                       const __m512i (&acc)[NT][2], __m512 (&y)[NT][2]) {
  const int64_t groups = a.ps->groups;  // tscale, xsum: [m, groups]
  for (int u = 0; u < NT; ++u) {
    const __m512 vts = _mm512_set1_ps(0.5f * a.tscale[(mi + u) * groups + g]);
    const __m512 vsx = _mm512_set1_ps(a.xsum[(mi + u) * groups + g]);
    const __m512 inner = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[u][e]), vts, _mm512_mul_ps(coef, vsx));
    y[u][e] = _mm512_fmadd_ps(s, inner, y[u][e]);
  }
}

// Stores tokens [mi, mi + NT) of tile t: rows 0-15 / 16-31 are permutex2var(y[u][0],
// rows_a / rows_b, y[u][1]) (index < 16: a lane of the first, else lane - 16 of the
// second), masked past the matrix's last row.
template <int NT>
inline void store_rows(const GemmArgs& a, int64_t t, int64_t mi, const __m512 (&y)[NT][2],
                       __m512i rows_a, __m512i rows_b) {
  const int64_t r0 = t * kNR;
  const int64_t left = a.ps->n - r0;
  const __mmask16 ma = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
  const __mmask16 mb = left >= 32 ? __mmask16(0xFFFF) : left <= 16 ? __mmask16(0) : __mmask16((1u << (left - 16)) - 1);
  for (int u = 0; u < NT; ++u) {
    float* yr = a.y + (mi + u) * a.ldy + r0;  // y [m, ldy]: token mi + u, rows [r0, r0 + 32)
    _mm512_mask_storeu_ps(yr, ma, _mm512_permutex2var_ps(y[u][0], rows_a, y[u][1]));
    _mm512_mask_storeu_ps(yr + 16, mb, _mm512_permutex2var_ps(y[u][0], rows_b, y[u][1]));
  }
}

}  // namespace
}  // namespace luthier
