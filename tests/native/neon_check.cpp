// neon_check.cpp: the NEON kernel against the portable kernel (and both against a
// reference on the logical codes), without Python. Built for aarch64 and run under
// qemu-user by run_neon_check.sh; exits non-zero on the first mismatch.
//
// Two checks per case:
//   integer: unit scales, tscale 2 (so 0.5 * ts = 1) and zero_const = cb (no bias term):
//            y is the integer lookup sum itself, exact in float; NEON, generic and the
//            reference must agree bit for bit.
//   float  : random fp16 scales (and zeros), real tables; |y_neon - y_generic| and
//            |y_generic - y_ref| within kRelTol of the sum of absolute terms of the row
//            (float accumulation order is the only allowed difference).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "dispatch.h"
#include "lut_gemm.h"

using namespace luthier;

namespace {

constexpr double kRelTol = 1e-4;  // of the row's sum of absolute terms
constexpr float kGuard = 12345.f;  // written past n in y; kernels must leave it alone

std::mt19937_64 rng(20261121);

// float -> IEEE binary16, round to nearest; only for generating normal-range values.
uint16_t float_to_half(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  const uint16_t sign = uint16_t((b >> 16) & 0x8000);
  const float a = std::fabs(f);
  if (a < 6.2e-5f) return sign;  // below the normal range: zero is enough for tests
  int e;
  const float fr = std::frexp(a, &e);  // a = fr * 2^e, fr in [0.5, 1)
  int man = int(std::lround((fr * 2.f - 1.f) * 1024.f));
  int exp = e - 1 + 15;
  if (man == 1024) man = 0, ++exp;
  return uint16_t(sign | exp << 10 | man);
}

struct Case {
  int bits;
  bool ternary, exact, zeros;
  int64_t n, k, m;
  int group_size;
  bool extreme;  // all-equal activations, maximal codes: the int16 flush worst case
};

std::string describe(const Case& c) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "bits=%d%s mode=%s zeros=%d n=%lld k=%lld m=%lld gs=%d%s",
                c.bits, c.ternary ? "(ternary)" : "", c.exact ? "exact" : "fast", int(c.zeros),
                (long long)c.n, (long long)c.k, (long long)c.m, c.group_size,
                c.extreme ? " extreme" : "");
  return buf;
}

// Reference on the logical codes: y and the sum of absolute terms per (token, row), in
// double, reading table entries by index (never the packed layout).
void reference(const Case& c, const PackedShape& ps, const TableShape& tsh,
               const std::vector<uint8_t>& codes, const std::vector<uint16_t>& sc,
               const std::vector<uint16_t>* zs, float zero_const,
               const std::vector<uint8_t>& tables, const float* tscale, const float* xsum,
               std::vector<double>& y, std::vector<double>& mag) {
  const double cb = 0.5 * ((1 << c.bits) - 1);
  const size_t tbk = c.exact ? 32 : 16;
  y.assign(size_t(c.m * c.n), 0.0);
  mag.assign(size_t(c.m * c.n), 0.0);
  for (int64_t mi = 0; mi < c.m; ++mi)
    for (int64_t r = 0; r < c.n; ++r)
      for (int64_t g = 0; g < ps.groups; ++g) {
        double L = 0, A = 0;
        for (int64_t j = 0; j < ps.gsp / kG; ++j) {
          // tables walk: [token mi][group g][kgroup j][16 or 32 bytes]
          const uint8_t* tj = tables.data() + size_t(mi) * tsh.bytes_per_token() +
                              (size_t(g) * (ps.gsp / kG) + j) * tbk;
          for (int pl = 0; pl < c.bits; ++pl) {
            int idx = 0;
            for (int t = 0; t < kG; ++t) {
              const int64_t off = j * kG + t, col = g * c.group_size + off;
              if (off < c.group_size && col < c.k) idx |= ((codes[r * c.k + col] >> pl) & 1) << t;
            }
            const double v = c.exact ? double(tj[idx]) + 256.0 * double(int8_t(tj[16 + idx]))
                                     : double(int8_t(tj[idx]));
            L += v * (1 << pl);
            A += std::fabs(v) * (1 << pl);
          }
        }
        const double s = half_to_float(sc[r * ps.groups + g]);
        const double z = zs ? half_to_float((*zs)[r * ps.groups + g]) : zero_const;
        const double ts = tscale[mi * ps.groups + g], sx = xsum[mi * ps.groups + g];
        y[mi * c.n + r] += s * (0.5 * ts * L + (cb - z) * sx);
        mag[mi * c.n + r] += std::fabs(s) * (0.5 * std::fabs(ts) * A + std::fabs((cb - z) * sx));
      }
}

