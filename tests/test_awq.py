"""AWQ: folding the scales leaves the float model unchanged, the scale and clip searches
lower the output error of round-to-nearest, and the sequential AWQ of a tiny random
transformer builds a model that computes what its QTensors and folded norms say."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from test_gptq import CharTokenizer, tiny_model_files, tiny_model_weights

from luthier.models import Transformer, float_linear
from luthier.quant import awq, quantize_rtn
from luthier.quant import calibration as calib

# AWQ-scaled RTN's output error over plain RTN's on the outlier-channel layer below:
# measured 0.41-0.49 over the cases; the bound leaves a wide margin.
AWQ_OVER_RTN_MAX = 0.7


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_blas_thread: Any) -> Any:
    yield


def outlier_layer(seed: int = 0, n: int = 64, k: int = 256, rows: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """(w [n, k], X [rows, k]): Gaussian weights; activations whose mean |x| spans two
    orders of magnitude, with 8 outlier channels 30x larger, as LLM inputs after RMSNorm."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    mag = np.exp(rng.uniform(-1.5, 1.5, k))  # [k]
    mag[rng.choice(k, 8, replace=False)] *= 30.0
    x = rng.standard_normal((rows, k)) * mag
    return w, x.astype(np.float32)


def output_error(x: np.ndarray, w: np.ndarray, wq: np.ndarray) -> float:
    return float(np.linalg.norm(x @ w.T - x @ wq.T))


def rtn(bits: int, gs: int):
    return lambda v: quantize_rtn(v, bits, gs, False).dequantize()


@pytest.mark.parametrize("bits, gs", [(2, 64), (3, 128), (4, 128), (4, 256)])
def test_awq_scaling_lowers_output_error_on_outlier_channels(bits, gs):
    w, x = outlier_layer(bits)
    h = x.astype(np.float64).T @ x
    s, info = awq.search_scale(w, h, np.abs(x).mean(0), rtn(bits, gs), group_size=gs)
    assert s.shape == (w.shape[1],) and np.all(s > 0)
    wq = rtn(bits, gs)(w * s) / s  # what the scaled layer computes on x / s
    ratio = output_error(x, w, wq) / output_error(x, w, rtn(bits, gs)(w))
    assert ratio < AWQ_OVER_RTN_MAX
    assert info["alpha"] > 0 and info["loss"] < info["loss_rtn"]
    # the search's loss is the output error through the Hessian
    assert info["loss"] == pytest.approx(output_error(x, w, wq) ** 2, rel=1e-3)


def test_scale_search_never_worse_than_rtn_and_tied_scales():
    # identical input channels: nothing to gain; the search may keep alpha 0 (plain RTN)
    rng = np.random.default_rng(5)
    w = rng.standard_normal((32, 64)).astype(np.float32)
    x = rng.standard_normal((512, 64)).astype(np.float32)
    h = x.astype(np.float64).T @ x
    _, info = awq.search_scale(w, h, np.abs(x).mean(0), rtn(3, 32), group_size=32)
    assert info["loss"] <= info["loss_rtn"]
    # tied channels (o's inputs read from one v row) get one scale each
    tie = np.arange(64) % 16
    s, _ = awq.search_scale(w, h, np.abs(x).mean(0), rtn(3, 32), tie=tie, group_size=32)
    assert s.shape == (16,)


def test_clip_search_lowers_group_error():
    w, x = outlier_layer(7)
    w[:, 5] *= 8.0  # a few large weights stretch their groups' grids
    gs = 64
    h = (x.astype(np.float64).T @ x).astype(np.float32)
    clipped = awq.search_clip(w, h, rtn(3, gs), gs)
    assert np.all(np.abs(clipped) <= np.abs(w) + 1e-6)

    def group_err(wq: np.ndarray) -> float:  # the per-group errors the search minimizes
        e = (w - wq).reshape(w.shape[0], -1, gs)  # [n, k] -> [n, G, gs]
        xg = x.reshape(x.shape[0], -1, gs)  # [rows, k] -> [rows, G, gs]
        return float(sum(np.square(xg[:, g] @ e[:, g].T).sum() for g in range(e.shape[1])))

    assert group_err(rtn(3, gs)(clipped)) < group_err(rtn(3, gs)(w))


