"""A memory-mapped GGUF reader that trusts nothing in the file.

Format (little-endian, versions 2 and 3; see ggml's docs/gguf.md):

    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x (key: string, value_type u32, value)
    n_tensors x (name: string, n_dims u32, dims u64[n_dims] (ggml order: row length first),
                 ggml_type u32, offset u64 (from the start of the data section))
    padding to `general.alignment` (default 32) | tensor data

    string = length u64 + UTF-8 bytes; array = elem_type u32 + count u64 + elements.

GGUF parsers have had many CVEs from sizes taken from the header. Here every
count, length, dimension and offset is a Python int (no overflow), is checked
against the bytes left in the file before anything is read or allocated, and
every tensor's byte range must lie inside the file without overlapping another.
Any violation raises GGUFError. Opening is fast because only the header is
parsed; tensor bytes stay in the memory map until asked for.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from .gguf_dequant import GGML_TYPES, GGUFError, dequantize, gguf_type_name

__all__ = ["GGUFError", "GGUFFile", "GGUFTensorInfo", "GGUFValueType"]

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_ALIGNMENT = 1 << 20  # real files use 32; a huge value only serves to misplace data
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_KEY_BYTES = 1 << 16
MAX_NAME_BYTES = 1 << 12  # ggml itself allows 63
MAX_STRING_BYTES = 1 << 26  # a metadata string (chat templates are ~10 KiB)
MAX_ARRAY_LEN = 1 << 26  # vocabularies are ~10^5..10^6 entries
INT64_MAX = (1 << 63) - 1


class GGUFValueType:
    """Metadata value type ids (gguf.constants.GGUFValueType)."""

    UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL = range(8)
    STRING, ARRAY, UINT64, INT64, FLOAT64 = 8, 9, 10, 11, 12


# scalar value type -> struct format and numpy dtype (both little-endian)
_SCALARS: dict[int, tuple[struct.Struct, np.dtype]] = {
    t: (struct.Struct("<" + f), np.dtype("<" + f))
    for t, f in (
        (GGUFValueType.UINT8, "B"),
        (GGUFValueType.INT8, "b"),
        (GGUFValueType.UINT16, "H"),
        (GGUFValueType.INT16, "h"),
        (GGUFValueType.UINT32, "I"),
        (GGUFValueType.INT32, "i"),
        (GGUFValueType.FLOAT32, "f"),
        (GGUFValueType.BOOL, "B"),
        (GGUFValueType.UINT64, "Q"),
        (GGUFValueType.INT64, "q"),
        (GGUFValueType.FLOAT64, "d"),
    )
}
_INT_TYPES = frozenset(
    {
        GGUFValueType.UINT8,
        GGUFValueType.INT8,
        GGUFValueType.UINT16,
        GGUFValueType.INT16,
        GGUFValueType.UINT32,
        GGUFValueType.INT32,
        GGUFValueType.UINT64,
        GGUFValueType.INT64,
    }
)
_FLOAT_TYPES = frozenset({GGUFValueType.FLOAT32, GGUFValueType.FLOAT64})
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

# Keys whose type the spec fixes; a file that disagrees is malformed.
_KEY_TYPES: dict[str, tuple[int, ...]] = {
    "general.alignment": (GGUFValueType.UINT32,),
    "general.architecture": (GGUFValueType.STRING,),
    "tokenizer.ggml.model": (GGUFValueType.STRING,),
    "tokenizer.ggml.tokens": (GGUFValueType.ARRAY, GGUFValueType.STRING),
    "tokenizer.ggml.merges": (GGUFValueType.ARRAY, GGUFValueType.STRING),
    "tokenizer.ggml.scores": (GGUFValueType.ARRAY, GGUFValueType.FLOAT32),
    "tokenizer.ggml.token_type": (GGUFValueType.ARRAY, GGUFValueType.INT32),
    "tokenizer.chat_template": (GGUFValueType.STRING,),
}


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor lives. shape is in numpy order (ggml's dims reversed),
    so a weight is (n_out, n_in); offset is absolute in the file."""

    name: str
    ggml_type: int
    type_name: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


