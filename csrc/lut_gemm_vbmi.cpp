// lut_gemm_vbmi.cpp: the AVX-512 kernel for blocks of tokens, with VBMI byte permutes and
// VNNI dot products (built with -mavx512vbmi -mavx512vnni on top of the AVX-512 flags;
// only called when dispatch.cpp finds both).
//
// Why: at m > 1 the LUT kernels are compute-bound (a batched decode step of 16 rows, a
// prefill). Per token and 64-byte weight vector the AVX-512 kernel spends 2 vpshufb, 2
// vpmaddubsw and 2 vpaddw, then widens the int16 sums to int32 every few pairs. Here the
// four lookups one row needs from a kgroup pair (planes a and b of kgroups 2p and 2p+1)
// land in one dword, so one vpdpbusd weights, adds and widens them into an int32 sum:
// 2 vpermb + 2 vpdpbusd per token and vector, and no int16 flushes.
//
// Index vectors, built once per weight vector and shared by every token of the block:
// word w of a 64-byte vector holds row r's bytes (plane a, plane b), each with kgroup 2p's
// index in its low nibble and 2p+1's in its high one. lo = nibbles of 2p, hi = nibbles of
// 2p+1 + 16 (its table follows 2p's in the token's 32 table bytes); interleaving their
// words gives dwords [a(2p), b(2p), a(2p+1), b(2p+1)] of one row:
//   X0 = unpacklo_epi16(lo, hi): lane L, dword i  <->  row 8L + i      (i < 4)
//   X1 = unpackhi_epi16(lo, hi): lane L, dword i  <->  row 8L + 4 + i
// vpermb looks each index up in the token's tables and vpdpbusd multiplies the 4 bytes by
// the plane weights (2^a, 2^b, 2^a, 2^b) and adds them to the row's int32 sum.
// EXACT tables (low u8 and high s8 bytes per kgroup, 32 bytes each) take two lookups per
// index (offset 0 and 16 within a kgroup's 32 bytes; 2p+1 at +32) and the low bytes go in
// as the unsigned operand, the high bytes as the signed one: low + 256 high, as the AVX2
// kernel's widen(acc, 0) + widen(acch, 8).
// The integer sums equal the other kernels' (exact integers), and the float epilogue is the
// AVX-512 kernel's per row in the same order, so the outputs are bit-identical
// (tests/test_kernels.py): batches decoded here equal one row decoded by lut_gemm_avx512.
#include <immintrin.h>

#include <algorithm>

#include "lut_gemm.h"
#include "lut_gemm_zmm.h"

namespace luthier {
namespace {

// int32 lane j of X0 / X1 -> row of the tile (the row of X1 is 4 more)
constexpr int row_of_x0(int j) { return (j / 4) * 8 + j % 4; }

// The scale slot (lut_gemm.h row_of_slot) of a row.
constexpr int slot_of_row(int row) {
  for (int s = 0; s < kNR; ++s)
    if (row_of_slot(s) == row) return s;
  return -1;
}

// Lane orders, computed at compile time: sx[x][j] = the scale slot of lane j of X0 / X1;
// ry[h][r] = where row 16h + r is: lane of X0 (< 16) or 16 + lane of X1.
struct LaneOrder {
  alignas(64) int32_t sx[2][16] = {};
  alignas(64) int32_t ry[2][16] = {};
  constexpr LaneOrder() {
    for (int j = 0; j < 16; ++j) {
      sx[0][j] = slot_of_row(row_of_x0(j));
      sx[1][j] = slot_of_row(row_of_x0(j) + 4);
    }
    for (int r = 0; r < kNR; ++r) {
      const int l = r / 8, i = r % 8;
      ry[r / 16][r % 16] = i < 4 ? l * 4 + i : 16 + l * 4 + (i - 4);
    }
  }
};
constexpr LaneOrder kOrder;

// Lane j = the fp16 value of slot idx[j] of the tile's 32 at p, as float: with idx =
// kOrder.sx[0] / sx[1], the scales of X0's / X1's rows. [32 fp16] -> 2 x [16 f32] -> permute
inline __m512 load_rows(const uint16_t* p, const __m512i idx) {
  const __m512 lo = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  const __m512 hi = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16)));
  return _mm512_permutex2var_ps(lo, idx, hi);
}

