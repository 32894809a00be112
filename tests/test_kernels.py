"""LUT matmul kernels against the numpy reference and against each other.

Kernel error is measured apart from quantization error: the oracle is the same QTensor,
dequantized, times the activations the mode defines (int8 per group in "exact" mode).
"""

import numpy as np
import pytest

from luthier import kernels, reference
from luthier.quant import QTensor, quantize_rtn, quantize_ternary

# Bounds on max|y - y_ref| / max(|x| @ |w|.T): the error relative to the largest sum of
# absolute products, so that cancellation in a small y cannot inflate it.
EXACT_VS_DEQUANT = 1e-5  # exact mode vs x_int8 @ dequantize(w).T: float rounding only
FAST_VS_LUT_REF = 1e-4  # fast mode vs the reference LUT method (rare +-1 table roundings)
SIMD_VS_GENERIC = 1e-6  # every ISA vs the portable kernel on the same tables
FAST_VS_FLOAT = 0.02  # fast mode vs float x: the int8 table quantization itself
# 1-bit with zero points: w in {0, s} makes the table term and the bias term cancel, which
# amplifies the table rounding (measured 5.0% at group 256, 0.1-0.3% for every other case)
FAST_VS_FLOAT_1BIT_ZEROS = 0.1
EXACT_VS_FLOAT = 0.01  # exact mode vs float x: int8 activations

ISAS = kernels.available_isas()
BITS = [1, 2, 3, 4, 5, 6, "ternary"]
# n and k in odd and edge sizes: 1, 3, 17, 33, 127, 129 granules of 8 columns / 1 row
SIZES_N = [1, 3, 17, 33, 127, 129]
SIZES_K = [8, 24, 136, 264, 1016, 1032]


def make_qt(rng, n, k, bits, group_size, zeros):
    w = rng.standard_normal((n, k)).astype(np.float32)
    if bits == "ternary":
        return quantize_ternary(w, None if group_size == k else group_size)
    return quantize_rtn(w, bits, group_size, symmetric=not zeros)


def rel(a, b, x, qt):
    scale = (np.abs(np.atleast_2d(x)).astype(np.float64) @ np.abs(qt.dequantize()).T.astype(np.float64)).max()
    return float(np.abs(np.asarray(a, np.float64) - b).max() / max(scale, 1e-30))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n,k", list(zip(SIZES_N, SIZES_K)) + [(129, 8), (1, 1032), (64, 520)])
@pytest.mark.parametrize("m", [1, 2, 7])
def test_exact_mode_equals_dequantized_matmul(bits, n, k, m):
    rng = np.random.default_rng(1000 * n + k + m)
    gs = 8 if k < 32 else 32
    zeros = bits != "ternary" and (n + k) % 2 == 0
    qt = make_qt(rng, n, k, bits, gs, zeros)
    pw = kernels.pack(qt)
    x = rng.standard_normal((m, k)).astype(np.float32)
    ref = reference.matmul(x, qt, "exact")
    for isa in ISAS:
        y = kernels.lut_linear(x, pw, "exact", isa=isa)
        assert y.shape == (m, n)
        assert rel(y, ref, x, qt) < EXACT_VS_DEQUANT, isa
    assert rel(kernels.lut_linear(x, pw, "exact"), reference.matmul(x, qt), x, qt) < EXACT_VS_FLOAT


# ternary has no zero points by definition
@pytest.mark.parametrize("bits,zeros", [(b, z) for b in BITS for z in (False, True)
                                        if not (b == "ternary" and z)])
@pytest.mark.parametrize("group_size", [16, 32, 64, 128, 256, "k"])  # 16: K-quant sub-blocks
def test_group_sizes_and_zeros(bits, group_size, zeros):
    rng = np.random.default_rng(7)
    n, k = 45, 512 if group_size != "k" else 200
    gs = k if group_size == "k" else group_size
    qt = make_qt(rng, n, k, bits, gs, zeros)
    assert (qt.zeros is not None) == zeros
    pw = kernels.pack(qt)
    for m in (1, 64):
        x = rng.standard_normal((m, k)).astype(np.float32)
        ref_exact = reference.matmul(x, qt, "exact")
        ref_fast = reference.lut_matmul(x, qt, "fast")
        ref_float = reference.matmul(x, qt)
        for isa in ISAS:
            assert rel(kernels.lut_linear(x, pw, "exact", isa=isa), ref_exact, x, qt) < EXACT_VS_DEQUANT
            yf = kernels.lut_linear(x, pw, "fast", isa=isa)
            assert rel(yf, ref_fast, x, qt) < FAST_VS_LUT_REF
            bound = FAST_VS_FLOAT_1BIT_ZEROS if (bits == 1 and zeros) else FAST_VS_FLOAT
            assert rel(yf, ref_float, x, qt) < bound


