// dispatch.h: the kernel of the best ISA this CPU has, chosen once; LUTHIER_ISA forces one.
#pragma once
#include <string>
#include <vector>

#include "lut_gemm.h"

namespace luthier {

#if defined(__aarch64__)
// The aarch64 kernel (lut_gemm_neon.cpp). Declared here rather than next to the others in
// lut_gemm.h only because that header is owned elsewhere; move it there when convenient.
void lut_gemm_neon(const GemmArgs&, int64_t, int64_t, int64_t, int64_t);
#endif

// ISAs compiled in and supported by this CPU, best last ("generic" always first).
std::vector<std::string> available_isas();
// The ISA in use: LUTHIER_ISA if set (error if unavailable), else the best available.
const std::string& active_isa();
// Kernel for a named ISA; throws std::invalid_argument if it is not available.
GemmKernel kernel_for(const std::string& isa);
// "avx512" and "avx512vbmi" (which adds a batched LUT kernel) share the other AVX-512 paths.
inline bool is_avx512_isa(const std::string& isa) { return isa == "avx512" || isa == "avx512vbmi"; }

}  // namespace luthier
