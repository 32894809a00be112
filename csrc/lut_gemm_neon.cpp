// lut_gemm_neon.cpp: NEON (aarch64) kernel for the packed layout of lut_gemm.h.
// NEON is baseline on aarch64: no extra compiler flags, no run-time feature check.
//
// Per tile of 32 rows and per token, for each weight group, in blocks of kFlush pairs and
// in two passes per block (hh: the first or the second 16 bytes of every 32-byte vector,
// i.e. rows 8hh..8hh+7 of each half-tile), to keep the accumulators in registers:
//   1. Load 16 weight bytes of one plane vector of a kgroup pair and split the nibbles:
//      low = kgroup 2p's indices, high = kgroup 2p+1's.
//   2. tbl (vqtbl1q) each against its kgroup's 16-byte table.
//   3. Widening multiply-accumulate (vmlal_s8) with per-byte plane weights
//      (2^i, 2^(i+1)) into int16 lanes; lane 2w + t holds row w's planes t (and t + 2,
//      t + 4), so the planes of a row sit in adjacent lanes.
//   4. Sum int16 for as many kgroups as cannot overflow (kFlush), then vpadal: adding the
//      adjacent lanes finishes the plane combination and widens to int32, one row a lane.
//   5. At the group end: y += s * (0.5 * ts * L + (cb - z) * S) in float.
// EXACT mode zips the low (u8) and high (s8) byte lookups into whole int16 entries and
// multiply-accumulates them in int16 (vmlaq_s16): the same lanes, half the accumulators
// of a low/high split, and a flush bound for whole entries (flush_pairs).
//
// The int32 sums come out in natural row order (4 rows per vector), while scales are
// stored in the AVX2 slot order of lut_gemm.h; one zip per 16 rows and group puts the
// scales back in row order.
#include <arm_neon.h>

#include <algorithm>
#include <cstring>

#include "dispatch.h"
#include "lut_gemm.h"

