"""Quantizers against float: error bounds per bit width (named constants), grid properties."""

import numpy as np
import pytest

from luthier.quant import QTensor, quantize_rtn, quantize_ternary

# Relative RMS error ||w - dq(w)|| / ||w|| of round-to-nearest on Gaussian weights, group 64.
# Theory for a uniform grid over +-absmax: step / sqrt(12) / sigma; these bounds add margin.
RTN_REL_RMS = {6: 0.03, 5: 0.06, 4: 0.12, 3: 0.24, 2: 0.55, 1: 0.65}
TERNARY_REL_RMS = 0.6


def rel_rms(w, qt):
    return float(np.sqrt(((qt.dequantize() - w) ** 2).mean() / (w**2).mean()))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_error_bounds_and_monotone(bits, symmetric):
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((64, 512)).astype(np.float32)
    qt = quantize_rtn(w, bits, 64, symmetric)
    assert qt.codes.max() < (1 << bits)
    assert rel_rms(w, qt) < RTN_REL_RMS[bits]
    if bits > 1:  # one bit fewer is clearly worse
        assert rel_rms(w, quantize_rtn(w, bits - 1, 64, symmetric)) > 1.1 * rel_rms(w, qt)


def test_rtn_is_round_to_nearest_on_its_grid():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    for sym in (True, False):
        qt = quantize_rtn(w, 3, 32, sym)
        s = qt.scales.astype(np.float32).repeat(32, 1)
        z = qt.zero_points().repeat(32, 1)
        # every other code on the grid is at least as far from w as the chosen one
        best = np.abs(qt.dequantize() - w)
        for c in range(8):
            assert np.all(best <= np.abs(s * (c - z) - w) + 1e-6)


def test_rtn_zero_and_partial_groups():
    w = np.zeros((3, 40), np.float32)
    w[1, 3] = 1.0
    qt = quantize_rtn(w, 4, 32, symmetric=False)  # last group has 8 of 32 columns
    assert qt.scales.shape == (3, 2)
    d = qt.dequantize()
    assert d[0].max() == 0 and d[2].max() == 0  # exact zeros stay zero
    assert abs(d[1, 3] - 1.0) < 1e-3
    qt_k = quantize_rtn(np.ones((2, 17), np.float32), 2, 17)  # group_size = k, odd k
    assert qt_k.groups == 1 and np.allclose(qt_k.dequantize(), 1.0, atol=0.35)


def test_ternary_absmean():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((32, 256)).astype(np.float32)
    qt = quantize_ternary(w)
    assert qt.ternary and qt.bits == 2 and qt.zeros is None
    assert set(np.unique(qt.codes)) <= {0, 1, 2}
    s = float(qt.scales[0, 0])
    assert np.all(qt.scales == qt.scales[0, 0])  # one scale per tensor
    assert abs(s - np.abs(w).mean()) < 1e-3 * s
    assert set(np.unique(qt.dequantize() / s).round(3)) <= {-1.0, 0.0, 1.0}
    assert rel_rms(w, qt) < TERNARY_REL_RMS
    qg = quantize_ternary(w, group_size=64)
    assert qg.scales.shape == (32, 4) and rel_rms(w, qg) <= rel_rms(w, qt) + 0.02


def test_bits_per_weight():
    qt = quantize_rtn(np.ones((4, 128), np.float32), 2, 64, symmetric=False)
    assert qt.bits_per_weight == 2 + 32 * 2 / 128


def test_quantizer_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        quantize_rtn(np.full((2, 8), np.nan, np.float32), 4, 8)
    with pytest.raises(ValueError, match="2-D"):
        quantize_rtn(np.ones(8, np.float32), 4, 8)
    with pytest.raises(ValueError, match="bits"):
        quantize_rtn(np.ones((2, 8), np.float32), 7, 8)  # the LUT kernels take 1-6 bits
    with pytest.raises(TypeError, match="uint8"):
        QTensor(np.ones((2, 8), np.int32), np.ones((2, 1), np.float16), None, 4, 8)
    with pytest.raises(ValueError, match="shape"):
        QTensor(np.ones((2, 8), np.uint8), np.ones((2, 2), np.float16), None, 4, 8)
    with pytest.raises(ValueError, match="ternary"):
        QTensor(np.ones((2, 8), np.uint8), np.ones((2, 1), np.float16),
                np.ones((2, 1), np.float16), 2, 8, ternary=True)
