// decoder.h: the native forward pass of a decoder-only transformer (Llama, Qwen2/3,
// Gemma 3) over LUT linear layers: no Python per layer. It mirrors, operation for
// operation, src/luthier/models/transformer.py, which is its test oracle.
//
// Activations are float32 [m, dim] row-major (m = tokens of this call). The KV cache holds
// n_seq sequences ("slots"), each [layers][ctx][kv_heads][head_dim] for K and for V, in
// float32 or fp16 (kv_f16).
// A call's rows may belong to different slots at different positions (continuous batching:
// one decode token per running sequence goes through every linear layer as one m > 1 LUT
// matmul). The cache is reserved with mmap and touched lazily, and release(slot) hands a
// finished sequence's pages back to the OS, so resident KV memory follows the live tokens.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "../lut_matmul.h"

namespace luthier {

struct Linear {  // a LUT weight, an int8 one (int8_gemm.h), or a float one [n, k]
  PackedRef lut{};
  bool is_lut = false;
  const float* f = nullptr;
  int64_t n = 0, k = 0;
  const int8_t* q8 = nullptr;  // int8 panels [ceil(n / 8), int8_kp(k) / 4, 8, 4] (int8_gemm.h)
  const uint16_t* q8_scale = nullptr;  // fp16 [ceil(n / 8), int8_kp(k) / 32, 8]
  // act-order (GPTQ g_idx) imports: y = x[:, perm] @ w.T; groups are contiguous in the
  // permuted order. Linears given the same perm array share one gather and table build.
  const int32_t* perm = nullptr;  // [k] or null
};

struct LayerWeights {
  Linear q, k, v, o, gate, up, down;
  const float* attn_norm = nullptr;
  const float* ffn_norm = nullptr;
  const float* post_attn_norm = nullptr;  // gemma "sandwich" norms (may be null)
  const float* post_ffn_norm = nullptr;
  const float* q_norm = nullptr;  // over head_dim (qwen3, gemma3; may be null)
  const float* k_norm = nullptr;
  const float *bq = nullptr, *bk = nullptr, *bv = nullptr, *bo = nullptr;  // biases
  const float* inv_freq = nullptr;  // [n_rot / 2]
  bool sliding = false;
};

struct DecoderConfig {
  int64_t dim = 0, n_layers = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0, ffn_dim = 0;
  int64_t vocab = 0, n_rot = 0, ctx = 0, sliding_window = 0;
  float norm_eps = 1e-6f, attn_scale = 0.f, embed_scale = 1.f;
  float attn_softcap = 0.f, final_softcap = 0.f;
  bool neox = true;  // RoPE halves (neox) or interleaved pairs
  bool gelu = false;  // GeGLU (gelu tanh) instead of SwiGLU
  TableMode mode = TableMode::kExact;
  int64_t n_seq = 1;  // KV slots (sequences decoded together)
  bool kv_f16 = false;  // the KV cache in fp16 (half the memory and the attention reads)
};

class Decoder {
 public:
  Decoder(const DecoderConfig& cfg, int n_threads);
  ~Decoder();
  Decoder(const Decoder&) = delete;
  Decoder& operator=(const Decoder&) = delete;
  DecoderConfig cfg;
  std::vector<LayerWeights> layers;
  const float* embd_f32 = nullptr;     // [vocab, dim], or
  const uint16_t* embd_f16 = nullptr;  // fp16 [vocab, dim], or
  const int8_t* embd_q8 = nullptr;     // int8 panels of [vocab, dim] (int8_gemm.h) with
  const uint16_t* embd_q8_s = nullptr; // their fp16 scales: a tied int8 head's own arrays
  const float* out_norm = nullptr;
  Linear head;
  int n_threads;

