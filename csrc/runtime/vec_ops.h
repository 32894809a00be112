// vec_ops.h: small float kernels of the decoder (dot products, softmax, activations),
// written so the compiler vectorizes them; built three times (AVX-512F, AVX2, baseline)
// with target_clones so one binary runs everywhere, with the same results on each.
#pragma once
#include <cstdint>

namespace luthier {

float dot(const float* a, const float* b, int64_t n);
// y += a * x
void axpy(float* y, float a, const float* x, int64_t n);
// out[t] = scale * dot(q, K[t * stride .. + n]) for t < n_keys (attention scores of one query)
void scores(const float* q, const float* K, int64_t stride, int64_t n_keys, int64_t n, float scale,
            float* out);
// out[0..n) = sum_t p[t] * V[t * stride .. + n] (probability-weighted values)
void weighted_sum(const float* p, const float* V, int64_t stride, int64_t n_keys, int64_t n,
                  float* out);
// the same over an fp16 cache (IEEE binary16 bits)
void scores_f16(const float* q, const uint16_t* K, int64_t stride, int64_t n_keys, int64_t n,
                float scale, float* out);
void weighted_sum_f16(const float* p, const uint16_t* V, int64_t stride, int64_t n_keys, int64_t n,
                      float* out);
#if defined(LUTHIER_X86)
// attention_avx512.cpp (call only when the AVX-512 kernels are active, hd % 16 == 0,
// hd <= 256): g query heads q [g][hd] sharing one kv head, fp16 keys/values at K/V + t * stride
// out[j * ldo + t] = scale * q[j] . K[t]
void scores_group_f16_avx512(const float* q, int g, const uint16_t* K, int64_t stride, int64_t nk,
                             int64_t hd, float scale, float* out, int64_t ldo);
// out[j][i] = sum_t p[j * ldp + t] * V[t][i], out [g][hd]
void wsum_group_f16_avx512(const float* p, int64_t ldp, int g, const uint16_t* V, int64_t stride,
                           int64_t nk, int64_t hd, float* out);
#endif
// fp32 -> fp16 bits, n values
void to_half(const float* x, uint16_t* out, int64_t n);
// x[i] = exp(x[i] - mx), returns the sum; exp by range reduction + polynomial (rel. err ~2e-7)
float exp_shift_sum(float* x, int64_t n, float mx);
// g[i] = act(g[i]) * u[i], act = silu or gelu (tanh form)
void silu_mul(float* g, const float* u, int64_t n);
void gelu_mul(float* g, const float* u, int64_t n);
// out = x / sqrt(mean(x^2) + eps) * w, one row
void rms_norm_row(const float* x, int64_t d, const float* w, float eps, float* out);

}  // namespace luthier
