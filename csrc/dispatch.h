// dispatch.h: the kernel of the best ISA this CPU has, chosen once; LUTHIER_ISA forces one.
#pragma once
#include <string>
#include <vector>

#include "lut_gemm.h"

namespace luthier {

// ISAs compiled in and supported by this CPU, best last ("generic" always first).
std::vector<std::string> available_isas();
// The ISA in use: LUTHIER_ISA if set (error if unavailable), else the best available.
const std::string& active_isa();
// Kernel for a named ISA; throws std::invalid_argument if it is not available.
GemmKernel kernel_for(const std::string& isa);

}  // namespace luthier
