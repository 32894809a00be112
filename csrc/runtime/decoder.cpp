// decoder.cpp: see decoder.h. Each step mirrors models/transformer.py.
#include "decoder.h"

#include "vec_ops.h"
#include "../dispatch.h"
#include "../int8_gemm.h"
#include "../thread_pool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>

#if defined(__linux__) || defined(__APPLE__)
#include <sys/mman.h>
#define LUTHIER_MMAP 1
#endif

namespace luthier {
namespace {

using Clock = std::chrono::steady_clock;
inline double ns_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::nano>(Clock::now() - t0).count();
}

void rms_norm_rows(const float* x, int64_t m, int64_t d, const float* w, float eps, float* out) {
  for (int64_t i = 0; i < m; ++i) rms_norm_row(x + i * d, d, w, eps, out + i * d);  // row i of [m, d]
}

// RoPE in place on x [m, heads, head_dim], row i at its own position; cs holds cos, sin
// interleaved per (token, j): [m, half, 2], computed once per forward for each base.
void rope(float* x, int64_t m, int64_t heads, int64_t hd, int64_t n_rot, const float* cs,
          bool neox) {
  const int64_t half = n_rot / 2;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < half; ++j) {
      const float c = cs[(i * half + j) * 2], s = cs[(i * half + j) * 2 + 1];
      for (int64_t h = 0; h < heads; ++h) {
        float* v = x + (i * heads + h) * hd;  // [m, heads, hd] -> head vector
        float* p1 = neox ? v + j : v + 2 * j;
        float* p2 = neox ? v + j + half : v + 2 * j + 1;
        const float a1 = *p1, a2 = *p2;
        *p1 = a1 * c - a2 * s;
        *p2 = a2 * c + a1 * s;
      }
    }
  }
}

// cos/sin of pos[i] * inv_freq[j] in double, as the numpy model does: [m, half, 2]
void rope_table(const float* inv_freq, int64_t half, int64_t m, const int32_t* pos, std::vector<float>& cs) {
  cs.resize(size_t(m * half * 2));
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < half; ++j) {
      const double a = double(pos[i]) * double(inv_freq[j]);
      cs[size_t((i * half + j) * 2)] = float(std::cos(a));
      cs[size_t((i * half + j) * 2 + 1)] = float(std::sin(a));
    }
}

}  // namespace

