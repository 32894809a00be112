// lut_gemm_avx512.cpp: AVX-512 kernel for the packed layout of lut_gemm.h (built with
// -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c; only called when dispatch.cpp
// finds AVX-512 F/BW/VL/DQ).
//
// The same layout and the same integer sums as the AVX2 kernel, two plane vectors per
// instruction: the plane pair (2j, 2j+1) of a kgroup pair is 64 contiguous bytes, the
// vector for rows 0-15 (A) then the one for rows 16-31 (B), so one zmm load holds both and
// every zmm accumulator is (A | B) with word w of each 256-bit half = row w of that half.
// The 16-byte tables are broadcast to all four 128-bit lanes (vpshufb looks up per lane),
// so the lookups, vpmaddubsw and the int16 sums are those of lut_gemm_avx2.cpp, done once
// for both halves. A last odd plane (bits 1, 3, 5) is one 32-byte vector feeding A with its
// even bytes and B with its odd ones: it is broadcast to both halves and weighted
// (2^i, 0) in the low half and (0, 2^i) in the high half.
// The float epilogue applies the same operations in the same order as the AVX2 kernel, so
// both give bit-identical outputs (tests/test_kernels.py checks it).
#include <immintrin.h>

#include <algorithm>

#include "lut_gemm.h"
#include "lut_gemm_zmm.h"

#ifndef LUTHIER_PREFETCH_L2
#define LUTHIER_PREFETCH_L2 16384
#endif

namespace luthier {
namespace {

inline __m512i bcast_table(const uint8_t* p) {  // 16 bytes to all four lanes (one load)
  return _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Plane-weighted lookups of one 64-byte vector into an int16 accumulator; FAST lookups are
// signed (second operand), EXACT low bytes unsigned (first operand), as in the AVX2 kernel.
template <bool LOOKUP_UNSIGNED>
inline __m512i madd(__m512i acc, __m512i cw, __m512i l0, __m512i l1) {
  if (LOOKUP_UNSIGNED) {
    acc = _mm512_add_epi16(acc, _mm512_maddubs_epi16(l0, cw));
    return _mm512_add_epi16(acc, _mm512_maddubs_epi16(l1, cw));
  }
  acc = _mm512_add_epi16(acc, _mm512_maddubs_epi16(cw, l0));
  return _mm512_add_epi16(acc, _mm512_maddubs_epi16(cw, l1));
}

// int16 (A | B) -> int32 even words (rows 2d of each half) and odd words (rows 2d + 1),
// shifted left by sh (8 for EXACT high bytes), added to dst[0] and dst[1]
inline void widen(__m512i v, int sh, __m512i* dst) {
  const __m512i e = _mm512_srai_epi32(_mm512_slli_epi32(v, 16), 16);
  const __m512i o = _mm512_srai_epi32(v, 16);
  dst[0] = _mm512_add_epi32(dst[0], _mm512_sll_epi32(e, _mm_cvtsi32_si128(sh)));
  dst[1] = _mm512_add_epi32(dst[1], _mm512_sll_epi32(o, _mm_cvtsi32_si128(sh)));
}

// 16 fp16 scales of slots [o, o + 8) and [o + 16, o + 24): the lanes of an (A | B) int32
// vector of even (o = 0) or odd (o = 8) rows
inline __m512 load_slots(const uint16_t* p, int o) {
  const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + o));
  const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + o + 16));
  return _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1));
}

