"""Mixed precision: the bit allocation respects the budget and follows sensitivity, the
measured sensitivity finds the layer that matters least, and the whole method builds a
runnable model of QTensors with bits per layer."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from test_gptq import CharTokenizer, tiny_model_files, tiny_model_weights

from luthier.models import Transformer, float_linear
from luthier.quant import calibration as calib
from luthier.quant import mixed


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_blas_thread: Any) -> Any:
    yield


def avg_bpw(sizes: dict, bpw: dict, bits: dict) -> float:
    return sum(sizes[n] * bpw[n][bits[n]] for n in sizes) / sum(sizes.values())


def test_layer_bpw_counts_scales_and_zeros():
    assert mixed.layer_bpw(2, 64) == 2.5
    assert mixed.layer_bpw(3, 128, symmetric=True) == 3.125
    assert mixed.layer_bpw(4, 96) == pytest.approx(4 + 32 / 96)


@pytest.mark.parametrize("seed", range(5))
def test_allocation_respects_the_budget_and_is_maximal(seed):
    rng = np.random.default_rng(seed)
    names = [f"l{i}" for i in range(40)]
    sizes = {n: int(rng.integers(1, 20)) * 4096 for n in names}
    gs = {n: int(rng.choice([64, 96, 128])) for n in names}
    bpw = {n: {b: mixed.layer_bpw(b, gs[n]) for b in (2, 3, 4)} for n in names}
    # costs fall with bits, 3-5x per bit, scaled per layer
    scale = {n: float(rng.uniform(0.1, 10.0)) for n in names}
    cost = {n: {b: scale[n] * 4.0 ** -b * rng.uniform(0.9, 1.1) for b in (2, 3, 4)} for n in names}
    for budget in (2.6, 3.0, 3.3, 3.9, 4.4):
        bits = mixed.allocate_bits(sizes, bpw, cost, budget)
        used = avg_bpw(sizes, bpw, bits)
        assert used <= budget
        # maximal: no layer's upgrade that would lower the cost still fits
        total = sum(sizes.values())
        for n in names:
            for b in (2, 3, 4):
                if b > bits[n] and cost[n][b] < cost[n][bits[n]]:
                    assert (used * total + sizes[n] * (bpw[n][b] - bpw[n][bits[n]])) / total > budget
    assert all(b == 4 for b in mixed.allocate_bits(sizes, bpw, cost, 10.0).values())


def test_more_sensitive_layer_gets_more_bits():
    sizes = {"a": 1000, "b": 1000}
    bpw = {n: {b: mixed.layer_bpw(b, 64) for b in (2, 3, 4)} for n in sizes}  # 2.5, 3.5, 4.5
    cost = {"a": {2: 10.0, 3: 2.5, 4: 0.6}, "b": {2: 1.0, 3: 0.25, 4: 0.06}}
    bits = mixed.allocate_bits(sizes, bpw, cost, 3.5)  # room for one layer at 4 or both at 3
    assert bits["a"] > bits["b"]
    assert avg_bpw(sizes, bpw, bits) == 3.5  # exactly on the budget
    with pytest.raises(ValueError, match="below the cheapest"):
        mixed.allocate_bits(sizes, bpw, cost, 2.4)


def constructed_model() -> tuple[Any, dict]:
    """The tiny model with block 1's attention output scaled down 100x: the rounding
    errors of block 1's attention (q, k, v, o) hardly reach the logits."""
    args, wts = tiny_model_weights()
    wts = dict(wts)
    wts["blk.1.attn_output.weight"] = wts["blk.1.attn_output.weight"] * 0.01
    return args, wts


def test_measured_sensitivity_on_a_constructed_model():
    args, wts = constructed_model()
    tokens = calib.calibration_tokens(CharTokenizer(), "To be, or not to be, that is the question. " * 4, 3, 12)
    cost, info = mixed.measure_sensitivity(args, wts, tokens, (2, 3, 4), lambda k: 32)
    assert len(cost) == 14
    assert all(c[2] >= c[3] >= c[4] >= 0 for c in cost.values())  # fewer bits, more damage
    attn1 = {f"blk.1.{n}.weight" for n in ("attn_q", "attn_k", "attn_v", "attn_output")}
    assert set(sorted(cost, key=lambda n: cost[n][2])[:4]) == attn1  # o's output hardly counts
    names = list(cost)
    sizes = {n: int(wts[n].size) for n in names}
    bpw = {n: {b: mixed.layer_bpw(b, 32) for b in (2, 3, 4)} for n in names}  # 3, 4, 5
    bits = mixed.allocate_bits(sizes, bpw, cost, 4.0)
    assert avg_bpw(sizes, bpw, bits) <= 4.0
    assert all(bits[n] == 2 for n in attn1)  # the insensitive layers pay for the others
    assert max(bits.values()) == 4


