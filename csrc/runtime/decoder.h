// decoder.h: the native forward pass of a decoder-only transformer (Llama, Qwen2/3,
// Gemma 3) over LUT linear layers: no Python per layer. It mirrors, operation for
// operation, src/luthier/models/transformer.py, which is its test oracle.
//
// Activations are float32 [m, dim] row-major (m = tokens of this call). The KV cache is
// float32 [layers][ctx][kv_heads][head_dim] for K and for V.
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
  const int8_t* q8 = nullptr;  // [n, int8_kp(k)]
  const uint16_t* q8_scale = nullptr;  // fp16 [n, int8_kp(k) / 32]
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
};

class Decoder {
 public:
  Decoder(const DecoderConfig& cfg, int n_threads);
  DecoderConfig cfg;
  std::vector<LayerWeights> layers;
  const float* embd_f32 = nullptr;     // [vocab, dim], or
  const uint16_t* embd_f16 = nullptr;  // fp16 [vocab, dim]
  const float* out_norm = nullptr;
  Linear head;
  int n_threads;

  // Runs tokens[0..m) at positions [pos, pos + m); writes logits of the last token (or of
  // all m when all_logits) into `logits` [1 or m, vocab]. Throws on a full cache.
  void forward(const int32_t* tokens, int64_t m, int64_t pos, float* logits, bool all_logits);
  void reset_cache() { length_ = 0; }
  // nanoseconds spent, summed over calls: [0] whole forward, [1] linear layers (tables +
  // LUT matmul), [2] attention, [3] the rest (norms, RoPE, activations, residuals)
  double prof_ns[4] = {0, 0, 0, 0};
  int64_t length() const { return length_; }

 private:
  void linear(const Linear& w, const float* x, int64_t m, float* y, const float* norm_w);
  void linears(const Linear* const* ws, float* const* ys, int count, const float* x, int64_t m,
               const float* norm_w);
  void attention(int layer, const float* q, int64_t m, int64_t pos, float* out);
  void linear_impl(const Linear& w, const float* x, int64_t m, float* y, const float* norm_w);
  void attention_impl(int layer, const float* q, int64_t m, int64_t pos, float* out);
  std::vector<float> kc_, vc_;  // KV cache
  int64_t length_ = 0;
  // scratch, grown to the largest m seen: no allocation per decode step after the first
  std::vector<float> x_, h_, q_, k_, v_, att_, o_, g_, u_, sc_;
  const float* rope_src_[2] = {nullptr, nullptr};  // inv_freq the tables below were made for
  std::vector<float> rope_cs_[2];
};

}  // namespace luthier
