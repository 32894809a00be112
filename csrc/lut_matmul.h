// lut_matmul.h: the threaded entry points above the per-ISA kernels of lut_gemm.h.
#pragma once
#include <functional>
#include <string>

#include "lut_gemm.h"

namespace luthier {

struct PackedRef {  // a packed weight (see lut_gemm.h), borrowed
  PackedShape ps;
  const uint8_t* w;
  const uint16_t* s;
  const uint16_t* z;  // null: symmetric, zero_const used
  float zero_const;
};

// Runs fn(task) for task in [0, n_tasks) on the process pool of n_threads, one job at a
// time (callers may come from several Python threads).
void parallel_for(int n_threads, int64_t n_tasks, const std::function<void(int64_t)>& fn);

constexpr int kMaxMulti = 8;

// Work on row i of the activations that must precede its table build (the gated activation
// before the down projection): run in the same pool task as that row's tables.
using RowFn = std::function<void(int64_t)>;

// ys[i][m, n_i] = tables(x) . w_i for weights sharing k and group_size (q/k/v, gate/up):
// one table build and one pool job for all of them.
void lut_gemm_multi(const PackedRef* pws, float* const* ys, int count, const TableShape& tsh,
                    const uint8_t* tables, const float* tscale, const float* xsum,
                    int n_threads, const std::string& isa);
void lut_linear_multi(const PackedRef* pws, float* const* ys, int count, TableMode mode,
                      const float* x, int64_t m, const float* norm_w, float eps, int n_threads,
                      const std::string& isa, const RowFn* pre = nullptr);

// y[m, n] = tables(x) . w ; tables built beforehand by build_tables.
void lut_gemm(const PackedRef& pw, const TableShape& tsh, const uint8_t* tables,
              const float* tscale, const float* xsum, float* y, int n_threads,
              const std::string& isa);

// Builds tables for m tokens on the pool (tokens split across threads), each after
// (*pre)(token) when pre is given.
void build_tables_mt(const TableShape& tsh, const float* x, const float* norm_w, float eps,
                     uint8_t* tables, float* tscale, float* xsum, int n_threads,
                     const RowFn* pre = nullptr);

// y[m, n] = (rmsnorm(x) if norm_w) . w^T: tables into a reused per-thread buffer, then
// lut_gemm. No allocation once the buffer has grown to the largest shape seen.
void lut_linear(const PackedRef& pw, TableMode mode, const float* x, int64_t m,
                const float* norm_w, float eps, float* y, int n_threads, const std::string& isa,
                const RowFn* pre = nullptr);

}  // namespace luthier
