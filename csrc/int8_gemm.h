// int8_gemm.h: y[m, n] = x[m, k] . w[n, k]^T for 8-bit weights (embeddings / output heads,
// where 8 bits are the default and a 256-entry table per activation would not pay).
//
// w: int8 [n, kp] row-major, kp = k rounded up to 32 (zero padded), one fp16 scale per
//    block of 32 along k, wscale [n, kp / 32] (symmetric, like GGUF's Q8_0:
//    w_float[n, c] = wscale[n, c / 32] * w[n, c]).
// x: quantized here to int8 per block of 32 activations (scale max|x| / 127), like
//    llama.cpp's q8_0 activations; the int32 sum of each block is scaled once.
#pragma once
#include <cstdint>

namespace luthier {

inline int64_t int8_kp(int64_t k) { return (k + 31) / 32 * 32; }

// x float [m, k] -> xq int8 [m, kp], xs float [m, kp / 32]
void quantize_act_q8(const float* x, int64_t m, int64_t k, int8_t* xq, float* xs);

using Int8Kernel = void (*)(const int8_t* w, const uint16_t* wscale, int64_t kp, const int8_t* xq,
                            const float* xs, int64_t m, float* y, int64_t ldy, int64_t n0,
                            int64_t n1);
// rows [n0, n1) for all m tokens
void int8_rows_generic(const int8_t* w, const uint16_t* wscale, int64_t kp, const int8_t* xq,
                       const float* xs, int64_t m, float* y, int64_t ldy, int64_t n0, int64_t n1);
#if defined(LUTHIER_X86)
void int8_rows_avx2(const int8_t* w, const uint16_t* wscale, int64_t kp, const int8_t* xq,
                    const float* xs, int64_t m, float* y, int64_t ldy, int64_t n0, int64_t n1);
#endif

// Threaded entry point; isa "" = the active one (generic or avx2).
void int8_linear(const int8_t* w, const uint16_t* wscale, int64_t n, int64_t k, const float* x,
                 int64_t m, const float* norm_w, float eps, float* y, int n_threads,
                 const char* isa);

}  // namespace luthier
