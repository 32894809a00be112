"""GPTQ against round-to-nearest on synthetic layers, its QTensors, the Hessian, and the
sequential (layer-by-layer) calibration on a tiny random transformer."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from luthier.engine import Int8Rows
from luthier.models import ModelArgs, Transformer, float_linear
from luthier.quant import QTensor, quantize_rtn, quantize_ternary
from luthier.quant import calibration as calib
from luthier.quant.gptq import HessianAccumulator, gptq_quantize

# GPTQ's output error ||X W^T - X Wq^T|| on the synthetic correlated layer below, at most
# this fraction of round-to-nearest's with the same grid. Measured 0.22-0.33 over every
# bits / group / symmetric / act-order case; the bound leaves a wide margin.
GPTQ_OVER_RTN_MAX = {2: 0.5, 3: 0.5, 4: 0.5, 5: 0.5, 6: 0.5}
N_OUT, K_IN, N_ROWS = 64, 256, 1024
# ternary GPTQ's output error over plain absmean ternary's on the same layer: measured
# 0.40-0.61 over group 64 / 128 / per tensor, with and without act-order.
TERNARY_EF_OVER_PLAIN_MAX = 0.8


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_blas_thread: Any) -> Any:
    yield


def correlated_layer(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(w [n, k], X [N, k]): Gaussian weights; activations mixed from a spectrum decaying
    over ~40 directions plus small isotropic noise, with 4 outlier channels (x10), like
    the inputs of LLM linear layers."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((N_OUT, K_IN)).astype(np.float32)
    mix = rng.standard_normal((K_IN, K_IN)) * np.exp(-np.arange(K_IN) / 40.0)[:, None]  # [k, k]
    x = rng.standard_normal((N_ROWS, K_IN)) @ mix + 0.1 * rng.standard_normal((N_ROWS, K_IN))
    x[:, :4] *= 10.0
    return w, x.astype(np.float32)


def hessian(x: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64).reshape(-1, x.shape[-1])
    return 2.0 * x64.T @ x64 / x64.shape[0]


def output_error(x: np.ndarray, w: np.ndarray, wq: np.ndarray) -> float:
    return float(np.linalg.norm(x @ w.T - x @ wq.T))


@pytest.fixture(scope="module")
def layer() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    w, x = correlated_layer()
    return w, x, hessian(x)


# ----------------------------------------------------------------------------- Hessian
def test_hessian_accumulation_equals_batch_formula():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((700, 48)).astype(np.float32)
    acc = HessianAccumulator(48)
    acc.add(x[:1])
    acc.add(x[1:300])
    acc.add(x[300:700].reshape(4, 100, 48))  # any leading shape: rows of k
    assert acc.count == 700
    np.testing.assert_allclose(acc.hessian, hessian(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        HessianAccumulator(3).hessian


# ------------------------------------------------------------------------ GPTQ vs RTN
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("group_size", [32, 64, 128, K_IN])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_below_rtn(layer, bits, group_size, symmetric, act_order):
    w, x, h = layer
    qt = gptq_quantize(w, h, bits, group_size, symmetric, act_order)
    rtn = quantize_rtn(w, bits, group_size, symmetric)
    ratio = output_error(x, w, qt.dequantize()) / output_error(x, w, rtn.dequantize())
    assert ratio < GPTQ_OVER_RTN_MAX[bits]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("symmetric", [False, True])
def test_identity_hessian_gives_rtn(bits, symmetric):
    # H = c I: no correlation to exploit, the error feedback is zero, GPTQ is RTN
    w, _ = correlated_layer(bits)
    for gs in (32, K_IN):
        qt = gptq_quantize(w, 3.0 * np.eye(K_IN), bits, gs, symmetric, clip_search=False)
        rtn = quantize_rtn(w, bits, gs, symmetric)
        np.testing.assert_array_equal(qt.codes, rtn.codes)
        np.testing.assert_array_equal(qt.scales, rtn.scales)
        if not symmetric:
            np.testing.assert_array_equal(qt.zeros, rtn.zeros)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("symmetric", [False, True])
def test_clip_search_rounds_each_group_no_worse_than_rtn(bits, symmetric):
    """With H = diag(d) there is no error feedback: each group is rounded on its own grid,
    and the searched grid (RTN's range among the candidates) gives every row a d-weighted
    squared error at most RTN's, lower on some rows (heavy-tailed weights), from a scale
    never above RTN's."""
    rng = np.random.default_rng(bits)
    w = rng.standard_t(3, (48, K_IN)).astype(np.float32)
    d = rng.uniform(0.5, 2.0, K_IN)
    gs = 32
    qt = gptq_quantize(w, np.diag(d), bits, gs, symmetric)
    rtn = quantize_rtn(w, bits, gs, symmetric)

    def row_err(q):  # [48]: sum over columns of d_j (dq - w)^2
        return (((q.dequantize() - w).astype(np.float64) ** 2) * d).sum(1)

    e_clip, e_rtn = row_err(qt), row_err(rtn)
    assert np.all(e_clip <= e_rtn * (1 + 1e-6))
    # finer grids gain less from clipping: at 6 bits asymmetric 15% of rows gain 1% or more
    assert (e_clip < 0.99 * e_rtn).mean() > (0.2 if bits <= 4 else 0.1)
    assert np.all(qt.scales.astype(np.float32) <= rtn.scales.astype(np.float32))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [48, 96, K_IN])  # 48, 96: partial last group, groups across blocks
