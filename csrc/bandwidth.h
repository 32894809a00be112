// bandwidth.h: memory read-bandwidth probe (benchmarks only).
#pragma once
#include <cstddef>
#include <cstdint>

namespace luthier {
// Reads `bytes` of data once, split over n_threads; returns a checksum so that the reads
// cannot be optimized away.
uint64_t read_probe(const uint8_t* data, size_t bytes, int n_threads);
}  // namespace luthier
