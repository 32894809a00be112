// lut_gemm.h: the contract of luthier's table-lookup mixed-precision matmul.
//
// Formula (letters fixed everywhere): y[m, n] = sum_k x[m, k] * w[n, k]
//   m = tokens, n = output features, k = input features.
// Weights are a QTensor: codes q[n, k] in [0, 2^bits), bits 1-6 (kMaxBits), fp16 scales
// s[n, G] and optional fp16 zeros z[n, G] per group of `group_size` along k (G = ceil(k / group_size)):
//   w[n, k] = s[n, G(k)] * (q[n, k] - z[n, G(k)])
// Without zeros, z is the symmetric constant `zero_default(bits)` (2^(bits-1), or 0.5 for
// bits = 1). Ternary is bits = 2 with codes {0, 1, 2} and z = 1.
//
// Method (T-MAC / LUT Tensor Core, see DESIGN.md): bit-serial decomposition
//   q = sum_i 2^i beta_i,  beta_i = (sigma_i + 1) / 2,  sigma_i in {-1, +1}
// so for one group, with S = sum_k x_k and cb = (2^bits - 1) / 2:
//   sum_k x_k w_k = s * ( 0.5 * sum_i 2^i sum_j T_j[idx_ij] + (cb - z) * S )
// where T_j[c] = sum_{t<4} (2 bit_t(c) - 1) x_{4j+t} is the 16-entry table of kgroup j
// (4 consecutive activations) and idx_ij the 4-bit index of plane i over kgroup j.
// Tables are integers times a per-group scale ts[m, G]: T_j ~= ts * Tint_j.
//   mode FAST : Tint int8, ts = max|T_float| / 127 over the group (lossy, like T-MAC).
//   mode EXACT: x quantized to int8 per group (ts = max|x| / 127); Tint = sum +-xq is
//               exact in int16 (|Tint| <= 508) and stored as a low byte (u8) and a
//               high byte (s8) table; lossless beyond the int8 activations.
// Symmetry: T[15 - c] = -T[c], so 8 entries are computed and 8 mirrored.
//
// ---- Packed weight layout (only pack.cpp writes it; kernels read it) -------------------
// NR = 32 rows per tile; n_tiles = ceil(n / 32); rows past n are zero codes.
// gsp = group_size rounded up to a multiple of 8 (only differs when group_size == k);
// kp = G * gsp; codes past k are zero (their activations are zero-padded too).
// A kgroup pair (8 activations, kgroups 2p and 2p+1) of one tile holds `bits` vectors of
// 32 bytes; each byte carries kgroup 2p's index in its low nibble, 2p+1's in its high.
//   planes (0,1), (2,3), (4,5) as pairs: two vectors each, for rows 0-15 and 16-31:
//       byte 2w + t = row (half * 16 + w), plane (pair_base + t)
//   a last odd plane (bits 1, 3 or 5): one vector: byte 2w + h = row (h * 16 + w)
// so `vpmaddubsw` with per-byte weights (2^i, 2^(i+1)) combines two planes and widens to
// int16 in one instruction, word w of the result being row w (or 16 + w).
// weights: uint8 [n_tiles][G][gsp / 8][bits][32]
// scales : uint16 (fp16) [n_tiles][G][32], zeros the same (optional); the 32 rows of a
//          tile are stored in the order the kernels' int32 vectors produce them:
//          position v * 8 + d  <->  row kRowOfSlot[v * 8 + d] (see below).
//
// ---- Tables layout (tables.cpp writes it) -----------------------------------------------
// per token m: kp / 4 kgroups, each 16 bytes (FAST: int8 T) or 32 bytes (EXACT: 16 bytes
// low u8 then 16 bytes high s8); ts[m, G] float; xsum[m, G] float (= S, in EXACT mode the
// sum of the dequantized int8 activations).
//
// Name suffixes: _generic = portable C++, _avx2 / _avx512 / _vbmi / _neon = SIMD for that ISA.
#pragma once
#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace luthier {

constexpr int kNR = 32;          // rows per tile
constexpr int kMaxBits = 6;      // widest codes: 6 planes (7 would overflow the int16 sums)
constexpr int kG = 4;            // activations per table
constexpr int kTableBytes = 16;  // entries per table

// Bytes ahead of the weight stream that the SIMD kernels prefetch into L1 (override with
// -DLUTHIER_PREFETCH=N to tune)
#ifndef LUTHIER_PREFETCH
#define LUTHIER_PREFETCH 2048
#endif

enum class TableMode : int { kFast = 0, kExact = 1 };

// Row (within a tile) of scale slot v * 8 + d: the kernels widen int16 accumulators of
// rows 0-15 (A) and 16-31 (B) into int32 vectors of even and odd rows:
// v = 0: A even, 1: A odd, 2: B even, 3: B odd; lane d.
constexpr int row_of_slot(int slot) {
  return (slot / 16) * 16 + (slot % 8) * 2 + (slot / 8) % 2;
}

inline float zero_default(int bits) { return bits == 1 ? 0.5f : float(1 << (bits - 1)); }