Decoder::Decoder(const DecoderConfig& c, int threads) : cfg(c), n_threads(threads) {
  if (c.n_heads <= 0 || c.n_kv_heads <= 0 || c.n_heads % c.n_kv_heads)
    throw std::invalid_argument("n_heads must be a positive multiple of n_kv_heads");
  if (c.ctx <= 0) throw std::invalid_argument("ctx must be positive");
  if (c.n_seq <= 0) throw std::invalid_argument("n_seq must be positive");
  layers.resize(size_t(c.n_layers));
  slot_floats_ = c.n_layers * c.ctx * c.n_kv_heads * c.head_dim;
  kv_es_ = c.kv_f16 ? 2 : 4;
  kv_bytes_ = kv_es_ * size_t(slot_floats_) * 2 * size_t(c.n_seq);
#ifdef LUTHIER_MMAP
  // reserved, not touched: pages become resident as tokens are cached (zero-filled)
  void* p = mmap(nullptr, kv_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  kv_ = static_cast<char*>(p);
#else
  kv_ = static_cast<char*>(std::calloc(kv_bytes_, 1));
  if (!kv_) throw std::bad_alloc();
#endif
  lengths_.assign(size_t(c.n_seq), 0);
}

Decoder::~Decoder() {
#ifdef LUTHIER_MMAP
  munmap(kv_, kv_bytes_);
#else
  std::free(kv_);
#endif
}

// slot walk: [n_seq][K, V][layers][ctx * kv_heads * head_dim] values of kv_es_ bytes
char* Decoder::k_cache(int64_t slot, int64_t layer) const {
  return kv_ + ((size_t(slot) * 2) * size_t(slot_floats_) + size_t(layer) * (slot_floats_ / cfg.n_layers)) * kv_es_;
}
char* Decoder::v_cache(int64_t slot, int64_t layer) const {
  return k_cache(slot, layer) + size_t(slot_floats_) * kv_es_;
}

void Decoder::reset_cache() {
  for (int64_t s = 0; s < cfg.n_seq; ++s) release(s);
}

void Decoder::release(int64_t slot) {
  if (slot < 0 || slot >= cfg.n_seq) throw std::invalid_argument("slot out of range");
  lengths_[size_t(slot)] = 0;
#ifdef LUTHIER_MMAP
  // give the slot's K and V pages back (they read as zeros when touched again); the range
  // starts page-aligned only by luck, so round inward and leave the partial pages resident
  const size_t page = 4096;
  const uintptr_t b = reinterpret_cast<uintptr_t>(k_cache(slot, 0));
  const uintptr_t e = b + kv_es_ * size_t(slot_floats_) * 2;
  const uintptr_t b2 = (b + page - 1) / page * page, e2 = e / page * page;
  if (e2 > b2) madvise(reinterpret_cast<void*>(b2), e2 - b2, MADV_DONTNEED);
#endif
}

void Decoder::copy_prefix(int64_t src, int64_t dst, int64_t n) {
  if (src < 0 || src >= cfg.n_seq || dst < 0 || dst >= cfg.n_seq) throw std::invalid_argument("slot out of range");
  if (src == dst) throw std::invalid_argument("copy_prefix needs two different slots");
  if (n < 0 || n > lengths_[size_t(src)])
    throw std::invalid_argument("copy_prefix: the source slot holds fewer tokens");
  // per layer, positions [0, n) of [ctx, kv_heads, head_dim] are one contiguous run
  const size_t bytes = size_t(n) * size_t(cfg.n_kv_heads * cfg.head_dim) * kv_es_;
  for (int64_t l = 0; l < cfg.n_layers; ++l) {
    std::memcpy(k_cache(dst, l), k_cache(src, l), bytes);
    std::memcpy(v_cache(dst, l), v_cache(src, l), bytes);
  }
  lengths_[size_t(dst)] = n;
}

void Decoder::linear(const Linear& w, const float* x, int64_t m, float* y, const float* norm_w,
                     const RowFn* pre) {
  const auto t0 = Clock::now();
  linear_impl(w, x, m, y, norm_w, pre);
  prof_ns[1] += ns_since(t0);
}

// x [m, k] (RMS-normalized first when norm_w) with columns reordered: out[i, j] =
// x[i, perm[j]], into scratch xp_ [m, k]
const float* Decoder::gather(const int32_t* perm, const float* x, int64_t m, int64_t k,
                             const float* norm_w) {
  const float* src = x;
  if (norm_w) {
    h_.resize(size_t(m * k));
    rms_norm_rows(x, m, k, norm_w, cfg.norm_eps, h_.data());
    src = h_.data();
  }
  xp_.resize(size_t(m * k));
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < k; ++j) xp_[size_t(i * k + j)] = src[i * k + perm[j]];
  return xp_.data();
}

void Decoder::linear_impl(const Linear& w, const float* x, int64_t m, float* y, const float* norm_w,
                          const RowFn* pre) {
  if (w.is_lut && !w.perm) {
    lut_linear(w.lut, cfg.mode, x, m, norm_w, cfg.norm_eps, y, n_threads, "", pre);
    return;
  }
  if (pre)  // the other paths read x whole: the rows' work first
    for (int64_t i = 0; i < m; ++i) (*pre)(i);
  if (w.perm) {
    x = gather(w.perm, x, m, w.k, norm_w);
    norm_w = nullptr;
  }
  if (w.is_lut) {
    lut_linear(w.lut, cfg.mode, x, m, norm_w, cfg.norm_eps, y, n_threads, "");
    return;
  }
  if (w.q8) {
    int8_linear(w.q8, w.q8_scale, w.n, w.k, x, m, norm_w, cfg.norm_eps, y, n_threads, "");
    return;
  }
  const float* xin = x;
  if (norm_w) {  // the float path has no fused tables: normalize into scratch
    h_.resize(size_t(m * w.k));
    rms_norm_rows(x, m, w.k, norm_w, cfg.norm_eps, h_.data());
    xin = h_.data();
  }
  const int64_t chunk = 64;
  std::function<void(int64_t)> fn = [&](int64_t t) {
    const int64_t n0 = t * chunk, n1 = std::min(w.n, n0 + chunk);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t r = n0; r < n1; ++r) {
        const float* wr = w.f + r * w.k;  // row r of [n, k]
        const float* xr = xin + i * w.k;
        float acc = 0.f;
        for (int64_t j = 0; j < w.k; ++j) acc += wr[j] * xr[j];
        y[i * w.n + r] = acc;
      }
  };
  parallel_for(n_threads, (w.n + chunk - 1) / chunk, fn);
}