class _Header:
    """Bounds-checked cursor over the mapped bytes; every read checks the end first."""

    def __init__(self, buf: mmap.mmap, size: int) -> None:
        self.buf = buf
        self.size = size
        self.pos = 0

    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise GGUFError(f"truncated file: {what} needs {n} bytes at offset {self.pos}, file has {self.size}")

    def scalar(self, vtype: int, what: str) -> Any:
        st, _ = _SCALARS[vtype]
        self.need(st.size, what)
        (v,) = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return bool(v) if vtype == GGUFValueType.BOOL else v

    def u32(self, what: str) -> int:
        return self.scalar(GGUFValueType.UINT32, what)

    def u64(self, what: str) -> int:
        return self.scalar(GGUFValueType.UINT64, what)

    def string(self, what: str, cap: int) -> str:
        n = self.u64(f"{what} length")
        if n > cap:
            raise GGUFError(f"{what} length {n} exceeds the limit of {cap} bytes")
        self.need(n, what)
        s = _decode(self.buf[self.pos : self.pos + n])
        self.pos += n
        return s

    def string_array(self, count: int, what: str) -> list[str]:
        # Tight loop on purpose: vocabularies hold ~10^5 strings and this is
        # the bulk of opening a file (gguf's reader builds numpy parts per item).
        if count > self.left() // 8:
            raise GGUFError(f"{what}: {count} strings cannot fit in the {self.left()} bytes left")
        buf, pos, end = self.buf, self.pos, self.size
        unpack = _U64.unpack_from
        out: list[str] = [""] * count
        for i in range(count):
            if pos + 8 > end:
                raise GGUFError(f"truncated file: {what}[{i}] length at offset {pos}")
            (n,) = unpack(buf, pos)
            pos += 8
            if n > end - pos or n > MAX_STRING_BYTES:
                raise GGUFError(f"{what}[{i}] length {n} at offset {pos - 8} runs past the end of the file")
            out[i] = _decode(buf[pos : pos + n])
            pos += n
        self.pos = pos
        return out

    def numeric_array(self, vtype: int, count: int, what: str) -> np.ndarray:
        _, dt = _SCALARS[vtype]
        nbytes = count * dt.itemsize
        self.need(nbytes, what)
        # copy: metadata must outlive close(); the arrays are small next to the file
        arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos).astype(dt.newbyteorder("="))
        self.pos += nbytes
        return arr.astype(bool) if vtype == GGUFValueType.BOOL else arr


def _decode(b: bytes) -> str:
    # surrogateescape keeps invalid UTF-8 (some vocabularies have raw bytes)
    # recoverable with .encode("utf-8", "surrogateescape") instead of failing
    return b.decode("utf-8", "surrogateescape")


