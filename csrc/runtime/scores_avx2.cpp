// scores_avx2.cpp: attention scores with AVX2+FMA (built with -mavx2 -mfma on x86 only;
// vec_ops.cpp calls it when the CPU has both). Eight keys at a time: eight dot-product
// accumulators, then one transposing reduction (hadds) yields the eight scores in one
// vector, instead of a horizontal sum per key.
#include <immintrin.h>

#include <cstdint>

namespace luthier {

// out[t] = scale * q . K[t * stride .. + n], n a multiple of 8; returns keys done (a
// multiple of 8; the caller finishes the rest)
int64_t scores_avx2(const float* q, const float* K, int64_t stride, int64_t n_keys, int64_t n,
                    float scale, float* out) {
  const __m256 vs = _mm256_set1_ps(scale);
  int64_t t = 0;
  for (; t + 8 <= n_keys; t += 8) {
    __m256 a[8];
    for (int u = 0; u < 8; ++u) a[u] = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) {
      const __m256 qv = _mm256_loadu_ps(q + i);
      for (int u = 0; u < 8; ++u)  // key t + u of the cache walk [t][kv][hd]
        a[u] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(K + (t + u) * stride + i), a[u]);
    }
    // lane u of r = sum of a[u]'s 8 lanes
    const __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    const __m256 r = _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31));
    _mm256_storeu_ps(out + t, _mm256_mul_ps(r, vs));
  }
  return t;
}

}  // namespace luthier