void Decoder::linears(const Linear* const* ws, float* const* ys, int count, const float* x,
                      int64_t m, const float* norm_w, const RowFn* pre) {
  // LUT weights with one group size share one table build and one pool job
  bool shared = count <= kMaxMulti;
  for (int i = 0; i < count; ++i)
    shared = shared && ws[i]->is_lut && ws[i]->lut.ps.group_size == ws[0]->lut.ps.group_size &&
             ws[i]->lut.ps.k == ws[0]->lut.ps.k && ws[i]->perm == ws[0]->perm;
  if (!shared || ws[0]->perm) {  // these read x whole: the rows' work first
    if (pre)
      for (int64_t i = 0; i < m; ++i) (*pre)(i);
    pre = nullptr;
  }
  if (!shared) {
    for (int i = 0; i < count; ++i) linear(*ws[i], x, m, ys[i], norm_w);
    return;
  }
  PackedRef refs[kMaxMulti];
  for (int i = 0; i < count; ++i) refs[i] = ws[i]->lut;
  const auto t0 = Clock::now();
  if (ws[0]->perm) {  // one gather for all: they take the same reordered input
    x = gather(ws[0]->perm, x, m, ws[0]->k, norm_w);
    norm_w = nullptr;
  }
  lut_linear_multi(refs, ys, count, cfg.mode, x, m, norm_w, cfg.norm_eps, n_threads, "", pre);
  prof_ns[1] += ns_since(t0);
}

void Decoder::attention(int li, const float* q, int64_t m, const RowFn& pre, bool distinct) {
  const auto t0 = Clock::now();
  attention_impl(li, q, m, pre, distinct);
  prof_ns[2] += ns_since(t0);
}

