"""The int8 kernel (embeddings and heads): every ISA against numpy on the same int8 data."""

import numpy as np
import pytest

from luthier import _core, kernels
from luthier.engine import Int8Linear, Int8Rows
from luthier.int8 import q8_panels, q8_width, quantize_q8

ISAS = kernels.available_isas()
# int8 activations per block of 32: error relative to sum |x| |w| per output
ACT_Q8_BOUND = 4e-3


def q8_reference(x, lin):
    """x quantized per 32 like the kernel, times the int8 weights, in float64."""
    m, k = x.shape
    kp = q8_width(k)
    xp = np.zeros((m, kp), np.float32)
    xp[:, :k] = x
    xb = xp.reshape(m, kp // 32, 32)  # [m, kp] -> [m, blocks, 32]
    amax = np.abs(xb).max(-1, keepdims=True)
    sc = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    xq = np.clip(np.rint(xb * (np.float32(1) / sc)), -127, 127) * sc
    return xq.reshape(m, kp)[:, :k].astype(np.float64) @ lin.dequantize().astype(np.float64).T


@pytest.mark.parametrize("n,k", [(1, 1), (3, 17), (33, 32), (127, 33), (129, 576), (64, 1000)])
@pytest.mark.parametrize("m", [1, 2, 7])
def test_int8_matches_reference(n, k, m):
    rng = np.random.default_rng(n * 1000 + k + m)
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = (rng.standard_normal((m, k)) * 3).astype(np.float32)
    lin = Int8Linear(w, n_threads=2)
    ref = q8_reference(x, lin)
    scale = (np.abs(x).astype(np.float64) @ np.abs(lin.dequantize()).T.astype(np.float64)).max()
    outs = {}
    for isa in ISAS:
        y = np.empty((m, n), np.float32)
        _core.int8_linear(lin.q, lin.scale, n, k, x, y, None, 1e-6, 2, isa)
        outs[isa] = y
        assert np.abs(y - ref).max() / scale < 1e-5, isa  # same int8 data: float rounding only
    for isa in ISAS:  # one rounding sequence on every ISA (int8_gemm.h): bit-identical
        np.testing.assert_array_equal(outs[isa], outs["generic"], err_msg=isa)
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    assert np.abs(lin(x) - exact).max() / scale < ACT_Q8_BOUND + 0.01  # int8 weights and activations


def test_int8_fused_norm_and_errors():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((40, 96)).astype(np.float32)
    lin = Int8Linear(w)
    x = rng.standard_normal((2, 96)).astype(np.float32)
    g = (rng.random(96) + 0.5).astype(np.float32)
    y = np.empty((2, 40), np.float32)
    _core.int8_linear(lin.q, lin.scale, 40, 96, x, y, g, 1e-5, 1, "")
    xn = (x / np.sqrt((x.astype(np.float64) ** 2).mean(1, keepdims=True) + 1e-5) * g).astype(np.float32)
    assert np.allclose(y, lin(xn), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="rounded up to 32"):
        _core.int8_linear(lin.q, lin.scale, 40, 60, x[:, :60].copy(), y, None, 1e-6, 1, "")
    with pytest.raises(ValueError, match="panels of a \\[48, 96\\]"):  # 6 panels, not 5
        _core.int8_linear(lin.q, lin.scale, 48, 96, x, np.empty((2, 48), np.float32), None, 1e-6, 1, "")
    with pytest.raises(ValueError, match="shape"):
        _core.int8_linear(lin.q, lin.scale, 40, 96, x, np.empty((2, 41), np.float32), None, 1e-6, 1, "")
    with pytest.raises(TypeError):
        _core.int8_linear(lin.q.astype(np.int16), lin.scale, 40, 96, x, y, None, 1e-6, 1, "")


@pytest.mark.parametrize("n,k", [(7, 40), (129, 576), (1030, 264)])
@pytest.mark.parametrize("m", [2, 5, 16, 23])
def test_int8_rows_of_a_batch_equal_solo(n, k, m):
    """Each token of a batch gets bit for bit its solo result on every ISA (the m > 1 path
    shares weight loads but not arithmetic): batched and solo greedy decoding agree."""
    rng = np.random.default_rng(n + k + m)
    lin = Int8Linear(rng.standard_normal((n, k)).astype(np.float32), n_threads=2)
    x = (rng.standard_normal((m, k)) * 2).astype(np.float32)
    for isa in ISAS:
        y = np.empty((m, n), np.float32)
        _core.int8_linear(lin.q, lin.scale, n, k, x, y, None, 1e-6, 2, isa)
        for i in range(m):
            yi = np.empty((1, n), np.float32)
            _core.int8_linear(lin.q, lin.scale, n, k, np.ascontiguousarray(x[i : i + 1]), yi, None, 1e-6, 1, isa)
            np.testing.assert_array_equal(y[i], yi[0], err_msg=f"{isa} token {i}")


def test_int8_rows_dequantize_only_the_rows_asked_for():
    """Int8Rows (8-bit token embeddings): indexing with ids of any shape gives the
    dequantized rows, within half a quantization step of the float table."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((50, 40)).astype(np.float32)  # dim 40: padded to 64 inside
    rows = Int8Rows.from_float(w)
    assert rows.shape == (50, 40) and rows.q.shape == (7, 8 * 64) and rows.scale.shape == (7, 16)  # 7 panels
    ids = np.array([[3, 7, 7], [49, 0, 12]])
    got = rows[ids]
    assert got.shape == (2, 3, 40) and got.dtype == np.float32
    np.testing.assert_array_equal(got, rows.dequantize()[ids])
    np.testing.assert_array_equal(rows.dequantize(), Int8Linear(w).dequantize())  # the head's grid
    step = quantize_q8(w)[1].view(np.float16).astype(np.float32).repeat(32, 1)[:, :40]  # [50, blocks] -> [50, 40]
    assert np.all(np.abs(rows.dequantize() - w) <= 0.5 * step * (1 + 1e-3))
    with pytest.raises(ValueError, match="not the int8 panels"):
        Int8Rows(rows.q, rows.scale, 50, 70)
    with pytest.raises(ValueError, match="not the int8 panels"):
        Int8Rows(rows.q, rows.scale, 57, 40)  # 8 panels
    with pytest.raises(ValueError, match="not the int8 panels"):
        Int8Rows(rows.q.astype(np.int16), rows.scale, 50, 40)
    with pytest.raises(IndexError):
        rows[np.array([50])]


@pytest.mark.parametrize("n,k", [(1, 5), (8, 32), (13, 70)])
def test_int8_panels_hold_each_row(n, k):
    """The panel layout (csrc/int8_gemm.h): [P, kp / 4, 8, 4] codes and [P, kp / 32, 8]
    scales, row 8p + j in lane j; rows past n zero."""
    rng = np.random.default_rng(n * k)
    q, s = quantize_q8(rng.standard_normal((n, k)).astype(np.float32))
    qp, sp = q8_panels(q, s)
    kp, p = q8_width(k), -(-n // 8)
    assert qp.shape == (p, 8 * kp) and sp.shape == (p, kp // 4)
    q4, s3 = qp.reshape(p, kp // 4, 8, 4), sp.reshape(p, kp // 32, 8)
    for r in range(8 * p):
        want_q = q[r] if r < n else np.zeros(kp, np.int8)
        want_s = s[r] if r < n else np.zeros(kp // 32, np.uint16)
        np.testing.assert_array_equal(q4[r // 8, :, r % 8, :].reshape(kp), want_q)
        np.testing.assert_array_equal(s3[r // 8, :, r % 8], want_s)
