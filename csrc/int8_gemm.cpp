// int8_gemm.cpp: portable int8 kernel, activation quantization and threading (int8_gemm.h).
#include "int8_gemm.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "dispatch.h"
#include "lut_gemm.h"
#include "lut_matmul.h"

namespace luthier {

void check_int8_panels(int64_t n, int64_t k, int64_t w_rows, int64_t w_cols, int64_t s_rows,
                       int64_t s_cols) {
  if (n <= 0 || k <= 0) throw std::invalid_argument("int8 weights need n > 0 and k > 0");
  const int64_t p = int8_panels(n), kp = int8_kp(k);
  auto dims = [](int64_t a, int64_t b) { return "(" + std::to_string(a) + ", " + std::to_string(b) + ")"; };
  if (w_rows != p || w_cols != 8 * kp || s_rows != p || s_cols != 8 * kp / 32)
    throw std::invalid_argument("int8 panels of a [" + std::to_string(n) + ", " + std::to_string(k) +
                                "] weight must be codes " + dims(p, 8 * kp) + " and scales " +
                                dims(p, 8 * kp / 32) + " (k rounded up to 32), got " +
                                dims(w_rows, w_cols) + " and " + dims(s_rows, s_cols));
}

void quantize_act_q8(const float* x, int64_t m, int64_t k, int8_t* xq, float* xs) {
  const int64_t kp = int8_kp(k);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t b = 0; b < kp / 32; ++b) {
      float v[32];
      float amax = 0.f;
      for (int j = 0; j < 32; ++j) {
        const int64_t c = b * 32 + j;
        v[j] = c < k ? x[i * k + c] : 0.f;  // row i of [m, k], zero past k
        amax = std::max(amax, std::fabs(v[j]));
      }
      const float sc = amax > 0.f ? amax / 127.f : 1.f;
      const float inv = 1.f / sc;
      for (int j = 0; j < 32; ++j)
        xq[i * kp + b * 32 + j] = int8_t(std::clamp(int(std::nearbyint(v[j] * inv)), -127, 127));
      xs[i * (kp / 32) + b] = sc;
    }
  }
}

void int8_dequantize_row(const int8_t* w, const uint16_t* wscale, int64_t k, int64_t r, float mul,
                         float* out) {
  const int64_t kp = int8_kp(k), nb = kp / 32, j = r % 8;
  const int8_t* wp = w + (r / 8) * 8 * kp;  // panel r / 8 of [P, kp / 4, 8, 4]
  const uint16_t* sp = wscale + (r / 8) * 8 * nb;  // its scales [kp / 32, 8]
  for (int64_t col = 0; col < k; ++col)
    out[col] = half_to_float(sp[(col / 32) * 8 + j]) * float(int8_panel_code(wp, j, col)) * mul;
}

void int8_panels_generic(const int8_t* w, const uint16_t* wscale, int64_t kp, const int8_t* xq,
                         const float* xs, int64_t m, float* y, int64_t ldy, int64_t n, int64_t p0,
                         int64_t p1) {
  const int64_t nb = kp / 32;
  for (int64_t p = p0; p < p1; ++p) {
    const int8_t* wp = w + p * 8 * kp;  // panel p: [kp / 4, 8, 4]
    const uint16_t* sp = wscale + p * 8 * nb;  // [nb, 8]
    for (int64_t j = 0; j < 8 && p * 8 + j < n; ++j)
      for (int64_t i = 0; i < m; ++i) {
        const int8_t* xr = xq + i * kp;  // token i of [m, kp]
        float acc = 0.f;
        for (int64_t b = 0; b < nb; ++b) {
          int32_t d = 0;
          for (int64_t col = b * 32; col < b * 32 + 32; ++col)
            d += int32_t(int8_panel_code(wp, j, col)) * xr[col];
          // the AVX2 kernel's rounding exactly: (dot * wscale) then one fused multiply-add
          acc = std::fma(float(d) * half_to_float(sp[b * 8 + j]), xs[i * nb + b], acc);
        }
        y[i * ldy + p * 8 + j] = acc;
      }
  }
}

void int8_linear(const int8_t* w, const uint16_t* wscale, int64_t n, int64_t k, const float* x,
                 int64_t m, const float* norm_w, float eps, float* y, int n_threads,
                 const char* isa) {
  const int64_t kp = int8_kp(k);
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<float> xs, xn;
  xq.resize(size_t(m * kp));
  xs.resize(size_t(m * kp / 32));
  const float* xin = x;
  if (norm_w) {  // RMSNorm first (the head's output norm), as the LUT tables fuse it
    xn.resize(size_t(m * k));
    for (int64_t i = 0; i < m; ++i) {
      double ss = 0.0;
      for (int64_t j = 0; j < k; ++j) ss += double(x[i * k + j]) * x[i * k + j];
      const float r = float(1.0 / std::sqrt(ss / double(k) + double(eps)));
      for (int64_t j = 0; j < k; ++j) xn[size_t(i * k + j)] = x[i * k + j] * r * norm_w[j];
    }
    xin = xn.data();
  }
  quantize_act_q8(xin, m, k, xq.data(), xs.data());
  const std::string want = (isa && *isa) ? isa : active_isa();
  kernel_for(want);  // validates the name
  Int8Kernel kern = int8_panels_generic;
#if defined(LUTHIER_X86)
  if (want == "avx2") kern = int8_panels_avx2;
  // Zen 4 and Intel since Ice Lake have VNNI with AVX-512; the rare CPU without it (Skylake-X)
  // runs the AVX2 kernel, which gives the same bits
  static const bool vnni = (__builtin_cpu_init(), __builtin_cpu_supports("avx512vnni"));
  if (is_avx512_isa(want)) kern = vnni ? int8_panels_vnni : int8_panels_avx2;
#endif
  const int64_t panels = int8_panels(n), chunk = 32;  // panels per task: 256 rows, 256 * kp bytes
  const int8_t* q = xq.data();
  const float* s = xs.data();
  std::function<void(int64_t)> fn = [&](int64_t t) {
    const int64_t p0 = t * chunk, p1 = std::min(panels, p0 + chunk);
    kern(w, wscale, kp, q, s, m, y, n, n, p0, p1);
  };
  parallel_for(n_threads, (panels + chunk - 1) / chunk, fn);
}

}  // namespace luthier