// NT tokens [mi, mi + NT) of tile t; each weight vector is loaded and split once for all.
// wend: the end of this call's tile range in the weights; the L2 prefetch stops there (past
// it are other threads' tiles, or nothing: fetching them wasted ~10% of a small matrix's reads)
template <int B, bool EXACT, int NT>
void tile_tokens(const GemmArgs& a, int64_t t, int64_t mi, const uint8_t* wend) {
  const PackedShape& ps = *a.ps;
  const TableShape& tsh = *a.ts;
  constexpr int kTb = EXACT ? 32 : 16;  // table bytes per kgroup
  constexpr int kPairBytes = B * 32;    // weight bytes per kgroup pair of a tile
  constexpr int kFlush = int16_flush_pairs<B, EXACT>();
  constexpr int kPrefetch = LUTHIER_PREFETCH;
  constexpr int kPrefetchL2 = LUTHIER_PREFETCH_L2;
  const int64_t pairs = ps.gsp / 8;
  const float cb = 0.5f * float((1 << B) - 1);
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  // plane pair (2j, 2j+1): bytes (2^2j, 2^(2j+1)) in both halves
  __m512i cw[3];
  for (int j = 0; j < 3; ++j) cw[j] = _mm512_set1_epi16(int16_t((1 << 2 * j) | (2 << 2 * j) << 8));
  // last odd plane: (2^i, 0) in the low half (rows 0-15), (0, 2^i) in the high half
  const __m512i codd = _mm512_inserti64x4(
      _mm512_set1_epi16(int16_t(1 << (B - 1))),
      _mm256_set1_epi16(int16_t((1 << (B - 1)) << 8)), 1);

  const uint8_t* tab[NT];  // tables walk: [token][bytes_per_token]
  for (int u = 0; u < NT; ++u) tab[u] = a.tables + size_t(mi + u) * tsh.bytes_per_token();
  __m512 y[NT][2];  // per token: (A | B) even rows, odd rows
  for (int u = 0; u < NT; ++u) y[u][0] = y[u][1] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ps.groups; ++g) {
    // weights walk: [tile t][group g][pair p][B * 32 bytes]
    const uint8_t* wg = a.w + (size_t(t) * ps.groups + g) * pairs * kPairBytes;
    const size_t tg = size_t(g) * (ps.gsp / kG) * kTb;  // group's offset in a token's tables
    __m512i acc32[NT][2];
    for (int u = 0; u < NT; ++u) acc32[u][0] = acc32[u][1] = _mm512_setzero_si512();
    for (int64_t p0 = 0; p0 < pairs; p0 += kFlush) {
      const int64_t p1 = p0 + kFlush < pairs ? p0 + kFlush : pairs;
      __m512i acc[NT], acch[NT];  // int16 (A | B): low bytes / FAST, EXACT high bytes
      for (int u = 0; u < NT; ++u) acc[u] = acch[u] = _mm512_setzero_si512();
      for (int64_t p = p0; p < p1; ++p) {
        const uint8_t* wp = wg + p * kPairBytes;
        // the weight stream is the only thing that should touch memory: fetch ahead
        _mm_prefetch(reinterpret_cast<const char*>(wp + kPrefetch), _MM_HINT_T0);
        if (kPairBytes > 64) _mm_prefetch(reinterpret_cast<const char*>(wp + kPrefetch + 64), _MM_HINT_T0);
        if (kPairBytes > 128) _mm_prefetch(reinterpret_cast<const char*>(wp + kPrefetch + 128), _MM_HINT_T0);
        // and into L2 much further ahead: on the Xeon the L1 distance alone left the
        // 2-thread stream ~12% below what it reaches with this (4096 x 14336, cold)
        if (wp + kPrefetchL2 < wend)
          for (int q = 0; q < kPairBytes; q += 64)
            _mm_prefetch(reinterpret_cast<const char*>(wp + kPrefetchL2 + q), _MM_HINT_T1);
        // vector j: plane pair j (64 bytes, A | B) for j < B / 2, then the odd plane
        for (int j = 0; j < (B + 1) / 2; ++j) {
          const bool odd = 2 * j + 1 == B;
          const __m512i wv = odd
              ? _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + 64 * j)))
              : _mm512_loadu_si512(reinterpret_cast<const void*>(wp + 64 * j));
          const __m512i w = odd ? codd : cw[j];
          const __m512i lo = _mm512_and_si512(wv, m4);
          const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), m4);
          for (int u = 0; u < NT; ++u) {
            const uint8_t* tj = tab[u] + tg + size_t(2 * p) * kTb;  // kgroups 2p and 2p+1
            const __m512i l0 = _mm512_shuffle_epi8(bcast_table(tj), lo);
            const __m512i l1 = _mm512_shuffle_epi8(bcast_table(tj + kTb), hi);
            if (EXACT) {
              acc[u] = madd<true>(acc[u], w, l0, l1);
              const __m512i h0 = _mm512_shuffle_epi8(bcast_table(tj + 16), lo);
              const __m512i h1 = _mm512_shuffle_epi8(bcast_table(tj + kTb + 16), hi);
              acch[u] = madd<false>(acch[u], w, h0, h1);
            } else {
              acc[u] = madd<false>(acc[u], w, l0, l1);
            }
          }
        }
      }
      for (int u = 0; u < NT; ++u) {
        widen(acc[u], 0, acc32[u]);
        if (EXACT) widen(acch[u], 8, acc32[u]);
      }
    }
    // scale once per group; scales/zeros walk: [tile t][group g][slot v*8+d]
    const size_t so = (size_t(t) * ps.groups + g) * kNR;
    for (int e = 0; e < 2; ++e) {  // e = 0: even rows (slots 0-7, 16-23), 1: odd (8-15, 24-31)
      const __m512 s = load_slots(a.s + so, 8 * e);
      const __m512 coef = a.z ? _mm512_sub_ps(_mm512_set1_ps(cb), load_slots(a.z + so, 8 * e))
                              : _mm512_set1_ps(cb - a.zero_const);
      scale_rows<NT>(a, mi, g, e, s, coef, acc32, y);
    }
  }
  // rows in order: row 2d of a half is lane d of the even vector, 2d + 1 of the odd one
  // (index < 16: from the even vector, >= 16: lane - 16 of the odd one)
  const __m512i rows_a = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i rows_b = _mm512_add_epi32(rows_a, _mm512_set1_epi32(8));
  store_rows<NT>(a, t, mi, y, rows_a, rows_b);
}