// Runs kern over the whole output, in the chunks lut_matmul.cpp might give a thread:
// tiles split in two, tokens split after the first (odd starts for the NT blocks).
void run_kernel(GemmKernel kern, const GemmArgs& a, int64_t n_tiles, int64_t m, bool split) {
  if (!split) return kern(a, 0, n_tiles, 0, m);
  const int64_t th = n_tiles / 2, mh = m > 1 ? 1 : m;
  const int64_t tr[2][2] = {{0, th}, {th, n_tiles}};
  for (const auto& r : tr) {
    if (r[0] == r[1]) continue;
    kern(a, r[0], r[1], 0, mh);
    if (mh < m) kern(a, r[0], r[1], mh, m);
  }
}

bool check_case(const Case& c, bool split, double* worst) {
  const PackedShape ps = packed_shape(c.n, c.k, c.bits, c.group_size);
  const TableShape tsh = table_shape(c.m, c.k, c.group_size, c.exact ? TableMode::kExact : TableMode::kFast);
  const int levels = c.ternary ? 3 : (1 << c.bits);
  std::uniform_int_distribution<int> code_d(0, levels - 1);
  std::normal_distribution<float> xd(0.f, 1.f);
  std::uniform_real_distribution<float> sd(0.01f, 1.f), zd(0.f, float((1 << c.bits) - 1));

  // logical QTensor: codes [n, k], scales / zeros fp16 [n, G]
  std::vector<uint8_t> codes(size_t(c.n * c.k));
  for (auto& q : codes) q = c.extreme ? uint8_t(levels - 1) : uint8_t(code_d(rng));
  std::vector<uint16_t> sc(size_t(c.n * ps.groups)), zs(sc.size()), ones(sc.size(), float_to_half(1.f));
  for (auto& s : sc) s = float_to_half(sd(rng) * (rng() & 1 ? 1.f : -1.f));
  for (auto& z : zs) z = float_to_half(zd(rng));
  // activations x [m, k]; a few outliers, as real layers have
  std::vector<float> x(size_t(c.m * c.k));
  for (auto& v : x) v = c.extreme ? 1.f : (rng() % 64 == 0 ? 20.f : 1.f) * xd(rng);

  std::vector<uint8_t> w(ps.weight_bytes());
  std::vector<uint16_t> ws(ps.scale_count()), wz(ps.scale_count()), wones(ps.scale_count());
  pack_weights(ps, codes.data(), sc.data(), c.zeros ? zs.data() : nullptr, w.data(), ws.data(),
               c.zeros ? wz.data() : nullptr);
  pack_weights(ps, codes.data(), ones.data(), nullptr, w.data(), wones.data(), nullptr);
  std::vector<uint8_t> tables(size_t(c.m) * tsh.bytes_per_token());
  std::vector<float> tscale(size_t(c.m * ps.groups)), xsum(tscale.size()), two(tscale.size(), 2.f);
  build_tables(tsh, x.data(), c.k, nullptr, 0.f, tables.data(), tscale.data(), xsum.data());

  const float cb = 0.5f * float((1 << c.bits) - 1);
  const float zero_const = c.ternary ? 1.f : zero_default(c.bits);
  const int64_t ldy = c.n + 3;  // padding columns hold kGuard
  auto out = [&] { return std::vector<float>(size_t(c.m * ldy), kGuard); };

  // integer check: y = sum of lookups, exact
  {
    GemmArgs a{&ps, &tsh, w.data(), wones.data(), nullptr, cb, tables.data(), two.data(), xsum.data(), nullptr, ldy};
    std::vector<float> yg = out(), yn = out();
    a.y = yg.data();
    lut_gemm_generic(a, 0, ps.n_tiles, 0, c.m);
    a.y = yn.data();
    run_kernel(lut_gemm_neon, a, ps.n_tiles, c.m, split);
    std::vector<double> yr, mag;
    reference(c, ps, tsh, codes, ones, nullptr, cb, tables, two.data(), xsum.data(), yr, mag);
    for (int64_t mi = 0; mi < c.m; ++mi)
      for (int64_t r = 0; r < ldy; ++r) {
        const float g = yg[mi * ldy + r], nn = yn[mi * ldy + r];
        const bool pad = r >= c.n;
        if (std::memcmp(&g, &nn, 4) != 0 || (pad && nn != kGuard) ||
            (!pad && double(g) != yr[mi * c.n + r])) {
          std::printf("FAIL integer %s split=%d at m=%lld row=%lld: neon %.1f generic %.1f ref %.1f\n",
                      describe(c).c_str(), int(split), (long long)mi, (long long)r, nn, g,
                      pad ? double(kGuard) : yr[mi * c.n + r]);
          return false;
        }
      }
  }
  // float check: real scales, zeros, table scales and sums
  {
    GemmArgs a{&ps, &tsh, w.data(), ws.data(), c.zeros ? wz.data() : nullptr, zero_const,
               tables.data(), tscale.data(), xsum.data(), nullptr, ldy};
    std::vector<float> yg = out(), yn = out();
    a.y = yg.data();
    lut_gemm_generic(a, 0, ps.n_tiles, 0, c.m);
    a.y = yn.data();
    run_kernel(lut_gemm_neon, a, ps.n_tiles, c.m, split);
    std::vector<double> yr, mag;
    reference(c, ps, tsh, codes, sc, c.zeros ? &zs : nullptr, zero_const, tables, tscale.data(),
              xsum.data(), yr, mag);
    for (int64_t mi = 0; mi < c.m; ++mi)
      for (int64_t r = 0; r < ldy; ++r) {
        const double g = yg[mi * ldy + r], nn = yn[mi * ldy + r];
        if (r >= c.n) {
          if (nn != kGuard) {
            std::printf("FAIL %s: wrote past n at m=%lld col=%lld\n", describe(c).c_str(), (long long)mi, (long long)r);
            return false;
          }
          continue;
        }
        const double mg = mag[mi * c.n + r] + 1e-30;
        const double e_nr = std::fabs(nn - g) / mg, e_gr = std::fabs(g - yr[mi * c.n + r]) / mg;
        *worst = std::max(*worst, e_nr);
        if (!(e_nr <= kRelTol) || !(e_gr <= kRelTol)) {
          std::printf("FAIL float %s split=%d at m=%lld row=%lld: neon %.9g generic %.9g ref %.9g (mag %.3g)\n",
                      describe(c).c_str(), int(split), (long long)mi, (long long)r, nn, g,
                      yr[mi * c.n + r], mg);
          return false;
        }
      }
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  // dispatch: "neon" is registered on aarch64 and maps to this kernel
  bool found = false;
  for (const auto& isa : available_isas()) found |= isa == "neon";
  if (!found || kernel_for("neon") != lut_gemm_neon || active_isa() != "neon") {
    std::printf("FAIL dispatch: neon not registered or not the default\n");
    return 1;
  }

  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  const int64_t ns[] = {1, 3, 17, 33, 64, 127, 129};
  const int64_t ks[] = {8, 24, 40, 136, 264, 1032};
  const int64_t ms[] = {1, 2, 5, 7, 64};
  const int gss[] = {32, 64, 128, 0};  // 0: group_size = k
  struct Kind { int bits; bool ternary; } kinds[] = {{1, false}, {2, false}, {3, false}, {4, false},
                                                     {5, false}, {6, false}, {2, true}};

  int cases = 0, fails = 0;
  double worst = 0;
  int rot = 0;  // rotates m over the (n, k) grid so every m meets every size class
  for (const auto& kd : kinds)
    for (int exact = 0; exact < 2; ++exact)
      for (int zeros = 0; zeros < 2; ++zeros)
        for (int gs0 : gss)
          for (int64_t n : ns)
            for (int64_t k : ks) {
              const int64_t m = ms[rot++ % 5];
              if (quick && (n > 33 || k > 264)) continue;
              // m = 64 on the largest shapes is slow under qemu and adds nothing new
              if (m == 64 && n * k > 40000) continue;
              const Case c{kd.bits, kd.ternary, exact == 1, zeros == 1 && !kd.ternary, n, k, m,
                           gs0 ? gs0 : int(k), false};
              ++cases;
              if (!check_case(c, (rot & 1) != 0, &worst) && ++fails >= 5) return 1;
            }
  // group_size = k with k not a multiple of 8 (padded to gsp), and odd group counts
  for (const auto& kd : kinds)
    for (int exact = 0; exact < 2; ++exact)
      for (int64_t k : {int64_t(5), int64_t(20), int64_t(100), int64_t(7 * 32), int64_t(3 * 64)})
        for (int64_t m : {int64_t(1), int64_t(7)}) {
          const int gs = k % 8 ? int(k) : 32;
          const Case c{kd.bits, kd.ternary, exact == 1, !kd.ternary, 33, k, m, gs, false};
          ++cases;
          if (!check_case(c, true, &worst) && ++fails >= 5) return 1;
        }
  // int16 flush worst case: every lookup at its largest value, long groups
  for (const auto& kd : kinds)
    for (int exact = 0; exact < 2; ++exact)
      for (int gs : {128, 4096}) {
        const Case c{kd.bits, kd.ternary, exact == 1, false, 40, 4096, 3, gs, true};
        ++cases;
        if (!check_case(c, false, &worst) && ++fails >= 5) return 1;
      }
  std::printf("%s: %d cases, %d failed; worst |neon - generic| / row magnitude = %.3g (bound %.0e)\n",
              fails ? "FAIL" : "OK", cases, fails, worst, kRelTol);
  return fails ? 1 : 0;
}