# ------------------------------------------------------------------------------- folding
def _variants() -> list[tuple[str, Any, dict]]:
    args, wts = tiny_model_weights(2)
    out = [("llama-gqa", args, wts)]
    # v/q/k biases and an offset norm convention (Gemma HF: x * (1 + w))
    rng = np.random.default_rng(3)
    a2 = dataclasses.replace(args, qkv_bias=True, norm_weight_offset=1.0)
    w2 = dict(wts)
    for i in range(a2.n_layers):
        for n, size in (("attn_q", 32), ("attn_k", 16), ("attn_v", 16)):
            w2[f"blk.{i}.{n}.bias"] = (rng.standard_normal(size) * 0.1).astype(np.float32)
        for n in ("attn_norm", "ffn_norm"):
            w2[f"blk.{i}.{n}.weight"] = wts[f"blk.{i}.{n}.weight"] - 1.0
    out.append(("bias-offset", a2, w2))
    return out


@pytest.mark.parametrize("name, args, wts", _variants(), ids=lambda v: v if isinstance(v, str) else "")
def test_folding_scales_is_neutral(name, args, wts):
    rng = np.random.default_rng(11)
    nkv = args.n_kv_heads * args.head_dim
    scales = {i: {"qkv": np.exp(rng.uniform(-1, 1, args.dim)).astype(np.float32),
                  "o": np.exp(rng.uniform(-1, 1, nkv)).astype(np.float32),
                  "ffn": np.exp(rng.uniform(-1, 1, args.dim)).astype(np.float32),
                  "down": np.exp(rng.uniform(-1, 1, args.ffn_dim)).astype(np.float32)}
              for i in range(args.n_layers)}
    folded = awq.fold_into_weights(args, wts, scales)
    assert not np.allclose(folded["blk.0.attn_q.weight"], wts["blk.0.attn_q.weight"])
    toks = np.arange(20) % 40
    ref, got = Transformer(args, wts), Transformer(args, folded)
    want = ref.forward(toks, ref.new_cache(32), 0)
    out = got.forward(toks, got.new_cache(32), 0)
    assert np.abs(out - want).max() <= 1e-5 * np.abs(want).max()


def test_o_tie_maps_query_heads_to_their_kv_head():
    args, _ = tiny_model_weights()  # 4 heads, 2 kv heads, head_dim 8
    tie = awq.o_tie(args)
    assert tie.shape == (32,)
    np.testing.assert_array_equal(tie[:8], np.arange(8))  # head 0 -> kv head 0
    np.testing.assert_array_equal(tie[8:16], np.arange(8))  # head 1 -> kv head 0
    np.testing.assert_array_equal(tie[16:24], np.arange(8, 16))  # head 2 -> kv head 1


# --------------------------------------------------------------------- sequential AWQ
@pytest.mark.parametrize("quant", ["rtn", "rtn-clip", "gptq"])
def test_sequential_awq_folds_consistently(quant):
    args, wts = tiny_model_weights()
    tokens = calib.calibration_tokens(CharTokenizer(), "To be, or not to be, that is the question. " * 4, 3, 12)
    model = Transformer(args, wts, calib.calibration_factory())
    qts, scales, stats = awq.awq_model_layers(model, tokens, 3, lambda k: 16, use_gptq=quant == "gptq",
                                              clip=quant == "rtn-clip")
    assert len(qts) == 14 and sorted(scales) == [0, 1]
    assert all(set(s) == {"qkv", "o", "ffn", "down"} for s in scales.values())
    assert stats["mean_loss_over_rtn"] <= 1.0
    # the scales, folded into the float weights, leave the float model unchanged, and the
    # calibration model's norm vectors are exactly those folded norms
    folded = awq.fold_into_weights(args, wts, scales)
    toks = np.arange(12) % 40
    ref, got = Transformer(args, wts), Transformer(args, folded)
    want = ref.forward(toks, ref.new_cache(16), 0)
    assert np.abs(got.forward(toks, got.new_cache(16), 0) - want).max() <= 1e-5 * np.abs(want).max()
    for i, layer in enumerate(model.layers):
        np.testing.assert_allclose(layer.attn_norm, folded[f"blk.{i}.attn_norm.weight"], rtol=1e-6)
        np.testing.assert_allclose(layer.ffn_norm, folded[f"blk.{i}.ffn_norm.weight"], rtol=1e-6)
    # the QTensors quantize the scaled weights
    for name, qt in qts.items():
        w = folded[name]
        if quant == "rtn":  # exactly round-to-nearest of the folded weights
            np.testing.assert_array_equal(qt.codes, quantize_rtn(w, 3, 16, False).codes)
        elif quant == "rtn-clip":  # clipped to at least 0.55 max|w|, then rounded
            lim = 0.45 * np.abs(w).max() + (w.max(1) - w.min(1)).max() / 7
            assert np.abs(qt.dequantize() - w).max() <= lim


