// lut_gemm_avx2.cpp: AVX2 kernel for the packed layout of lut_gemm.h (built with
// -mavx2 -mfma -mf16c; only called when dispatch.cpp finds those features).
//
// Per tile of 32 rows and per token, for each weight group:
//   1. Load 32 weight bytes (one plane vector of a kgroup pair) and split the nibbles:
//      low = kgroup 2p's indices, high = kgroup 2p+1's.
//   2. vpshufb each against its kgroup's 16-byte table (broadcast to both lanes).
//   3. vpmaddubsw with per-byte plane weights (2^i, 2^(i+1)) combines two bit planes of a
//      row and widens to int16 in one instruction (word w = row w of the half-tile).
//      Bits 1-6: the pairs (0,1), (2,3), (4,5); 6 planes still fit 2 kgroups in int16.
//   4. Sum int16 for as many kgroups as cannot overflow (kFlush), then widen to int32.
//   5. At the group end: y += s * (0.5 * ts * L + (cb - z) * S) in float.
// EXACT mode does 2-4 twice: low bytes (u8 operand) and high bytes (added << 8).
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "lut_gemm.h"

namespace luthier {
namespace {

inline __m256i bcast_table(const uint8_t* p) {
  return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Adds the plane-weighted lookups of one 32-byte vector into an int16 accumulator.
// cw: per-byte weights; for FAST the lookups are the signed operand, for the EXACT low
// bytes the lookups are unsigned and the weights signed (vpmaddubsw is u8 x s8).
template <bool LOOKUP_UNSIGNED>
inline __m256i madd(__m256i acc, __m256i cw, __m256i l0, __m256i l1) {
  if (LOOKUP_UNSIGNED) {
    acc = _mm256_add_epi16(acc, _mm256_maddubs_epi16(l0, cw));
    return _mm256_add_epi16(acc, _mm256_maddubs_epi16(l1, cw));
  }
  acc = _mm256_add_epi16(acc, _mm256_maddubs_epi16(cw, l0));
  return _mm256_add_epi16(acc, _mm256_maddubs_epi16(cw, l1));
}

inline __m256i pair_weights(int i) {  // bytes (2^i, 2^(i+1)) repeated
  return _mm256_set1_epi16(int16_t((1 << i) | (2 << i) << 8));
}

// NT tokens [mi, mi + NT) of tile t: each weight vector is loaded and split once and
// looked up in every token's tables (prefill reads and decodes the weights once per NT).
template <int B, bool EXACT, int NT>
void tile_tokens(const GemmArgs& a, int64_t t, int64_t mi) {
  const PackedShape& ps = *a.ps;
  const TableShape& tsh = *a.ts;
  constexpr int kTb = EXACT ? 32 : 16;      // table bytes per kgroup
  constexpr int kPairBytes = B * 32;        // weight bytes per kgroup pair of a tile
  constexpr int kFlush = int16_flush_pairs<B, EXACT>();
  constexpr int kPrefetch = LUTHIER_PREFETCH;
  const int64_t pairs = ps.gsp / 8;
  const float cb = 0.5f * float((1 << B) - 1);
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i cw01 = pair_weights(0), cw23 = pair_weights(2), cw45 = pair_weights(4);
  // last odd plane: (2^i, 0) -> rows 0-15, (0, 2^i) -> rows 16-31
  const __m256i ce = _mm256_set1_epi16(int16_t(1 << (B - 1)));
  const __m256i co = _mm256_set1_epi16(int16_t((1 << (B - 1)) << 8));

  const uint8_t* tab[NT];  // tables walk: [token][bytes_per_token]
  for (int u = 0; u < NT; ++u) tab[u] = a.tables + size_t(mi + u) * tsh.bytes_per_token();
  __m256 y[NT][4];
  for (int u = 0; u < NT; ++u)
    for (int v = 0; v < 4; ++v) y[u][v] = _mm256_setzero_ps();
  for (int64_t g = 0; g < ps.groups; ++g) {
    // weights walk: [tile t][group g][pair p][B * 32 bytes]
    const uint8_t* wg = a.w + (size_t(t) * ps.groups + g) * pairs * kPairBytes;
    const size_t tg = size_t(g) * (ps.gsp / kG) * kTb;  // group's offset in a token's tables
    __m256i acc32[NT][4];
    for (int u = 0; u < NT; ++u)
      for (int v = 0; v < 4; ++v) acc32[u][v] = _mm256_setzero_si256();
    for (int64_t p0 = 0; p0 < pairs; p0 += kFlush) {
      const int64_t p1 = p0 + kFlush < pairs ? p0 + kFlush : pairs;
      __m256i A[NT], Bv[NT], Ah[NT], Bh[NT];
      for (int u = 0; u < NT; ++u)
        A[u] = Bv[u] = Ah[u] = Bh[u] = _mm256_setzero_si256();
      for (int64_t p = p0; p < p1; ++p) {
        const uint8_t* wp = wg + p * kPairBytes;
        // the weight stream is the only thing that should touch memory: fetch ahead
        _mm_prefetch(reinterpret_cast<const char*>(wp + kPrefetch), _MM_HINT_T0);
        if (kPairBytes > 64) _mm_prefetch(reinterpret_cast<const char*>(wp + kPrefetch + 64), _MM_HINT_T0);
        if (kPairBytes > 128) _mm_prefetch(reinterpret_cast<const char*>(wp + kPrefetch + 128), _MM_HINT_T0);
        // vector q of the pair: which weights and which half-tile accumulator it feeds
        auto vec_weights = [&](int q, bool second) {
          if ((B & 1) && q == B - 1) return second ? co : ce;  // last odd plane
          return q < 2 ? cw01 : q < 4 ? cw23 : cw45;
        };
        // step 1: load and split each plane vector once; steps 2-3 for every token
        for (int q = 0; q < B; ++q) {
          const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + 32 * q));
          const __m256i lo = _mm256_and_si256(wv, m4);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), m4);
          const bool odd_plane = (B & 1) && q == B - 1;
          for (int u = 0; u < NT; ++u) {
            const uint8_t* tj = tab[u] + tg + size_t(2 * p) * kTb;  // kgroups 2p and 2p+1
            const __m256i l0 = _mm256_shuffle_epi8(bcast_table(tj), lo);
            const __m256i l1 = _mm256_shuffle_epi8(bcast_table(tj + kTb), hi);
            __m256i h0, h1;
            if (EXACT) {
              h0 = _mm256_shuffle_epi8(bcast_table(tj + 16), lo);
              h1 = _mm256_shuffle_epi8(bcast_table(tj + kTb + 16), hi);
            }
            // pairs: even q -> rows 0-15 (A), odd q -> rows 16-31 (B); the odd plane feeds both
            if (odd_plane || q % 2 == 0) {
              const __m256i cw = vec_weights(q, false);
              if (EXACT) {
                A[u] = madd<true>(A[u], cw, l0, l1);
                Ah[u] = madd<false>(Ah[u], cw, h0, h1);
              } else {
                A[u] = madd<false>(A[u], cw, l0, l1);
              }
            }
            if (odd_plane || q % 2 == 1) {
              const __m256i cw = vec_weights(q, true);
              if (EXACT) {
                Bv[u] = madd<true>(Bv[u], cw, l0, l1);
                Bh[u] = madd<false>(Bh[u], cw, h0, h1);
              } else {
                Bv[u] = madd<false>(Bv[u], cw, l0, l1);
              }
            }
          }
        }
      }
      // step 4: int16 -> int32, even and odd words (rows 2d and 2d+1 of each half)
      auto widen = [&](__m256i v, int sh, __m256i* dst) {
        __m256i e = _mm256_srai_epi32(_mm256_slli_epi32(v, 16), 16);
        __m256i o = _mm256_srai_epi32(v, 16);
        dst[0] = _mm256_add_epi32(dst[0], _mm256_slli_epi32(e, sh));
        dst[1] = _mm256_add_epi32(dst[1], _mm256_slli_epi32(o, sh));
      };
      for (int u = 0; u < NT; ++u) {
        widen(A[u], 0, acc32[u]);
        widen(Bv[u], 0, acc32[u] + 2);
        if (EXACT) {
          widen(Ah[u], 8, acc32[u]);
          widen(Bh[u], 8, acc32[u] + 2);
        }
      }
    }
    // step 5: scale once per group; scales/zeros walk: [tile t][group g][slot v*8+d]
    const size_t so = (size_t(t) * ps.groups + g) * kNR;
    for (int v = 0; v < 4; ++v) {
      const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a.s + so + v * 8)));
      __m256 coef = _mm256_set1_ps(cb - a.zero_const);
      if (a.z) {
        const __m256 z = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a.z + so + v * 8)));
        coef = _mm256_sub_ps(_mm256_set1_ps(cb), z);
      }
      for (int u = 0; u < NT; ++u) {
        const __m256 vts = _mm256_set1_ps(0.5f * a.tscale[(mi + u) * ps.groups + g]);
        const __m256 vsx = _mm256_set1_ps(a.xsum[(mi + u) * ps.groups + g]);
        const __m256 inner = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc32[u][v]), vts, _mm256_mul_ps(coef, vsx));
        y[u][v] = _mm256_fmadd_ps(s, inner, y[u][v]);
      }
    }
  }
  for (int u = 0; u < NT; ++u) {
    alignas(32) float out[kNR];
    for (int v = 0; v < 4; ++v) _mm256_store_ps(out + v * 8, y[u][v]);
    float* yr = a.y + (mi + u) * a.ldy;
    for (int slot = 0; slot < kNR; ++slot) {
      const int64_t row = t * kNR + row_of_slot(slot);
      if (row < ps.n) yr[row] = out[slot];
    }
  }
}

template <int B, bool EXACT>
void run(const GemmArgs& a, int64_t t0, int64_t t1, int64_t m0, int64_t m1) {
  // Blocks of tokens whose tables fit in L2 (a token's tables are k * 4 or k * 8 bytes);
  // within a block, tile-major so a tile's weights stay in L1 while every token uses them;
  // tokens go NT at a time so each weight vector is split once per NT lookups.
  // 5-6 bits: two more plane-weight constants, and 4 tokens' accumulators no longer fit
  // the 16 ymm registers (spills made m = 128 ~20% slower at 6 bits than 2 tokens at a time)
  constexpr int NT = EXACT || B > 4 ? 2 : 4;
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

void lut_gemm_avx2(const GemmArgs& a, int64_t t0, int64_t t1, int64_t m0, int64_t m1) {
  with_bits(a.ps->bits, a.ts->mode == TableMode::kExact, [&](auto b, auto e) {
    run<decltype(b)::value, decltype(e)::value>(a, t0, t1, m0, m1);
  });
}

}  // namespace luthier
