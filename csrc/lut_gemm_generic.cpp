// lut_gemm_generic.cpp: portable scalar kernel on the packed layout of lut_gemm.h.
// The fallback on every CPU and the oracle the SIMD kernels are tested against.
#include <cstring>

#include "lut_gemm.h"

namespace luthier {

void lut_gemm_generic(const GemmArgs& a, int64_t tile_begin, int64_t tile_end,
                      int64_t m_begin, int64_t m_end) {
  const PackedShape& ps = *a.ps;
  const TableShape& tsh = *a.ts;
  const int bits = ps.bits;
  const int64_t pairs = ps.gsp / 8;
  const size_t pair_bytes = size_t(bits) * 32;
  const bool exact = tsh.mode == TableMode::kExact;
  const size_t tb_kgroup = exact ? 32 : 16;
  const float cb = 0.5f * float((1 << bits) - 1);

  // Where each (row, plane) lives inside a kgroup pair: the inverse of pack.cpp's walk.
  int off[kNR][kMaxBits];
  for (int r = 0; r < kNR; ++r)
    for (int p = 0; p < bits; ++p) {
      const int base = p & ~1;
      off[r][p] = (p == bits - 1 && (bits & 1))
                      ? base / 2 * 64 + 2 * (r % 16) + r / 16
                      : base / 2 * 64 + (r / 16) * 32 + 2 * (r % 16) + (p - base);
    }
  int slot_of_row[kNR];
  for (int s = 0; s < kNR; ++s) slot_of_row[row_of_slot(s)] = s;

  for (int64_t t = tile_begin; t < tile_end; ++t) {
    for (int64_t mi = m_begin; mi < m_end; ++mi) {
      const uint8_t* tab = a.tables + size_t(mi) * tsh.bytes_per_token();
      float acc[kNR] = {0};
      for (int64_t g = 0; g < ps.groups; ++g) {
        // weights walk: [tile t][group g][pair p][bits * 32]
        const uint8_t* wg = a.w + (size_t(t) * ps.groups + g) * pairs * pair_bytes;
        const uint8_t* tg = tab + size_t(g) * (ps.gsp / kG) * tb_kgroup;
        const float tsc = a.tscale[mi * ps.groups + g];
        const float sx = a.xsum[mi * ps.groups + g];
        for (int r = 0; r < kNR; ++r) {
          int32_t L = 0;
          for (int64_t p = 0; p < pairs; ++p) {
            for (int half = 0; half < 2; ++half) {
              const uint8_t* tj = tg + size_t(2 * p + half) * tb_kgroup;
              for (int pl = 0; pl < bits; ++pl) {
                const int idx = (wg[p * pair_bytes + off[r][pl]] >> (4 * half)) & 15;
                const int32_t v = exact ? int32_t(tj[idx]) + 256 * int32_t(int8_t(tj[16 + idx]))
                                        : int32_t(int8_t(tj[idx]));
                L += v << pl;
              }
            }
          }
          const size_t o = (size_t(t) * ps.groups + g) * kNR + slot_of_row[r];
          const float s = half_to_float(a.s[o]);
          const float z = a.z ? half_to_float(a.z[o]) : a.zero_const;
          acc[r] += s * (0.5f * tsc * float(L) + (cb - z) * sx);
        }
      }
      for (int r = 0; r < kNR; ++r) {
        const int64_t row = t * kNR + r;
        if (row < ps.n) a.y[mi * a.ldy + row] = acc[r];
      }
    }
  }
}

// IEEE binary16 -> binary32, portable (no F16C needed).
float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      int e = -1;
      do { ++e; man <<= 1; } while (!(man & 0x400));
      bits = sign | uint32_t(127 - 15 - e) << 23 | (man & 0x3FF) << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | man << 13;
  } else {
    bits = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// IEEE binary32 -> binary16, round to nearest even (as F16C's vcvtps2ph with mode 0);
// overflow gives infinity, tiny values subnormals or zero.
uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000);
  const uint32_t exp = (x >> 23) & 0xFF, man = x & 0x7FFFFF;
  if (exp == 0xFF) return uint16_t(sign | 0x7C00 | (man ? 0x200 : 0));  // inf, nan
  const int e = int(exp) - 127 + 15;
  if (e >= 31) return uint16_t(sign | 0x7C00);
  if (e <= 0) {  // subnormal half (or zero): shift the implicit 1 in, then round
    if (e < -10) return sign;
    const uint32_t m = man | 0x800000;
    const int shift = 14 - e;
    uint32_t h = m >> shift;
    const uint32_t rest = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rest > half || (rest == half && (h & 1))) ++h;
    return uint16_t(sign | h);
  }
  uint32_t h = uint32_t(e) << 10 | man >> 13;
  const uint32_t rest = man & 0x1FFF;
  if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) ++h;  // may carry into the exponent: fine
  return uint16_t(sign | h);
}

}  // namespace luthier