// Attention in chunks of keys (split-K, "flash decoding"): a task takes one row and
// kAttnChunk of its keys, for every head (the query heads of a kv head together: they share
// its keys and values), and leaves per head the chunk's max score, sum of exp and
// exp-weighted value sum (att_stats_, att_vals_); attention_combine merges a row's chunks
// in order. One
// row at 1500 positions is 6 tasks, where it was 9 single-head ones that each read their
// kv head's cache again. Chunks start at fixed offsets of the row's own key range, so a
// row's arithmetic never depends on its batch.
void Decoder::attention_impl(int li, const float* q, int64_t m, const RowFn& pre, bool distinct) {
  const DecoderConfig& c = cfg;
  const int64_t hd = c.head_dim, group = c.n_heads / c.n_kv_heads, nkvh = c.n_kv_heads;
  const float scale = c.attn_scale;
  const int64_t window = layers[size_t(li)].sliding ? c.sliding_window : 0;
  // per row: its first key and its first chunk's index in att_stats_ / att_vals_
  att_begin_.resize(size_t(m));
  att_chunk0_.resize(size_t(m) + 1);
  att_chunk0_[0] = 0;
  for (int64_t i = 0; i < m; ++i) {
    const int64_t p = pos_[size_t(i)];
    const int64_t begin = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
    att_begin_[size_t(i)] = begin;
    att_chunk0_[size_t(i) + 1] = att_chunk0_[size_t(i)] + (p + 1 - begin + kAttnChunk - 1) / kAttnChunk;
  }
  const int64_t n_chunks = att_chunk0_[size_t(m)];
  // a task per (row, chunk) for all kv heads; with too few of them to keep the threads busy
  // (one row at a short context), a task per kv head (a head's arithmetic is the same)
  const int32_t kv_per = n_chunks < 2 * n_threads ? 1 : int32_t(nkvh);
  att_tasks_.clear();
  for (int64_t i = 0; i < m; ++i)
    for (int64_t ch = 0; ch < att_chunk0_[size_t(i) + 1] - att_chunk0_[size_t(i)]; ++ch)
      for (int32_t h = 0; h < int32_t(nkvh); h += kv_per)
        att_tasks_.push_back({int32_t(i), int32_t(ch), h, h + kv_per});
  att_stats_.resize(size_t(n_chunks * c.n_heads * 2));
  att_vals_.resize(size_t(n_chunks * c.n_heads * hd));
#if defined(LUTHIER_X86)
  static const bool avx512 = is_avx512_isa(active_isa());
#else
  constexpr bool avx512 = false;
#endif
  // the AVX-512 fp16 path converts each key and value once for the group's heads
  const bool grouped = avx512 && c.kv_f16 && hd % 16 == 0 && hd <= 256;
  // The row epilogues (pre) come before any attention reads the cache they write. Rows with
  // slots of their own (decode batches): row i's first chunk task runs pre(i), its other
  // chunks wait for that row alone. Rows sharing a slot (prompt chunks): pre of every row
  // as the job's first tasks, which the attention tasks wait for. One row: pre first.
  const bool threaded = m > 1 && n_threads > 1;
  const bool per_row = threaded && distinct;
  const int64_t n_pre = threaded && !distinct ? m : 0;
  if (!threaded)
    for (int64_t i = 0; i < m; ++i) pre(i);
  att_ready_.assign(size_t(m), 0);
  int* ready = att_ready_.data();  // [m]: row i's pre done (per_row), read with __atomic
  std::atomic<int64_t> pre_done{0};
  const AttnTask* tasks = att_tasks_.data();  // the lambda runs on the workers too
  // the waits below: tasks are taken in order, so what a task waits for was taken before it
  // and is running on another thread
  std::function<void(int64_t)> fn = [&](int64_t task) {
    if (task < n_pre) {
      pre(task);
      pre_done.fetch_add(1, std::memory_order_release);
      return;
    }
    spin_until([&] { return pre_done.load(std::memory_order_acquire) >= n_pre; });
    const AttnTask& tk = tasks[task - n_pre];
    if (per_row) {
      if (tk.chunk == 0 && tk.kv0 == 0) {  // the row's first task
        pre(tk.row);
        __atomic_store_n(ready + tk.row, 1, __ATOMIC_RELEASE);
      } else {
        spin_until([&] { return __atomic_load_n(ready + tk.row, __ATOMIC_ACQUIRE) != 0; });
      }
    }
    const int64_t i = tk.row;
    const int64_t p = pos_[size_t(i)];
    const int64_t t0 = att_begin_[size_t(i)] + int64_t(tk.chunk) * kAttnChunk;
    const int64_t nk = std::min<int64_t>(kAttnChunk, p + 1 - t0);
    const int64_t stride = nkvh * hd;  // cache [ctx, kv, hd]: key t at t * stride
    const char* K = k_cache(slots_[size_t(i)], li);
    const char* V = v_cache(slots_[size_t(i)], li);
    thread_local std::vector<float> sc;
    sc.resize(size_t(group * nk));  // [group][nk]
    // every kv head of the chunk in one task: the cache interleaves them ([t][kv][hd]), so
    // the lines one head's pass brings in hold the next heads' keys, in this core's L2
    for (int64_t kvh = tk.kv0; kvh < tk.kv1; ++kvh) {
      const size_t koff = size_t(t0 * stride + kvh * hd);  // key t0, this kv head
      const int64_t h0 = kvh * group;  // the kv head's query heads h0 .. h0 + group - 1
      const float* qv = q + (i * c.n_heads + h0) * hd;  // [m, heads, hd]
      // this chunk's heads h0.. in att_stats_ [chunks][heads][max, sum of exp] and
      // att_vals_ [chunks][heads][hd] (the exp-weighted value sums)
      const int64_t ph = (att_chunk0_[size_t(i)] + tk.chunk) * c.n_heads + h0;
      float* st = att_stats_.data() + ph * 2;
      float* ov = att_vals_.data() + ph * hd;
      const int64_t gg = grouped ? group : 1;  // heads per kernel call
      for (int64_t j0 = 0; j0 < group; j0 += gg) {
        float* sj0 = sc.data() + j0 * nk;
#if defined(LUTHIER_X86)
        if (grouped)
          scores_group_f16_avx512(qv, int(gg), reinterpret_cast<const uint16_t*>(K) + koff, stride, nk,
                                  hd, scale, sj0, nk);
        else
#endif
        if (c.kv_f16)
          scores_f16(qv + j0 * hd, reinterpret_cast<const uint16_t*>(K) + koff, stride, nk, hd, scale, sj0);
        else
          scores(qv + j0 * hd, reinterpret_cast<const float*>(K) + koff, stride, nk, hd, scale, sj0);
      }
      for (int64_t j = 0; j < group; ++j) {  // exp of each head's scores, shifted by their max
        float* sj = sc.data() + j * nk;
        float mx = -INFINITY;
        for (int64_t t = 0; t < nk; ++t) {
          if (c.attn_softcap > 0.f) sj[t] = c.attn_softcap * std::tanh(sj[t] / c.attn_softcap);
          mx = std::max(mx, sj[t]);
        }
        st[j * 2] = mx;
        st[j * 2 + 1] = exp_shift_sum(sj, nk, mx);
      }
      for (int64_t j0 = 0; j0 < group; j0 += gg) {  // exp-weighted value sums [group][hd]
#if defined(LUTHIER_X86)
        if (grouped)
          wsum_group_f16_avx512(sc.data(), nk, int(gg), reinterpret_cast<const uint16_t*>(V) + koff,
                                stride, nk, hd, ov);
        else
#endif
        if (c.kv_f16)
          weighted_sum_f16(sc.data() + j0 * nk, reinterpret_cast<const uint16_t*>(V) + koff, stride, nk, hd,
                           ov + j0 * hd);
        else
          weighted_sum(sc.data() + j0 * nk, reinterpret_cast<const float*>(V) + koff, stride, nk, hd,
                       ov + j0 * hd);
      }
    }
  };
  parallel_for(n_threads, n_pre + int64_t(att_tasks_.size()), fn);
}