def test_reference_lut_method_equals_dequantize():
    # the LUT decomposition itself (bit planes, signed tables, bias term) is exact
    rng = np.random.default_rng(3)
    for bits in BITS:
        qt = make_qt(rng, 19, 96, bits, 32, bits in (1, 3))
        x = rng.standard_normal((3, 96)).astype(np.float32)
        assert rel(reference.lut_matmul(x, qt, "exact"), reference.matmul(x, qt, "exact"), x, qt) < 1e-12


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_simd_equals_generic_large(bits, mode):
    rng = np.random.default_rng(11)
    n, k = 300, 1280  # several flushes of the int16 accumulators per group of 256
    qt = make_qt(rng, n, k, bits, 256 if bits != "ternary" else k, bits == 3)
    pw = kernels.pack(qt)
    x = (rng.standard_normal((5, k)) * 3).astype(np.float32)
    x[:, ::7] *= 40  # outliers: tables at their extremes
    t = kernels.build_tables(x, pw.group_size, mode)
    y0 = kernels.lut_gemm(t, pw, isa="generic")
    for isa in ISAS:
        for threads in (1, 2, 3):
            assert rel(kernels.lut_gemm(t, pw, n_threads=threads, isa=isa), y0, x, qt) < SIMD_VS_GENERIC


def test_extreme_activations_do_not_overflow():
    # all-equal maximal activations and all-ones codes: every lookup at +-127 (or 508), so
    # each int16 flush holds the most kgroups its bound allows (6 planes: 2 kgroups)
    n, k = 32, 4096
    for bits in (1, 2, 3, 4, 5, 6):
        qt = QTensor(np.full((n, k), (1 << bits) - 1, np.uint8), np.ones((n, 1), np.float16),
                     None, bits, k)
        pw = kernels.pack(qt)
        x = np.ones((1, k), np.float32)
        for mode in ("exact", "fast"):
            for isa in ISAS:
                y = kernels.lut_linear(x, pw, mode, isa=isa)
                expect = k * ((1 << bits) - 1 - qt.zero_const)
                assert np.allclose(y, expect, rtol=1e-5), (bits, mode, isa, y[0, 0], expect)


def test_tables_match_reference_layout():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 72)).astype(np.float32)
    t = kernels.build_tables(x, 24, "fast")
    tr, ts, xs = reference.tables(x, 24, "fast")
    got = t.tables.view(np.int8).reshape(3, -1, 16)  # [m, kp/4 * 16] -> [m, kp/4, 16]
    assert np.abs(got.astype(int) - tr).max() <= 1
    assert np.mean(got != tr) < 0.01
    assert np.allclose(t.tscale, ts) and np.allclose(t.xsum, xs, atol=1e-5)
    assert (got == -got[..., ::-1]).all()  # symmetry T[15 - c] = -T[c]
    te = kernels.build_tables(x, 24, "exact")
    tre, tse, _ = reference.tables(x, 24, "exact")
    raw = te.tables.reshape(3, -1, 2, 16)  # [m, kp/4, (lo, hi), 16]
    val = raw[:, :, 0].astype(int) + 256 * raw[:, :, 1].view(np.int8).astype(int)
    assert (val == tre).all()
    assert np.array_equal(te.tscale, tse)


def test_fused_rmsnorm_tables():
    rng = np.random.default_rng(9)
    n, k = 70, 320
    qt = make_qt(rng, n, k, 4, 64, False)
    pw = kernels.pack(qt)
    x = (rng.standard_normal((4, k)) * 5).astype(np.float32)
    g = (rng.random(k) + 0.5).astype(np.float32)
    eps = 1e-5
    xn = reference.rmsnorm(x, g, eps).astype(np.float32)
    y_fused = kernels.lut_linear(x, pw, "exact", norm_weight=g, eps=eps)
    y_ref = reference.matmul(xn, qt, "exact")
    assert rel(y_fused, y_ref, xn, qt) < 1e-4
    assert rel(y_fused, kernels.lut_linear(x, pw, "exact"), xn, qt) > 0.1  # the norm was applied