def test_quantize_model_awq_builds_a_runnable_model(tmp_path, monkeypatch):
    args, wts = tiny_model_weights(1)
    model_file, calib_file = tiny_model_files(tmp_path, monkeypatch, args, wts)
    lm = awq.quantize_model_awq(str(model_file), 4, 16, str(calib_file), n_samples=4, seq_len=16,
                                n_threads=1, ctx=32, head_bits=16)
    assert lm.extra["awq"]["layers"] == 14 and lm.quant.bits == 4 and lm.quantize_seconds > 0
    qts, folded = lm.extra["qtensors"], lm.extra["weights"]
    # the LUT model computes what the QTensors with the folded norms compute
    deq = Transformer(args, folded, lambda n, w: float_linear(n, qts[n].dequantize() if n in qts else w))
    toks = np.arange(10) % 40
    got = lm.model.forward(toks, lm.model.new_cache(32), 0)
    want = deq.forward(toks, deq.new_cache(32), 0)
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
    # and is close to the float model (4 bits)
    ref = Transformer(args, wts)
    flt = ref.forward(toks, ref.new_cache(32), 0)
    assert np.abs(got - flt).max() < 0.5 * np.abs(flt).max()


@pytest.mark.parametrize("bits, gs, symmetric", [(2, 64, False), (3, 128, True), (4, 32, False), (4, 256, True)])
def test_fake_quantizer_equals_rtn_dequantized(bits, gs, symmetric):
    w, _ = outlier_layer(1)
    w[3, :40] = 0.0  # an all-zero group: the floored scale
    np.testing.assert_array_equal(awq.fake_quantizer(bits, gs, symmetric)(w),
                                  quantize_rtn(w, bits, gs, symmetric).dequantize())


# ------------------------------------------------------------------ luthier ppl --method
def run_ppl_command(tmp_path, monkeypatch, capsys, args, wts, extra: list[str]) -> tuple[float, str]:
    """`luthier ppl` on the tiny model (char tokens): (the printed PPL, stderr)."""
    import argparse

    from luthier.ppl import add_ppl_parser

    monkeypatch.setattr(calib, "read_float_model", lambda path: (args, wts, CharTokenizer(), {}))
    model_file = tmp_path / "tiny.gguf"
    model_file.write_bytes(b"")
    text = tmp_path / "text.txt"
    text.write_text("The quality of mercy is not strained; it droppeth as the gentle rain. " * 3)
    calib_file = tmp_path / "calib.txt"
    calib_file.write_text("Now is the winter of our discontent made glorious summer. " * 8)
    p = argparse.ArgumentParser(prog="luthier")
    add_ppl_parser(p.add_subparsers(dest="cmd"))
    a = p.parse_args(["ppl", str(model_file), "--text", str(text), "--ctx", "32", "--chunks", "2", "-t", "1",
                      "--calib", str(calib_file), "--calib-samples", "3", "--calib-len", "16", *extra])
    assert a.fn(a) == 0
    cap = capsys.readouterr()
    return float([ln for ln in cap.out.splitlines() if ln.startswith("PPL = ")][0].split()[2]), cap.err


@pytest.mark.parametrize("extra", [["--method", "awq", "--bits", "4", "--group-size", "16"],
                                   ["--method", "awq+gptq", "--bits", "3", "--group-size", "16"],
                                   ["--method", "awq", "--bits", "3", "--group-size", "16", "--no-awq-clip",
                                    "--no-awq-duo", "--awq-grid", "5"],
                                   ["--method", "gptq", "--bits", "ternary", "--group-size", "16"]])
def test_ppl_command_methods(tmp_path, monkeypatch, capsys, extra):
    args, wts = tiny_model_weights(1)
    ppl, err = run_ppl_command(tmp_path, monkeypatch, capsys, args, wts, extra)
    assert np.isfinite(ppl) and ppl > 1.0
    assert f"{extra[1]}: 14 layers in" in err


def test_ppl_command_awq_needs_calib(tmp_path):
    import argparse

    from luthier.ppl import add_ppl_parser

    f = tmp_path / "t.txt"
    f.write_text("some text")
    p = argparse.ArgumentParser(prog="luthier")
    add_ppl_parser(p.add_subparsers(dest="cmd"))
    a = p.parse_args(["ppl", "--text", str(f), "--method", "awq"])
    with pytest.raises(ValueError, match="--calib"):
        a.fn(a)
