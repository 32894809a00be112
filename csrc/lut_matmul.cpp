// lut_matmul.cpp: splits a LUT matmul into tasks for the thread pool and runs the kernel
// of the chosen ISA on each.
#include "lut_matmul.h"

#include <algorithm>
#include <mutex>
#include <stdexcept>
#include <vector>

#include "dispatch.h"
#include "thread_pool.h"

namespace luthier {
namespace {
std::mutex g_pool_mu;  // the pool runs one job at a time; callers may come from many threads
}

void parallel_for(int n_threads, int64_t n_tasks, const std::function<void(int64_t)>& fn) {
  std::lock_guard<std::mutex> lk(g_pool_mu);
  global_pool(n_threads).run(n_tasks, fn);
}

void lut_gemm_multi(const PackedRef* pws, float* const* ys, int count, const TableShape& tsh,
                    const uint8_t* tables, const float* tscale, const float* xsum,
                    int n_threads, const std::string& isa) {
  if (count < 1 || count > kMaxMulti) throw std::invalid_argument("1 to 8 weights per call");
  GemmKernel kern = kernel_for(isa.empty() ? active_isa() : isa);
  int64_t total_tiles = 0;
  for (int i = 0; i < count; ++i) {
    if (tsh.k != pws[i].ps.k || tsh.group_size != pws[i].ps.group_size)
      throw std::invalid_argument("tables were built for another k or group_size");
    total_tiles += pws[i].ps.n_tiles;
  }
  n_threads = std::max(1, n_threads);
  // Tasks: chunks of tiles of every weight (a few per thread for balance), times chunks of
  // tokens when the tiles alone cannot keep every thread busy. One pool job for all.
  const int64_t want = n_threads == 1 ? 1 : int64_t(n_threads) * 4;
  const int64_t tiles_per = std::max<int64_t>(1, (total_tiles + want - 1) / want);
  int64_t first_chunk[kMaxMulti + 1];  // prefix sums of tile chunks per weight
  first_chunk[0] = 0;
  for (int i = 0; i < count; ++i)
    first_chunk[i + 1] = first_chunk[i] + (pws[i].ps.n_tiles + tiles_per - 1) / tiles_per;
  const int64_t tile_chunks = first_chunk[count];
  const int64_t m_chunks = std::min<int64_t>(tsh.m, std::max<int64_t>(1, want / tile_chunks));
  const int64_t m_per = (tsh.m + m_chunks - 1) / m_chunks;
  GemmArgs args[kMaxMulti];
  for (int i = 0; i < count; ++i)
    args[i] = GemmArgs{&pws[i].ps, &tsh, pws[i].w, pws[i].s, pws[i].z, pws[i].zero_const,
                       tables, tscale, xsum, ys[i], pws[i].ps.n};
  std::function<void(int64_t)> fn = [&](int64_t task) {
    const int64_t tc = task % tile_chunks, mc = task / tile_chunks;
    int i = 0;
    while (tc >= first_chunk[i + 1]) ++i;
    const int64_t nt = pws[i].ps.n_tiles;
    const int64_t t0 = (tc - first_chunk[i]) * tiles_per, t1 = std::min(nt, t0 + tiles_per);
    const int64_t m0 = mc * m_per, m1 = std::min(tsh.m, m0 + m_per);
    if (t0 < t1 && m0 < m1) kern(args[i], t0, t1, m0, m1);
  };
  std::lock_guard<std::mutex> lk(g_pool_mu);
  global_pool(n_threads).run(tile_chunks * m_chunks, fn);
}

void lut_gemm(const PackedRef& pw, const TableShape& tsh, const uint8_t* tables,
              const float* tscale, const float* xsum, float* y, int n_threads,
              const std::string& isa) {
  lut_gemm_multi(&pw, &y, 1, tsh, tables, tscale, xsum, n_threads, isa);
}

void build_tables_mt(const TableShape& tsh, const float* x, const float* norm_w, float eps,
                     uint8_t* tables, float* tscale, float* xsum, int n_threads,
                     const RowFn* pre) {
  if (tsh.m == 1 || n_threads <= 1) {
    if (pre)
      for (int64_t mi = 0; mi < tsh.m; ++mi) (*pre)(mi);
    build_tables(tsh, x, tsh.k, norm_w, eps, tables, tscale, xsum);
    return;
  }
  TableShape one = tsh;
  one.m = 1;
  std::function<void(int64_t)> fn = [&](int64_t mi) {
    if (pre) (*pre)(mi);
    build_tables(one, x + mi * tsh.k, tsh.k, norm_w, eps,
                 tables + size_t(mi) * tsh.bytes_per_token(), tscale + mi * tsh.groups,
                 xsum + mi * tsh.groups);
  };
  std::lock_guard<std::mutex> lk(g_pool_mu);
  global_pool(n_threads).run(tsh.m, fn);
}

void lut_linear(const PackedRef& pw, TableMode mode, const float* x, int64_t m,
                const float* norm_w, float eps, float* y, int n_threads, const std::string& isa,
                const RowFn* pre) {
  lut_linear_multi(&pw, &y, 1, mode, x, m, norm_w, eps, n_threads, isa, pre);
}

void lut_linear_multi(const PackedRef* pws, float* const* ys, int count, TableMode mode,
                      const float* x, int64_t m, const float* norm_w, float eps, int n_threads,
                      const std::string& isa, const RowFn* pre) {
  const PackedRef& pw = pws[0];
  const TableShape tsh = table_shape(m, pw.ps.k, pw.ps.group_size, mode);
  thread_local std::vector<uint8_t> tables;
  thread_local std::vector<float> stats;  // [tscale (m*G) | xsum (m*G)]
  tables.resize(size_t(m) * tsh.bytes_per_token());
  stats.resize(size_t(2 * m * tsh.groups));
  build_tables_mt(tsh, x, norm_w, eps, tables.data(), stats.data(),
                  stats.data() + m * tsh.groups, n_threads, pre);
  lut_gemm_multi(pws, ys, count, tsh, tables.data(), stats.data(), stats.data() + m * tsh.groups,
                 n_threads, isa);
}

}  // namespace luthier
