"""Writing GGUF files: atomic output (temp file + fsync + rename), the KV pairs and tensors
of gguf's writer, and `luthier convert` (a float GGUF llama.cpp reads). qfile.py writes
luthier's quantized files through these.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

F32, F16 = 0, 1  # general.file_type values (llama_ftype)

Progress = Callable[[int, int, str], None]


class WriteError(OSError):
    """A model file could not be written; str() is the whole message."""

    def __str__(self) -> str:
        return str(self.strerror)


# ----------------------------------------------------------------------------- writing


@dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]  # numpy order
    dtype: Any  # np.float32 | np.float16 | np.int8: the GGML type F32 / F16 / I8
    make: Callable[[], np.ndarray]  # the data, produced when it is written (keeps memory low)


def _io_message(e: OSError, out: str) -> str:
    known = {errno.ENOSPC: "no space left on device writing", errno.EACCES: "permission denied writing",
             errno.EPERM: "permission denied writing", errno.EROFS: "read-only file system: cannot write"}
    return f"{known[e.errno]} {out}" if e.errno in known else f"cannot write {out}: {e.strerror or e}"


def check_output(out: str, force: bool) -> str:
    """The absolute output path; a clear error when it exists (without force) or its
    directory does not. Checked before any slow work."""
    out = os.path.abspath(os.fspath(out))
    if os.path.isdir(out):
        raise IsADirectoryError(f"output {out} is a directory")
    if os.path.lexists(out) and not force:
        raise FileExistsError(f"{out} exists; pass --force to overwrite it")
    if not os.path.isdir(os.path.dirname(out)):
        raise FileNotFoundError(f"output directory {os.path.dirname(out)} does not exist")
    return out


@contextlib.contextmanager
def atomic_output(out: str, force: bool = False) -> Iterator[str]:
    """Yields a temp path beside `out`; on success renames it to `out` (after the caller
    fsynced it). On any failure, KeyboardInterrupt included, the temp file is removed and
    `out` is untouched; OS errors become a WriteError with a plain message."""
    out = check_output(out, force)
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, out)
        with contextlib.suppress(OSError):  # make the rename durable; not every fs allows it
            fd = os.open(os.path.dirname(out), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError(e.errno, _io_message(e, out)) from e
        raise


def _kv(key: str, value: Any, types: tuple[int, ...]):
    """A (key, value, type, sub type) for GGUFWriter from GGUFFile's value and type ids;
    None for an empty array (gguf's writer refuses those)."""
    from gguf import GGUFValueType as VT

    def enc(s: str) -> bytes:  # the reader kept invalid UTF-8 as surrogates
        return s.encode("utf-8", "surrogateescape")

    if types[0] == VT.ARRAY:
        if len(value) == 0:
            return None
        sub = VT(types[1])
        items = [enc(s) for s in value] if sub == VT.STRING else np.asarray(value).tolist()
        return key, items, VT.ARRAY, sub
    if types[0] == VT.STRING:
        return key, enc(value), VT.STRING, None
    return key, value, VT(types[0]), None


def _write_gguf(path: str, arch: str, kvs: list, tensors: list[_Tensor], alignment: int,
                progress: Progress | None, first_key: str | None = None) -> None:
    """One GGUF file at `path` (a fresh temp path): KV pairs, tensor infos, data; fsynced."""
    import gguf

    w = gguf.GGUFWriter(path, arch)
    try:
        if alignment != gguf.GGUF_DEFAULT_ALIGNMENT:
            w.add_custom_alignment(alignment)
        for key, value, vtype, sub in kvs:
            w.add_key_value(key, value, vtype, sub)
        if first_key is not None:  # move it to the front: detection reads only the first key
            kv = w.kv_data[0]
            first = kv.pop(first_key)
            w.kv_data[0] = {first_key: first, **kv}
        for t in tensors:
            w.add_tensor_info(t.name, t.shape, np.dtype(t.dtype), math.prod(t.shape) * np.dtype(t.dtype).itemsize)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, t in enumerate(tensors):
            a = np.ascontiguousarray(t.make())
            if a.dtype != np.dtype(t.dtype) or a.shape != t.shape:
                raise AssertionError(f"{t.name}: produced {a.dtype}{a.shape}, declared {t.shape}")
            w.write_tensor_data(a)
            if progress:
                progress(i + 1, len(tensors), f"writing {t.name}")
        w.flush()
        os.fsync(w.fout[0].fileno())
    finally:
        w.close()


# ----------------------------------------------------------------------------- convert


def convert_to_file(model: str | None, out: str, to: str = "f16", force: bool = False,
                    progress: Progress | None = None) -> dict[str, Any]:
    """Write MODEL (a GGUF file) as a float GGUF llama.cpp reads: the source's KV pairs
    (general.file_type set to 0 for f32, 1 for f16), every tensor dequantized, in f16 (2-D
    and larger) or f32 (1-D tensors always, as llama.cpp's converter keeps norms)."""
    from gguf import GGUFValueType as VT

    from . import engine
    from .loaders.gguf import GGUFFile
    from .qfile import FORMAT_KEY

    if to not in ("f16", "f32"):
        raise ValueError(f"--to must be f16 or f32, got {to!r}")
    out = check_output(out, force)
    path = engine.resolve_model_path(model)
    if os.path.isdir(path):
        raise ValueError(f"{path}: convert reads GGUF files only; a Hugging Face folder needs "
                         "llama.cpp's own convert_hf_to_gguf.py (its tokenizer metadata)")
    t0 = time.perf_counter()
    f = GGUFFile(path)
    try:
        if FORMAT_KEY in f.metadata:
            raise ValueError(f"{path} is a luthier quantized file; convert the float model it was made from")
        skip = ("general.architecture", "general.alignment", "general.file_type")  # set by the writer
        kvs = [kv for key, v in f.metadata.items() if key not in skip and (kv := _kv(key, v, f.metadata_types[key]))]
        kvs.append(("general.file_type", F32 if to == "f32" else F16, VT.UINT32, None))
        tensors = []
        for name, info in f.tensors.items():
            dt = np.float16 if to == "f16" and len(info.shape) >= 2 else np.float32
            tensors.append(_Tensor(name, info.shape, dt, lambda n=name, dt=dt: f.load_float(n).astype(dt, copy=False)))
        with atomic_output(out, force) as tmp:
            _write_gguf(tmp, f.architecture or "llama", kvs, tensors, 32, progress)
    finally:
        f.close()
    return dict(path=out, seconds=time.perf_counter() - t0, file_bytes=os.path.getsize(out))