def test_qlinear_vector_and_threads():
    rng = np.random.default_rng(2)
    qt = make_qt(rng, 100, 256, 2, 64, True)
    lin = kernels.QLinear(qt, mode="exact", n_threads=2)
    x = rng.standard_normal(256).astype(np.float32)
    y = lin(x)
    assert y.shape == (100,)
    assert rel(y, reference.matmul(x[None], qt, "exact")[0], x, qt) < EXACT_VS_DEQUANT
    assert lin.in_features == 256 and lin.out_features == 100
    # the layer keeps only the packed bytes: 2 bits per weight plus fp16 scales and zeros
    assert lin.packed.nbytes == kernels.packed_nbytes(100, 256, 2, 64, zeros=True)
    rows = 128  # n padded to tiles of 32 rows
    assert lin.packed.nbytes == rows * 256 * 2 // 8 + rows * (256 // 64) * 2 * 2


def test_bad_arguments_raise():
    rng = np.random.default_rng(0)
    qt = make_qt(rng, 16, 64, 4, 32, False)
    pw = kernels.pack(qt)
    with pytest.raises(TypeError, match="float32"):
        kernels.lut_linear(np.ones((1, 64)), pw)
    with pytest.raises(ValueError, match="shape"):
        kernels.lut_linear(np.ones((1, 63), np.float32), pw)
    with pytest.raises(ValueError, match="mode"):
        kernels.lut_linear(np.ones((1, 64), np.float32), pw, mode="int4")
    with pytest.raises(ValueError, match="not available"):
        kernels.lut_linear(np.ones((1, 64), np.float32), pw, isa="sve9")
    with pytest.raises(ValueError, match="bits"):
        QTensor(qt.codes, qt.scales, None, 7, 32)
    with pytest.raises(ValueError, match="group_size"):
        quantize_rtn(np.ones((4, 64), np.float32), 4, 12)
    with pytest.raises(ValueError, match="range"):
        QTensor(np.full((2, 8), 9, np.uint8), np.ones((2, 1), np.float16), None, 3, 8)
    with pytest.raises(ValueError, match="tables are for"):
        t = kernels.build_tables(np.ones((1, 32), np.float32), 32)
        kernels.lut_gemm(t, pw)
    bad = kernels.PackedWeight(16, 64, 4, 32, False, pw.w[:-1], pw.s, None, 8.0)
    with pytest.raises(ValueError, match="packed weights"):
        kernels.lut_linear(np.ones((1, 64), np.float32), bad)
    with pytest.raises(TypeError):
        kernels.lut_linear([1.0] * 64, pw)


def test_isa_override_env(tmp_path):
    import subprocess
    import sys

    import os

    code = "from luthier import kernels; print(kernels.active_isa())"
    for isa in ISAS:
        env = dict(os.environ, LUTHIER_ISA=isa)
        out = subprocess.run([sys.executable, "-c", code], env=env,
                             capture_output=True, text=True, check=True).stdout.strip()
        assert out == isa
    env = dict(os.environ, LUTHIER_ISA="nope")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "not available" in r.stderr


AVX512_ISAS = [i for i in ISAS if i.startswith("avx512")]


@pytest.mark.skipif(not AVX512_ISAS or "avx2" not in ISAS, reason="needs a CPU with AVX-512")
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_avx512_is_bit_identical_to_avx2(bits, mode):
    # the AVX-512 kernel does the AVX2 kernel's integer sums two half-tiles at a time, the
    # avx512vbmi one sums blocks of 8 or 4 tokens by vpermb + vpdpbusd (the rest through the
    # AVX-512 kernel); both with the same float epilogue: every output is the same float,
    # over row tails (n % 32 below and above 16), token counts around the 4- and 8-token
    # blocks (a batch must decode as its rows alone), zero points on and off
    rng = np.random.default_rng(13)
    for n, k, gs, zeros in [(45, 520, 8, True), (7, 264, 24, False), (61, 1032, 128, True),
                            (96, 2048, 256, False)]:
        qt = make_qt(rng, n, k, bits, gs if bits != "ternary" else k, zeros and bits != "ternary")
        pw = kernels.pack(qt)
        for m in (1, 3, 4, 9, 13, 16):
            x = (rng.standard_normal((m, k)) * 2).astype(np.float32)
            t = kernels.build_tables(x, pw.group_size, mode)
            y2 = kernels.lut_gemm(t, pw, isa="avx2")
            for isa in AVX512_ISAS:
                np.testing.assert_array_equal(kernels.lut_gemm(t, pw, isa=isa), y2, err_msg=f"{isa} m={m}")
                np.testing.assert_array_equal(kernels.lut_gemm(t, pw, n_threads=2, isa=isa), y2,
                                              err_msg=f"{isa} m={m}, 2 threads")