  // Runs tokens[0..m) of sequence `slot` at positions [pos, pos + m); writes logits of the
  // last token (or of all m when all_logits) into `logits` [1 or m, vocab]. Throws on a
  // full cache.
  void forward(const int32_t* tokens, int64_t m, int64_t pos, float* logits, bool all_logits,
               int64_t slot = 0);
  // Row i is token tokens[i] of sequence slots[i] at position positions[i]. Within a call
  // the rows of one slot are consecutive positions, the first at most that slot's length.
  // Logits of rows out_rows[0..n_out) go to `logits` [n_out, vocab]; with `hidden`, their
  // final-normed hidden states instead, [n_out, dim] (embeddings: the head is skipped).
  void forward_batch(const int32_t* tokens, const int32_t* slots, const int32_t* positions,
                     int64_t m, const int32_t* out_rows, int64_t n_out, float* logits,
                     bool hidden = false);
  void reset_cache();
  void release(int64_t slot);  // forget a sequence and return its KV pages to the OS
  // dst's cache becomes the first n positions of src's (a shared prompt prefix fed once)
  void copy_prefix(int64_t src, int64_t dst, int64_t n);
  // nanoseconds spent, summed over calls: [0] whole forward, [1] linear layers (tables +
  // LUT matmul, and the per-row work run inside their table builds: residual adds, the
  // gated activation, the merge of attention chunks), [2] attention (with the q/k/v bias,
  // norm, RoPE and KV write), [3] the rest (embeddings, the last residual, copies)
  double prof_ns[4] = {0, 0, 0, 0};
  int64_t length(int64_t slot = 0) const { return lengths_.at(size_t(slot)); }

 private:
  // pre: per-row work on x that must come first (see RowFn), fused into the table build
  void linear(const Linear& w, const float* x, int64_t m, float* y, const float* norm_w,
              const RowFn* pre = nullptr);
  void linears(const Linear* const* ws, float* const* ys, int count, const float* x, int64_t m,
               const float* norm_w, const RowFn* pre = nullptr);
  // pre(i): row i's q/k/v epilogue, before any attention reads the cache it writes;
  // distinct: no two rows share a slot. The chunks' partial results go to att_stats_ and
  // att_vals_; attention_combine(i, att) merges row i's.
  void attention(int layer, const float* q, int64_t m, const RowFn& pre, bool distinct);
  void attention_combine(int64_t i, float* att) const;
  void linear_impl(const Linear& w, const float* x, int64_t m, float* y, const float* norm_w,
                   const RowFn* pre);
  const float* gather(const int32_t* perm, const float* x, int64_t m, int64_t k, const float* norm_w);
  void attention_impl(int layer, const float* q, int64_t m, const RowFn& pre, bool distinct);
  // [ctx, kv_heads, head_dim] of float or fp16 bits (cfg.kv_f16)
  char* k_cache(int64_t slot, int64_t layer) const;
  char* v_cache(int64_t slot, int64_t layer) const;
  char* kv_ = nullptr;  // [n_seq][K, V][layers][ctx][kv_heads][head_dim], mmap-reserved
  size_t kv_bytes_ = 0;
  size_t kv_es_ = 4;  // bytes per cached value
  int64_t slot_floats_ = 0;  // values of one slot's K (= of its V)
  std::vector<int64_t> lengths_;  // cached tokens per slot
  // scratch, grown to the largest m seen: no allocation per decode step after the first
  std::vector<float> x_, h_, q_, k_, v_, att_, o_, g_, u_, sc_, xo_, xp_;
  std::vector<int32_t> slots_, pos_;  // per row of the current call
  // attention tasks: row, chunk of kAttnChunk keys, kv heads [kv0, kv1); per row its first
  // key and its first chunk's index in att_stats_ [chunks][heads][max score, sum of exp]
  // and att_vals_ [chunks][heads][head_dim] (exp-weighted value sums)
  static constexpr int64_t kAttnChunk = 256;
  struct AttnTask { int32_t row, chunk, kv0, kv1; };
  std::vector<AttnTask> att_tasks_;
  std::vector<int64_t> att_begin_, att_chunk0_;
  std::vector<int> att_ready_;  // per row: its q/k/v epilogue is done (atomic builtins)
  std::vector<float> att_stats_, att_vals_;
  const float* rope_src_[2] = {nullptr, nullptr};  // inv_freq the tables below were made for
  std::vector<float> rope_cs_[2];
};

}  // namespace luthier
