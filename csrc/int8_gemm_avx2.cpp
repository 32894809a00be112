// int8_gemm_avx2.cpp: AVX2 int8 x int8 rows (built with -mavx2 -mfma). Per block of 32:
// |w| (u8) x sign(x, w) (s8) with vpmaddubsw (the sign trick: maddubs needs one unsigned
// operand), pairs summed to int32 with vpmaddwd; the sums of 8 blocks are reduced into one
// vector and scaled by their 8 (weight x activation) scales in one multiply-add.
#include <immintrin.h>

#include "int8_gemm.h"

namespace luthier {

namespace {

// int32 dot products of one 32-byte block of weights and activations, 8 lanes
inline __m256i block_dot(const int8_t* w, const int8_t* x, __m256i ones) {
  const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  const __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
  return _mm256_madd_epi16(p16, ones);
}

// lane j of the result = the sum of the 8 lanes of p[j] (a transposing reduction: 6 hadds
// and one cross-lane add for 8 blocks, instead of 8 full horizontal sums)
inline __m256i hsum8(const __m256i* p) {
  const __m256i t0 = _mm256_hadd_epi32(p[0], p[1]), t1 = _mm256_hadd_epi32(p[2], p[3]);
  const __m256i t2 = _mm256_hadd_epi32(p[4], p[5]), t3 = _mm256_hadd_epi32(p[6], p[7]);
  const __m256i u0 = _mm256_hadd_epi32(t0, t1), u1 = _mm256_hadd_epi32(t2, t3);
  // u0 lanes: [b0 b1 b2 b3 | b0 b1 b2 b3] halves (low 128 / high 128), u1 likewise for b4..b7
  return _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u0, u1, 0x31));
}

}  // namespace

#ifndef LUTHIER_INT8_PREFETCH_ROWS
#define LUTHIER_INT8_PREFETCH_ROWS 16
#endif

namespace {

constexpr int64_t kInt8PrefetchRows = LUTHIER_INT8_PREFETCH_ROWS;

// R rows [r, r + R) for token i: R independent dependency chains interleaved, so the long
// latency of one block group (loads, sign, maddubs, madd, hadd tree, fma) overlaps the others
template <int R>
inline void rows_token(const int8_t* w, const uint16_t* wscale, int64_t kp, int64_t nb,
                       const int8_t* xr, const float* sr, int64_t r, float* yr, __m256i ones) {
  __m256 acc[R];
  for (int q = 0; q < R; ++q) acc[q] = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 8 <= nb; b += 8) {
    const __m256 xsc = _mm256_loadu_ps(sr + b);
    for (int q = 0; q < R; ++q) {
      const int8_t* wr = w + (r + q) * kp;  // row r + q of [n, kp]
      __m256i p[8];
      for (int j = 0; j < 8; ++j) p[j] = block_dot(wr + (b + j) * 32, xr + (b + j) * 32, ones);
      const __m256 sc = _mm256_mul_ps(
          _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wscale + (r + q) * nb + b))), xsc);
      acc[q] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hsum8(p)), sc, acc[q]);
    }
  }
  for (; b < nb; ++b)  // the last nb % 8 blocks, one at a time
    for (int q = 0; q < R; ++q) {
      const float sc = sr[b] * _cvtsh_ss(wscale[(r + q) * nb + b]);
      const __m256i d = block_dot(w + (r + q) * kp + b * 32, xr + b * 32, ones);
      acc[q] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(sc), acc[q]);
    }
  if (R == 4) {  // four horizontal sums at once: lane q of the result = row r + q
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
    _mm_storeu_ps(yr + r, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
    return;
  }
  for (int q = 0; q < R; ++q) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[q]), _mm256_extractf128_ps(acc[q], 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    yr[r + q] = _mm_cvtss_f32(h);
  }
}

}  // namespace

void int8_rows_avx2(const int8_t* w, const uint16_t* wscale, int64_t kp, const int8_t* xq,
                    const float* xs, int64_t m, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t nb = kp / 32;
  int64_t r = n0;
  for (; r + 4 <= n1; r += 4) {
    // every cache line of the 4 rows kInt8PrefetchRows ahead: the weight stream is the only
    // thing that should miss
    if (r + kInt8PrefetchRows + 4 <= n1) {
      const char* pf = reinterpret_cast<const char*>(w + (r + kInt8PrefetchRows) * kp);
      for (int64_t off = 0; off < 4 * kp; off += 64) _mm_prefetch(pf + off, _MM_HINT_T0);
    }
    for (int64_t i = 0; i < m; ++i)  // token i of xq [m, kp], xs [m, nb], y [m, ldy]
      rows_token<4>(w, wscale, kp, nb, xq + i * kp, xs + i * nb, r, y + i * ldy, ones);
  }
  for (; r < n1; ++r)
    for (int64_t i = 0; i < m; ++i)
      rows_token<1>(w, wscale, kp, nb, xq + i * kp, xs + i * nb, r, y + i * ldy, ones);
}

}  // namespace luthier