def test_qtensor_consistent_with_what_gptq_committed(layer, act_order, symmetric, group_size):
    w, _, h = layer
    qt, committed = gptq_quantize(w, h, 3, group_size, symmetric, act_order, return_dequant=True)
    assert isinstance(qt, QTensor) and qt.shape == w.shape and qt.group_size == group_size
    assert qt.groups == -(-K_IN // group_size)
    assert qt.scales.dtype == np.float16 and qt.codes.dtype == np.uint8 and qt.codes.max() <= 7
    if symmetric:
        assert qt.zeros is None
    else:
        assert qt.zeros.dtype == np.float16
        assert np.all(qt.zeros == np.round(qt.zeros)) and qt.zeros.max() <= 7
    np.testing.assert_array_equal(qt.dequantize(), committed)  # exactly what the errors were fed from


def test_act_order_uses_static_groups_in_original_order(layer):
    # static groups: every scale/zero is RTN's, from the original weights, contiguous along k
    w, _, h = layer
    qt = gptq_quantize(w, h, 2, 64, False, act_order=True, clip_search=False)
    rtn = quantize_rtn(w, 2, 64, False)
    np.testing.assert_array_equal(qt.scales, rtn.scales)
    np.testing.assert_array_equal(qt.zeros, rtn.zeros)
    assert not np.array_equal(qt.codes, rtn.codes)  # but the codes carry the error feedback


@pytest.mark.parametrize("group_size", [48, K_IN])
def test_lazy_batches_equal_column_by_column(layer, group_size):
    # block 1 applies every update at once; lazy blocks (and groups starting mid-block,
    # whose scales see pending updates) must give the same result up to float rounding
    w, _, h = layer
    ref = gptq_quantize(w, h, 3, group_size, block_size=1).dequantize()
    for block in (17, 128):
        got = gptq_quantize(w, h, 3, group_size, block_size=block).dequantize()
        assert np.mean(got == ref) > 0.999
        np.testing.assert_allclose(got, ref, atol=0.5 * np.abs(w).max() / 7)  # one step at most


def test_dead_inputs_and_damping():
    w, x = correlated_layer(3)
    x[:, 10:20] = 0.0  # inputs that never fire
    qt = gptq_quantize(w, hessian(x), 4, 32, False)
    dq = qt.dequantize()
    assert np.all(np.isfinite(dq)) and np.all(dq[:, 10:20] == 0.0)
    with pytest.raises(ValueError):
        gptq_quantize(w, np.eye(5), 4, 32)


# ------------------------------------------------------- ternary with error feedback
@pytest.mark.parametrize("group_size", [64, 128, None])
@pytest.mark.parametrize("act_order", [False, True])
def test_ternary_error_feedback_below_plain_ternary(layer, group_size, act_order):
    w, x, h = layer
    qt, committed = gptq_quantize(w, h, "ternary", group_size, act_order=act_order, return_dequant=True)
    plain = quantize_ternary(w, group_size)
    assert qt.ternary and qt.bits == 2 and qt.zeros is None and qt.codes.max() <= 2
    assert qt.group_size == (group_size or K_IN) and qt.scales.shape == plain.scales.shape
    np.testing.assert_array_equal(qt.dequantize(), committed)
    ratio = output_error(x, w, qt.dequantize()) / output_error(x, w, plain.dequantize())
    assert ratio < TERNARY_EF_OVER_PLAIN_MAX
    if group_size is None:  # one absmean scale for the tensor, as BitNet b1.58
        assert np.all(qt.scales == plain.scales)


@pytest.mark.parametrize("group_size", [32, None])
def test_ternary_identity_hessian_gives_plain_ternary(group_size):
    w, _ = correlated_layer(4)
    qt = gptq_quantize(w, 3.0 * np.eye(K_IN), "ternary", group_size)
    plain = quantize_ternary(w, group_size)
    np.testing.assert_array_equal(qt.codes, plain.codes)
    np.testing.assert_array_equal(qt.scales, plain.scales)


def test_sequential_ternary_gptq_keeps_ternary_qtensors():
    args, wts = tiny_model_weights()
    tokens = calib.calibration_tokens(CharTokenizer(), "To be, or not to be, that is the question. " * 4, 3, 12)
    for gs in (16, None):
        model = Transformer(args, wts, calib.calibration_factory())
        qts, _ = calib.gptq_model_layers(model, tokens, "ternary", gs)
        assert len(qts) == 14 and all(q.ternary and q.zeros is None for q in qts.values())
        if gs is None:  # one scale per layer, not one for q, k and v stacked
            assert all(np.all(q.scales == q.scales[0, 0]) for q in qts.values())
            assert qts["blk.0.attn_q.weight"].scales[0, 0] != qts["blk.0.attn_k.weight"].scales[0, 0]


# ---------------------------------------------------------------- sequential calibration
def tiny_model_weights(seed: int = 0) -> tuple[ModelArgs, dict[str, np.ndarray]]:
    args = ModelArgs(arch="llama", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                     ffn_dim=64, vocab_size=40, norm_eps=1e-5, max_seq_len=64, rope_base=10000.0)
    rng = np.random.default_rng(seed)

    def r(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    wts = {"token_embd.weight": r(40, 32, scale=1.0), "output_norm.weight": 1 + r(32, scale=0.1)}
    for i in range(2):
        p = f"blk.{i}."
        wts.update({p + "attn_norm.weight": 1 + r(32, scale=0.1), p + "ffn_norm.weight": 1 + r(32, scale=0.1),
                    p + "attn_q.weight": r(32, 32), p + "attn_k.weight": r(16, 32), p + "attn_v.weight": r(16, 32),
                    p + "attn_output.weight": r(32, 32), p + "ffn_gate.weight": r(64, 32),
                    p + "ffn_up.weight": r(64, 32), p + "ffn_down.weight": r(32, 64)})
    return args, wts


class CharTokenizer:
    add_bos, bos_id, add_eos, eos_id = False, None, False, None

    def encode(self, text: str, add_bos: Any = None, special: bool = True, add_eos: Any = None) -> list[int]:
        return [ord(c) % 40 for c in text]


def test_sequential_calibration_sees_quantized_predecessors():
    args, wts = tiny_model_weights()
    tokens = calib.calibration_tokens(CharTokenizer(), "To be, or not to be, that is the question. " * 4, 3, 12)
    assert tokens.shape == (3, 12)
    seen: list[tuple[list[str], np.ndarray]] = []
    model = Transformer(args, wts, calib.calibration_factory())
    qts, stats = calib.gptq_model_layers(model, tokens, 2, 16, observer=lambda n, h: seen.append((n, h)))
    order = [[n.split(".", 2)[2].removesuffix(".weight") for n in names] for names, _ in seen]
    assert order == [["attn_q", "attn_k", "attn_v"], ["attn_output"], ["ffn_gate", "ffn_up"], ["ffn_down"]] * 2
    assert stats["layers"] == 14 == len(qts) and stats["calib_tokens"] == 36
    assert all(q.bits == 2 and q.group_size == 16 for q in qts.values())

    # each group's Hessian, recomputed with an ordinary full forward pass in which every
    # layer quantized before it (this block's and earlier blocks') runs its GPTQ weights
    done: set[str] = set()
    for names, h in seen:
        rec: list[np.ndarray] = []

        def factory(name: str, w: np.ndarray, target: str = names[0]):
            if name in done:
                return float_linear(name, qts[name].dequantize())
            f = float_linear(name, w)
            if name != target:
                return f
            return lambda x: (rec.append(x.copy()), f(x))[1]

        ref = Transformer(args, wts, factory)
        for s in range(len(tokens)):
            ref.forward(tokens[s], ref.new_cache(12), 0)
        np.testing.assert_allclose(h, hessian(np.concatenate(rec)), rtol=1e-4, atol=1e-5)
        done.update(names)


def tiny_model_files(tmp_path, monkeypatch, args, wts):
    """(model file, calibration text file) for the model-level quantizers: the file is a
    placeholder, read_float_model is patched to return (args, wts) with a CharTokenizer."""
    monkeypatch.setattr(calib, "read_float_model", lambda path: (args, wts, CharTokenizer(), {}))
    model_file = tmp_path / "tiny.gguf"
    model_file.write_bytes(b"")
    calib_file = tmp_path / "calib.txt"
    calib_file.write_text("Now is the winter of our discontent made glorious summer. " * 8)
    return model_file, calib_file


def test_quantize_model_gptq_builds_a_runnable_model(tmp_path, monkeypatch):
    args, wts = tiny_model_weights(1)
    model_file, calib_file = tiny_model_files(tmp_path, monkeypatch, args, wts)
    lm = calib.quantize_model_gptq(str(model_file), 3, 16, str(calib_file), n_samples=4, seq_len=16,
                                   n_threads=1, ctx=32, head_bits=16)
    assert lm.extra["gptq"]["layers"] == 14 and lm.quant.bits == 3
    qts = lm.extra["qtensors"]
    # the LUT model computes what the dequantized GPTQ weights compute (up to the kernel's
    # int8 activation tables)
    deq = Transformer(args, wts, lambda n, w: float_linear(n, qts[n].dequantize() if n in qts else w))
    toks = np.arange(10) % 40
    got = lm.model.forward(toks, lm.model.new_cache(32), 0)
    want = deq.forward(toks, deq.new_cache(32), 0)
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
    assert isinstance(lm.extra["reference"].tok_embd, np.ndarray)  # a float head keeps a float table
    lm8 = calib.quantize_model_gptq(str(model_file), 3, 16, str(calib_file), n_samples=4, seq_len=16,
                                    n_threads=1, ctx=32, head_bits=16, embd_bits=8)
    emb = lm8.extra["reference"].tok_embd
    assert isinstance(emb, Int8Rows) and lm8.quant.embedding_bits == 8
    got8 = lm8.model.forward(toks, lm8.model.new_cache(32), 0)
    assert 0 < np.abs(got8 - got).max() < 0.05 * np.abs(want).max()  # int8 rows: close, not equal
