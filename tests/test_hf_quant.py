"""GPTQ / AWQ checkpoint import (loaders/hf_quant.py): checkpoints written here from known
QTensors (tests/hf_quant_writer.py) must come back exactly, codes, scales and zeros, and
a whole SmolLM2 GPTQ folder must run like the same QTensors handed to the engine directly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from luthier.engine import QuantConfig, load_model, make_linear, read_float_model
from luthier.kernels import QLinear
from luthier.loaders.hf_quant import (
    HFQuantError,
    ImportedWeight,
    PermutedQLinear,
    UnsupportedQuantization,
    import_linear,
    quantization_config,
    unpack_awq,
    unpack_gptq,
)
from luthier.loaders.safetensors import HFFolder
from luthier.quant import QTensor, quantize_rtn

from hf_quant_writer import act_order_layout, awq_pack, awq_tensors, gptq_tensors, pack_stream, random_act_order

MODULE = "model.layers.0.mlp.up_proj"
# Kernel vs float matmul of the same dequantized weights (LUT tables are int8 per group):
# relative to the output's scale; measured ~1e-2 at these sizes.
KERNEL_RTOL = 5e-2


# ------------------------------------------------------------------ helpers
def known_qtensor(n: int, k: int, bits: int, gs: int, sym: bool, seed: int = 0, zero_lo: int = 0) -> QTensor:
    """Random codes, fp16 scales and integer zeros in [zero_lo, 2^bits) (v1 cannot hold 0)."""
    rng = np.random.default_rng(seed)
    groups = -(-k // gs)
    codes = rng.integers(0, 1 << bits, (n, k)).astype(np.uint8)
    scales = rng.uniform(0.001, 0.05, (n, groups)).astype(np.float16)
    zeros = None if sym else rng.integers(zero_lo, 1 << bits, (n, groups)).astype(np.float16)
    return QTensor(codes, scales, zeros, bits, gs)


def write_folder(path: Path, tensors: dict[str, np.ndarray], qcfg: dict | None, side: str | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    config: dict = {"model_type": "llama"}
    if qcfg is not None and side is None:
        config["quantization_config"] = qcfg
    elif qcfg is not None:
        (path / side).write_text(json.dumps(qcfg))
    (path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def gptq_config(bits: int, gs: int, sym: bool, fmt: str, desc_act: bool = False) -> dict:
    return {"quant_method": "gptq", "bits": bits, "group_size": gs, "sym": sym, "desc_act": desc_act,
            "checkpoint_format": fmt, "true_sequential": True}  # fmt: skip


def zeros_of(qt: QTensor) -> np.ndarray:
    """The real integer zeros [n, G] a checkpoint stores (symmetric: 2^(bits-1))."""
    return qt.zero_points().astype(np.int64)


def assert_same(a: QTensor, b: QTensor) -> None:
    assert (a.bits, a.group_size, a.ternary) == (b.bits, b.group_size, b.ternary)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.scales, b.scales)
    assert (a.zeros is None) == (b.zeros is None)
    if a.zeros is not None:
        np.testing.assert_array_equal(a.zeros, b.zeros)
    np.testing.assert_array_equal(a.dequantize(), b.dequantize())


# ------------------------------------------------------------------ bit layouts
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_stream_matches_python_integers(bits: int) -> None:
    """The oracle: a column's codes as one big Python integer, split into 32-bit words."""
    rng = np.random.default_rng(bits)
    k, c = 96, 3
    v = rng.integers(0, 1 << bits, (k, c))
    expected = np.zeros((k * bits // 32, c), np.int64)
    for j in range(c):
        big = sum(int(v[t, j]) << (bits * t) for t in range(k))
        expected[:, j] = [(big >> (32 * w)) & 0xFFFFFFFF for w in range(k * bits // 32)]
    packed = pack_stream(v, bits)
    np.testing.assert_array_equal(packed.view(np.uint32), expected)
    codes, zeros = unpack_gptq(packed, np.ascontiguousarray(packed.T), bits)  # zeros: the same stream along n
    np.testing.assert_array_equal(codes, v.T)
    np.testing.assert_array_equal(zeros, v)


def test_gptq_3bit_value_straddling_words() -> None:
    # value 10 has its low 2 bits in bits 30-31 of word 0 and its high bit in bit 0 of word 1
    v = np.zeros((32, 1), np.uint8)
    v[10] = 0b101
    words = pack_stream(v, 3).view(np.uint32)[:, 0]
    assert list(words) == [0b01 << 30, 0b1, 0]
    assert unpack_gptq(pack_stream(v, 3), pack_stream(np.zeros((32, 1), np.uint8), 3).T, 3)[0][0, 10] == 5


def test_awq_interleave_literal() -> None:
    cols = np.arange(8, dtype=np.uint8)[None]  # columns 0..7 hold values 0..7
    word = awq_pack(cols).view(np.uint32)[0, 0]
    assert word == 0x75316420  # nibbles in column order 0, 2, 4, 6, 1, 3, 5, 7
    codes, zeros = unpack_awq(awq_pack(cols), awq_pack(cols))
    np.testing.assert_array_equal(codes[:, 0], np.arange(8))
    np.testing.assert_array_equal(zeros[:, 0], np.arange(8))


# ------------------------------------------------------------------ single layers
GPTQ_CASES = [
    (fmt, bits, sym, act, gs)
    for fmt in ("gptq", "gptq_v2")
    for bits in (2, 3, 4)
    for sym in (True, False)
    for act in (False, True)
    for gs in (64,)
] + [("gptq_v2", 3, False, True, 32), ("gptq", 4, True, False, -1), ("gptq_v2", 2, False, False, 128)]  # fmt: skip


@pytest.mark.parametrize("fmt,bits,sym,act,gs", GPTQ_CASES)
def test_gptq_round_trip(tmp_path: Path, fmt: str, bits: int, sym: bool, act: bool, gs: int) -> None:
    n, k = 64, 160  # k = 2.5 groups of 64: a partial last group
    g = k if gs == -1 else gs
    # v1 stores zero - 1: a real zero of 0 is not representable, so known zeros start at 1
    qt = known_qtensor(n, k, bits, g, sym, seed=bits, zero_lo=1 if fmt == "gptq" else 0)
    perm = random_act_order(k, g, np.random.default_rng(7)) if act else None
    codes, g_idx = act_order_layout(qt.codes, perm, g) if act else (qt.codes, np.arange(k) // g)
    tensors = gptq_tensors(MODULE, codes, qt.scales, zeros_of(qt), bits, fmt, g_idx)
    tensors[MODULE.replace("up_proj", "down_proj") + ".weight"] = np.zeros((4, 4), np.float16)  # a float tensor
    folder = write_folder(tmp_path / "ckpt", tensors, gptq_config(bits, gs, sym, fmt, act))
    with HFFolder(folder) as f:
        cfg = quantization_config(f.config, f.path)
        assert cfg is not None and (cfg.method, cfg.bits, cfg.fmt) == ("gptq", bits, fmt)
        imp = import_linear(f, MODULE, cfg)
    assert_same(imp.qtensor, qt)
    if act:
        np.testing.assert_array_equal(imp.perm, perm)
        assert imp.perm.dtype == np.int32
        w = np.empty_like(codes, np.float32)
        w[:, perm] = qt.dequantize()
        np.testing.assert_array_equal(imp.dequantize(), w)
    else:
        assert imp.perm is None
        np.testing.assert_array_equal(imp.dequantize(), qt.dequantize())


def test_gptq_v1_zero_of_zero_reads_as_2_pow_bits(tmp_path: Path) -> None:
    """A v1 checkpoint cannot store a real zero of 0 (zero - 1 wraps to all ones); it reads
    back as 2^bits, which is what v1 runtime kernels compute (stored + 1)."""
    qt = known_qtensor(32, 64, 4, 32, sym=False, zero_lo=1)
    zeros = zeros_of(qt)
    zeros[0, 0] = 0
    tensors = gptq_tensors(MODULE, qt.codes, qt.scales, zeros, 4, "gptq")
    with HFFolder(write_folder(tmp_path / "c", tensors, gptq_config(4, 32, False, "gptq"))) as f:
        imp = import_linear(f, MODULE, quantization_config(f.config))
    assert imp.qtensor.zeros[0, 0] == 16
    np.testing.assert_array_equal(imp.qtensor.zeros.ravel()[1:], zeros.ravel()[1:])


@pytest.mark.parametrize("gs,side", [(32, None), (128, None), (64, "quant_config.json")])
def test_awq_gemm_round_trip(tmp_path: Path, gs: int, side: str | None) -> None:
    qt = known_qtensor(48, 256, 4, gs, sym=False, seed=gs)
    tensors = awq_tensors(MODULE, qt.codes, qt.scales, zeros_of(qt))
    if side:  # AutoAWQ's own file names its keys differently
        qcfg = {"zero_point": True, "q_group_size": gs, "w_bit": 4, "version": "GEMM"}
    else:
        qcfg = {"quant_method": "awq", "bits": 4, "group_size": gs, "version": "gemm", "zero_point": True}
    with HFFolder(write_folder(tmp_path / "awq", tensors, qcfg, side)) as f:
        cfg = quantization_config(f.config, f.path)
        imp = import_linear(f, MODULE, cfg)
    assert cfg.describe() == f"AWQ import (gemm): 4 bits, group {gs}, asymmetric"
    assert imp.perm is None
    assert_same(imp.qtensor, qt)


def test_autogptq_side_config(tmp_path: Path) -> None:
    qt = known_qtensor(32, 64, 4, 32, sym=True)
    tensors = gptq_tensors(MODULE, qt.codes, qt.scales, zeros_of(qt), 4, "gptq", np.arange(64) // 32)
    qcfg = {"bits": 4, "group_size": 32, "desc_act": False, "sym": True}  # AutoGPTQ: no format = v1
    with HFFolder(write_folder(tmp_path / "c", tensors, qcfg, "quantize_config.json")) as f:
        cfg = quantization_config(f.config, f.path)
        assert cfg.describe() == "GPTQ import (gptq): 4 bits, group 32, symmetric"
        assert_same(import_linear(f, MODULE, cfg).qtensor, qt)


def test_permuted_qlinear_computes_gathered_product() -> None:
    qt = known_qtensor(40, 128, 3, 32, sym=False, seed=3)
    perm = random_act_order(128, 32, np.random.default_rng(1))
    x = np.random.default_rng(2).standard_normal((3, 128)).astype(np.float32)
    lin = PermutedQLinear(qt, perm, n_threads=1)
    y = lin(x)
    np.testing.assert_array_equal(y, QLinear(qt)(np.ascontiguousarray(x[:, perm])))
    w = np.empty((40, 128), np.float32)
    w[:, perm] = qt.dequantize()
    ref = x @ w.T
    assert np.abs(y - ref).max() <= KERNEL_RTOL * np.abs(ref).max()
    lin.n_threads = 2
    assert lin.inner.n_threads == 2 and lin.nbytes == lin.packed.nbytes + 128 * 4
    with pytest.raises(ValueError, match="permutation"):
        PermutedQLinear(qt, np.zeros(128, np.int32))


# ------------------------------------------------------------------ malformed inputs
def _gptq_folder(tmp_path: Path, mutate=None, qcfg: dict | None = None) -> Path:
    qt = known_qtensor(32, 64, 4, 32, sym=False, zero_lo=1)
    tensors = gptq_tensors(MODULE, qt.codes, qt.scales, zeros_of(qt), 4, "gptq", np.arange(64) // 32)
    if mutate:
        mutate(tensors)
    return write_folder(tmp_path / "bad", tensors, qcfg or gptq_config(4, 32, False, "gptq"))


@pytest.mark.parametrize(
    "qcfg,match",
    [
        ({"quant_method": "gptq", "bits": 8, "group_size": 128}, "8-bit GPTQ is not supported"),
        ({"quant_method": "gptq", "bits": 5, "group_size": 128}, "bits must be one of"),
        ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "checkpoint_format 'marlin'"),
        ({"quant_method": "gptq", "bits": 4, "is_marlin_format": True}, "marlin"),
        ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "AWQ version 'gemv'"),
        ({"quant_method": "awq", "bits": 4, "version": "gemm", "zero_point": False}, "zero_point"),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quant_method 'bitsandbytes'"),
    ],
)
def test_unsupported_configs(qcfg: dict, match: str) -> None:
    with pytest.raises(UnsupportedQuantization, match=match):
        quantization_config({"quantization_config": qcfg})


def test_float_checkpoint_has_no_quantization() -> None:
    assert quantization_config({"model_type": "llama"}) is None


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda t: t.__setitem__(MODULE + ".qweight", t[MODULE + ".qweight"][:-1]), r"qweight holds k=56"),
        (lambda t: t.__setitem__(MODULE + ".qzeros", t[MODULE + ".qzeros"][:1]), r"qzeros: shape \(1, 4\)"),
        (lambda t: t.__setitem__(MODULE + ".scales", t[MODULE + ".scales"][:, :8]), r"scales: shape"),
        (lambda t: t.__setitem__(MODULE + ".qweight", t[MODULE + ".qweight"].astype(np.float32)), "expected I32"),
        (lambda t: t.pop(MODULE + ".qzeros"), "missing tensor"),
        (lambda t: t.__setitem__(MODULE + ".g_idx", np.r_[np.zeros(40), np.ones(24)].astype(np.int32)),
         "do not each hold 32 columns"),
        (lambda t: t.__setitem__(MODULE + ".g_idx", np.full(64, 7, np.int32)),
         r"g_idx: group indices must lie in \[0, 2\)"),
    ],
)  # fmt: skip
def test_malformed_tensors_are_named(tmp_path: Path, mutate, match: str) -> None:
    with HFFolder(_gptq_folder(tmp_path, mutate)) as f:
        with pytest.raises(HFQuantError, match=match):
            import_linear(f, MODULE, quantization_config(f.config))


def test_3bit_qweight_of_partial_block_is_refused(tmp_path: Path) -> None:
    qt = known_qtensor(32, 64, 3, 32, sym=True)
    tensors = gptq_tensors(MODULE, qt.codes, qt.scales, zeros_of(qt), 3, "gptq_v2")
    tensors[MODULE + ".qweight"] = tensors[MODULE + ".qweight"][:4]  # 4 words: not whole 3-word blocks
    with HFFolder(write_folder(tmp_path / "c", tensors, gptq_config(3, 32, True, "gptq_v2"))) as f:
        with pytest.raises(HFQuantError, match="3-bit"):
            import_linear(f, MODULE, quantization_config(f.config))


# ------------------------------------------------------------------ whole model (SmolLM2)
from luthier.loaders.bundled import smollm2_path  # noqa: E402

SMOLLM2 = smollm2_path()
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="SmolLM2 GGUF not installed")
CTX = 64
WHOLE = QuantConfig(bits=4, group_size=64)  # head_bits 8: the int8 head, as for any model
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smollm2_hf(tmp_path_factory: pytest.TempPathFactory):
    """SmolLM2 in HF layout: (config, float HF state dict, tokenizer folder)."""
    if SMOLLM2 is None:
        pytest.skip("SmolLM2 GGUF not installed")
    from luthier.loaders.gguf import GGUFFile
    from test_hf_folder import gguf_to_hf, hf_config, write_tokenizer

    f = GGUFFile(SMOLLM2)
    try:
        meta, weights = dict(f.metadata), {name: f.load_float(name) for name in f.tensors}
    finally:
        f.close()
    tok_dir = tmp_path_factory.mktemp("tok")
    write_tokenizer(tok_dir, meta)
    heads, kv = int(meta["llama.attention.head_count"]), int(meta["llama.attention.head_count_kv"])
    return hf_config(meta, weights, "float16"), gguf_to_hf(weights, "llama", heads, kv), tok_dir


def write_quantized_model(root: Path, smollm2_hf, bits: int, sym: bool, fmt: str, act: bool) -> tuple[Path, dict]:
    """A GPTQ (fmt "gptq" / "gptq_v2") or AWQ (fmt "gemm") folder of SmolLM2 whose linears are
    RTN QTensors; returns it and the QTensors (with their perms) by HF weight name."""
    import shutil

    config, hf, tok_dir = smollm2_hf
    rng = np.random.default_rng(0)
    gs = WHOLE.group_size
    tensors, known = {}, {}
    for name, w in hf.items():
        if ".layers." not in name or not name.endswith("proj.weight"):
            tensors[name] = np.ascontiguousarray(w, np.float32)  # embeddings, norms: as floats
            continue
        module = name[: -len(".weight")]
        perm = random_act_order(w.shape[1], gs, rng) if act else None
        # fancy-indexed columns come out Fortran-ordered: quantize a C-ordered copy
        qt = quantize_rtn(np.ascontiguousarray(w[:, perm]) if act else w, bits, gs, symmetric=sym)
        codes, g_idx = act_order_layout(qt.codes, perm, gs) if act else (qt.codes, np.arange(w.shape[1]) // gs)
        if fmt == "gemm":
            tensors |= awq_tensors(module, codes, qt.scales, zeros_of(qt))
        else:
            tensors |= gptq_tensors(module, codes, qt.scales, zeros_of(qt), bits, fmt, g_idx)
        known[name] = (qt, perm)
    folder = root / f"q{bits}{fmt}{'act' if act else ''}"
    folder.mkdir()
    awq = {"quant_method": "awq", "bits": 4, "group_size": gs, "version": "gemm", "zero_point": True}
    cfg = config | {"quantization_config": awq if fmt == "gemm" else gptq_config(bits, gs, sym, fmt, act)}
    (folder / "config.json").write_text(json.dumps(cfg))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, folder / name)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder, known


def reference_model(folder: Path, known: dict, native: bool):
    """The same QTensors given to the engine's pieces directly (no checkpoint in between)."""
    from luthier.models import ModelArgs, Transformer
    from luthier.models.hf_names import hf_layer_names
    from luthier.native import NativeModel

    with HFFolder(folder) as f:
        args = ModelArgs.from_hf_config(f.config)
        floats = {n: f.load_float(n) for n in f.tensor_names if n.endswith(".weight")}
    names = {f"blk.{i}.{g}": f"model.layers.{i}.{h}" for i in range(args.n_layers)
             for g, h in hf_layer_names(args).items()}  # fmt: skip
    names |= {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    if "lm_head.weight" in floats:
        names["output.weight"] = "lm_head.weight"
    # quantized linears are stored as codes only: Transformer just needs their shapes here
    weights = {g: floats[h] if h in floats else np.zeros(known[h][0].shape, np.float32) for g, h in names.items()}

    def factory(name: str, w: np.ndarray):
        hf_name = names.get(name)
        if hf_name in known:
            qt, perm = known[hf_name]
            lin = QLinear(qt, mode=WHOLE.mode, n_threads=1)
            return lin if perm is None else (lambda x: lin(np.ascontiguousarray(x[:, perm])))
        return make_linear(w, WHOLE.head_bits, WHOLE.head_group_size, WHOLE, 1)

    model = Transformer(args, weights, factory)
    return NativeModel(model, CTX, 1, WHOLE.mode) if native else model


def logits(model, ids: list[int]) -> np.ndarray:
    cache = model.new_cache(CTX)
    return np.asarray(model.forward(np.asarray(ids, np.int64), cache, 0), np.float32)


@needs_smollm2
@pytest.mark.parametrize("bits,sym,fmt", [(4, False, "gptq_v2"), (3, True, "gptq"), (4, False, "gemm")])
def test_quantized_smollm2_matches_direct_qtensors(tmp_path: Path, smollm2_hf, bits: int, sym: bool, fmt: str,
                                              capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    folder, known = write_quantized_model(tmp_path, smollm2_hf, bits, sym, fmt, act=False)
    lm = load_model(folder, WHOLE, n_threads=1, ctx=CTX, kv="f32")  # the reference NativeModel caches in f32
    assert type(lm.model).__name__ == "NativeModel"
    code_bytes = sum(qt.codes.size * bits // 8 for qt, _ in known.values())
    assert code_bytes < lm.linear_bytes < 2 * code_bytes + lm.args.dim * lm.tokenizer.vocab_size * 2
    ids = lm.tokenizer.encode(PROMPT)
    # same codes, same kernels, same arithmetic: bit for bit
    np.testing.assert_array_equal(logits(lm.model, ids), logits(reference_model(folder, known, True), ids))
    # float readers (calibration, convert) get the exact dequantized weights
    _, floats, _, _ = read_float_model(str(folder))
    qt, _ = known["model.layers.3.mlp.down_proj.weight"]
    np.testing.assert_array_equal(floats["blk.3.ffn_down.weight"], qt.dequantize())
    assert not any(isinstance(w, ImportedWeight) for w in floats.values())
    # `luthier quantize --bits source` stores the checkpoint's codes as they are
    from luthier.qfile import quantize_to_file

    out_file = tmp_path / "src.gguf"
    quantize_to_file(str(folder), str(out_file), QuantConfig(bits="source", group_size=64))
    lf = load_model(str(out_file), n_threads=1, ctx=CTX, kv="f32")
    np.testing.assert_array_equal(logits(lf.model, ids), logits(lm.model, ids))

    from luthier.cli import main

    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    method, desc = "AWQ" if fmt == "gemm" else "GPTQ", "symmetric" if sym else "asymmetric"
    assert f"quantization: {method} import ({fmt}): {bits} bits, group 64, {desc}" in out


@needs_smollm2
def test_act_order_gptq_smollm2_runs_natively(tmp_path: Path, smollm2_hf) -> None:
    """An act-order checkpoint runs on the native decoder, which gathers each linear's input
    columns by its perm (shared by q/k/v and gate/up when equal), and agrees with the
    numpy Transformer running PermutedQLinear, which is bit-exact to the direct QTensors."""
    folder, known = write_quantized_model(tmp_path, smollm2_hf, 4, False, "gptq_v2", act=True)
    from luthier.qfile import quantize_to_file

    with pytest.raises(ValueError, match="act-order"):  # the file format holds no column permutation
        quantize_to_file(str(folder), str(tmp_path / "act.gguf"), QuantConfig(bits="source"))
    assert not (tmp_path / "act.gguf").exists()
    lm = load_model(folder, WHOLE, n_threads=1, ctx=CTX)
    assert type(lm.model).__name__ == "NativeModel"
    ref = lm.extra["reference"]
    lin = ref.layers[0].w_down
    assert isinstance(lin, PermutedQLinear)
    np.testing.assert_array_equal(lin.perm, known["model.layers.0.mlp.down_proj.weight"][1])
    ids = lm.tokenizer.encode(PROMPT)
    direct = logits(reference_model(folder, known, False), ids)
    np.testing.assert_array_equal(logits(ref, ids), direct)
    # native vs numpy: the same codes, but the two paths round activations differently
    # before the int8 tables, and 30 layers amplify that (the non-act-order model differs
    # as much, ~5% of the largest logit): compare the shape of each row's distribution
    assert min(_row_corr(logits(lm.model, ids), direct)) > 0.99
    # one linear without its gather (layer 0's down) is far off: the check can fail
    lm.model._dec.set_lut(0, "down", *_packed_args(lin.packed))
    assert max(_row_corr(logits(lm.model, ids), direct)) < 0.9


def _row_corr(a: np.ndarray, b: np.ndarray) -> list[float]:
    return [float(np.corrcoef(x, y)[0, 1]) for x, y in zip(a, b)]


def _packed_args(p):
    return p.n, p.k, p.bits, p.group_size, p.w, p.s, p.z, p.zero_const


@needs_smollm2
def test_native_perm_rejects_non_permutations(tmp_path: Path, smollm2_hf) -> None:
    folder, _ = write_quantized_model(tmp_path, smollm2_hf, 4, False, "gptq_v2", act=False)
    lm = load_model(folder, WHOLE, n_threads=1, ctx=CTX)
    k = lm.args.dim
    with pytest.raises(ValueError, match="permutation"):
        lm.model._dec.set_perm(0, "q", np.zeros(k, np.int32))
    with pytest.raises(ValueError, match="length k"):
        lm.model._dec.set_perm(0, "q", np.arange(k - 1, dtype=np.int32))
