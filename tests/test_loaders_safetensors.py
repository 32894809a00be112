"""Hugging Face folders and safetensors files: round trips against the real
`safetensors` package, bf16 written by hand, and the format's rules enforced."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

st_numpy = pytest.importorskip("safetensors.numpy")

from luthier.loaders.safetensors import (  # noqa: E402
    HFFolder,
    SafetensorsError,
    load_safetensors_file,
    save_safetensors,
)

CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2, "rms_norm_eps": 1e-5}


def make_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "model.embed_tokens.weight": rng.standard_normal((17, 8)).astype(np.float32),
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((8, 8)).astype(np.float32),
        "model.layers.0.input_layernorm.weight": rng.standard_normal(8).astype(np.float32),
        "model.norm.weight": rng.standard_normal(8).astype(np.float32),
        "lm_head.weight": rng.standard_normal((17, 8)).astype(np.float32),
        "scalar": np.array(1.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }


def bf16_exact(x: np.ndarray) -> np.ndarray:
    """float32 values that bf16 holds exactly (low 16 bits cleared)."""
    return (x.astype(np.float32).view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)


def write_bf16_by_hand(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """A safetensors file built byte by byte: u64 header length, JSON, bf16 payloads."""
    header, payload = {}, b""
    for name, x in tensors.items():
        bits = (bf16_exact(x).view(np.uint32) >> 16).astype("<u2").tobytes()
        offsets = [len(payload), len(payload) + len(bits)]
        header[name] = {"dtype": "BF16", "shape": list(x.shape), "data_offsets": offsets}
        payload += bits
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + payload)


def write_folder(path: Path, files: dict[str, dict[str, np.ndarray]], index: bool = False) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(CONFIG))
    for filename, tensors in files.items():
        st_numpy.save_file(tensors, str(path / filename), metadata={"format": "pt"})
    if index:
        weight_map = {name: filename for filename, tensors in files.items() for name in tensors}
        (path / HFFolder.INDEX).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return path


def test_single_file_f32_round_trip(tmp_path: Path) -> None:
    tensors = make_tensors()
    folder = write_folder(tmp_path / "m", {"model.safetensors": tensors})
    (folder / "tokenizer.json").write_text("{}")
    with HFFolder(folder) as hf:
        assert hf.config == CONFIG
        assert sorted(hf.tensor_names) == sorted(tensors)
        assert hf.tokenizer_json_path == folder / "tokenizer.json"
        assert hf.tokenizer_config is None
        assert hf.metadata == {"format": "pt"}
        for name, x in tensors.items():
            out = hf.load_float(name)
            assert out.dtype == np.float32 and out.shape == x.shape and out.flags.writeable
            np.testing.assert_array_equal(out, x)
            assert hf.tensors[name].dtype == "F32" and hf.tensors[name].shape == x.shape
        raw = hf.raw("model.norm.weight")
        assert not raw.flags.writeable
        with pytest.raises(KeyError):
            hf.load_float("missing")


def test_f16_round_trip(tmp_path: Path) -> None:
    tensors = {k: v.astype(np.float16) for k, v in make_tensors(1).items()}
    folder = write_folder(tmp_path / "m", {"model.safetensors": tensors})
    with HFFolder(folder) as hf:
        assert hf.tokenizer_json_path is None
        for name, x in tensors.items():
            assert hf.tensors[name].dtype == "F16"
            np.testing.assert_array_equal(hf.load_float(name), x.astype(np.float32))


def test_bf16_written_by_hand(tmp_path: Path) -> None:
    tensors = make_tensors(2)
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    write_bf16_by_hand(folder / "model.safetensors", tensors)
    special = np.array([0.0, -0.0, np.inf, -np.inf, 1e-40, -3.0e38], dtype=np.float32)
    write_bf16_by_hand(folder / "special.safetensors", {"special": special})
    with HFFolder(folder) as hf:
        for name, x in tensors.items():
            assert hf.tensors[name].dtype == "BF16"
            out = hf.load_float(name)
            assert out.shape == x.shape
            np.testing.assert_array_equal(out.view(np.uint32), bf16_exact(x).view(np.uint32))
        np.testing.assert_array_equal(hf.load_float("special").view(np.uint32), bf16_exact(special).view(np.uint32))


def test_bf16_agrees_with_ml_dtypes_and_safetensors(tmp_path: Path) -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.random.default_rng(3).standard_normal((5, 7)).astype(np.float32)
    # written by the real package from an ml_dtypes array, read by us
    st_numpy.save_file({"w": x.astype(ml_dtypes.bfloat16)}, str(tmp_path / "a.safetensors"))
    ours = load_safetensors_file(tmp_path / "a.safetensors")["w"]
    np.testing.assert_array_equal(ours, x.astype(ml_dtypes.bfloat16).astype(np.float32))
    # our writer rounds float32 -> bf16 to nearest even, like ml_dtypes
    save_safetensors(tmp_path / "b.safetensors", {"w": x}, dtype="BF16")
    np.testing.assert_array_equal(
        load_safetensors_file(tmp_path / "b.safetensors")["w"], x.astype(ml_dtypes.bfloat16).astype(np.float32)
    )


def test_sharded_with_index(tmp_path: Path) -> None:
    tensors = make_tensors(4)
    names = list(tensors)
    shards = {
        "model-00001-of-00002.safetensors": {n: tensors[n] for n in names[:3]},
        "model-00002-of-00002.safetensors": {n: tensors[n].astype(np.float16) for n in names[3:]},
    }
    folder = write_folder(tmp_path / "m", shards, index=True)
    with HFFolder(folder) as hf:
        assert sorted(hf.tensor_names) == sorted(names)
        for n in names[:3]:
            np.testing.assert_array_equal(hf.load_float(n), tensors[n])
        for n in names[3:]:
            np.testing.assert_array_equal(hf.load_float(n), tensors[n].astype(np.float16).astype(np.float32))
            assert hf.tensors[n].file.name == "model-00002-of-00002.safetensors"


def test_sharded_without_index_and_duplicates(tmp_path: Path) -> None:
    tensors = make_tensors(5)
    names = list(tensors)
    folder = write_folder(tmp_path / "m", {"a.safetensors": {n: tensors[n] for n in names[:2]},
                                           "b.safetensors": {n: tensors[n] for n in names[2:]}})  # fmt: skip
    with HFFolder(folder) as hf:
        assert sorted(hf.tensor_names) == sorted(names)
    st_numpy.save_file({names[0]: tensors[names[0]]}, str(folder / "c.safetensors"))
    with pytest.raises(SafetensorsError, match="in both"):
        HFFolder(folder)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda wm: wm.update({"model.norm.weight": "../outside.safetensors"}), "invalid shard"),
        (lambda wm: wm.update({"model.norm.weight": "/etc/passwd.safetensors"}), "invalid shard"),
        (lambda wm: wm.update({"model.norm.weight": "model.bin"}), "invalid shard"),
        (lambda wm: wm.update({"model.norm.weight": 3}), "invalid shard"),
        (lambda wm: wm.update({"model.norm.weight": "gone.safetensors"}), "missing weights file"),
        (lambda wm: wm.update({"not.in.file": "model-00001-of-00002.safetensors"}), "does not hold"),
        (lambda wm: wm.clear(), "weight_map"),
    ],
)
def test_bad_index(tmp_path: Path, edit: object, message: str) -> None:
    tensors = make_tensors(6)
    names = list(tensors)
    shards = {
        "model-00001-of-00002.safetensors": {n: tensors[n] for n in names[:3]},
        "model-00002-of-00002.safetensors": {n: tensors[n] for n in names[3:]},
    }
    folder = write_folder(tmp_path / "m", shards, index=True)
    index = json.loads((folder / HFFolder.INDEX).read_text())
    edit(index["weight_map"])  # type: ignore[operator]
    (folder / HFFolder.INDEX).write_text(json.dumps(index))
    with pytest.raises(SafetensorsError, match=message):
        HFFolder(folder)


def test_bad_folders(tmp_path: Path) -> None:
    with pytest.raises(SafetensorsError, match="not a directory"):
        HFFolder(tmp_path / "nope")
    (tmp_path / "a").mkdir()
    with pytest.raises(SafetensorsError, match="config.json"):
        HFFolder(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text("[1, 2]")
    with pytest.raises(SafetensorsError, match="not a JSON object"):
        HFFolder(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text("{bad json")
    with pytest.raises(SafetensorsError, match="invalid JSON"):
        HFFolder(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text("{}")
    with pytest.raises(SafetensorsError, match="no \\*.safetensors"):
        HFFolder(tmp_path / "a")


def test_tokenizer_config(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "m", {"model.safetensors": make_tensors()})
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ x }}"}))
    with HFFolder(folder) as hf:
        assert hf.tokenizer_config == {"chat_template": "{{ x }}"}


def test_writer_is_read_by_reference(tmp_path: Path) -> None:
    """Our writer's f32/f16/int files load in the real package identically."""
    tensors = make_tensors(7)
    tensors["ids"] = np.arange(-3, 9, dtype=np.int64).reshape(3, 4)
    save_safetensors(tmp_path / "x.safetensors", tensors, metadata={"format": "np"})
    ref = st_numpy.load_file(str(tmp_path / "x.safetensors"))
    assert sorted(ref) == sorted(tensors)
    for name, x in tensors.items():
        assert ref[name].dtype == x.dtype
        np.testing.assert_array_equal(ref[name], x)
    save_safetensors(tmp_path / "h.safetensors", tensors, dtype="F16")
    for name, x in st_numpy.load_file(str(tmp_path / "h.safetensors")).items():
        np.testing.assert_array_equal(x, tensors[name].astype(np.float16))


