"""Hugging Face model folders: config.json plus *.safetensors (single or sharded).

safetensors format: header length u64 (little-endian) | JSON header | data.
The header maps tensor names to {"dtype", "shape", "data_offsets": [begin, end]}
(offsets relative to the data section) plus an optional "__metadata__" of
strings. We parse it ourselves and memory-map the data, because the
`safetensors` package's numpy loader cannot read bf16, and we enforce the
format's own rules: header at most 100 MB, starting with "{", every byte
range in bounds and sized dtype x shape, ranges contiguous from 0 and ending
exactly at the end of the file. Any violation raises SafetensorsError.
"""

from __future__ import annotations

import json
import mmap
import os
import pathlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["HFFolder", "SafetensorsError", "SafetensorsTensorInfo", "load_safetensors_file", "save_safetensors"]

MAX_HEADER_BYTES = 100_000_000  # the limit of the reference implementation
MAX_JSON_FILE_BYTES = 64 << 20  # config.json / index.json are kilobytes
MAX_DIMS = 16

# safetensors dtype -> bytes per element; the reference's full list
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
# dtypes load_float converts exactly (or as float32 rounding of wider types)
_NUMPY_DTYPES = {
    "F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": "<u2",
    "I8": "i1", "U8": "u1", "I16": "<i2", "U16": "<u2", "I32": "<i4", "U32": "<u4",
    "I64": "<i8", "U64": "<u8", "BOOL": "u1",
}  # fmt: skip


class SafetensorsError(ValueError):
    """A malformed safetensors file or Hugging Face folder."""