def mixed_inputs(tmp_path, monkeypatch) -> tuple[Any, dict, Any, Any]:
    """The constructed model as the file quantize_model_mixed reads, and a calibration text."""
    args, wts = constructed_model()
    return (args, wts, *tiny_model_files(tmp_path, monkeypatch, args, wts))


def test_quantize_model_mixed_builds_a_runnable_model(tmp_path, monkeypatch):
    args, wts, model_file, calib_file = mixed_inputs(tmp_path, monkeypatch)
    lm = mixed.quantize_model_mixed(str(model_file), 3.7, 32, str(calib_file), n_samples=4, seq_len=16,
                                    sens_samples=2, sens_len=12, n_threads=1, ctx=32, head_bits=16)
    m = lm.extra["mixed"]
    qts = lm.extra["qtensors"]
    assert m["bpw"] <= 3.7 and len(qts) == 14 and sum(m["counts"].values()) == 14
    assert all(qts[n].bits == b for n, b in m["bits"].items())  # each layer at its own bits
    assert len(set(m["bits"].values())) > 1
    deq = Transformer(args, wts, lambda n, w: float_linear(n, qts[n].dequantize() if n in qts else w))
    toks = np.arange(10) % 40
    got = lm.model.forward(toks, lm.model.new_cache(32), 0)
    want = deq.forward(toks, deq.new_cache(32), 0)
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


def test_ppl_command_mixed(tmp_path, monkeypatch, capsys):
    from test_awq import run_ppl_command

    args, wts = constructed_model()
    ppl, err = run_ppl_command(tmp_path, monkeypatch, capsys, args, wts,
                               ["--method", "mixed", "--bpw-budget", "3.5", "--group-size", "32", "--mixed-rtn"])
    assert np.isfinite(ppl) and ppl > 1.0
    assert "bits/weight (budget 3.5)" in err


def test_ppl_command_mixed_needs_budget(tmp_path, monkeypatch, capsys):
    from test_awq import run_ppl_command

    args, wts = constructed_model()
    with pytest.raises(ValueError, match="--bpw-budget"):
        run_ppl_command(tmp_path, monkeypatch, capsys, args, wts, ["--method", "mixed"])


def test_candidates_parse_bits_and_bits_with_groups():
    assert mixed.parse_candidates("2,3,4") == (2, 3, 4)
    assert mixed.parse_candidates("3g128, 4G32,4") == ((3, 128), (4, 32), 4)
    assert mixed.parse_candidates("5g64,6") == ((5, 64), 6)
    for bad in ("7", "8g32", "4g0", "4gx", "", "g32"):
        with pytest.raises(ValueError, match="mixed candidates"):
            mixed.parse_candidates(bad)


def test_auto_candidates_span_the_budget():
    # asymmetric bits/weight: b + 32 / g
    assert mixed.parse_candidates("auto", 4.2) == ((3, 128), (3, 64), (3, 32), (4, 128), (4, 64), (4, 32))
    assert mixed.parse_candidates("AUTO", 5.5) == ((4, 128), (4, 64), (4, 32), (5, 128), (5, 64), (5, 32),
                                                   (6, 128), (6, 64))
    assert mixed.auto_candidates(4.2, symmetric=True)[-1] == (5, 128)  # 5.125 with fp16 scales only
    for budget in (2.3, 3.0, 3.9, 4.5, 6.0, 7.0):
        c = mixed.auto_candidates(budget)
        assert min(mixed.layer_bpw(b, g) for b, g in c) <= budget  # the allocation has room
        assert all(abs(mixed.layer_bpw(b, g) - budget) <= 1.25 and b >= budget - 1.6 for b, g in c)
    with pytest.raises(ValueError, match="budget"):
        mixed.parse_candidates("auto")
    with pytest.raises(ValueError, match="--mixed-bits"):
        mixed.auto_candidates(9.5)


