// int8_gemm.h: y[m, n] = x[m, k] . w[n, k]^T for 8-bit weights (embeddings / output heads,
// where 8 bits are the default and a 256-entry table per activation would not pay).
//
// Weights: symmetric int8 with one fp16 scale per block of 32 along k (GGUF's Q8_0 grid),
// stored in panels of 8 rows. This is the layout the kernels read, the luthier file stores
// and the int8 embedding lookup reads:
//   kp = k rounded up to 32 (zero padded), P = ceil(n / 8) panels (rows past n are zero)
//   w      int8 [P, kp / 4, 8, 4]: w[p, c, j, i] = code of row 8p + j, column 4c + i
//   wscale fp16 [P, kp / 32, 8]:   wscale[p, b, j] = scale of row 8p + j, columns [32b, 32b + 32)
// Why panels: one 32-byte load holds 4 columns of 8 rows, so vpmaddubsw + vpmaddwd against a
// token's 4 activations (one broadcast) leave the 8 rows' partial dots in the 8 int32 lanes.
// No horizontal sums, a weight load serves every token of the tile, and a row-major layout's
// per-row reductions (half the multiplier time at m = 16) are gone.
// x: quantized here to int8 per block of 32 activations (scale max|x| / 127), like
//    llama.cpp's q8_0 activations; the int32 sum of each block is scaled once.
// Every ISA computes each output as acc = fma(float(dot_b) * wscale_b, xscale_b, acc) over
// blocks b in order, so results are bit-identical across ISAs and tilings (a token's logits
// do not depend on the batch it is decoded in).
#pragma once
#include <cstdint>
#include <type_traits>

namespace luthier {

inline int64_t int8_kp(int64_t k) { return (k + 31) / 32 * 32; }
inline int64_t int8_panels(int64_t n) { return (n + 7) / 8; }
// code of row 8p + j, column col, in panel p's codes [kp / 4, 8, 4] (the layout above)
inline int8_t int8_panel_code(const int8_t* panel, int64_t j, int64_t col) {
  return panel[(col / 4) * 32 + j * 4 + col % 4];
}

// Throws std::invalid_argument unless int8 codes of shape [w_rows, w_cols] and scales of
// [s_rows, s_cols] are the panels of an [n, k] weight: [P, 8 * kp] and [P, 8 * kp / 32].
void check_int8_panels(int64_t n, int64_t k, int64_t w_rows, int64_t w_cols, int64_t s_rows,
                       int64_t s_cols);

// x float [m, k] -> xq int8 [m, kp], xs float [m, kp / 32]
void quantize_act_q8(const float* x, int64_t m, int64_t k, int8_t* xq, float* xs);

// Row r of panel-layout weights, dequantized and times `mul`, into out [k].
void int8_dequantize_row(const int8_t* w, const uint16_t* wscale, int64_t k, int64_t r, float mul,
                         float* out);

// Panels [p0, p1) for all m tokens: y[i * ldy + r] for rows r < n of those panels.
using Int8Kernel = void (*)(const int8_t* w, const uint16_t* wscale, int64_t kp, const int8_t* xq,
                            const float* xs, int64_t m, float* y, int64_t ldy, int64_t n,
                            int64_t p0, int64_t p1);
void int8_panels_generic(const int8_t* w, const uint16_t* wscale, int64_t kp, const int8_t* xq,
                         const float* xs, int64_t m, float* y, int64_t ldy, int64_t n, int64_t p0,
                         int64_t p1);
#if defined(LUTHIER_X86)
void int8_panels_avx2(const int8_t* w, const uint16_t* wscale, int64_t kp, const int8_t* xq,
                      const float* xs, int64_t m, float* y, int64_t ldy, int64_t n, int64_t p0,
                      int64_t p1);
// AVX-512 VNNI (vpdpbusd); the "avx512" ISA's kernel on CPUs that have VNNI
void int8_panels_vnni(const int8_t* w, const uint16_t* wscale, int64_t kp, const int8_t* xq,
                      const float* xs, int64_t m, float* y, int64_t ldy, int64_t n, int64_t p0,
                      int64_t p1);
#endif

#ifndef LUTHIER_INT8_PREFETCH_PANELS
#define LUTHIER_INT8_PREFETCH_PANELS 4
#endif

// The walk every SIMD int8 kernel shares: panels [p0, p1), each for its tokens in tiles of
// 8, 4, 2 and 1; the first tile of a panel prefetches the panel LUTHIER_INT8_PREFETCH_PANELS
// ahead (the panel's other tiles find it in L1). tile(std::integral_constant<int, T>, p, t0,
// pf, rows) computes and stores tokens [t0, t0 + T) of panel p (its first `rows` rows; pf:
// bytes to prefetch, or null). The tile is a lambda of the kernel's own file, so each ISA's
// instance is compiled with that file's flags.
template <typename Tile>
inline void int8_panel_walk(int64_t kp, int64_t m, int64_t n, int64_t p0, int64_t p1, const int8_t* w,
                            Tile&& tile) {
  for (int64_t p = p0; p < p1; ++p) {
    const int8_t* pf = p + LUTHIER_INT8_PREFETCH_PANELS < p1 ? w + (p + LUTHIER_INT8_PREFETCH_PANELS) * 8 * kp : nullptr;
    const int64_t rows = n - p * 8 < 8 ? n - p * 8 : 8;
    int64_t t = 0;
    for (; t + 8 <= m; t += 8, pf = nullptr) tile(std::integral_constant<int, 8>{}, p, t, pf, rows);
    for (; t + 4 <= m; t += 4, pf = nullptr) tile(std::integral_constant<int, 4>{}, p, t, pf, rows);
    for (; t + 2 <= m; t += 2, pf = nullptr) tile(std::integral_constant<int, 2>{}, p, t, pf, rows);
    for (; t < m; ++t, pf = nullptr) tile(std::integral_constant<int, 1>{}, p, t, pf, rows);
  }
}

// Threaded entry point; isa "" = the active one (generic, avx2 or avx512).
void int8_linear(const int8_t* w, const uint16_t* wscale, int64_t n, int64_t k, const float* x,
                 int64_t m, const float* norm_w, float eps, float* y, int n_threads,
                 const char* isa);

}  // namespace luthier