// Row i's attention output att [heads, hd] from its chunks in order:
// out = sum_c e^(m_c - M) o_c / sum_c e^(m_c - M) l_c, M = max_c m_c
void Decoder::attention_combine(int64_t i, float* att) const {
  const DecoderConfig& c = cfg;
  const int64_t hd = c.head_dim, nh = c.n_heads;
  const int64_t c0 = att_chunk0_[size_t(i)], nc = att_chunk0_[size_t(i) + 1] - c0;
  for (int64_t h = 0; h < nh; ++h) {
    const float* st = att_stats_.data() + (c0 * nh + h) * 2;  // chunk ch of head h: st[ch * nh * 2]
    const float* ov = att_vals_.data() + (c0 * nh + h) * hd;  // and ov[ch * nh * hd]
    float* out = att + (i * nh + h) * hd;  // [m, heads, hd]
    float mx = -INFINITY;
    for (int64_t ch = 0; ch < nc; ++ch) mx = std::max(mx, st[ch * nh * 2]);
    float l = 0.f;
    for (int64_t d = 0; d < hd; ++d) out[d] = 0.f;
    for (int64_t ch = 0; ch < nc; ++ch) {
      const float w = std::exp(st[ch * nh * 2] - mx);  // 1 for the chunk holding the max
      l += w * st[ch * nh * 2 + 1];
      for (int64_t d = 0; d < hd; ++d) out[d] += w * ov[ch * nh * hd + d];
    }
    const float inv = 1.f / l;
    for (int64_t d = 0; d < hd; ++d) out[d] *= inv;
  }
}

void Decoder::forward(const int32_t* tokens, int64_t m, int64_t pos, float* logits,
                      bool all_logits, int64_t slot) {
  if (m <= 0) throw std::invalid_argument("forward needs at least one token");
  if (pos >= 0 && pos + m > cfg.ctx)
    throw std::invalid_argument("context full: " + std::to_string(pos + m) + " tokens > ctx " +
                                std::to_string(cfg.ctx));
  std::vector<int32_t> sl(static_cast<size_t>(m), int32_t(slot)), ps(static_cast<size_t>(m)), rows;
  for (int64_t i = 0; i < m; ++i) ps[size_t(i)] = int32_t(pos + i);
  for (int64_t i = all_logits ? 0 : m - 1; i < m; ++i) rows.push_back(int32_t(i));
  forward_batch(tokens, sl.data(), ps.data(), m, rows.data(), int64_t(rows.size()), logits);
}