struct PackedShape {
  int64_t n, k;
  int bits, group_size;
  int64_t n_tiles, groups, gsp, kp;
  size_t weight_bytes() const { return size_t(n_tiles) * groups * (gsp / 8) * bits * 32; }
  size_t scale_count() const { return size_t(n_tiles) * groups * kNR; }
};

// Validates and derives the packed shape; throws std::invalid_argument on bad input.
PackedShape packed_shape(int64_t n, int64_t k, int bits, int group_size);

// codes uint8 [n, k]; scales fp16 [n, G]; zeros fp16 [n, G] or nullptr.
void pack_weights(const PackedShape& ps, const uint8_t* codes, const uint16_t* scales,
                  const uint16_t* zeros, uint8_t* w_out, uint16_t* s_out, uint16_t* z_out);
// Inverse of pack_weights (for tests and for the dequantize-based path).
void unpack_weights(const PackedShape& ps, const uint8_t* w, const uint16_t* s,
                    const uint16_t* z, uint8_t* codes_out, uint16_t* scales_out,
                    uint16_t* zeros_out);

struct TableShape {
  int64_t m, k, group_size, groups, gsp, kp;
  TableMode mode;
  size_t bytes_per_token() const {
    return size_t(kp / kG) * (mode == TableMode::kExact ? 2 * kTableBytes : kTableBytes);
  }
};
TableShape table_shape(int64_t m, int64_t k, int group_size, TableMode mode);

// x float [m, k] (row stride ldx) -> tables uint8 [m][bytes_per_token], ts, xsum float [m, G].
// If norm_w is given, x is first RMS-normalized per row with weight norm_w[k] and eps:
// the fused variant reads the activations once.
void build_tables(const TableShape& ts, const float* x, int64_t ldx, const float* norm_w,
                  float eps, uint8_t* tables, float* tscale, float* xsum);

// The kernel of one ISA: rows [tile_begin, tile_end) x tokens [m_begin, m_end).
struct GemmArgs {
  const PackedShape* ps;
  const TableShape* ts;
  const uint8_t* w;
  const uint16_t* s;
  const uint16_t* z;  // may be null: symmetric
  float zero_const;   // z when zeros is null
  const uint8_t* tables;
  const float* tscale;
  const float* xsum;
  float* y;  // [m, n], row stride ldy
  int64_t ldy;
};
using GemmKernel = void (*)(const GemmArgs&, int64_t tile_begin, int64_t tile_end,
                            int64_t m_begin, int64_t m_end);

void lut_gemm_generic(const GemmArgs&, int64_t, int64_t, int64_t, int64_t);
#if defined(LUTHIER_X86)
void lut_gemm_avx2(const GemmArgs&, int64_t, int64_t, int64_t, int64_t);
void lut_gemm_avx512(const GemmArgs&, int64_t, int64_t, int64_t, int64_t);
// AVX-512 with VBMI and VNNI: blocks of tokens (m > 1) by vpermb + vpdpbusd, the rest
// through lut_gemm_avx512; the same bits as lut_gemm_avx512
void lut_gemm_vbmi(const GemmArgs&, int64_t, int64_t, int64_t, int64_t);
#endif

// kgroup pairs an int16 accumulator of the x86 kernels can sum before it is widened to
// int32 (a power of two): FAST |lookup| <= 127, EXACT low bytes <= 255, times 2^b - 1
// for the plane weights of b bits
template <int B, bool EXACT>
constexpr int int16_flush_pairs() {
  constexpr int per = (EXACT ? 255 : 127) * ((1 << B) - 1);
  constexpr int kg = 32767 / per;
  int p = 1;
  while (p * 4 <= kg) p *= 2;
  return p;
}

// f(std::integral_constant<int, bits>, std::integral_constant<bool, exact>) for bits 1-6:
// the one switch from run-time (bits, mode) to a kernel's template instance
template <typename F>
void with_bits(int bits, bool exact, F&& f) {
  using std::integral_constant;
  using T = std::true_type;
  using N = std::false_type;
  switch (bits * 2 + (exact ? 1 : 0)) {
    case 2: return f(integral_constant<int, 1>{}, N{});
    case 3: return f(integral_constant<int, 1>{}, T{});
    case 4: return f(integral_constant<int, 2>{}, N{});
    case 5: return f(integral_constant<int, 2>{}, T{});
    case 6: return f(integral_constant<int, 3>{}, N{});
    case 7: return f(integral_constant<int, 3>{}, T{});
    case 8: return f(integral_constant<int, 4>{}, N{});
    case 9: return f(integral_constant<int, 4>{}, T{});
    case 10: return f(integral_constant<int, 5>{}, N{});
    case 11: return f(integral_constant<int, 5>{}, T{});
    case 12: return f(integral_constant<int, 6>{}, N{});
    default: return f(integral_constant<int, 6>{}, T{});
  }
}

// Portable fp16 <-> fp32 (IEEE binary16; to half rounds to nearest even).
float half_to_float(uint16_t h);
uint16_t float_to_half(float f);

}  // namespace luthier