def test_group_size_candidates_are_allocated_per_layer(tmp_path, monkeypatch):
    """Candidates that differ only in group size: finer groups cost more bits and are
    given to the layers that matter; each layer is built at its own group size."""
    args, wts, model_file, calib_file = mixed_inputs(tmp_path, monkeypatch)
    cands = ((3, 32), (3, 16), (3, 8))  # 4, 5, 7 bits/weight
    lm = mixed.quantize_model_mixed(str(model_file), 5.0, 32, str(calib_file), candidate_bits=cands,
                                    n_samples=4, seq_len=16, sens_samples=2, sens_len=12, n_threads=1, ctx=32,
                                    head_bits=16)
    m = lm.extra["mixed"]
    qts = lm.extra["qtensors"]
    assert m["bpw"] <= 5.0 and set(m["counts"]) == {"3g32", "3g16", "3g8"}
    assert all(qt.bits == 3 for qt in qts.values())
    assert {qt.group_size for qt in qts.values()} > {32}  # some layers got finer groups
    assert all(m["groups"][n] == qts[n].group_size for n in qts)
    attn1 = [f"blk.1.{n}.weight" for n in ("attn_q", "attn_k", "attn_v", "attn_output")]
    assert all(qts[n].group_size == 32 for n in attn1)  # the insensitive layers stay coarse
    sizes = {n: qts[n].n * qts[n].k for n in qts}
    achieved = sum(sizes[n] * mixed.layer_bpw(3, qts[n].group_size) for n in qts) / sum(sizes.values())
    assert achieved == pytest.approx(m["bpw"])
    deq = Transformer(args, wts, lambda n, w: float_linear(n, qts[n].dequantize() if n in qts else w))
    toks = np.arange(10) % 40
    got = lm.model.forward(toks, lm.model.new_cache(32), 0)
    want = deq.forward(toks, deq.new_cache(32), 0)
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


def test_awq_mixed_searches_each_layer_at_its_own_bits(tmp_path, monkeypatch):
    """awq+mixed: AWQ's scales are searched with each layer rounded at its chosen bits and
    folded into the norms; the LUT model computes what its QTensors with those folded
    norms compute, and the folding alone leaves the float model unchanged."""
    args, wts, model_file, calib_file = mixed_inputs(tmp_path, monkeypatch)
    lm = mixed.quantize_model_mixed(str(model_file), 3.7, 32, str(calib_file), n_samples=4, seq_len=16,
                                    sens_samples=2, sens_len=12, n_threads=1, ctx=32, head_bits=16, awq=True)
    m, qts, folded = lm.extra["mixed"], lm.extra["qtensors"], lm.extra["weights"]
    assert m["method"] == "awq+mixed" and m["bpw"] <= 3.7 and len(set(m["bits"].values())) > 1
    assert set(m["awq_search"]) == {f"blk.{i}.{k}" for i in range(2) for k in ("qkv", "o", "ffn", "down")}
    assert not np.array_equal(folded["blk.0.attn_norm.weight"], wts["blk.0.attn_norm.weight"])
    toks = np.arange(10) % 40
    deq = Transformer(args, folded, lambda n, w: float_linear(n, qts[n].dequantize() if n in qts else w))
    got = lm.model.forward(toks, lm.model.new_cache(32), 0)
    want = deq.forward(toks, deq.new_cache(32), 0)
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
    ref, flt = Transformer(args, wts), Transformer(args, folded)
    np.testing.assert_allclose(flt.forward(toks, flt.new_cache(32), 0), ref.forward(toks, ref.new_cache(32), 0),
                               rtol=1e-3, atol=1e-3 * np.abs(want).max())


def test_awq_hook_rounds_stacked_members_at_their_own_bits():
    """The scale search's quantizer for q, k, v stacked by rows, at 2, 3 and 4 bits, rounds
    each member's rows as that member's own quantizer does, on a row subset too."""
    from luthier.quant import awq

    args, _ = tiny_model_weights()
    hook = awq.AWQBlockHook(args, lambda k: 16, 4, False)
    rng = np.random.default_rng(3)
    parts = [rng.standard_normal((r, 32)).astype(np.float32) for r in (5, 3, 4)]
    quants = [(2, 16), (3, 16), (4, 32)]
    w = np.concatenate(parts)  # [12, 32]
    dq = hook._dequant(quants, np.cumsum([5, 3, 4]))
    want = np.concatenate([awq.fake_quantizer(b, g)(p) for (b, g), p in zip(quants, parts)])
    np.testing.assert_array_equal(dq(w), want)
    sub = np.array([0, 2, 6, 9, 10])  # 2 rows of q, 1 of k, 2 of v
    dqs = hook._dequant(quants, np.searchsorted(sub, np.cumsum([5, 3, 4])))
    np.testing.assert_array_equal(dqs(w[sub]), want[sub])
    with pytest.raises(ValueError, match="stacked rows"):
        dq(w[:7])
