// bindings_runtime.cpp: nanobind glue for the native decoder (csrc/runtime/decoder.h).
// The Python object keeps every array it was given alive; the decoder only borrows them.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "int8_gemm.h"
#include "runtime/decoder.h"

namespace nb = nanobind;
using namespace luthier;

namespace {

template <typename T, typename... Extra>
using Arr = nb::ndarray<T, nb::c_contig, nb::device::cpu, Extra...>;

struct PyDecoder {
  std::unique_ptr<Decoder> dec;
  std::vector<nb::object> keep;  // arrays the decoder borrows

  LayerWeights& layer(int i) {
    if (i < 0 || i >= int(dec->layers.size())) throw std::invalid_argument("layer index out of range");
    return dec->layers[size_t(i)];
  }
  Linear* linear_slot(int li, const std::string& name) {
    if (li == -1 && name == "head") return &dec->head;
    LayerWeights& L = layer(li);
    if (name == "q") return &L.q;
    if (name == "k") return &L.k;
    if (name == "v") return &L.v;
    if (name == "o") return &L.o;
    if (name == "gate") return &L.gate;
    if (name == "up") return &L.up;
    if (name == "down") return &L.down;
    throw std::invalid_argument("unknown linear '" + name + "'");
  }
  const float** vector_slot(int li, const std::string& name) {
    if (li == -1 && name == "out_norm") return &dec->out_norm;
    LayerWeights& L = layer(li);
    if (name == "attn_norm") return &L.attn_norm;
    if (name == "ffn_norm") return &L.ffn_norm;
    if (name == "post_attn_norm") return &L.post_attn_norm;
    if (name == "post_ffn_norm") return &L.post_ffn_norm;
    if (name == "q_norm") return &L.q_norm;
    if (name == "k_norm") return &L.k_norm;
    if (name == "bq") return &L.bq;
    if (name == "bk") return &L.bk;
    if (name == "bv") return &L.bv;
    if (name == "bo") return &L.bo;
    if (name == "inv_freq") return &L.inv_freq;
    throw std::invalid_argument("unknown vector '" + name + "'");
  }
  int64_t vector_len(int li, const std::string& name) const {
    const DecoderConfig& c = dec->cfg;
    if (name == "out_norm" || name == "attn_norm" || name == "ffn_norm" || name == "post_attn_norm" ||
        name == "post_ffn_norm" || name == "bo")
      return c.dim;
    if (name == "q_norm" || name == "k_norm") return c.head_dim;
    if (name == "bq") return c.n_heads * c.head_dim;
    if (name == "bk" || name == "bv") return c.n_kv_heads * c.head_dim;
    if (name == "inv_freq") return c.n_rot / 2;
    return -1;
  }
};

}  // namespace

