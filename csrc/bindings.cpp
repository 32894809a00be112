// bindings.cpp: nanobind glue only. Typed, C-contiguous CPU arrays; shapes checked here and
// reported as ValueError; the GIL is released around native work; Python allocates outputs.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <optional>
#include <stdexcept>
#include <string>

#include "bandwidth.h"
#include "dispatch.h"
#include "int8_gemm.h"
#include "lut_matmul.h"

namespace nb = nanobind;
using namespace luthier;

template <typename T, typename... Extra>
using Arr = nb::ndarray<T, nb::c_contig, nb::device::cpu, Extra...>;

namespace {

void check(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}

template <typename A>
void check_shape(const A& a, std::initializer_list<int64_t> shape, const char* name) {
  std::string want = "(", got = "(";
  bool ok = a.ndim() == shape.size();
  size_t i = 0;
  for (int64_t d : shape) {
    want += std::to_string(d) + (i + 1 < shape.size() ? ", " : ")");
    if (ok && int64_t(a.shape(i)) != d) ok = false;
    ++i;
  }
  for (size_t j = 0; j < a.ndim(); ++j) got += std::to_string(a.shape(j)) + (j + 1 < a.ndim() ? ", " : "");
  got += ")";
  check(ok, std::string(name) + " has shape " + got + ", expected " + want);
}

TableMode parse_mode(const std::string& m) {
  if (m == "exact") return TableMode::kExact;
  if (m == "fast") return TableMode::kFast;
  throw std::invalid_argument("table mode must be 'exact' or 'fast', got '" + m + "'");
}

PackedRef packed_ref(int64_t n, int64_t k, int bits, int group_size, const Arr<const uint8_t>& w,
                     const Arr<const uint16_t>& s, const std::optional<Arr<const uint16_t>>& z,
                     float zero_const) {
  const PackedShape ps = packed_shape(n, k, bits, group_size);
  check_shape(w, {int64_t(ps.weight_bytes())}, "packed weights");
  check_shape(s, {int64_t(ps.scale_count())}, "packed scales");
  if (z) check_shape(*z, {int64_t(ps.scale_count())}, "packed zeros");
  return PackedRef{ps, w.data(), s.data(), z ? z->data() : nullptr, zero_const};
}

}  // namespace

void bind_runtime(nb::module_& m);  // bindings_runtime.cpp