namespace luthier {
namespace {

// kgroups an int16 lane can take without overflow, as whole pairs (a power of two).
// A lane holds part of one row's sum, so a row's bound covers it:
// FAST |sum| <= 127 * (2^b - 1) per kgroup; EXACT whole int16 entries <= 508 * (2^b - 1)
// (the AVX2 kernel's 255 is for its separate low bytes; here entries are not split).
template <int B, bool EXACT>
constexpr int flush_pairs() {
  constexpr int per = (EXACT ? 508 : 127) * ((1 << B) - 1);
  constexpr int kg = 32767 / per;
  static_assert(kg >= 2, "a kgroup pair must fit an int16 lane (EXACT 6-bit does not: generic kernel)");
  int p = 1;
  while (p * 4 <= kg) p *= 2;
  return p;
}

// Per-byte weights for vector q of a kgroup pair: (2^i, 2^(i+1)) for plane pairs;
// for the last odd plane (bytes 2w + h = row h*16 + w) the weight goes only to the bytes
// of one half-tile: (c, 0) feeds rows 0-15, (0, c) rows 16-31.
inline int8x16_t byte_weights(int lo_w, int hi_w) {
  return vreinterpretq_s8_s16(vdupq_n_s16(int16_t((lo_w & 0xFF) | (hi_w << 8))));
}

// int32 accumulator (4 rows) of (half-tile, 16-byte half hh of the 32-byte vectors,
// 8-byte half lohi): acc32[j] lane w' <-> row 4j + w' (j = half * 4 + hh * 2 + lohi).
inline int acc_index(int half, int hh, int lohi) { return half * 4 + hh * 2 + lohi; }

// FAST: one 16-byte lookup l of one vector into the two int16 accumulators of its rows.
inline void mla_fast(int16x8_t* acc, int j, int8x16_t l, int8x16_t cw) {
  acc[j] = vmlal_s8(acc[j], vget_low_s8(l), vget_low_s8(cw));
  acc[j + 1] = vmlal_high_s8(acc[j + 1], l, cw);
}

// EXACT: whole int16 entries from the low/high byte lookups (little endian: lo + 256 hi).
inline void mla_exact(int16x8_t* acc, int j, uint8x16_t lo, uint8x16_t hi, int16x8_t cw) {
  acc[j] = vmlaq_s16(acc[j], vreinterpretq_s16_u8(vzip1q_u8(lo, hi)), cw);
  acc[j + 1] = vmlaq_s16(acc[j + 1], vreinterpretq_s16_u8(vzip2q_u8(lo, hi)), cw);
}

// 8 scale (or zero) vectors of 4 rows each, in row order, from the 32 fp16 slots of
// lut_gemm.h (slots v*8+d: v = 0 rows 0,2,..,14; 1 rows 1,3,..,15; 2, 3 the same + 16).
inline void load_slots_f32(const uint16_t* p, float32x4_t out[8]) {
  for (int half = 0; half < 2; ++half) {
    const uint16x8_t ev = vld1q_u16(p + half * 16), od = vld1q_u16(p + half * 16 + 8);
    const float16x8_t r0 = vreinterpretq_f16_u16(vzip1q_u16(ev, od));  // rows 0-7 of half
    const float16x8_t r1 = vreinterpretq_f16_u16(vzip2q_u16(ev, od));  // rows 8-15
    out[half * 4 + 0] = vcvt_f32_f16(vget_low_f16(r0));
    out[half * 4 + 1] = vcvt_high_f32_f16(r0);
    out[half * 4 + 2] = vcvt_f32_f16(vget_low_f16(r1));
    out[half * 4 + 3] = vcvt_high_f32_f16(r1);
  }
}

// NT tokens [mi, mi + NT) of tile t: each weight vector is loaded and split once and
// looked up in every token's tables (prefill reads and decodes the weights once per NT).
template <int B, bool EXACT, int NT>
void tile_tokens(const GemmArgs& a, int64_t t, int64_t mi) {
  const PackedShape& ps = *a.ps;
  const TableShape& tsh = *a.ts;
  constexpr int kTb = EXACT ? 32 : 16;  // table bytes per kgroup
  constexpr int kPairBytes = B * 32;    // weight bytes per kgroup pair of a tile
  constexpr int kFlush = flush_pairs<B, EXACT>();
  constexpr int kPrefetch = LUTHIER_PREFETCH;
  constexpr bool kOdd = (B & 1) != 0;
  const int64_t pairs = ps.gsp / 8;
  const float cb = 0.5f * float((1 << B) - 1);
  const uint8x16_t m4 = vdupq_n_u8(0x0F);
  // per-byte weights (int8, FAST) and per-lane weights (int16, EXACT) of each vector kind
  const int8x16_t cw01 = byte_weights(1, 2), cw23 = byte_weights(4, 8), cw45 = byte_weights(16, 32);
  const int8x16_t ce = byte_weights(1 << (B - 1), 0), co = byte_weights(0, 1 << (B - 1));
  const int16x8_t ew01 = vmovl_s8(vget_low_s8(cw01)), ew23 = vmovl_s8(vget_low_s8(cw23));
  const int16x8_t ew45 = vmovl_s8(vget_low_s8(cw45));
  const int16x8_t ewe = vmovl_s8(vget_low_s8(ce)), ewo = vmovl_s8(vget_low_s8(co));

  const uint8_t* tab[NT];  // tables walk: [token][bytes_per_token]
  for (int u = 0; u < NT; ++u) tab[u] = a.tables + size_t(mi + u) * tsh.bytes_per_token();
  float32x4_t y[NT][8];  // y[u][j]: rows 4j .. 4j + 3 of the tile
  for (int u = 0; u < NT; ++u)
    for (int j = 0; j < 8; ++j) y[u][j] = vdupq_n_f32(0.f);

  for (int64_t g = 0; g < ps.groups; ++g) {
    // weights walk: [tile t][group g][pair p][B * 32 bytes]
    const uint8_t* wg = a.w + (size_t(t) * ps.groups + g) * pairs * kPairBytes;
    const size_t tg = size_t(g) * (ps.gsp / kG) * kTb;  // group's offset in a token's tables
    int32x4_t acc32[NT][8];
    for (int u = 0; u < NT; ++u)
      for (int j = 0; j < 8; ++j) acc32[u][j] = vdupq_n_s32(0);
    for (int64_t p0 = 0; p0 < pairs; p0 += kFlush) {
      const int64_t p1 = p0 + kFlush < pairs ? p0 + kFlush : pairs;
      // hh = which 16-byte half of every 32-byte vector (rows 8hh..8hh+7 of each half-tile):
      // one pass per hh keeps only 4 int16 accumulators per token live, so NT tokens fit
      // the 32 vector registers; the second pass re-reads the block from L1.
#pragma GCC unroll 2
      for (int hh = 0; hh < 2; ++hh) {
        // acc[u][half * 2 + lohi]: lane 2w' + t <-> row 4 acc_index(half, hh, lohi) + w'
        int16x8_t acc[NT][4];
        for (int u = 0; u < NT; ++u)
          for (int j = 0; j < 4; ++j) acc[u][j] = vdupq_n_s16(0);
        for (int64_t p = p0; p < p1; ++p) {
          const uint8_t* wp = wg + p * kPairBytes;  // [B][32] bytes of pair p
          // the weight stream is the only thing that should touch memory: fetch ahead
          if (hh == 0) {
            __builtin_prefetch(wp + kPrefetch);
            if (kPairBytes > 64) __builtin_prefetch(wp + kPrefetch + 64);
            if (kPairBytes > 128) __builtin_prefetch(wp + kPrefetch + 128);
          }
          // the pair's tables, per token: kgroups 2p, 2p+1 ([16] int8, or [16] lo + [16] hi)
          int8x16_t T0[NT], T1[NT];
          uint8x16_t L0[NT], H0[NT], L1[NT], H1[NT];
          for (int u = 0; u < NT; ++u) {
            const uint8_t* tj = tab[u] + tg + size_t(2 * p) * kTb;
            if (EXACT) {
              L0[u] = vld1q_u8(tj);
              H0[u] = vld1q_u8(tj + 16);
              L1[u] = vld1q_u8(tj + kTb);
              H1[u] = vld1q_u8(tj + kTb + 16);
            } else {
              T0[u] = vld1q_s8(reinterpret_cast<const int8_t*>(tj));
              T1[u] = vld1q_s8(reinterpret_cast<const int8_t*>(tj + kTb));
            }
          }
          // fully unrolled: accumulator indices must be constants to stay in registers
#pragma GCC unroll 6
          for (int q = 0; q < B; ++q) {
            const bool odd_plane = kOdd && q == B - 1;
            const int8x16_t cw = q < 2 ? cw01 : q < 4 ? cw23 : cw45;
            const int16x8_t ew = q < 2 ? ew01 : q < 4 ? ew23 : ew45;
            // step 1: 16 bytes of vector q = rows 8hh..8hh+7 of a half-tile (both: odd plane)
            const uint8x16_t wv = vld1q_u8(wp + 32 * q + 16 * hh);
            const uint8x16_t lo = vandq_u8(wv, m4);
            const uint8x16_t hi = vshrq_n_u8(wv, 4);
            const int jq = (q % 2) * 2;  // plane pairs: even q rows 0-15, odd q rows 16-31
#pragma GCC unroll 4
            for (int u = 0; u < NT; ++u) {
              // steps 2-3 for token u
              if (EXACT) {
                const uint8x16_t l0 = vqtbl1q_u8(L0[u], lo), h0 = vqtbl1q_u8(H0[u], lo);
                const uint8x16_t l1 = vqtbl1q_u8(L1[u], hi), h1 = vqtbl1q_u8(H1[u], hi);
                if (odd_plane) {
                  mla_exact(acc[u], 0, l0, h0, ewe);
                  mla_exact(acc[u], 0, l1, h1, ewe);
                  mla_exact(acc[u], 2, l0, h0, ewo);
                  mla_exact(acc[u], 2, l1, h1, ewo);
                } else {
                  mla_exact(acc[u], jq, l0, h0, ew);
                  mla_exact(acc[u], jq, l1, h1, ew);
                }
              } else {
                const int8x16_t l0 = vqtbl1q_s8(T0[u], lo);
                const int8x16_t l1 = vqtbl1q_s8(T1[u], hi);
                if (odd_plane) {
                  mla_fast(acc[u], 0, l0, ce);
                  mla_fast(acc[u], 0, l1, ce);
                  mla_fast(acc[u], 2, l0, co);
                  mla_fast(acc[u], 2, l1, co);
                } else {
                  mla_fast(acc[u], jq, l0, cw);
                  mla_fast(acc[u], jq, l1, cw);
                }
              }
            }
          }
        }
        // step 4: adjacent int16 lanes (the planes of one row) -> one int32 lane per row
        for (int u = 0; u < NT; ++u)
          for (int half = 0; half < 2; ++half)
            for (int lohi = 0; lohi < 2; ++lohi) {
              int32x4_t& d = acc32[u][acc_index(half, hh, lohi)];
              d = vpadalq_s16(d, acc[u][half * 2 + lohi]);
            }
      }
    }
    // step 5: scale once per group; scales/zeros walk: [tile t][group g][slot]
    const size_t so = (size_t(t) * ps.groups + g) * kNR;
    float32x4_t s[8], coef[8];
    load_slots_f32(a.s + so, s);
    if (a.z) {
      load_slots_f32(a.z + so, coef);
      for (int j = 0; j < 8; ++j) coef[j] = vsubq_f32(vdupq_n_f32(cb), coef[j]);
    } else {
      for (int j = 0; j < 8; ++j) coef[j] = vdupq_n_f32(cb - a.zero_const);
    }
    for (int u = 0; u < NT; ++u) {
      const float32x4_t vts = vdupq_n_f32(0.5f * a.tscale[(mi + u) * ps.groups + g]);
      const float32x4_t vsx = vdupq_n_f32(a.xsum[(mi + u) * ps.groups + g]);
      for (int j = 0; j < 8; ++j) {
        const float32x4_t inner = vfmaq_f32(vmulq_f32(coef[j], vsx), vcvtq_f32_s32(acc32[u][j]), vts);
        y[u][j] = vfmaq_f32(y[u][j], s[j], inner);
      }
    }
  }
  // rows t*32 .. t*32+31, natural order; the last tile may stop short of 32 rows
  const int64_t r0 = t * kNR;
  const int64_t rows = std::min<int64_t>(kNR, ps.n - r0);
  for (int u = 0; u < NT; ++u) {
    float* yr = a.y + (mi + u) * a.ldy + r0;  // y walk: [token mi+u][row r0 ..]
    if (rows == kNR) {
      for (int j = 0; j < 8; ++j) vst1q_f32(yr + 4 * j, y[u][j]);
    } else {
      float out[kNR];
      for (int j = 0; j < 8; ++j) vst1q_f32(out + 4 * j, y[u][j]);
      std::memcpy(yr, out, size_t(rows) * sizeof(float));
    }
  }
}

template <int B, bool EXACT>
void run(const GemmArgs& a, int64_t t0, int64_t t1, int64_t m0, int64_t m1) {
  // Blocks of tokens whose tables fit in L2 (a token's tables are k * 4 or k * 8 bytes);
  // within a block, tile-major so a tile's weights stay in L1 while every token uses them;
  // tokens go NT at a time so each weight vector is split once per NT lookups. NT is what
  // fits the 32 vector registers: 4 int16 accumulators and 2 (FAST) or 4 (EXACT) tables
  // per token, plus the weight vector, its nibbles, the plane weights and the lookups
  // (chosen from GCC 12's -O3 output: at most a few spills per inner loop, none for NT=1).
  constexpr int NT = EXACT ? 2 : (B <= 2 ? 4 : 3);
  constexpr size_t kL2Tables = 192 * 1024;
  const size_t bpt = a.ts->bytes_per_token();
  const int64_t mb = std::max<int64_t>(NT, int64_t(kL2Tables / bpt) / NT * NT);
  for (int64_t b0 = m0; b0 < m1; b0 += mb) {
    const int64_t b1 = std::min(m1, b0 + mb);
    for (int64_t t = t0; t < t1; ++t) {
      int64_t mi = b0;
      for (; mi + NT <= b1; mi += NT) tile_tokens<B, EXACT, NT>(a, t, mi);
      for (; mi < b1; ++mi) tile_tokens<B, EXACT, 1>(a, t, mi);
    }
  }
}

}  // namespace

void lut_gemm_neon(const GemmArgs& a, int64_t t0, int64_t t1, int64_t m0, int64_t m1) {
  const bool exact = a.ts->mode == TableMode::kExact;
  // EXACT 6-bit: lane 2w + 1 sums planes 1, 3, 5 (weights 42) of whole int16 entries (up to
  // 508), and a kgroup pair would overflow it; the portable kernel takes that case
  if (a.ps->bits == 6 && exact) return lut_gemm_generic(a, t0, t1, m0, m1);
  switch (a.ps->bits * 2 + (exact ? 1 : 0)) {
    case 2: return run<1, false>(a, t0, t1, m0, m1);
    case 3: return run<1, true>(a, t0, t1, m0, m1);
    case 4: return run<2, false>(a, t0, t1, m0, m1);
    case 5: return run<2, true>(a, t0, t1, m0, m1);
    case 6: return run<3, false>(a, t0, t1, m0, m1);
    case 7: return run<3, true>(a, t0, t1, m0, m1);
    case 8: return run<4, false>(a, t0, t1, m0, m1);
    case 9: return run<4, true>(a, t0, t1, m0, m1);
    case 10: return run<5, false>(a, t0, t1, m0, m1);
    case 11: return run<5, true>(a, t0, t1, m0, m1);
    default: return run<6, false>(a, t0, t1, m0, m1);
  }
}

}  // namespace luthier
