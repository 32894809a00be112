// attention_avx512.cpp: attention scores and value sums over the fp16 KV cache with AVX-512
// (built with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c; decoder.cpp calls it
// when the active ISA is avx512 and head_dim is a multiple of 16, at most 256).
//
// The g query heads that share a kv head (grouped-query attention) read the same keys and
// values: each 16-key block of K is converted from fp16 once into an L1 buffer and used by
// every head, and each value row is converted once and added into every head's sums.
// Scores: 16 keys' dot products of one head sit in 16 zmm accumulators, then one
// transposing reduction (unpack, shuffle_ps, shuffle_f32x4 with adds) leaves the 16 scores
// in one vector. Every head's result is computed by the same operations in the same order
// whatever g is, so a sequence's attention does not depend on how heads were grouped into
// tasks (the batch it decodes in).
#include <immintrin.h>

#include <cstdint>

namespace luthier {

namespace {

constexpr int64_t kPrefetchRows = 8;  // cache rows ahead that the loops prefetch

inline __m512 load16h(const uint16_t* p) {  // 16 fp16 values
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// lane u of the result = the sum of a[u]'s 16 lanes
inline __m512 reduce16(const __m512 a[16]) {
  __m512 s[8], t[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: (a0+a2, b0+b2, a1+a3, b1+b3) of keys 2i, 2i+1
    s[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per 128-bit lane: keys 4i..4i+3, that lane's partial sums
    t[i] = _mm512_add_ps(_mm512_shuffle_ps(s[2 * i], s[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(s[2 * i], s[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // add the four 128-bit lanes: keys 0-3 | 4-7 | 8-11 | 12-15
  const __m512 v01 = _mm512_add_ps(_mm512_shuffle_f32x4(t[0], t[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(t[0], t[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 v23 = _mm512_add_ps(_mm512_shuffle_f32x4(t[2], t[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(t[2], t[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(v01, v23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(v01, v23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// q [hd] . kf[u] [hd] for the 16 keys of a block (kf: [16][hd] floats), NC = hd / 16
template <int NC>
inline __m512 block_scores(const float* q, const float* kf, int64_t hd) {
  const int nc = NC > 0 ? NC : int(hd / 16);
  __m512 acc[16];
  for (int u = 0; u < 16; ++u) {
    __m512 a = _mm512_mul_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(kf + u * hd));
    for (int c = 1; c < nc; ++c) a = _mm512_fmadd_ps(_mm512_loadu_ps(q + 16 * c), _mm512_loadu_ps(kf + u * hd + 16 * c), a);
    acc[u] = a;
  }
  return reduce16(acc);
}

// one key's score, the same chain of products as block_scores, then a horizontal sum
inline float key_score(const float* q, const uint16_t* k, int64_t hd) {
  __m512 a = _mm512_mul_ps(_mm512_loadu_ps(q), load16h(k));
  for (int64_t c = 1; c < hd / 16; ++c) a = _mm512_fmadd_ps(_mm512_loadu_ps(q + 16 * c), load16h(k + 16 * c), a);
  return _mm512_reduce_add_ps(a);
}

template <int NC>
void scores_impl(const float* q, int g, const uint16_t* K, int64_t stride, int64_t nk, int64_t hd,
                 float scale, float* out, int64_t ldo) {
  alignas(64) float kf[16 * 256];  // one block of keys in float: [16][hd]
  const __m512 vs = _mm512_set1_ps(scale);
  int64_t t = 0;
  for (; t + 16 <= nk; t += 16) {
    for (int u = 0; u < 16; ++u) {  // key t + u of the cache walk [t][kv][hd]
      const uint16_t* kr = K + (t + u + 2 * kPrefetchRows) * stride;  // a block and more ahead
      for (int64_t b = 0; b < hd * 2; b += 64) _mm_prefetch(reinterpret_cast<const char*>(kr) + b, _MM_HINT_T0);
      for (int64_t c = 0; c < hd / 16; ++c)
        _mm512_store_ps(kf + u * hd + 16 * c, load16h(K + (t + u) * stride + 16 * c));
    }
    for (int j = 0; j < g; ++j)  // head j of the group: q [g][hd], out [g][ldo]
      _mm512_storeu_ps(out + j * ldo + t, _mm512_mul_ps(block_scores<NC>(q + j * hd, kf, hd), vs));
  }
  // a last block that is not a multiple of 16: a horizontal sum per key, then the same scaling
  for (; t < nk; ++t)
    for (int j = 0; j < g; ++j) out[j * ldo + t] = key_score(q + j * hd, K + t * stride, hd) * scale;
}

}  // namespace

// out[j * ldo + t] = scale * q[j] . K[t * stride ..] for g heads q [g][hd], t < nk
void scores_group_f16_avx512(const float* q, int g, const uint16_t* K, int64_t stride, int64_t nk,
                             int64_t hd, float scale, float* out, int64_t ldo) {
  if (hd == 64) return scores_impl<4>(q, g, K, stride, nk, hd, scale, out, ldo);
  if (hd == 128) return scores_impl<8>(q, g, K, stride, nk, hd, scale, out, ldo);
  scores_impl<0>(q, g, K, stride, nk, hd, scale, out, ldo);
}

namespace {

// GB heads x NC chunks of 16 values (at most 4 x 4: 16 accumulators) of columns [i0, ...)
template <int GB, int NC>
void wsum_block(const float* p, int64_t ldp, const uint16_t* V, int64_t stride, int64_t nk,
                int64_t hd, int64_t i0, float* out) {
  __m512 acc[GB][NC];
  for (int j = 0; j < GB; ++j)
    for (int c = 0; c < NC; ++c) acc[j][c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < nk; ++t) {
    const uint16_t* v = V + t * stride + i0;  // value t of the cache walk [t][kv][hd]
    // cache rows are `stride` apart: fetch the one kPrefetchRows ahead of the stream
    _mm_prefetch(reinterpret_cast<const char*>(v + kPrefetchRows * stride), _MM_HINT_T0);
    if (NC > 2) _mm_prefetch(reinterpret_cast<const char*>(v + kPrefetchRows * stride + 32), _MM_HINT_T0);
    __m512 vf[NC];
    for (int c = 0; c < NC; ++c) vf[c] = load16h(v + 16 * c);
    for (int j = 0; j < GB; ++j) {
      const __m512 pt = _mm512_set1_ps(p[j * ldp + t]);
      for (int c = 0; c < NC; ++c) acc[j][c] = _mm512_fmadd_ps(pt, vf[c], acc[j][c]);
    }
  }
  for (int j = 0; j < GB; ++j)
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(out + j * hd + i0 + 16 * c, acc[j][c]);
}

template <int GB>
void wsum_heads(const float* p, int64_t ldp, const uint16_t* V, int64_t stride, int64_t nk,
                int64_t hd, float* out) {
  for (int64_t i0 = 0; i0 < hd; i0 += 64) {  // chunks of 64 values (the last may be 16-48)
    switch ((hd - i0 < 64 ? hd - i0 : 64) / 16) {
      case 1: wsum_block<GB, 1>(p, ldp, V, stride, nk, hd, i0, out); break;
      case 2: wsum_block<GB, 2>(p, ldp, V, stride, nk, hd, i0, out); break;
      case 3: wsum_block<GB, 3>(p, ldp, V, stride, nk, hd, i0, out); break;
      default: wsum_block<GB, 4>(p, ldp, V, stride, nk, hd, i0, out); break;
    }
  }
}

}  // namespace

// out[j][i] = sum_t p[j * ldp + t] * V[t * stride + i] for g heads, out [g][hd]
void wsum_group_f16_avx512(const float* p, int64_t ldp, int g, const uint16_t* V, int64_t stride,
                           int64_t nk, int64_t hd, float* out) {
  for (int j0 = 0; j0 < g; j0 += 4) {  // blocks of up to 4 heads: each head's sums are the same
    const float* pj = p + j0 * ldp;
    float* oj = out + j0 * hd;
    switch (g - j0 < 4 ? g - j0 : 4) {
      case 1: wsum_heads<1>(pj, ldp, V, stride, nk, hd, oj); break;
      case 2: wsum_heads<2>(pj, ldp, V, stride, nk, hd, oj); break;
      case 3: wsum_heads<3>(pj, ldp, V, stride, nk, hd, oj); break;
      default: wsum_heads<4>(pj, ldp, V, stride, nk, hd, oj); break;
    }
  }
}

}  // namespace luthier