NB_MODULE(_core, m) {
  m.doc() = "luthier native core: LUT mixed-precision matmul (see csrc/lut_gemm.h)";

  m.def("packed_shape", [](int64_t n, int64_t k, int bits, int group_size) {
    const PackedShape ps = packed_shape(n, k, bits, group_size);
    return std::make_tuple(int64_t(ps.weight_bytes()), int64_t(ps.scale_count()), ps.n_tiles,
                           ps.groups, ps.kp);
  }, nb::arg("n"), nb::arg("k"), nb::arg("bits"), nb::arg("group_size"),
  "(weight_bytes, scale_count, n_tiles, groups, kp) of the packed layout");

  m.def("pack", [](const Arr<const uint8_t, nb::ndim<2>>& codes, const Arr<const uint16_t, nb::ndim<2>>& scales,
                   const std::optional<Arr<const uint16_t, nb::ndim<2>>>& zeros, int bits, int group_size,
                   Arr<uint8_t> w_out, Arr<uint16_t> s_out, std::optional<Arr<uint16_t>> z_out) {
    const int64_t n = codes.shape(0), k = codes.shape(1);
    const PackedShape ps = packed_shape(n, k, bits, group_size);
    check_shape(scales, {n, ps.groups}, "scales");
    if (zeros) check_shape(*zeros, {n, ps.groups}, "zeros");
    check(bool(zeros) == bool(z_out), "zeros and z_out must be given together");
    check_shape(w_out, {int64_t(ps.weight_bytes())}, "w_out");
    check_shape(s_out, {int64_t(ps.scale_count())}, "s_out");
    if (z_out) check_shape(*z_out, {int64_t(ps.scale_count())}, "z_out");
    const uint8_t* c = codes.data();
    uint8_t cmax = 0;  // one pass, message only on failure
    for (int64_t i = 0; i < n * k; ++i) cmax = c[i] > cmax ? c[i] : cmax;
    check(cmax < (1u << bits), "code " + std::to_string(cmax) + " does not fit in " + std::to_string(bits) + " bits");
    nb::gil_scoped_release nogil;
    pack_weights(ps, c, scales.data(), zeros ? zeros->data() : nullptr, w_out.data(), s_out.data(),
                 z_out ? z_out->data() : nullptr);
  }, nb::arg("codes").noconvert(), nb::arg("scales").noconvert(), nb::arg("zeros").noconvert().none(), nb::arg("bits"), nb::arg("group_size"),
     nb::arg("w_out").noconvert(), nb::arg("s_out").noconvert(), nb::arg("z_out").noconvert().none());

  m.def("unpack", [](int64_t n, int64_t k, int bits, int group_size, const Arr<const uint8_t>& w,
                     const Arr<const uint16_t>& s, const std::optional<Arr<const uint16_t>>& z,
                     Arr<uint8_t, nb::ndim<2>> codes_out, Arr<uint16_t, nb::ndim<2>> scales_out,
                     std::optional<Arr<uint16_t, nb::ndim<2>>> zeros_out) {
    const PackedRef pr = packed_ref(n, k, bits, group_size, w, s, z, 0.f);
    check_shape(codes_out, {n, k}, "codes_out");
    check_shape(scales_out, {n, pr.ps.groups}, "scales_out");
    if (zeros_out) check_shape(*zeros_out, {n, pr.ps.groups}, "zeros_out");
    nb::gil_scoped_release nogil;
    unpack_weights(pr.ps, pr.w, pr.s, pr.z, codes_out.data(), scales_out.data(),
                   zeros_out ? zeros_out->data() : nullptr);
  }, nb::arg("n"), nb::arg("k"), nb::arg("bits"), nb::arg("group_size"), nb::arg("w").noconvert(), nb::arg("s").noconvert(),
     nb::arg("z").noconvert().none(), nb::arg("codes_out").noconvert(), nb::arg("scales_out").noconvert(), nb::arg("zeros_out").noconvert().none());

  m.def("table_bytes_per_token", [](int64_t k, int group_size, const std::string& mode) {
    const TableShape t = table_shape(1, k, group_size, parse_mode(mode));
    return std::make_tuple(int64_t(t.bytes_per_token()), t.groups);
  }, nb::arg("k"), nb::arg("group_size"), nb::arg("mode"), "(bytes per token, groups)");

  m.def("build_tables", [](const Arr<const float, nb::ndim<2>>& x, int group_size, const std::string& mode,
                           Arr<uint8_t, nb::ndim<2>> tables, Arr<float, nb::ndim<2>> tscale,
                           Arr<float, nb::ndim<2>> xsum, const std::optional<Arr<const float, nb::ndim<1>>>& norm_w,
                           float eps, int n_threads) {
    const int64_t mm = x.shape(0), k = x.shape(1);
    const TableShape t = table_shape(mm, k, group_size, parse_mode(mode));
    check_shape(tables, {mm, int64_t(t.bytes_per_token())}, "tables");
    check_shape(tscale, {mm, t.groups}, "tscale");
    check_shape(xsum, {mm, t.groups}, "xsum");
    if (norm_w) check_shape(*norm_w, {k}, "norm weight");
    nb::gil_scoped_release nogil;
    build_tables_mt(t, x.data(), norm_w ? norm_w->data() : nullptr, eps, tables.data(),
                    tscale.data(), xsum.data(), n_threads);
  }, nb::arg("x").noconvert(), nb::arg("group_size"), nb::arg("mode"), nb::arg("tables").noconvert(), nb::arg("tscale").noconvert(),
     nb::arg("xsum").noconvert(), nb::arg("norm_w").noconvert().none() = nb::none(), nb::arg("eps") = 1e-6f, nb::arg("n_threads") = 1);

  m.def("gemm", [](int64_t n, int64_t k, int bits, int group_size, const Arr<const uint8_t>& w,
                   const Arr<const uint16_t>& s, const std::optional<Arr<const uint16_t>>& z,
                   float zero_const, const std::string& mode, const Arr<const uint8_t, nb::ndim<2>>& tables,
                   const Arr<const float, nb::ndim<2>>& tscale, const Arr<const float, nb::ndim<2>>& xsum,
                   Arr<float, nb::ndim<2>> y, int n_threads, const std::string& isa) {
    const PackedRef pr = packed_ref(n, k, bits, group_size, w, s, z, zero_const);
    const int64_t mm = tables.shape(0);
    const TableShape t = table_shape(mm, k, group_size, parse_mode(mode));
    check_shape(tables, {mm, int64_t(t.bytes_per_token())}, "tables");
    check_shape(tscale, {mm, t.groups}, "tscale");
    check_shape(xsum, {mm, t.groups}, "xsum");
    check_shape(y, {mm, n}, "y");
    if (!isa.empty()) kernel_for(isa);  // clear error before releasing the GIL
    nb::gil_scoped_release nogil;
    lut_gemm(pr, t, tables.data(), tscale.data(), xsum.data(), y.data(), n_threads, isa);
  }, nb::arg("n"), nb::arg("k"), nb::arg("bits"), nb::arg("group_size"), nb::arg("w").noconvert(), nb::arg("s").noconvert(),
     nb::arg("z").noconvert().none(), nb::arg("zero_const"), nb::arg("mode"), nb::arg("tables").noconvert(), nb::arg("tscale").noconvert(),
     nb::arg("xsum").noconvert(), nb::arg("y").noconvert(), nb::arg("n_threads") = 1, nb::arg("isa") = "");

  m.def("linear", [](int64_t n, int64_t k, int bits, int group_size, const Arr<const uint8_t>& w,
                     const Arr<const uint16_t>& s, const std::optional<Arr<const uint16_t>>& z,
                     float zero_const, const std::string& mode, const Arr<const float, nb::ndim<2>>& x,
                     Arr<float, nb::ndim<2>> y, const std::optional<Arr<const float, nb::ndim<1>>>& norm_w,
                     float eps, int n_threads, const std::string& isa) {
    const PackedRef pr = packed_ref(n, k, bits, group_size, w, s, z, zero_const);
    const int64_t mm = x.shape(0);
    check(mm > 0, "x has no rows");
    check_shape(x, {mm, k}, "x");
    check_shape(y, {mm, n}, "y");
    if (norm_w) check_shape(*norm_w, {k}, "norm weight");
    const TableMode md = parse_mode(mode);
    if (!isa.empty()) kernel_for(isa);
    nb::gil_scoped_release nogil;
    lut_linear(pr, md, x.data(), mm, norm_w ? norm_w->data() : nullptr, eps, y.data(), n_threads, isa);
  }, nb::arg("n"), nb::arg("k"), nb::arg("bits"), nb::arg("group_size"), nb::arg("w").noconvert(), nb::arg("s").noconvert(),
     nb::arg("z").noconvert().none(), nb::arg("zero_const"), nb::arg("mode"), nb::arg("x").noconvert(), nb::arg("y").noconvert(),
     nb::arg("norm_w").noconvert().none() = nb::none(), nb::arg("eps") = 1e-6f, nb::arg("n_threads") = 1,
     nb::arg("isa") = "");

  m.def("read_probe", [](const Arr<const uint8_t, nb::ndim<1>>& data, int n_threads) {
    const uint8_t* p = data.data();
    const size_t bytes = data.shape(0);
    nb::gil_scoped_release nogil;
    return read_probe(p, bytes, n_threads);
  }, nb::arg("data").noconvert(), nb::arg("n_threads") = 1, "reads data once (bandwidth probe); returns a checksum");

  m.def("int8_linear", [](const Arr<const int8_t, nb::ndim<2>>& w, const Arr<const uint16_t, nb::ndim<2>>& wscale,
                          int64_t n, int64_t k, const Arr<const float, nb::ndim<2>>& x, Arr<float, nb::ndim<2>> y,
                          const std::optional<Arr<const float, nb::ndim<1>>>& norm_w, float eps, int n_threads,
                          const std::string& isa) {
    const int64_t mm = x.shape(0);
    check_int8_panels(n, k, int64_t(w.shape(0)), int64_t(w.shape(1)), int64_t(wscale.shape(0)),
                      int64_t(wscale.shape(1)));
    check_shape(x, {mm, k}, "x");
    check_shape(y, {mm, n}, "y");
    check(mm > 0, "x has no rows");
    if (norm_w) check_shape(*norm_w, {k}, "norm weight");
    if (!isa.empty()) kernel_for(isa);
    nb::gil_scoped_release nogil;
    int8_linear(w.data(), wscale.data(), n, k, x.data(), mm, norm_w ? norm_w->data() : nullptr, eps,
                y.data(), n_threads, isa.c_str());
  }, nb::arg("w").noconvert(), nb::arg("wscale").noconvert(), nb::arg("n"), nb::arg("k"), nb::arg("x").noconvert(),
     nb::arg("y").noconvert(), nb::arg("norm_w").noconvert().none() = nb::none(), nb::arg("eps") = 1e-6f,
     nb::arg("n_threads") = 1, nb::arg("isa") = "",
     "y = x . w^T for int8 weights in panels with fp16 scales per 32 (int8_gemm.h; activations "
     "int8 per 32)");

  m.def("float_to_half", [](Arr<const float, nb::ndim<1>> x, Arr<uint16_t, nb::ndim<1>> out) {
         if (out.shape(0) != x.shape(0)) throw std::invalid_argument("out must have the length of x");
         for (size_t i = 0; i < x.shape(0); ++i) out.data()[i] = float_to_half(x.data()[i]);
       }, nb::arg("x").noconvert(), nb::arg("out").noconvert(),
       "portable fp32 -> fp16 bits (round to nearest even), as the fp16 KV cache stores");

  bind_runtime(m);

  m.def("available_isas", &available_isas, "ISAs compiled in and supported here, best last");
  m.def("active_isa", [] { return active_isa(); }, "ISA in use (LUTHIER_ISA overrides)");
}
