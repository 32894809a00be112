// vec_ops.cpp: see vec_ops.h. Eight partial sums make the reductions vectorizable
// without -ffast-math (the summation order is fixed, so results are deterministic).
#include "vec_ops.h"

#include "../lut_gemm.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LUTHIER_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LUTHIER_CLONES
#endif

namespace luthier {
namespace {

// (target_clones("arch=...") would test the CPU model, not its features: "avx512f" and
// "avx2" it is; CMakeLists.txt turns off FMA contraction so every clone gives the same bits)
// exp(x) for x <= 0 (softmax after the max shift; activations clamp): 2^n * p(r),
// r = x - n ln2 in [-ln2/2, ln2/2], degree-6 polynomial; branch-free so it vectorizes.
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.f), 88.f);
  // round to nearest (even) by the 1.5 * 2^23 trick: nearbyint is a call the vectorizer skips
  const float n = (x * 1.4426950408889634f + 12582912.f) - 12582912.f;
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  float p = 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

}  // namespace

LUTHIER_CLONES float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int u = 0; u < 8; ++u) acc[u] += a[i + u] * b[i + u];
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

#if defined(LUTHIER_X86)
int64_t scores_f16_avx2(const float* q, const uint16_t* K, int64_t stride, int64_t n_keys, int64_t n,
                        float scale, float* out);
int64_t weighted_sum_f16_avx2(const float* p, const uint16_t* V, int64_t stride, int64_t n_keys,
                              int64_t n, float* out);
void to_half_avx2(const float* x, uint16_t* out, int64_t n);
static bool f16c_ok() {  // at first use, after the CPU model is known
  static const bool ok = (__builtin_cpu_init(), __builtin_cpu_supports("avx2") &&
                          __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"));
  return ok;
}
#endif

void scores_f16(const float* q, const uint16_t* K, int64_t stride, int64_t n_keys, int64_t n,
                float scale, float* out) {
#if defined(LUTHIER_X86)
  if (f16c_ok() && n % 8 == 0) {
    scores_f16_avx2(q, K, stride, n_keys, n, scale, out);
    return;
  }
#endif
  for (int64_t t = 0; t < n_keys; ++t) {
    const uint16_t* k = K + t * stride;  // key t of the cache walk [t][kv][hd]
    float s = 0.f;
    for (int64_t i = 0; i < n; ++i) s += q[i] * half_to_float(k[i]);
    out[t] = s * scale;
  }
}

void weighted_sum_f16(const float* p, const uint16_t* V, int64_t stride, int64_t n_keys, int64_t n,
                      float* out) {
#if defined(LUTHIER_X86)
  if (f16c_ok() && n % 8 == 0) {
    weighted_sum_f16_avx2(p, V, stride, n_keys, n, out);
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) out[i] = 0.f;
  for (int64_t t = 0; t < n_keys; ++t) {
    const uint16_t* v = V + t * stride;  // value t of the cache walk [t][kv][hd]
    for (int64_t i = 0; i < n; ++i) out[i] += p[t] * half_to_float(v[i]);
  }
}

void to_half(const float* x, uint16_t* out, int64_t n) {
#if defined(LUTHIER_X86)
  if (f16c_ok()) {
    to_half_avx2(x, out, n);
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) out[i] = float_to_half(x[i]);
}

#if defined(LUTHIER_X86)
int64_t scores_avx2(const float* q, const float* K, int64_t stride, int64_t n_keys, int64_t n,
                    float scale, float* out);
#endif

LUTHIER_CLONES void scores(const float* q, const float* K, int64_t stride, int64_t n_keys, int64_t n,
                           float scale, float* out) {
  int64_t t0 = 0;
#if defined(LUTHIER_X86)
  static const bool simd = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (simd && n % 8 == 0) t0 = scores_avx2(q, K, stride, n_keys, n, scale, out);
#endif
  for (int64_t t = t0; t < n_keys; ++t) {
    const float* k = K + t * stride;  // key t of the cache walk [t][kv][hd]
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      for (int u = 0; u < 8; ++u) acc[u] += q[i + u] * k[i + u];
    float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; i < n; ++i) s += q[i] * k[i];
    out[t] = s * scale;
  }
}

LUTHIER_CLONES void weighted_sum(const float* p, const float* V, int64_t stride, int64_t n_keys,
                                 int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = 0.f;
  for (int64_t t = 0; t < n_keys; ++t) {
    const float* v = V + t * stride;  // value t of the cache walk [t][kv][hd]
    const float w = p[t];
    for (int64_t i = 0; i < n; ++i) out[i] += w * v[i];
  }
}

LUTHIER_CLONES void axpy(float* y, float a, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

LUTHIER_CLONES float exp_shift_sum(float* x, int64_t n, float mx) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int u = 0; u < 8; ++u) acc[u] += (x[i + u] = fast_exp(x[i + u] - mx));
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += (x[i] = fast_exp(x[i] - mx));
  return s;
}

LUTHIER_CLONES void silu_mul(float* g, const float* u, int64_t n) {
  // silu(x) = x / (1 + exp(-x)); exp of -|x| keeps fast_exp in range, then flip for x < 0
  for (int64_t i = 0; i < n; ++i) {
    const float x = g[i];
    const float e = fast_exp(-std::fabs(x));
    const float sig = (x >= 0.f ? 1.f : e) / (1.f + e);  // a select, then one division: vectorizes
    g[i] = x * sig * u[i];
  }
}

LUTHIER_CLONES void gelu_mul(float* g, const float* u, int64_t n) {
  // 0.5 x (1 + tanh(z)) = x * sigmoid(2z), z = sqrt(2/pi) (x + 0.044715 x^3)
  for (int64_t i = 0; i < n; ++i) {
    const float x = g[i];
    const float z2 = 2.f * 0.7978845608028654f * (x + 0.044715f * x * x * x);
    const float e = fast_exp(-std::fabs(z2));
    const float sig = (z2 >= 0.f ? 1.f : e) / (1.f + e);
    g[i] = x * sig * u[i];
  }
}

LUTHIER_CLONES void rms_norm_row(const float* x, int64_t d, const float* w, float eps, float* out) {
  const float r = 1.f / std::sqrt(dot(x, x, d) / float(d) + eps);
  for (int64_t j = 0; j < d; ++j) out[j] = x[j] * r * w[j];
}

}  // namespace luthier