void bind_runtime(nb::module_& m) {
  nb::class_<PyDecoder>(m, "Decoder")
      .def("__init__", [](PyDecoder* self, int64_t dim, int64_t n_layers, int64_t n_heads, int64_t n_kv_heads,
                          int64_t head_dim, int64_t ffn_dim, int64_t vocab, int64_t n_rot, int64_t ctx,
                          int64_t sliding_window, float norm_eps, float attn_scale, float embed_scale,
                          float attn_softcap, float final_softcap, bool neox, bool gelu,
                          const std::string& mode, int n_threads, int64_t n_seq, const std::string& kv) {
             DecoderConfig c;
             c.dim = dim; c.n_layers = n_layers; c.n_heads = n_heads; c.n_kv_heads = n_kv_heads;
             c.head_dim = head_dim; c.ffn_dim = ffn_dim; c.vocab = vocab; c.n_rot = n_rot; c.ctx = ctx;
             c.sliding_window = sliding_window; c.norm_eps = norm_eps; c.attn_scale = attn_scale;
             c.embed_scale = embed_scale; c.attn_softcap = attn_softcap; c.final_softcap = final_softcap;
             c.neox = neox; c.gelu = gelu; c.n_seq = n_seq;
             if (kv != "f32" && kv != "f16") throw std::invalid_argument("kv must be 'f32' or 'f16'");
             c.kv_f16 = kv == "f16";
             if (mode != "exact" && mode != "fast") throw std::invalid_argument("mode must be 'exact' or 'fast'");
             c.mode = mode == "exact" ? TableMode::kExact : TableMode::kFast;
             if (n_rot % 2 || n_rot > head_dim) throw std::invalid_argument("n_rot must be even and <= head_dim");
             new (self) PyDecoder{std::make_unique<Decoder>(c, n_threads), {}};
           },
           nb::arg("dim"), nb::arg("n_layers"), nb::arg("n_heads"), nb::arg("n_kv_heads"), nb::arg("head_dim"),
           nb::arg("ffn_dim"), nb::arg("vocab"), nb::arg("n_rot"), nb::arg("ctx"), nb::arg("sliding_window"),
           nb::arg("norm_eps"), nb::arg("attn_scale"), nb::arg("embed_scale"), nb::arg("attn_softcap"),
           nb::arg("final_softcap"), nb::arg("neox"), nb::arg("gelu"), nb::arg("mode"), nb::arg("n_threads"),
           nb::arg("n_seq") = 1, nb::arg("kv") = "f32")
      .def("set_lut", [](PyDecoder& self, int li, const std::string& name, int64_t n, int64_t k, int bits,
                         int group_size, Arr<const uint8_t, nb::ndim<1>> w, Arr<const uint16_t, nb::ndim<1>> s,
                         std::optional<Arr<const uint16_t, nb::ndim<1>>> z, float zero_const) {
             const PackedShape ps = packed_shape(n, k, bits, group_size);
             if (int64_t(w.shape(0)) != int64_t(ps.weight_bytes()) || int64_t(s.shape(0)) != int64_t(ps.scale_count()) ||
                 (z && int64_t(z->shape(0)) != int64_t(ps.scale_count())))
               throw std::invalid_argument("packed arrays do not match the shape");
             Linear* L = self.linear_slot(li, name);
             *L = Linear{PackedRef{ps, w.data(), s.data(), z ? z->data() : nullptr, zero_const}, true, nullptr, n, k};
             self.keep.push_back(nb::cast(w));
             self.keep.push_back(nb::cast(s));
             if (z) self.keep.push_back(nb::cast(*z));
           }, nb::arg("layer"), nb::arg("name"), nb::arg("n"), nb::arg("k"), nb::arg("bits"), nb::arg("group_size"),
           nb::arg("w").noconvert(), nb::arg("s").noconvert(), nb::arg("z").noconvert().none(), nb::arg("zero_const"))
      .def("set_float", [](PyDecoder& self, int li, const std::string& name, Arr<const float, nb::ndim<2>> w) {
             Linear* L = self.linear_slot(li, name);
             *L = Linear{PackedRef{}, false, w.data(), int64_t(w.shape(0)), int64_t(w.shape(1))};
             self.keep.push_back(nb::cast(w));
           }, nb::arg("layer"), nb::arg("name"), nb::arg("w").noconvert())
      .def("set_int8", [](PyDecoder& self, int li, const std::string& name, int64_t n, int64_t k,
                          Arr<const int8_t, nb::ndim<2>> w, Arr<const uint16_t, nb::ndim<2>> scale) {
             check_int8_panels(n, k, int64_t(w.shape(0)), int64_t(w.shape(1)), int64_t(scale.shape(0)),
                               int64_t(scale.shape(1)));
             Linear* L = self.linear_slot(li, name);
             Linear q;
             q.n = n;
             q.k = k;
             q.q8 = w.data();
             q.q8_scale = scale.data();
             *L = q;
             self.keep.push_back(nb::cast(w));
             self.keep.push_back(nb::cast(scale));
           }, nb::arg("layer"), nb::arg("name"), nb::arg("n"), nb::arg("k"), nb::arg("w").noconvert(),
           nb::arg("scale").noconvert(), "int8 weights in panels (int8_gemm.h)")
      .def("set_perm", [](PyDecoder& self, int li, const std::string& name, Arr<const int32_t, nb::ndim<1>> perm) {
             Linear* L = self.linear_slot(li, name);
             if (int64_t(perm.shape(0)) != L->k || L->k == 0)
               throw std::invalid_argument("perm must have length k (set the weight first)");
             std::vector<char> seen(size_t(L->k), 0);
             for (int64_t j = 0; j < L->k; ++j) {
               const int32_t v = perm.data()[j];
               if (v < 0 || v >= L->k || seen[size_t(v)]) throw std::invalid_argument("perm is not a permutation of range(k)");
               seen[size_t(v)] = 1;
             }
             L->perm = perm.data();
             self.keep.push_back(nb::cast(perm));
           }, nb::arg("layer"), nb::arg("name"), nb::arg("perm").noconvert(),
           "input column order of an act-order linear: y = x[:, perm] @ w.T")
      .def("set_vector", [](PyDecoder& self, int li, const std::string& name, Arr<const float, nb::ndim<1>> v) {
             const float** slot = self.vector_slot(li, name);
             if (int64_t(v.shape(0)) != self.vector_len(li, name))
               throw std::invalid_argument(name + " has length " + std::to_string(v.shape(0)) + ", expected " +
                                           std::to_string(self.vector_len(li, name)));
             *slot = v.data();
             self.keep.push_back(nb::cast(v));
           }, nb::arg("layer"), nb::arg("name"), nb::arg("v").noconvert())
      .def("set_sliding", [](PyDecoder& self, int li, bool sliding) { self.layer(li).sliding = sliding; })
      .def("set_embedding_f32", [](PyDecoder& self, Arr<const float, nb::ndim<2>> e) {
             if (int64_t(e.shape(0)) != self.dec->cfg.vocab || int64_t(e.shape(1)) != self.dec->cfg.dim)
               throw std::invalid_argument("embedding shape does not match (vocab, dim)");
             self.dec->embd_f32 = e.data();
             self.dec->embd_f16 = nullptr;
             self.dec->embd_q8 = nullptr;
             self.keep.push_back(nb::cast(e));
           }, nb::arg("embedding").noconvert())
      .def("set_embedding_f16", [](PyDecoder& self, Arr<const uint16_t, nb::ndim<2>> e) {
             if (int64_t(e.shape(0)) != self.dec->cfg.vocab || int64_t(e.shape(1)) != self.dec->cfg.dim)
               throw std::invalid_argument("embedding shape does not match (vocab, dim)");
             self.dec->embd_f16 = e.data();
             self.dec->embd_f32 = nullptr;
             self.dec->embd_q8 = nullptr;
             self.keep.push_back(nb::cast(e));
           }, nb::arg("embedding").noconvert())
      .def("set_embedding_q8", [](PyDecoder& self, Arr<const int8_t, nb::ndim<2>> q,
                                  Arr<const uint16_t, nb::ndim<2>> s) {
             check_int8_panels(self.dec->cfg.vocab, self.dec->cfg.dim, int64_t(q.shape(0)), int64_t(q.shape(1)),
                               int64_t(s.shape(0)), int64_t(s.shape(1)));
             self.dec->embd_q8 = q.data();
             self.dec->embd_q8_s = s.data();
             self.dec->embd_f32 = nullptr;
             self.dec->embd_f16 = nullptr;
             self.keep.push_back(nb::cast(q));
             self.keep.push_back(nb::cast(s));
           }, nb::arg("q").noconvert(), nb::arg("scale").noconvert(), "int8 panels of [vocab, dim]")
      .def("check", [](PyDecoder& self) {
             // every required weight set before the first forward: a clear error, not a crash
             Decoder& d = *self.dec;
             auto need = [](bool ok, const std::string& what) {
               if (!ok) throw std::invalid_argument("decoder is missing " + what);
             };
             need(d.embd_f32 || d.embd_f16 || d.embd_q8, "the embedding");
             need(d.out_norm, "the output norm");
             need(d.head.is_lut || d.head.f || d.head.q8, "the output head");
             for (size_t i = 0; i < d.layers.size(); ++i) {
               const LayerWeights& L = d.layers[i];
               const std::string p = "layer " + std::to_string(i) + " ";
               for (auto [lin, nm] : {std::pair{&L.q, "q"}, {&L.k, "k"}, {&L.v, "v"}, {&L.o, "o"},
                                       {&L.gate, "gate"}, {&L.up, "up"}, {&L.down, "down"}})
                 need(lin->is_lut || lin->f || lin->q8, p + nm);
               need(L.attn_norm && L.ffn_norm && L.inv_freq, p + "norms or rope frequencies");
               need(!L.q_norm == !L.k_norm, p + "q_norm/k_norm pair");
             }
           })
      .def("forward", [](PyDecoder& self, Arr<const int32_t, nb::ndim<1>> tokens, int64_t pos,
                         Arr<float, nb::ndim<2>> logits, bool all_logits, int64_t slot) {
             const int64_t m = tokens.shape(0);
             const int64_t rows = all_logits ? m : 1;
             if (int64_t(logits.shape(0)) != rows || int64_t(logits.shape(1)) != self.dec->cfg.vocab)
               throw std::invalid_argument("logits must have shape (" + std::to_string(rows) + ", vocab)");
             const int32_t* t = tokens.data();
             float* out = logits.data();
             nb::gil_scoped_release nogil;
             self.dec->forward(t, m, pos, out, all_logits, slot);
           }, nb::arg("tokens").noconvert(), nb::arg("pos"), nb::arg("logits").noconvert(), nb::arg("all_logits") = false,
           nb::arg("slot") = 0)
      .def("forward_batch", [](PyDecoder& self, Arr<const int32_t, nb::ndim<1>> tokens,
                               Arr<const int32_t, nb::ndim<1>> slots, Arr<const int32_t, nb::ndim<1>> positions,
                               Arr<const int32_t, nb::ndim<1>> out_rows, Arr<float, nb::ndim<2>> logits,
                               bool hidden) {
             const int64_t m = tokens.shape(0), r = out_rows.shape(0);
             if (int64_t(slots.shape(0)) != m || int64_t(positions.shape(0)) != m)
               throw std::invalid_argument("tokens, slots and positions must have the same length");
             const int64_t width = hidden ? self.dec->cfg.dim : self.dec->cfg.vocab;
             if (int64_t(logits.shape(0)) != r || int64_t(logits.shape(1)) != width)
               throw std::invalid_argument(hidden ? "hidden states must have shape (len(out_rows), dim)"
                                                  : "logits must have shape (len(out_rows), vocab)");
             const int32_t *t = tokens.data(), *s = slots.data(), *p = positions.data(), *o = out_rows.data();
             float* out = logits.data();
             nb::gil_scoped_release nogil;
             self.dec->forward_batch(t, s, p, m, o, r, out, hidden);
           }, nb::arg("tokens").noconvert(), nb::arg("slots").noconvert(), nb::arg("positions").noconvert(),
           nb::arg("out_rows").noconvert(), nb::arg("logits").noconvert(), nb::arg("hidden") = false,
           "row i: token of sequence slots[i] at positions[i]; logits (or, with hidden, the final "
           "norm's output) of out_rows")
      .def("release", [](PyDecoder& self, int64_t slot) { self.dec->release(slot); }, nb::arg("slot"))
      .def("copy_prefix", [](PyDecoder& self, int64_t src, int64_t dst, int64_t n) {
             self.dec->copy_prefix(src, dst, n);
           }, nb::arg("src"), nb::arg("dst"), nb::arg("n"))
      .def("slot_length", [](PyDecoder& self, int64_t slot) {
             if (slot < 0 || slot >= self.dec->cfg.n_seq) throw std::invalid_argument("slot out of range");
             return self.dec->length(slot);
           }, nb::arg("slot"))
      .def_prop_ro("n_seq", [](PyDecoder& self) { return self.dec->cfg.n_seq; })
      .def("reset", [](PyDecoder& self) { self.dec->reset_cache(); })
      .def("profile", [](PyDecoder& self, bool clear) {
             double* p = self.dec->prof_ns;
             nb::dict d;
             d["forward_ns"] = p[0];
             d["linear_ns"] = p[1];
             d["attention_ns"] = p[2];
             d["other_ns"] = p[3];
             if (clear) for (int i = 0; i < 4; ++i) p[i] = 0;
             return d;
           }, nb::arg("clear") = false, "native time per phase, summed over forward calls")
      .def_prop_ro("length", [](PyDecoder& self) { return self.dec->length(); })
      .def_prop_ro("ctx", [](PyDecoder& self) { return self.dec->cfg.ctx; })
      .def_prop_rw("n_threads", [](PyDecoder& self) { return self.dec->n_threads; },
                   [](PyDecoder& self, int n) { self.dec->n_threads = n < 1 ? 1 : n; });
}
