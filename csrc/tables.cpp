// tables.cpp: float activations -> the lookup tables of lut_gemm.h ("Tables layout").
// One pass over a token's activations; the fused variant applies RMSNorm in the same pass.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "dispatch.h"
#include "lut_gemm.h"

namespace luthier {

#if defined(LUTHIER_X86)
void fast_group_entries_avx2(const float* xg, int64_t kgroups, float inv, uint8_t* out);
#endif

TableShape table_shape(int64_t m, int64_t k, int group_size, TableMode mode) {
  if (m <= 0 || k <= 0) throw std::invalid_argument("m and k must be positive");
  if (group_size <= 0 || (group_size != k && group_size % 8 != 0))
    throw std::invalid_argument("group_size must be a multiple of 8, or equal to k");
  TableShape ts{};
  ts.m = m;
  ts.k = k;
  ts.group_size = group_size;
  ts.groups = (k + group_size - 1) / group_size;
  ts.gsp = (int64_t(group_size) + 7) / 8 * 8;
  ts.kp = ts.groups * ts.gsp;
  ts.mode = mode;
  return ts;
}

namespace {

// The sum of 8 partial sums in one fixed order (the same bits on every ISA and batch).
template <typename T>
inline T sum8(const T (&s)[8]) {
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

// The 8 independent entries c = 0..7 of T[c] = sum_t (2 bit_t(c) - 1) x_t; bit 3 is clear,
// so x3 enters with -1. The other 8 are T[15 - c] = -T[c] (symmetry).
template <typename V>
inline void half_table(const V* x, V* t8) {
  for (int c = 0; c < 8; ++c) {
    V v = -x[3];
    for (int j = 0; j < 3; ++j) v += ((c >> j) & 1) ? x[j] : -x[j];
    t8[c] = v;
  }
}

// One group of one token: gsp padded activations (zeros past the real columns).
void group_tables(TableMode mode, const float* xg, int64_t gsp, uint8_t* out, float* tscale,
                  float* xsum) {
  const int64_t kgroups = gsp / kG;
  if (mode == TableMode::kFast) {
    // Max |T| over the group is max over kgroups of sum |x_t| (entry with matching signs).
    // Lanes of 8 (two kgroups) so the loop vectorizes and no add waits on the one before:
    // a single running sum was one dependent chain of gsp adds per group.
    float am[2] = {0.f, 0.f}, s8[8] = {};
    for (int64_t j = 0; j < gsp; j += 8) {  // gsp is a multiple of 8
      for (int l = 0; l < 8; ++l) s8[l] += xg[j + l];
      for (int h = 0; h < 2; ++h) {  // kgroups j / 4 + h
        const float* x = xg + j + 4 * h;
        am[h] = std::max(am[h], ((std::fabs(x[0]) + std::fabs(x[1])) + std::fabs(x[2])) + std::fabs(x[3]));
      }
    }
    const float amax = std::max(am[0], am[1]);
    const float sum = sum8(s8);
    const float sc = amax > 0.f ? amax / 127.f : 1.f;
    const float inv = 1.f / sc;
    *tscale = sc;
    *xsum = sum;
#if defined(LUTHIER_X86)
    static const bool simd = active_isa() == "avx2" || is_avx512_isa(active_isa());  // same bytes, ~5x fewer instructions
    if (simd) {
      fast_group_entries_avx2(xg, kgroups, inv, out);
      return;
    }
#endif
    for (int64_t j = 0; j < kgroups; ++j) {
      float t8[8];
      half_table(xg + j * kG, t8);
      int8_t* tb = reinterpret_cast<int8_t*>(out + j * kTableBytes);  // [16] int8
      for (int c = 0; c < 8; ++c) {
        const int v = std::clamp(int(std::nearbyint(t8[c] * inv)), -127, 127);
        tb[c] = int8_t(v);
        tb[15 - c] = int8_t(-v);
      }
    }
  } else {
    float amax = 0.f;
    for (int64_t i = 0; i < gsp; ++i) amax = std::max(amax, std::fabs(xg[i]));
    const float sc = amax > 0.f ? amax / 127.f : 1.f;
    const float inv = 1.f / sc;
    int32_t qsum = 0;
    for (int64_t j = 0; j < kgroups; ++j) {
      int32_t xq[kG];
      for (int t = 0; t < kG; ++t) {
        xq[t] = std::clamp(int(std::nearbyint(xg[j * kG + t] * inv)), -127, 127);
        qsum += xq[t];
      }
      int32_t t8[8];
      half_table(xq, t8);
      // [32] bytes: low bytes (u8) of the int16 entries, then high bytes (s8)
      uint8_t* lo = out + j * 2 * kTableBytes;
      uint8_t* hi = lo + kTableBytes;
      for (int c = 0; c < 8; ++c) {
        const int16_t pos = int16_t(t8[c]), neg = int16_t(-t8[c]);
        lo[c] = uint8_t(pos & 0xFF);
        hi[c] = uint8_t(pos >> 8);
        lo[15 - c] = uint8_t(neg & 0xFF);
        hi[15 - c] = uint8_t(neg >> 8);
      }
    }
    *tscale = sc;
    *xsum = sc * float(qsum);
  }
}

}  // namespace

void build_tables(const TableShape& ts, const float* x, int64_t ldx, const float* norm_w,
                  float eps, uint8_t* tables, float* tscale, float* xsum) {
  thread_local std::vector<float> buf;  // padded group; reused: no allocation per call
  buf.resize(size_t(ts.gsp));
  const size_t tb_group = size_t(ts.gsp / kG) * (ts.mode == TableMode::kExact ? 32 : 16);
  for (int64_t mi = 0; mi < ts.m; ++mi) {
    const float* xr = x + mi * ldx;  // row mi of x[m, k]
    float rnorm = 1.f;
    if (norm_w) {
      // 8 partial sums (lane i % 8) in a fixed order: vectorizable, and 8 short chains
      // instead of one of k dependent double adds (~1 us per row at k = 576)
      double s8[8] = {};
      int64_t i = 0;
      for (; i + 8 <= ts.k; i += 8)
        for (int l = 0; l < 8; ++l) s8[l] += double(xr[i + l]) * xr[i + l];
      for (; i < ts.k; ++i) s8[i % 8] += double(xr[i]) * xr[i];
      const double ss = sum8(s8);
      rnorm = float(1.0 / std::sqrt(ss / double(ts.k) + double(eps)));
    }
    for (int64_t g = 0; g < ts.groups; ++g) {
      const int64_t c0 = g * ts.group_size;
      const int64_t len = std::min<int64_t>(ts.group_size, ts.k - c0);
      for (int64_t i = 0; i < ts.gsp; ++i) {
        float v = 0.f;
        if (i < len) v = norm_w ? xr[c0 + i] * rnorm * norm_w[c0 + i] : xr[c0 + i];
        buf[size_t(i)] = v;
      }
      group_tables(ts.mode, buf.data(), ts.gsp,
                   tables + size_t(mi) * ts.bytes_per_token() + size_t(g) * tb_group,
                   tscale + mi * ts.groups + g, xsum + mi * ts.groups + g);
    }
  }
}

}  // namespace luthier
