// pack.cpp: QTensor codes/scales/zeros -> the kernel layout of lut_gemm.h, and back.
// The only file that writes the packed layout; every kernel only reads it.
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

#include "lut_gemm.h"

namespace luthier {

PackedShape packed_shape(int64_t n, int64_t k, int bits, int group_size) {
  if (n <= 0 || k <= 0) throw std::invalid_argument("n and k must be positive");
  if (bits < 1 || bits > kMaxBits) throw std::invalid_argument("bits must be 1 to " + std::to_string(kMaxBits));
  if (group_size <= 0) throw std::invalid_argument("group_size must be positive");
  if (group_size != k && group_size % 8 != 0)
    throw std::invalid_argument("group_size must be a multiple of 8, or equal to k (got " +
                                std::to_string(group_size) + ")");
  if (n > (int64_t(1) << 31) || k > (int64_t(1) << 31))
    throw std::invalid_argument("n and k must be below 2^31");
  PackedShape ps{};
  ps.n = n;
  ps.k = k;
  ps.bits = bits;
  ps.group_size = group_size;
  ps.n_tiles = (n + kNR - 1) / kNR;
  ps.groups = (k + group_size - 1) / group_size;
  ps.gsp = (int64_t(group_size) + 7) / 8 * 8;
  ps.kp = ps.groups * ps.gsp;
  return ps;
}

namespace {

// Byte offset, inside one kgroup pair of a tile, of (row r, plane i), and which of the
// two bytes' halves: see "Packed weight layout" in lut_gemm.h.
inline int byte_in_pair(int bits, int r, int plane) {
  const int pair_base = plane & ~1;
  if (plane == bits - 1 && (bits & 1)) {
    // last odd plane: one vector, byte 2w + h = row h*16 + w
    return pair_base / 2 * 64 + 2 * (r % 16) + r / 16;
  }
  // planes pair: vectors [rows 0-15], [rows 16-31], byte 2w + t = row half*16 + w
  return pair_base / 2 * 64 + (r / 16) * 32 + 2 * (r % 16) + (plane - pair_base);
}

inline int64_t group_col(const PackedShape& ps, int64_t g, int64_t c) {
  // column of padded position c of group g in the unpadded [n, k] codes, or -1 if padding
  const int64_t col = g * ps.group_size + c;
  return (c < ps.group_size && col < ps.k) ? col : -1;
}

}  // namespace

void pack_weights(const PackedShape& ps, const uint8_t* codes, const uint16_t* scales,
                  const uint16_t* zeros, uint8_t* w_out, uint16_t* s_out, uint16_t* z_out) {
  const int64_t pairs = ps.gsp / 8;
  const int bits = ps.bits;
  const size_t pair_bytes = size_t(bits) * 32;
  int off[kNR][kMaxBits];  // byte of (row, plane) inside a kgroup pair
  for (int r = 0; r < kNR; ++r)
    for (int pl = 0; pl < bits; ++pl) off[r][pl] = byte_in_pair(bits, r, pl);
  std::memset(w_out, 0, ps.weight_bytes());
  for (int64_t t = 0; t < ps.n_tiles; ++t) {
    for (int64_t g = 0; g < ps.groups; ++g) {
      // w_out walk: [tile t][group g][pair p][bits * 32 bytes]
      uint8_t* wg = w_out + (size_t(t) * ps.groups + g) * pairs * pair_bytes;
      for (int r = 0; r < kNR; ++r) {
        const int64_t row = t * kNR + r;
        if (row >= ps.n) break;
        const uint8_t* qrow = codes + size_t(row) * ps.k;
        for (int64_t p = 0; p < pairs; ++p) {
          uint8_t c8[8];  // the pair's 8 codes, zero past the group or past k
          const int64_t c0 = g * ps.group_size + p * 8;
          const int64_t lim = std::min<int64_t>(int64_t(ps.group_size) - p * 8, ps.k - c0);
          if (lim >= 8) {
            std::memcpy(c8, qrow + c0, 8);
          } else {
            for (int j = 0; j < 8; ++j) c8[j] = j < lim ? qrow[c0 + j] : 0;
          }
          uint8_t* wp = wg + p * pair_bytes;
          for (int pl = 0; pl < bits; ++pl) {
            int byte = 0;  // bit j of nibble: plane pl of code j (low nibble kgroup 2p)
            for (int j = 0; j < 8; ++j) byte |= ((c8[j] >> pl) & 1) << j;
            wp[off[r][pl]] = uint8_t(byte);
          }
        }
      }
      // scales/zeros walk: [tile t][group g][slot]; rows past n get scale 0
      for (int slot = 0; slot < kNR; ++slot) {
        const int64_t row = t * kNR + row_of_slot(slot);
        const size_t o = (size_t(t) * ps.groups + g) * kNR + slot;
        const bool in = row < ps.n;
        s_out[o] = in ? scales[size_t(row) * ps.groups + g] : 0;
        if (z_out) z_out[o] = (in && zeros) ? zeros[size_t(row) * ps.groups + g] : 0;
      }
    }
  }
}

void unpack_weights(const PackedShape& ps, const uint8_t* w, const uint16_t* s,
                    const uint16_t* z, uint8_t* codes_out, uint16_t* scales_out,
                    uint16_t* zeros_out) {
  const int64_t pairs = ps.gsp / 8;
  const int bits = ps.bits;
  const size_t pair_bytes = size_t(bits) * 32;
  for (int64_t t = 0; t < ps.n_tiles; ++t) {
    for (int64_t g = 0; g < ps.groups; ++g) {
      const uint8_t* wg = w + (size_t(t) * ps.groups + g) * pairs * pair_bytes;
      for (int r = 0; r < kNR; ++r) {
        const int64_t row = t * kNR + r;
        if (row >= ps.n) break;
        uint8_t* qrow = codes_out + size_t(row) * ps.k;
        for (int64_t p = 0; p < pairs; ++p) {
          for (int half = 0; half < 2; ++half) {
            for (int j = 0; j < kG; ++j) {
              const int64_t col = group_col(ps, g, p * 8 + half * 4 + j);
              if (col < 0) continue;
              int q = 0;
              for (int plane = 0; plane < bits; ++plane) {
                const int idx = (wg[p * pair_bytes + byte_in_pair(bits, r, plane)] >> (4 * half)) & 15;
                q |= ((idx >> j) & 1) << plane;
              }
              qrow[col] = uint8_t(q);
            }
          }
        }
      }
      for (int slot = 0; slot < kNR; ++slot) {
        const int64_t row = t * kNR + row_of_slot(slot);
        if (row >= ps.n) continue;
        const size_t o = (size_t(t) * ps.groups + g) * kNR + slot;
        scales_out[size_t(row) * ps.groups + g] = s[o];
        if (zeros_out && z) zeros_out[size_t(row) * ps.groups + g] = z[o];
      }
    }
  }
}

}  // namespace luthier