# --------------------------------------------------------------------------
# malformed files


def _header_file(path: Path, header: object, payload: bytes = b"", raw: bytes | None = None) -> Path:
    text = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + payload)
    return path


GOOD = {
    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
    "b": {"dtype": "F16", "shape": [2], "data_offsets": [8, 12]},
}


@pytest.mark.parametrize(
    ("header", "payload", "message"),
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 7, "end at byte"),  # short data
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 9, "end at byte"),  # trailing bytes
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "needs 12"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, "hold"),
        ({"a": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unknown dtype"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "shape"),
        ({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, b"\0" * 8, "shape"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, -8]}}, b"\0" * 8, "data_offsets"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, b"\0" * 8, "data_offsets"),
        ({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, "exactly"),
        ({"a": [1, 2]}, b"", "exactly"),
        ({"a": {"dtype": "F32", "shape": [1 << 62, 1 << 62], "data_offsets": [0, 8]}}, b"\0" * 8, "needs"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 1 << 62]}}, b"\0" * 8, "hold"),
        ({**GOOD, "b": {"dtype": "F16", "shape": [2], "data_offsets": [4, 8]}}, b"\0" * 12, "contiguous"),  # overlap
        ({**GOOD, "b": {"dtype": "F16", "shape": [2], "data_offsets": [10, 14]}}, b"\0" * 14, "contiguous"),  # gap
        ({**GOOD, "__metadata__": {"k": 1}}, b"\0" * 12, "__metadata__"),
        ({**GOOD, "__metadata__": [1]}, b"\0" * 12, "__metadata__"),
        ([1, 2], b"", "start with"),
    ],
)
def test_malformed_headers(tmp_path: Path, header: object, payload: bytes, message: str) -> None:
    path = _header_file(tmp_path / "x.safetensors", header, payload)
    with pytest.raises(SafetensorsError, match=message):
        load_safetensors_file(path)