template <int B, bool EXACT>
void run(const GemmArgs& a, int64_t t0, int64_t t1, int64_t m0, int64_t m1) {
  // Blocks of tokens whose tables fit in L2; tile-major within a block so a tile's weights
  // stay in L1 while every token of the block uses them (as the AVX2 kernel).
  // NT tokens share each split weight vector: 32 zmm registers hold 4 tokens' accumulators
  // and tables (8 would spill the 8-entry EXACT and 5-6-bit working sets).
  constexpr int NT = 4;
  constexpr size_t kL2Tables = 192 * 1024;
  const size_t bpt = a.ts->bytes_per_token();
  const int64_t mb = std::max<int64_t>(NT, int64_t(kL2Tables / bpt) / NT * NT);
  // weights [tile][group][pair][B * 32]: the end of tiles [t0, t1)
  const uint8_t* wend = a.w + size_t(t1) * a.ps->groups * (a.ps->gsp / 8) * (B * 32);
  for (int64_t b0 = m0; b0 < m1; b0 += mb) {
    const int64_t b1 = std::min(m1, b0 + mb);
    for (int64_t t = t0; t < t1; ++t) {
      int64_t mi = b0;
      for (; mi + NT <= b1; mi += NT) tile_tokens<B, EXACT, NT>(a, t, mi, wend);
      for (; mi < b1; ++mi) tile_tokens<B, EXACT, 1>(a, t, mi, wend);
    }
  }
}

}  // namespace

void lut_gemm_avx512(const GemmArgs& a, int64_t t0, int64_t t1, int64_t m0, int64_t m1) {
  with_bits(a.ps->bits, a.ts->mode == TableMode::kExact, [&](auto b, auto e) {
    run<decltype(b)::value, decltype(e)::value>(a, t0, t1, m0, m1);
  });
}

}  // namespace luthier