// NT tokens [mi, mi + NT) of tile t
template <int B, bool EXACT, int NT>
void tile_tokens(const GemmArgs& a, int64_t t, int64_t mi) {
  const PackedShape& ps = *a.ps;
  const TableShape& tsh = *a.ts;
  constexpr int kTb = EXACT ? 32 : 16;  // table bytes per kgroup
  constexpr int kPairBytes = B * 32;    // weight bytes per kgroup pair of a tile
  constexpr int kVec = (B + 1) / 2;     // 64-byte vectors per pair (the last may be odd)
  const int64_t pairs = ps.gsp / 8;
  const float cb = 0.5f * float((1 << B) - 1);
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  const __m512i k16 = _mm512_set1_epi8(0x10);
  const __m512i k32 = _mm512_set1_epi8(0x20);
  // plane weights per vector j: (2^2j, 2^(2j+1)) per row, twice (kgroups 2p and 2p+1);
  // the odd plane i = B - 1 feeds rows 0-15 with its even bytes, 16-31 with its odd ones
  __m512i cw[kVec];
  for (int j = 0; j < kVec; ++j) {
    if (2 * j + 1 == B) {
      const int v = 1 << (B - 1);
      cw[j] = _mm512_inserti64x4(_mm512_set1_epi16(int16_t(v)), _mm256_set1_epi16(int16_t(v << 8)), 1);
    } else {
      cw[j] = _mm512_set1_epi16(int16_t((1 << 2 * j) | (2 << 2 * j) << 8));
    }
  }
  const __m512i sidx[2] = {_mm512_load_si512(kOrder.sx[0]), _mm512_load_si512(kOrder.sx[1])};

  const uint8_t* tab[NT];  // tables walk: [token][bytes_per_token]
  for (int u = 0; u < NT; ++u) tab[u] = a.tables + size_t(mi + u) * tsh.bytes_per_token();
  __m512 y[NT][2];  // per token: rows in X0 / X1 order
  for (int u = 0; u < NT; ++u) y[u][0] = y[u][1] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ps.groups; ++g) {
    // weights walk: [tile t][group g][pair p][B * 32 bytes]
    const uint8_t* wg = a.w + (size_t(t) * ps.groups + g) * pairs * kPairBytes;
    const size_t tg = size_t(g) * (ps.gsp / kG) * kTb;  // group's offset in a token's tables
    __m512i acc[NT][2];
    for (int u = 0; u < NT; ++u) acc[u][0] = acc[u][1] = _mm512_setzero_si512();
    for (int64_t p = 0; p < pairs; ++p) {
      const uint8_t* wp = wg + p * kPairBytes;
      _mm_prefetch(reinterpret_cast<const char*>(wp + LUTHIER_PREFETCH), _MM_HINT_T0);
      if (kPairBytes > 64) _mm_prefetch(reinterpret_cast<const char*>(wp + LUTHIER_PREFETCH + 64), _MM_HINT_T0);
      if (kPairBytes > 128) _mm_prefetch(reinterpret_cast<const char*>(wp + LUTHIER_PREFETCH + 128), _MM_HINT_T0);
      __m512i x0[kVec], x1[kVec];
      for (int j = 0; j < kVec; ++j) {
        const bool odd = 2 * j + 1 == B;
        const __m512i wv = odd
            ? _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + 64 * j)))
            : _mm512_loadu_si512(reinterpret_cast<const void*>(wp + 64 * j));
        const __m512i lo = _mm512_and_si512(wv, m4);
        // 2p+1's table follows 2p's: +16 (FAST), +32 (EXACT: 2p's low and high come first)
        const __m512i hi = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(wv, 4), m4), EXACT ? k32 : k16);
        x0[j] = _mm512_unpacklo_epi16(lo, hi);
        x1[j] = _mm512_unpackhi_epi16(lo, hi);
      }
      for (int u = 0; u < NT; ++u) {
        const uint8_t* tp = tab[u] + tg + size_t(2 * p) * kTb;  // kgroups 2p and 2p+1
        if (EXACT) {
          const __m512i tb = _mm512_loadu_si512(reinterpret_cast<const void*>(tp));
          for (int j = 0; j < kVec; ++j) {
            // low bytes (unsigned) at +0, high bytes (signed) at +16
            const __m512i l0 = _mm512_permutexvar_epi8(x0[j], tb);
            const __m512i l1 = _mm512_permutexvar_epi8(x1[j], tb);
            const __m512i h0 = _mm512_permutexvar_epi8(_mm512_or_si512(x0[j], k16), tb);
            const __m512i h1 = _mm512_permutexvar_epi8(_mm512_or_si512(x1[j], k16), tb);
            const __m512i lo0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), l0, cw[j]);
            const __m512i lo1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), l1, cw[j]);
            const __m512i hi0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), cw[j], h0);
            const __m512i hi1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), cw[j], h1);
            acc[u][0] = _mm512_add_epi32(acc[u][0], _mm512_add_epi32(lo0, _mm512_slli_epi32(hi0, 8)));
            acc[u][1] = _mm512_add_epi32(acc[u][1], _mm512_add_epi32(lo1, _mm512_slli_epi32(hi1, 8)));
          }
        } else {
          // 32 table bytes; vpermb reads only indices < 32 of it
          const __m512i tb = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tp)));
          for (int j = 0; j < kVec; ++j) {
            acc[u][0] = _mm512_dpbusd_epi32(acc[u][0], cw[j], _mm512_permutexvar_epi8(x0[j], tb));
            acc[u][1] = _mm512_dpbusd_epi32(acc[u][1], cw[j], _mm512_permutexvar_epi8(x1[j], tb));
          }
        }
      }
    }
    // scale once per group, the AVX-512 kernel's operations per row; scales/zeros walk:
    // [tile t][group g][slot]
    const size_t so = (size_t(t) * ps.groups + g) * kNR;
    for (int e = 0; e < 2; ++e) {
      const __m512 s = load_rows(a.s + so, sidx[e]);
      const __m512 coef = a.z ? _mm512_sub_ps(_mm512_set1_ps(cb), load_rows(a.z + so, sidx[e]))
                              : _mm512_set1_ps(cb - a.zero_const);
      scale_rows<NT>(a, mi, g, e, s, coef, acc, y);
    }
  }
  const __m512i rows_a = _mm512_load_si512(kOrder.ry[0]);
  const __m512i rows_b = _mm512_load_si512(kOrder.ry[1]);
  store_rows<NT>(a, t, mi, y, rows_a, rows_b);
}