class GGUFFile:
    """A GGUF file opened read-only and memory-mapped.

    metadata: key -> Python scalar / str / list[str] / 1-D numpy array (numeric arrays).
    metadata_types: key -> value type ids, (type,) or (ARRAY, element type).
    tensors: name -> GGUFTensorInfo, in file order.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.metadata: dict[str, Any] = {}
        self.metadata_types: dict[str, tuple[int, ...]] = {}
        self.tensors: dict[str, GGUFTensorInfo] = {}
        self.version = 0
        self.alignment = DEFAULT_ALIGNMENT
        self.data_offset = 0  # absolute offset of the data section
        self._mm: mmap.mmap | None = None
        self._data: np.ndarray | None = None
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise GGUFError(f"{self.path}: {size} bytes is too small for a GGUF header")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._parse(mm, size)
        except GGUFError as e:
            mm.close()
            raise GGUFError(f"{self.path}: {e}") from None
        except BaseException:
            mm.close()
            raise
        self._mm = mm
        self._data = np.frombuffer(mm, dtype=np.uint8)  # (file_size,) read-only view

    # -- parsing ---------------------------------------------------------

    def _parse(self, mm: mmap.mmap, size: int) -> None:
        h = _Header(mm, size)
        h.need(4, "magic")
        magic = bytes(mm[0:4])
        if magic != GGUF_MAGIC:
            raise GGUFError(f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
        h.pos = 4
        version = h.u32("version")
        if version not in SUPPORTED_VERSIONS:
            if version & 0xFFFF == 0 and (version >> 24) in SUPPORTED_VERSIONS:
                raise GGUFError("big-endian GGUF files are not supported")
            raise GGUFError(f"unsupported GGUF version {version} (supported: {SUPPORTED_VERSIONS})")
        self.version = version
        n_tensors = h.u64("tensor count")
        n_kv = h.u64("metadata count")
        # smallest key/value is 13 bytes (empty key, type, u8); smallest tensor info 24
        if n_kv > h.left() // 13:
            raise GGUFError(f"metadata count {n_kv} cannot fit in a {size}-byte file")
        if n_tensors > h.left() // 24:
            raise GGUFError(f"tensor count {n_tensors} cannot fit in a {size}-byte file")

        for _ in range(n_kv):
            key = h.string("metadata key", MAX_KEY_BYTES)
            if key in self.metadata:
                raise GGUFError(f"duplicate metadata key {key!r}")
            vtype = h.u32(f"type of {key!r}")
            value, types = self._read_value(h, vtype, key)
            expected = _KEY_TYPES.get(key)
            if expected is not None and types != expected:
                raise GGUFError(f"metadata {key!r} has value type {types}, expected {expected}")
            self.metadata[key] = value
            self.metadata_types[key] = types

        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if alignment <= 0 or alignment & (alignment - 1) or alignment > MAX_ALIGNMENT:
            raise GGUFError(f"general.alignment {alignment} is not a power of two <= {MAX_ALIGNMENT}")
        self.alignment = alignment

        raw_infos = []
        for _ in range(n_tensors):
            name = h.string("tensor name", MAX_NAME_BYTES)
            n_dims = h.u32(f"n_dims of {name!r}")
            if n_dims > MAX_DIMS:
                raise GGUFError(f"tensor {name!r} has {n_dims} dims, at most {MAX_DIMS} allowed")
            dims = [h.u64(f"dims of {name!r}") for _ in range(n_dims)]
            ggml_type = h.u32(f"type of {name!r}")
            offset = h.u64(f"offset of {name!r}")
            raw_infos.append((name, dims, ggml_type, offset))

        # the data section starts at the next multiple of the alignment
        data_offset = -(-h.pos // alignment) * alignment
        if raw_infos and data_offset > size:
            raise GGUFError(f"data section at {data_offset} starts past the end of the {size}-byte file")
        self.data_offset = data_offset
        self._check_tensors(raw_infos, data_offset, size, alignment)

    def _read_value(self, h: _Header, vtype: int, key: str) -> tuple[Any, tuple[int, ...]]:
        if vtype in _SCALARS:
            return h.scalar(vtype, repr(key)), (vtype,)
        if vtype == GGUFValueType.STRING:
            return h.string(repr(key), MAX_STRING_BYTES), (vtype,)
        if vtype != GGUFValueType.ARRAY:
            raise GGUFError(f"metadata {key!r} has unknown value type {vtype}")
        etype = h.u32(f"element type of {key!r}")
        count = h.u64(f"length of {key!r}")
        if count > MAX_ARRAY_LEN:
            raise GGUFError(f"metadata array {key!r} length {count} exceeds the limit {MAX_ARRAY_LEN}")
        if etype == GGUFValueType.STRING:
            return h.string_array(count, repr(key)), (vtype, etype)
        if etype in _SCALARS:
            return h.numeric_array(etype, count, repr(key)), (vtype, etype)
        # ggml rejects nested arrays too; they would also allow unbounded recursion
        raise GGUFError(f"metadata array {key!r} has unsupported element type {etype}")

    def _check_tensors(self, raw_infos: list, data_offset: int, size: int, alignment: int) -> None:
        spans = []  # (start, end or None if the type is unknown, name, ggml_type, numpy shape), file order
        seen: set[str] = set()
        for name, dims, ggml_type, offset in raw_infos:
            if name in seen:
                raise GGUFError(f"duplicate tensor name {name!r}")
            seen.add(name)
            n = 1
            for d in dims:
                if d > INT64_MAX:
                    raise GGUFError(f"tensor {name!r} dimension {d} is out of range")
                n *= d
            if n > INT64_MAX:
                raise GGUFError(f"tensor {name!r} has {n} elements, more than ggml can index")
            if offset % alignment:
                raise GGUFError(f"tensor {name!r} offset {offset} is not a multiple of the alignment {alignment}")
            start = data_offset + offset
            if start > size:
                raise GGUFError(f"tensor {name!r} data at {start} starts past the end of the {size}-byte file")
            end = None
            entry = GGML_TYPES.get(ggml_type)
            if entry is not None:
                _, block, type_size = entry
                row = dims[0] if dims else 1
                if row % block:
                    raise GGUFError(
                        f"tensor {name!r}: row length {row} is not a multiple of the {entry[0]} block size {block}"
                    )
                nbytes = n // block * type_size
                end = start + nbytes
                if end > size:
                    raise GGUFError(f"tensor {name!r} data [{start}, {end}) runs past the end of the {size}-byte file")
            shape = tuple(int(d) for d in reversed(dims))  # ggml (ne0, ne1, ..) -> numpy (.., ne1, ne0)
            spans.append((start, end, name, ggml_type, shape))

        # Ranges must not overlap. An unknown type's size is unknown: give it the
        # bytes up to the next tensor (or the end of the file) so raw() still works.
        ordered = sorted(spans, key=lambda s: (s[0], 0 if s[1] is None else s[1]))  # empty ones first
        infos = {}
        for i, (start, end, name, ggml_type, shape) in enumerate(ordered):
            nxt = ordered[i + 1][0] if i + 1 < len(ordered) else size
            if end is None:
                end = nxt
            elif end > nxt:
                raise GGUFError(f"tensor {name!r} data [{start}, {end}) overlaps the next tensor at {nxt}")
            infos[name] = GGUFTensorInfo(name, ggml_type, gguf_type_name(ggml_type), shape, start, end - start)
        self.tensors = {s[2]: infos[s[2]] for s in spans}  # file order

    # -- access ----------------------------------------------------------

    @property
    def architecture(self) -> str | None:
        """general.architecture ("llama", "gemma3", ...), None if absent."""
        return self.metadata.get("general.architecture")

    def _info(self, name: str) -> GGUFTensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in {self.path}") from None

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view of the memory map (no copy)."""
        if self._data is None:
            raise GGUFError(f"{self.path} is closed")
        info = self._info(name)
        return self._data[info.offset : info.offset + info.nbytes]

    def load_float(self, name: str) -> np.ndarray:
        """The tensor dequantized to a new float32 array of shape info.shape."""
        info = self._info(name)
        try:
            return dequantize(self.raw(name), info.ggml_type, info.shape)
        except GGUFError as e:
            raise GGUFError(f"tensor {name!r} ({info.type_name}): {e}") from None

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def get_int(self, key: str, default: int | None = None) -> int | None:
        """An integer metadata value; GGUFError if the key holds another type."""
        return self._typed(key, default, _INT_TYPES, "an integer")

    def get_float(self, key: str, default: float | None = None) -> float | None:
        """A float (or integer) metadata value as float; GGUFError for other types."""
        v = self._typed(key, default, _FLOAT_TYPES | _INT_TYPES, "a number")
        return None if v is None else float(v)

    def get_str(self, key: str, default: str | None = None) -> str | None:
        return self._typed(key, default, frozenset({GGUFValueType.STRING}), "a string")

    def get_bool(self, key: str, default: bool | None = None) -> bool | None:
        return self._typed(key, default, frozenset({GGUFValueType.BOOL}), "a bool")

    def _typed(self, key: str, default: Any, allowed: frozenset[int], what: str) -> Any:
        if key not in self.metadata:
            return default
        types = self.metadata_types[key]
        if len(types) != 1 or types[0] not in allowed:
            raise GGUFError(f"{self.path}: metadata {key!r} has value type {types}, expected {what}")
        return self.metadata[key]

    def close(self) -> None:
        """Unmap the file. Views from raw() keep the mapping alive until they are freed."""
        self._data = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass  # raw() views still exported; the map closes when they are collected
            self._mm = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFFile({self.path!r}, arch={self.architecture!r}, {len(self.tensors)} tensors)"