@dataclass(frozen=True)
class SafetensorsTensorInfo:
    """One tensor: dtype as safetensors names it ("BF16"), numpy-order shape,
    absolute byte offset in `file`, and byte count."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: pathlib.Path
    offset: int
    nbytes: int


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise SafetensorsError(f"duplicate JSON key {k!r}")
        out[k] = v
    return out


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _File:
    """One memory-mapped safetensors file with its validated header."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise SafetensorsError(f"{path}: {size} bytes is too small for a safetensors header")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER_BYTES:
                raise SafetensorsError(f"{path}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
            if n > size - 8:
                raise SafetensorsError(f"{path}: header length {n} runs past the end of the {size}-byte file")
            header_bytes = f.read(n)
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self.tensors, self.metadata = self._parse(header_bytes, 8 + n, size)
        except BaseException:
            self.mm.close()
            raise

    def _parse(self, raw: bytes, data_start: int, size: int) -> tuple[dict[str, SafetensorsTensorInfo], dict[str, str]]:
        if not raw.startswith(b"{"):
            raise SafetensorsError(f"{self.path}: header does not start with '{{'")
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise SafetensorsError(f"{self.path}: header is not valid JSON: {e}") from None
        except SafetensorsError as e:
            raise SafetensorsError(f"{self.path}: {e}") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: header is not a JSON object")
        metadata = header.pop("__metadata__", {})
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise SafetensorsError(f"{self.path}: __metadata__ must map strings to strings")
        tensors = {}
        for name, entry in header.items():
            tensors[name] = self._entry(name, entry, data_start)
        # Byte ranges must tile the data section exactly: no gaps, no overlap,
        # nothing hidden after the last tensor.
        expected = 0
        for info in sorted(tensors.values(), key=lambda t: (t.offset, t.nbytes)):
            begin = info.offset - data_start
            if begin != expected:
                raise SafetensorsError(
                    f"{self.path}: tensor {info.name!r} starts at data offset {begin}, expected {expected} "
                    "(ranges must be contiguous and non-overlapping)"
                )
            expected = begin + info.nbytes
        if data_start + expected != size:
            raise SafetensorsError(
                f"{self.path}: tensors end at byte {data_start + expected} but the file has {size} bytes"
            )
        return tensors, metadata

    def _entry(self, name: str, entry: object, data_start: int) -> SafetensorsTensorInfo:
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise SafetensorsError(f"{where}: entry must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPE_SIZES:
            raise SafetensorsError(f"{where}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_int(s) and s >= 0 for s in shape):
            raise SafetensorsError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
            raise SafetensorsError(f"{where}: data_offsets {offsets!r} is not [begin, end]")
        begin, end = offsets
        n = 1
        for s in shape:  # Python ints: no overflow, the size check below bounds it
            n *= s
        if end < begin or end - begin != n * DTYPE_SIZES[dtype]:
            need = n * DTYPE_SIZES[dtype]
            held = end - begin
            raise SafetensorsError(f"{where}: data_offsets {offsets} hold {held} bytes, {dtype} {shape} needs {need}")
        return SafetensorsTensorInfo(name, dtype, tuple(shape), self.path, data_start + begin, end - begin)

    def array(self, info: SafetensorsTensorInfo) -> np.ndarray:
        """Read-only view of a tensor's stored values, in its stored dtype (bf16 as uint16)."""
        dt = np.dtype(_NUMPY_DTYPES[info.dtype]) if info.dtype in _NUMPY_DTYPES else np.dtype(np.uint8)
        count = info.nbytes // dt.itemsize
        arr = np.frombuffer(self.mm, dtype=dt, count=count, offset=info.offset)
        return arr.reshape(info.shape) if dt.itemsize == DTYPE_SIZES[info.dtype] else arr  # (n,) -> shape

    def close(self) -> None:
        try:
            self.mm.close()
        except BufferError:
            pass  # views still exported; the map closes when they are collected


def _to_float32(info: SafetensorsTensorInfo, values: np.ndarray) -> np.ndarray:
    if info.dtype == "BF16":
        # bf16 is the top half of a float32: widen the bits and shift
        bits = values.astype(np.uint32) << np.uint32(16)
        return bits.view(np.float32)
    if info.dtype not in _NUMPY_DTYPES:
        raise SafetensorsError(f"tensor {info.name!r}: cannot convert dtype {info.dtype} to float32")
    return values.astype(np.float32)  # always a copy, native byte order


def load_safetensors_file(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Every tensor of one .safetensors file as float32 arrays (copies)."""
    f = _File(pathlib.Path(path))
    try:
        return {name: _to_float32(info, f.array(info)) for name, info in f.tensors.items()}
    finally:
        f.close()


def _read_json(path: pathlib.Path) -> Any:
    size = path.stat().st_size
    if size > MAX_JSON_FILE_BYTES:
        raise SafetensorsError(f"{path}: {size} bytes is too large for a JSON side file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise SafetensorsError(f"{path}: invalid JSON: {e}") from None


class HFFolder:
    """A Hugging Face model folder: config.json, weights, tokenizer files.

    Weights come from model.safetensors.index.json's weight_map when present,
    else from every *.safetensors file in the folder. Tensors stay memory-mapped
    until load_float copies one out as float32.
    """

    INDEX = "model.safetensors.index.json"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = pathlib.Path(path)
        if not self.path.is_dir():
            raise SafetensorsError(f"{self.path} is not a directory")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise SafetensorsError(f"{self.path} has no config.json")
        config = _read_json(config_path)
        if not isinstance(config, dict):
            raise SafetensorsError(f"{config_path}: not a JSON object")
        self.config: dict[str, Any] = config
        self.metadata: dict[str, str] = {}
        self._files: list[_File] = []
        self.tensors: dict[str, SafetensorsTensorInfo] = {}
        self._owner: dict[str, _File] = {}
        try:
            self._open_weights()
        except BaseException:
            self.close()
            raise

    def _open_weights(self) -> None:
        index_path = self.path / self.INDEX
        if index_path.is_file():
            index = _read_json(index_path)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise SafetensorsError(f"{index_path}: missing or empty weight_map")
            shards = sorted({self._shard_name(index_path, v) for v in weight_map.values()})
            files = {s: self._open(self.path / s) for s in shards}
            for name, shard in weight_map.items():
                f = files[shard]
                if name not in f.tensors:
                    raise SafetensorsError(f"{index_path}: {name!r} is mapped to {shard}, which does not hold it")
                self.tensors[name] = f.tensors[name]
                self._owner[name] = f
        else:
            paths = sorted(p for p in self.path.glob("*.safetensors") if p.is_file())
            if not paths:
                raise SafetensorsError(f"{self.path} holds no *.safetensors file")
            for p in paths:
                f = self._open(p)
                for name, info in f.tensors.items():
                    if name in self.tensors:
                        first = self.tensors[name].file.name
                        raise SafetensorsError(f"tensor {name!r} is in both {first} and {p.name}")
                    self.tensors[name] = info
                    self._owner[name] = f

    @staticmethod
    def _shard_name(index_path: pathlib.Path, shard: object) -> str:
        # the index comes from the model repo: a shard must be a plain file name
        # in this folder, never a path that walks out of it
        if (
            not isinstance(shard, str)
            or not shard.endswith(".safetensors")
            or shard != os.path.basename(shard)
            or shard in (".", "..")
            or "\\" in shard
            or "\x00" in shard
        ):
            raise SafetensorsError(f"{index_path}: invalid shard file name {shard!r}")
        return shard

    def _open(self, path: pathlib.Path) -> _File:
        if not path.is_file():
            raise SafetensorsError(f"missing weights file {path}")
        f = _File(path)
        self._files.append(f)
        self.metadata.update(f.metadata)
        return f

    @property
    def tensor_names(self) -> list[str]:
        return list(self.tensors)

    @property
    def tokenizer_json_path(self) -> pathlib.Path | None:
        p = self.path / "tokenizer.json"
        return p if p.is_file() else None

    @property
    def tokenizer_config(self) -> dict[str, Any] | None:
        """tokenizer_config.json (holds the chat template), None if absent."""
        p = self.path / "tokenizer_config.json"
        if not p.is_file():
            return None
        value = _read_json(p)
        if not isinstance(value, dict):
            raise SafetensorsError(f"{p}: not a JSON object")
        return value

    def _info(self, name: str) -> SafetensorsTensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in {self.path}") from None

    def raw(self, name: str) -> np.ndarray:
        """Read-only memory-mapped view in the stored dtype (BF16 as uint16)."""
        return self._owner[name].array(self._info(name))

    def load_float(self, name: str) -> np.ndarray:
        """A new float32 array of the tensor (numpy order, e.g. [n_out, n_in] for a Linear weight)."""
        info = self._info(name)
        return _to_float32(info, self._owner[name].array(info))

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files = []

    def __enter__(self) -> HFFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HFFolder({str(self.path)!r}, {len(self.tensors)} tensors)"


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits, round to nearest even, NaN kept quiet (ggml's fp32_to_bf16)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    is_nan = (u & 0x7FFFFFFF) > 0x7F800000
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return np.where(is_nan, (u >> 16) | 64, rounded).astype("<u2")


def save_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, np.ndarray],
    *,
    dtype: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write tensors to a .safetensors file (e.g. to build an HF folder for tests).

    dtype: None keeps each array's dtype (float32/float16/float64/ints, and
    ml_dtypes.bfloat16 as BF16); "F32", "F16" or "BF16" converts float arrays.
    """
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs, offset = [], 0
    # numpy dtype string -> safetensors dtype ("<u2" is U16; BF16 is decided by name)
    by_str = {np.dtype(v).str: k for k, v in _NUMPY_DTYPES.items() if k not in ("BF16", "BOOL")}
    by_str["|b1"] = "BOOL"
    for name, value in tensors.items():
        arr = np.asarray(value)
        if dtype == "BF16" or (dtype is None and arr.dtype.name == "bfloat16"):
            st_dtype = "BF16"
            data = arr.view("<u2") if arr.dtype.name == "bfloat16" else _bf16_bits(arr)
        else:
            if dtype is not None:
                if dtype not in ("F32", "F16"):
                    raise SafetensorsError(f"unsupported target dtype {dtype!r}")
                arr = arr.astype("<f4" if dtype == "F32" else "<f2")
            if arr.dtype.byteorder == ">":
                arr = arr.astype(arr.dtype.newbyteorder("<"))
            st_dtype = by_str.get(arr.dtype.str)
            if st_dtype is None:
                raise SafetensorsError(f"cannot store dtype {arr.dtype} of {name!r}")
            data = arr
        payload = np.ascontiguousarray(data).tobytes()
        header[name] = {"dtype": st_dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(payload)]}
        blobs.append(payload)
        offset += len(payload)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # pad so the data section is 8-byte aligned, as the reference does
    tmp = pathlib.Path(f"{os.fspath(path)}.{os.getpid()}.tmp")
    with open(tmp, "wb") as out:
        out.write(struct.pack("<Q", len(text)))
        out.write(text)
        for blob in blobs:
            out.write(blob)
    os.replace(tmp, path)