template <int B, bool EXACT>
void run(const GemmArgs& a, int64_t t0, int64_t t1, int64_t m0, int64_t m1) {
  // Blocks of tokens whose tables fit in L2, tile-major within a block (as the AVX-512
  // kernel). NT tokens per weight vector: 2 int32 sums per token (16 zmm at NT = 8) beside
  // the 2 index vectors per weight vector; 8 for up to 4 bits, then a block of 4 (all of a
  // 4-row step), and the tokens left (m = 1 among them) take lut_gemm_avx512: same bits.
  constexpr int NT = B <= 4 ? 8 : 4;
  constexpr size_t kL2Tables = 192 * 1024;
  const size_t bpt = a.ts->bytes_per_token();
  const int64_t mb = std::max<int64_t>(NT, int64_t(kL2Tables / bpt) / NT * NT);
  for (int64_t b0 = m0; b0 < m1; b0 += mb) {
    const int64_t b1 = std::min(m1, b0 + mb);
    const int64_t full = b0 + (b1 - b0) / NT * NT;        // [b0, full): blocks of NT
    const int64_t four = full + (b1 - full) / 4 * 4;      // [full, four): one block of 4
    if (four == b0) {
      lut_gemm_avx512(a, t0, t1, b0, b1);
      continue;
    }
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t mi = b0; mi < full; mi += NT) tile_tokens<B, EXACT, NT>(a, t, mi);
      if (NT != 4 && four > full) tile_tokens<B, EXACT, 4>(a, t, full);
    }
    if (four < b1) lut_gemm_avx512(a, t0, t1, four, b1);
  }
}

}  // namespace

void lut_gemm_vbmi(const GemmArgs& a, int64_t t0, int64_t t1, int64_t m0, int64_t m1) {
  with_bits(a.ps->bits, a.ts->mode == TableMode::kExact, [&](auto b, auto e) {
    run<decltype(b)::value, decltype(e)::value>(a, t0, t1, m0, m1);
  });
}

}  // namespace luthier
