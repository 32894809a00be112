// int8_gemm.cpp: portable int8 kernel, activation quantization and threading (int8_gemm.h).
#include "int8_gemm.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "dispatch.h"
#include "lut_gemm.h"
#include "lut_matmul.h"

namespace luthier {

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

void int8_rows_generic(const int8_t* w, const uint16_t* wscale, int64_t kp, const int8_t* xq,
                       const float* xs, int64_t m, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  for (int64_t r = n0; r < n1; ++r) {
    const int8_t* wr = w + r * kp;  // row r of [n, kp]
    for (int64_t i = 0; i < m; ++i) {
      float acc = 0.f;
      for (int64_t b = 0; b < kp / 32; ++b) {
        int32_t s = 0;
        for (int j = 0; j < 32; ++j) s += int32_t(wr[b * 32 + j]) * xq[i * kp + b * 32 + j];
        acc += float(s) * (xs[i * (kp / 32) + b] * half_to_float(wscale[r * (kp / 32) + b]));
      }
      y[i * ldy + r] = acc;
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
  Int8Kernel kern = int8_rows_generic;
#if defined(LUTHIER_X86)
  if (want == "avx2") kern = int8_rows_avx2;
#endif
  const int64_t chunk = 256;  // rows per task: 256 * kp bytes of weights
  const int8_t* q = xq.data();
  const float* s = xs.data();
  std::function<void(int64_t)> fn = [&](int64_t t) {
    const int64_t r0 = t * chunk, r1 = std::min(n, r0 + chunk);
    kern(w, wscale, kp, q, s, m, y, n, r0, r1);
  };
  parallel_for(n_threads, (n + chunk - 1) / chunk, fn);
}

}  // namespace luthier
