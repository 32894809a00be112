// bandwidth.cpp: a memory read-bandwidth probe for the benchmarks: the speed limit of a
// memory-bound GEMV. Wide loads into several independent accumulators, split over the pool.
#include "bandwidth.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <functional>

#include "lut_matmul.h"

#if defined(LUTHIER_X86)
#include <immintrin.h>
#endif

namespace luthier {
namespace {

#if defined(LUTHIER_X86)
__attribute__((target("avx2"))) uint64_t read_avx2(const uint8_t* p, size_t bytes) {
  // 8 accumulators of 32 bytes: 256 bytes per iteration keep enough loads in flight
  __m256i acc[8];
  for (auto& a : acc) a = _mm256_setzero_si256();
  const size_t step = 256;
  size_t i = 0;
  for (; i + step <= bytes; i += step)
    for (int j = 0; j < 8; ++j)
      acc[j] = _mm256_xor_si256(acc[j], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 32 * j)));
  for (int j = 1; j < 8; ++j) acc[0] = _mm256_xor_si256(acc[0], acc[j]);
  uint64_t out[4];
  std::memcpy(out, &acc[0], 32);
  return out[0] ^ out[1] ^ out[2] ^ out[3];
}

__attribute__((target("avx512f"))) uint64_t read_avx512(const uint8_t* p, size_t bytes) {
  // 8 accumulators of 64 bytes: 512 bytes per iteration (the widest loads this CPU has)
  __m512i acc[8];
  for (auto& a : acc) a = _mm512_setzero_si512();
  const size_t step = 512;
  size_t i = 0;
  for (; i + step <= bytes; i += step)
    for (int j = 0; j < 8; ++j)
      acc[j] = _mm512_xor_si512(acc[j], _mm512_loadu_si512(reinterpret_cast<const void*>(p + i + 64 * j)));
  for (int j = 1; j < 8; ++j) acc[0] = _mm512_xor_si512(acc[0], acc[j]);
  uint64_t out[8];
  std::memcpy(out, &acc[0], 64);
  return out[0] ^ out[1] ^ out[2] ^ out[3] ^ out[4] ^ out[5] ^ out[6] ^ out[7];
}
#endif

uint64_t read_generic(const uint8_t* p, size_t bytes) {
  uint64_t acc[8] = {0};
  for (size_t i = 0; i + 64 <= bytes; i += 64)
    for (int j = 0; j < 8; ++j) {
      uint64_t v;
      std::memcpy(&v, p + i + 8 * j, 8);
      acc[j] ^= v;
    }
  return acc[0] ^ acc[1] ^ acc[2] ^ acc[3] ^ acc[4] ^ acc[5] ^ acc[6] ^ acc[7];
}

}  // namespace

uint64_t read_probe(const uint8_t* data, size_t bytes, int n_threads) {
  bool avx2 = false, avx512 = false;
#if defined(LUTHIER_X86)
  __builtin_cpu_init();
  avx2 = __builtin_cpu_supports("avx2");
  // LUTHIER_PROBE=avx2 keeps 32-byte loads (to compare the two probes)
  const char* force = std::getenv("LUTHIER_PROBE");
  avx512 = __builtin_cpu_supports("avx512f") && !(force && std::strcmp(force, "avx2") == 0);
#endif
  n_threads = std::max(1, n_threads);
  const size_t chunk = (bytes / size_t(n_threads)) & ~size_t(511);
  uint64_t parts[256] = {0};
  std::function<void(int64_t)> fn = [&](int64_t t) {
    const uint8_t* p = data + size_t(t) * chunk;
#if defined(LUTHIER_X86)
    if (avx512) { parts[t] = read_avx512(p, chunk); return; }
    if (avx2) { parts[t] = read_avx2(p, chunk); return; }
#endif
    parts[t] = read_generic(p, chunk);
  };
  parallel_for(n_threads, std::min(n_threads, 256), fn);
  uint64_t r = 0;
  for (int t = 0; t < n_threads && t < 256; ++t) r ^= parts[t];
  return r;
}

}  // namespace luthier
