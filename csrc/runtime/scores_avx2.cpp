// scores_avx2.cpp: attention scores with AVX2+FMA (built with -mavx2 -mfma on x86 only;
// vec_ops.cpp calls it when the CPU has both). Eight keys at a time: eight dot-product
// accumulators, then one transposing reduction (hadds) yields the eight scores in one
// vector, instead of a horizontal sum per key.
#include <immintrin.h>

#include <cstdint>

namespace luthier {

namespace {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {  // 8 fp16 values (F16C)
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// out[t] = scale * q . K[t * stride .. + n] for whole blocks of 8 keys, n a multiple of 8;
// returns the keys done (a multiple of 8)
template <typename T>
int64_t score_blocks(const float* q, const T* K, int64_t stride, int64_t n_keys, int64_t n,
                     float scale, float* out) {
  const __m256 vs = _mm256_set1_ps(scale);
  int64_t t = 0;
  for (; t + 8 <= n_keys; t += 8) {
    __m256 a[8];
    for (int u = 0; u < 8; ++u) a[u] = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) {
      const __m256 qv = _mm256_loadu_ps(q + i);
      for (int u = 0; u < 8; ++u)  // key t + u of the cache walk [t][kv][hd]
        a[u] = _mm256_fmadd_ps(qv, load8(K + (t + u) * stride + i), a[u]);
    }
    // lane u of r = sum of a[u]'s 8 lanes
    const __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    const __m256 r = _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31));
    _mm256_storeu_ps(out + t, _mm256_mul_ps(r, vs));
  }
  return t;
}

}  // namespace

// float cache: whole blocks of 8 keys; returns the keys done (the caller finishes the rest)
int64_t scores_avx2(const float* q, const float* K, int64_t stride, int64_t n_keys, int64_t n,
                    float scale, float* out) {
  return score_blocks(q, K, stride, n_keys, n, scale, out);
}

// fp16 cache: every key (the last n_keys % 8 one by one)
int64_t scores_f16_avx2(const float* q, const uint16_t* K, int64_t stride, int64_t n_keys, int64_t n,
                        float scale, float* out) {
  int64_t t = score_blocks(q, K, stride, n_keys, n, scale, out);
  for (; t < n_keys; ++t) {  // the last keys one by one
    __m256 a = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(K + t * stride + i), a);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    out[t] = _mm_cvtss_f32(h) * scale;
  }
  return n_keys;
}

// out[0..n) = sum_t p[t] V[t], n a multiple of 8 (at most 256: the sum stays in registers
// in chunks of 64 values)
int64_t weighted_sum_f16_avx2(const float* p, const uint16_t* V, int64_t stride, int64_t n_keys,
                              int64_t n, float* out) {
  for (int64_t i0 = 0; i0 < n; i0 += 64) {
    const int64_t w = n - i0 < 64 ? n - i0 : 64;  // values of this chunk, a multiple of 8
    __m256 acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t t = 0; t < n_keys; ++t) {
      const __m256 pt = _mm256_set1_ps(p[t]);
      const uint16_t* v = V + t * stride + i0;  // value t of the cache walk [t][kv][hd]
      for (int j = 0; j < w / 8; ++j)
        acc[j] = _mm256_fmadd_ps(pt, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v + 8 * j))), acc[j]);
    }
    for (int j = 0; j < w / 8; ++j) _mm256_storeu_ps(out + i0 + 8 * j, acc[j]);
  }
  return n_keys;
}

void to_half_avx2(const float* x, uint16_t* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) {
    const __m128i h = _mm_cvtps_ph(_mm_set_ss(x[i]), _MM_FROUND_TO_NEAREST_INT);
    out[i] = uint16_t(_mm_extract_epi16(h, 0));
  }
}

}  // namespace luthier