void Decoder::forward_batch(const int32_t* tokens, const int32_t* slots, const int32_t* positions,
                            int64_t m, const int32_t* out_rows, int64_t n_out, float* logits,
                            bool hidden) {
  const DecoderConfig& c = cfg;
  const auto t_start = Clock::now();
  const double inner0 = prof_ns[1] + prof_ns[2];
  if (m <= 0) throw std::invalid_argument("forward needs at least one token");
  // validate every row before touching the cache: a bad call changes nothing
  std::vector<int64_t> next(size_t(c.n_seq), -1);  // next position each slot may take
  bool distinct = true;  // no two rows share a slot
  for (int64_t i = 0; i < m; ++i) {
    if (tokens[i] < 0 || tokens[i] >= c.vocab) throw std::invalid_argument("token id out of range");
    const int64_t s = slots[i], p = positions[i];
    if (s < 0 || s >= c.n_seq) throw std::invalid_argument("slot out of range");
    if (p >= c.ctx)
      throw std::invalid_argument("context full: " + std::to_string(p + 1) + " tokens > ctx " +
                                  std::to_string(c.ctx));
    const int64_t want = next[size_t(s)];
    distinct = distinct && want < 0;
    if (p < 0 || (want < 0 ? p > lengths_[size_t(s)] : p != want))
      throw std::invalid_argument("position past the cached tokens");
    next[size_t(s)] = p + 1;
  }
  for (int64_t r = 0; r < n_out; ++r)
    if (out_rows[r] < 0 || out_rows[r] >= m) throw std::invalid_argument("logit row out of range");
  slots_.assign(slots, slots + m);
  pos_.assign(positions, positions + m);
  const int64_t d = c.dim, hd = c.head_dim, nq = c.n_heads * hd, nkv = c.n_kv_heads * hd;
  x_.resize(size_t(m * d));
  q_.resize(size_t(m * nq));
  k_.resize(size_t(m * nkv));
  v_.resize(size_t(m * nkv));
  att_.resize(size_t(m * nq));
  o_.resize(size_t(m * d));
  g_.resize(size_t(m * c.ffn_dim));
  u_.resize(size_t(m * c.ffn_dim));
  rope_src_[0] = rope_src_[1] = nullptr;  // RoPE tables are per forward (positions)
  // 1. embeddings [m, dim]
  for (int64_t i = 0; i < m; ++i) {
    float* xr = x_.data() + i * d;
    const int64_t t = tokens[i];
    if (embd_q8) {  // row t of the int8 panels (int8_gemm.h)
      int8_dequantize_row(embd_q8, embd_q8_s, d, t, c.embed_scale, xr);
      continue;
    }
    for (int64_t j = 0; j < d; ++j)
      xr[j] = (embd_f32 ? embd_f32[t * d + j] : half_to_float(embd_f16[t * d + j])) * c.embed_scale;
  }
  // Per-row work between the pool jobs runs inside them (RowFn): the residual add before the
  // next table build, the activation before the down projection's, the merge of a row's
  // attention chunks before the o projection's, and the q/k/v epilogue (bias, q/k norm,
  // RoPE, cache write) in the attention job. Single-threaded, these passes left the other
  // thread idle (~1.9 of a ~25 ms 16-row SmolLM2 step).
  RowFn residual;  // the pending residual add (null before the first layer)
  for (int64_t li = 0; li < c.n_layers; ++li) {
    const LayerWeights& L = layers[size_t(li)];
    // 2. attention: RMSNorm fused into the tables of q, k, v
    {
      const Linear* ws[3] = {&L.q, &L.k, &L.v};
      float* ys[3] = {q_.data(), k_.data(), v_.data()};
      linears(ws, ys, 3, x_.data(), m, L.attn_norm, residual ? &residual : nullptr);
    }
    // cos/sin per RoPE base (gemma3 has two), computed once per forward
    if (L.inv_freq != rope_src_[0] && L.inv_freq != rope_src_[1]) {
      const int slot = rope_src_[0] == nullptr ? 0 : 1;  // a third base would reuse slot 1
      rope_src_[slot] = L.inv_freq;
      rope_table(L.inv_freq, c.n_rot / 2, m, pos_.data(), rope_cs_[slot]);
    }
    const float* csr = (L.inv_freq == rope_src_[0] ? rope_cs_[0] : rope_cs_[1]).data();
    const RowFn qkv_epilogue = [&, li, csr](int64_t i) {
      float* q = q_.data() + i * nq;  // row i of [m, heads, hd]
      float* k = k_.data() + i * nkv;  // row i of [m, kv_heads, hd]
      float* v = v_.data() + i * nkv;
      for (int64_t j = 0; L.bq && j < nq; ++j) q[j] += L.bq[j];
      for (int64_t j = 0; L.bk && j < nkv; ++j) k[j] += L.bk[j];
      for (int64_t j = 0; L.bv && j < nkv; ++j) v[j] += L.bv[j];
      if (L.q_norm) {  // per head over head_dim
        rms_norm_rows(q, c.n_heads, hd, L.q_norm, c.norm_eps, q);
        rms_norm_rows(k, c.n_kv_heads, hd, L.k_norm, c.norm_eps, k);
      }
      const float* cs = csr + i * (c.n_rot / 2) * 2;  // row i of [m, half, 2]
      rope(q, 1, c.n_heads, hd, c.n_rot, cs, c.neox);
      rope(k, 1, c.n_kv_heads, hd, c.n_rot, cs, c.neox);
      // to its slot's cache at its position: [ctx, kv, hd] row pos_[i]
      const size_t off = size_t(pos_[size_t(i)]) * nkv * kv_es_;
      char* kd = k_cache(slots_[size_t(i)], li) + off;
      char* vd = v_cache(slots_[size_t(i)], li) + off;
      if (c.kv_f16) {
        to_half(k, reinterpret_cast<uint16_t*>(kd), nkv);
        to_half(v, reinterpret_cast<uint16_t*>(vd), nkv);
      } else {
        std::memcpy(kd, k, sizeof(float) * nkv);
        std::memcpy(vd, v, sizeof(float) * nkv);
      }
    };
    attention(int(li), q_.data(), m, qkv_epilogue, distinct);
    // row i's attention output from its chunks, before the o projection's tables
    const RowFn combine = [&](int64_t i) { attention_combine(i, att_.data()); };
    linear(L.o, att_.data(), m, o_.data(), nullptr, &combine);
    // x += post_attn_norm(o + bo), row by row, before the feed-forward's tables
    const RowFn attn_residual = [&](int64_t i) {
      float* o = o_.data() + i * d;  // row i of [m, d]
      float* x = x_.data() + i * d;
      for (int64_t j = 0; L.bo && j < d; ++j) o[j] += L.bo[j];
      if (L.post_attn_norm) rms_norm_row(o, d, L.post_attn_norm, c.norm_eps, o);
      for (int64_t j = 0; j < d; ++j) x[j] += o[j];
    };
    // 3. feed-forward: gate and up share the fused-norm input
    {
      const Linear* ws[2] = {&L.gate, &L.up};
      float* ys[2] = {g_.data(), u_.data()};
      linears(ws, ys, 2, x_.data(), m, L.ffn_norm, &attn_residual);
    }
    // the gated activation of row i, [m, ffn] -> g_ in place, before the down projection's
    const int64_t f = c.ffn_dim;
    const RowFn act = [&](int64_t i) {
      if (c.gelu) gelu_mul(g_.data() + i * f, u_.data() + i * f, f);
      else silu_mul(g_.data() + i * f, u_.data() + i * f, f);
    };
    linear(L.down, g_.data(), m, o_.data(), nullptr, &act);
    // x += post_ffn_norm(o): before the next layer's tables (after the last, below)
    const float* pfn = L.post_ffn_norm;
    residual = [this, pfn, d, eps = c.norm_eps](int64_t i) {
      float* o = o_.data() + i * d;  // row i of [m, d]
      float* x = x_.data() + i * d;
      if (pfn) rms_norm_row(o, d, pfn, eps, o);
      for (int64_t j = 0; j < d; ++j) x[j] += o[j];
    };
  }
  if (residual)
    for (int64_t i = 0; i < m; ++i) residual(i);
  for (int64_t i = 0; i < m; ++i) lengths_[size_t(slots_[size_t(i)])] = pos_[size_t(i)] + 1;
  // 4. head on the rows asked for: final norm fused into its tables. xo_ [n_out, dim]
  xo_.resize(size_t(n_out * d));
  for (int64_t r = 0; r < n_out; ++r)
    std::memcpy(xo_.data() + r * d, x_.data() + int64_t(out_rows[r]) * d, sizeof(float) * d);
  if (hidden) {  // the final norm's output is the hidden state a head would read
    if (n_out > 0) rms_norm_rows(xo_.data(), n_out, d, out_norm, c.norm_eps, logits);
  } else if (n_out > 0) {
    linear(head, xo_.data(), n_out, logits, out_norm);
  }
  if (!hidden && c.final_softcap > 0.f)
    for (int64_t i = 0; i < n_out * c.vocab; ++i)
      logits[i] = c.final_softcap * std::tanh(logits[i] / c.final_softcap);
  const double total = ns_since(t_start);
  prof_ns[0] += total;
  prof_ns[3] += total - (prof_ns[1] + prof_ns[2] - inner0);
}

}  // namespace luthier
