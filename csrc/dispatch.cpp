// dispatch.cpp: picks the kernel from CPU features once per process.
#include "dispatch.h"

#include <cstdlib>
#include <stdexcept>

namespace luthier {

std::vector<std::string> available_isas() {
  std::vector<std::string> v{"generic"};
#if defined(LUTHIER_X86)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) v.push_back("avx2");
  // the AVX-512 kernels use F (zmm), BW (byte/word ops), VL and DQ (inserts/broadcasts)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("fma"))
    v.push_back("avx512");
  // batched tokens by byte permutes (VBMI) and u8 x s8 dot products (VNNI)
  if (v.back() == "avx512" && __builtin_cpu_supports("avx512vbmi") &&
      __builtin_cpu_supports("avx512vnni"))
    v.push_back("avx512vbmi");
#endif
#if defined(__aarch64__)
  v.push_back("neon");  // Advanced SIMD is part of the aarch64 baseline: no check needed
#endif
  return v;
}

GemmKernel kernel_for(const std::string& isa) {
  for (const auto& a : available_isas()) {
    if (a != isa) continue;
    if (isa == "generic") return lut_gemm_generic;
#if defined(LUTHIER_X86)
    if (isa == "avx2") return lut_gemm_avx2;
    if (isa == "avx512") return lut_gemm_avx512;
    if (isa == "avx512vbmi") return lut_gemm_vbmi;
#endif
#if defined(__aarch64__)
    if (isa == "neon") return lut_gemm_neon;
#endif
  }
  std::string have;
  for (const auto& a : available_isas()) have += (have.empty() ? "" : ", ") + a;
  throw std::invalid_argument("ISA '" + isa + "' is not available on this CPU/build (available: " + have + ")");
}

const std::string& active_isa() {
  static const std::string isa = [] {
    const char* env = std::getenv("LUTHIER_ISA");
    if (env && *env) {
      kernel_for(env);  // throws with the list if unavailable
      return std::string(env);
    }
    return available_isas().back();
  }();
  return isa;
}

}  // namespace luthier