def test_malformed_header_bytes(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    for raw, message in [
        (b'{"a": ', "not valid JSON"),
        (b"\xff\xfe{}", "start with"),
        (b'{"a": 1, "a": 2}', "duplicate"),
        (b"{\xff}", "not valid JSON"),
        (b"[" * 100 + b"]" * 100, "start with"),
        (b'{"x":' + b"[" * 100000 + b"]" * 100000 + b"}", "not valid JSON"),  # RecursionError
    ]:
        with pytest.raises(SafetensorsError, match=message):
            load_safetensors_file(_header_file(p, None, raw=raw))
    p.write_bytes(b"\x01\x00")
    with pytest.raises(SafetensorsError, match="too small"):
        load_safetensors_file(p)
    p.write_bytes(struct.pack("<Q", 200_000_000) + b"{}")
    with pytest.raises(SafetensorsError, match="limit"):
        load_safetensors_file(p)
    p.write_bytes(struct.pack("<Q", 2**64 - 1) + b"{}")
    with pytest.raises(SafetensorsError, match="limit"):
        load_safetensors_file(p)
    p.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(SafetensorsError, match="past the end"):
        load_safetensors_file(p)
    _header_file(p, {}, b"")
    assert load_safetensors_file(p) == {}


def test_truncated_everywhere(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    st_numpy.save_file({"a": np.arange(6, dtype=np.float32), "b": np.ones((2, 3), np.float16)}, str(good))
    data = good.read_bytes()
    bad = tmp_path / "bad.safetensors"
    for cut in range(len(data)):
        bad.unlink(missing_ok=True)  # a fresh file each time: truncating a mapped one can be slow
        bad.write_bytes(data[:cut])
        with pytest.raises(SafetensorsError):
            load_safetensors_file(bad)
    out = load_safetensors_file(good)
    np.testing.assert_array_equal(out["a"], np.arange(6, dtype=np.float32))
