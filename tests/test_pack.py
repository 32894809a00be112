"""Packing: unpack(pack(qt)) == qt for every shape, bit width and group size (hypothesis)."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from luthier import kernels
from luthier.quant import QTensor


@st.composite
def qtensors(draw):
    bits = draw(st.sampled_from([1, 2, 3, 4, 5, 6, "ternary"]))
    n = draw(st.integers(1, 70))
    gs_choice = draw(st.sampled_from([8, 16, 32, 64, 128, 256, "k"]))
    k = draw(st.integers(1, 300)) if gs_choice == "k" else draw(st.integers(1, 5)) * gs_choice - draw(st.integers(0, 7))
    k = max(k, 1)
    gs = k if gs_choice == "k" else gs_choice
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    ternary = bits == "ternary"
    b = 2 if ternary else bits
    codes = rng.integers(0, 3 if ternary else 1 << b, (n, k), dtype=np.uint8)
    g = -(-k // gs)
    scales = rng.standard_normal((n, g)).astype(np.float16)
    zeros = None
    if not ternary and draw(st.booleans()):
        zeros = rng.integers(0, 1 << b, (n, g)).astype(np.float16)
    return QTensor(codes, scales, zeros, b, gs, ternary=ternary)


@settings(max_examples=150, deadline=None)
@given(qtensors())
def test_pack_unpack_round_trip(qt):
    pw = kernels.pack(qt)
    back = kernels.unpack(pw)
    assert np.array_equal(back.codes, qt.codes)
    assert np.array_equal(back.scales.view(np.uint16), qt.scales.view(np.uint16))
    if qt.zeros is None:
        assert back.zeros is None
    else:
        assert np.array_equal(back.zeros.view(np.uint16), qt.zeros.view(np.uint16))
    assert back.ternary == qt.ternary and back.bits == qt.bits
    assert pw.nbytes == kernels.packed_nbytes(qt.n, qt.k, qt.bits, qt.group_size,
                                              qt.zeros is not None)


def test_packed_size_is_bits_per_weight():
    # 4096 x 4096 at 2 bits, group 128: 2 bits of codes + 16/128 bits of fp16 scale
    nbytes = kernels.packed_nbytes(4096, 4096, 2, 128)
    assert nbytes == 4096 * 4096 * 2 // 8 + 4096 * 32 * 2


def test_pack_rejects_bad_input():
    from luthier import _core

    codes = np.zeros((4, 16), np.uint8)
    codes[0, 0] = 4
    s = np.ones((4, 2), np.float16)
    w = np.empty(_core.packed_shape(4, 16, 2, 8)[0], np.uint8)
    so = np.empty(_core.packed_shape(4, 16, 2, 8)[1], np.uint16)
    with pytest.raises(ValueError, match="does not fit"):
        _core.pack(codes, s.view(np.uint16), None, 2, 8, w, so, None)
    with pytest.raises(ValueError, match="scales has shape"):
        _core.pack(codes * 0, np.ones((4, 3), np.uint16), None, 2, 8, w, so, None)
    with pytest.raises(ValueError, match="w_out"):
        _core.pack(codes * 0, s.view(np.uint16), None, 2, 8, w[:-1], so, None)
    with pytest.raises(ValueError, match="bits"):
        _core.packed_shape(4, 16, 7, 8)
    with pytest.raises(ValueError, match="group_size"):
        _core.packed_shape(4, 16, 2, 12)
    with pytest.raises(TypeError):
        _core.pack(codes.astype(np.int32), s.view(np.uint16), None, 2, 8, w, so, None)
