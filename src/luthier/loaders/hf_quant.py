"""Hugging Face GPTQ and AWQ checkpoints: their integer codes become QTensors directly.

Nothing is re-quantized: every quantized linear keeps the checkpoint's codes, fp16 scales
and zero points, so luthier computes w[n, k] = s[n, G] * (q[n, k] - z[n, G]) with the very
numbers the checkpoint's own kernels use.

Layouts (per quantized module `P`, n = out features, k = in features, G = groups):

GPTQ (AutoGPTQ / GPTQModel / optimum; quant_method "gptq"):
  P.qweight int32 [k * bits / 32, n]  codes packed along k: each column is a little-endian
                                      bit stream, value t at bit t * bits (3-bit values
                                      straddle int32 words: 32 values fill 3 words)
  P.qzeros  int32 [G, n * bits / 32]  zero points packed the same way, along n
  P.scales  fp16  [G, n]
  P.g_idx   int32 [k] (optional)      group of each input column; act-order (desc_act)
                                      checkpoints scatter the groups over k
  checkpoint_format "gptq" (v1) stores zero - 1 (so real zeros are 1..2^bits; the kernels
  add the 1 back), "gptq_v2" stores the zero itself. Symmetric checkpoints store the
  constant 2^(bits-1) (v2; 2^(bits-1) - 1 in v1), which is QTensor's implicit zero.
AWQ GEMM (AutoAWQ `version: gemm`; quant_method "awq"), 4 bits, asymmetric:
  P.qweight int32 [k, n / 8]  eight columns per word, nibble i holding column AWQ_ORDER[i]
  P.qzeros  int32 [G, n / 8]  the same interleave
  P.scales  fp16  [G, n]      real zeros, no offset

Act-order: luthier's groups are contiguous along k. When g_idx is not j // group_size the
columns are sorted by group (stable), the QTensor is stored in that permuted order and
`perm` (int32 [k]) comes with it: y = x[:, perm] @ dequantize(qtensor).T. PermutedQLinear
computes that on the Python path; the native decoder has no column gather yet, so
engine.load_model falls back to the numpy model (native=False) for such checkpoints.

8-bit GPTQ, AWQ GEMV/Marlin/ExLlama layouts and other quant_methods raise
UnsupportedQuantization; malformed tensors raise HFQuantError naming the tensor.
"""

from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from ..kernels import QLinear
from ..quant.qtensor import QTensor, check_group_size, default_zero
from .safetensors import SafetensorsError, _read_json

__all__ = [
    "AWQ_ORDER", "HFQuantConfig", "HFQuantError", "ImportedLinear", "ImportedWeight", "PermutedQLinear",
    "UnsupportedQuantization", "import_linear", "load_hf_weights", "quantization_config",
    "unpack_awq", "unpack_gptq",
]  # fmt: skip

AWQ_ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])  # nibble i of an AWQ word holds column AWQ_ORDER[i]
GPTQ_BITS = (2, 3, 4)  # the widths GPTQ packs that fit the LUT kernels (1-6 bits); not 8
GPTQ_FORMATS = ("gptq", "gptq_v2")
_CHUNK = 1 << 22  # codes unpacked per step: bounds the temporaries of large layers


class HFQuantError(SafetensorsError):
    """A malformed GPTQ/AWQ checkpoint (wrong shape or dtype of a packed tensor)."""


class UnsupportedQuantization(HFQuantError):
    """A quantization method, format or bit width luthier does not import."""


@dataclass(frozen=True)
class HFQuantConfig:
    method: str  # "gptq" | "awq"
    bits: int
    group_size: int  # -1: one group per row (all of k)
    sym: bool
    desc_act: bool
    fmt: str  # "gptq" | "gptq_v2" (GPTQ checkpoint_format) | "gemm" (AWQ version)

    def describe(self) -> str:
        """One line for `luthier info`: "GPTQ import (gptq_v2): 4 bits, group 128, ..."."""
        group = "per row" if self.group_size == -1 else f"group {self.group_size}"
        sym = "symmetric" if self.sym else "asymmetric"
        act = ", act-order" if self.desc_act else ""
        return f"{self.method.upper()} import ({self.fmt}): {self.bits} bits, {group}, {sym}{act}"


def _side_config(folder: pathlib.Path | None, name: str) -> dict[str, Any] | None:
    p = folder / name if folder is not None else None
    if p is None or not p.is_file():
        return None
    value = _read_json(p)
    if not isinstance(value, dict):
        raise HFQuantError(f"{p}: not a JSON object")
    return value


def _int(q: Mapping[str, Any], *keys: str, default: int | None = None) -> int:
    for key in keys:
        v = q.get(key)
        if v is not None:
            if not isinstance(v, int) or isinstance(v, bool):
                raise HFQuantError(f"quantization config: {key} must be an integer, got {v!r}")
            return v
    if default is None:
        raise HFQuantError(f"quantization config: missing {keys[0]}")
    return default


def quantization_config(
    config: Mapping[str, Any], folder: str | os.PathLike[str] | None = None
) -> HFQuantConfig | None:
    """The GPTQ/AWQ settings of an HF folder: config.json's quantization_config, else
    quantize_config.json (AutoGPTQ) or quant_config.json (AutoAWQ) in `folder`. None for a
    float checkpoint; UnsupportedQuantization for any other method or layout."""
    where = pathlib.Path(folder) if folder is not None else None
    q = config.get("quantization_config")
    if q is None:
        q = _side_config(where, "quantize_config.json")
        if q is not None:
            q = {"quant_method": "gptq"} | q
    if q is None:
        q = _side_config(where, "quant_config.json")
        if q is not None:
            q = {"quant_method": "awq"} | q
    if q is None:
        return None
    if not isinstance(q, Mapping):
        raise HFQuantError(f"quantization_config must be a JSON object, got {type(q).__name__}")
    method = str(q.get("quant_method", "")).lower()
    if method == "gptq":
        return _gptq_config(q)
    if method == "awq":
        return _awq_config(q)
    raise UnsupportedQuantization(
        f"quant_method {q.get('quant_method')!r} is not supported: luthier imports GPTQ and AWQ (GEMM) "
        "checkpoints, or float (f32/f16/bf16) ones that it quantizes itself"
    )


def _gptq_config(q: Mapping[str, Any]) -> HFQuantConfig:
    bits = _int(q, "bits")
    if bits == 8:
        raise UnsupportedQuantization(
            "8-bit GPTQ is not supported: luthier's LUT kernels take 1-6-bit codes (load the float "
            "checkpoint with --bits 8 for its int8 path)"
        )
    if bits not in GPTQ_BITS:
        raise UnsupportedQuantization(f"GPTQ bits must be one of {GPTQ_BITS}, got {bits}")
    # GPTQModel writes checkpoint_format; AutoGPTQ's older configs have none (= v1)
    fmt = str(q.get("checkpoint_format") or q.get("format") or "gptq").lower()
    if q.get("is_marlin_format") or fmt not in GPTQ_FORMATS:
        fmt = "marlin" if q.get("is_marlin_format") else fmt
        raise UnsupportedQuantization(f"GPTQ checkpoint_format {fmt!r} is not supported (only {GPTQ_FORMATS})")
    gs = _int(q, "group_size", default=-1)
    if gs != -1 and gs <= 0:
        raise HFQuantError(f"GPTQ group_size must be positive or -1, got {gs}")
    return HFQuantConfig("gptq", bits, gs, bool(q.get("sym", True)), bool(q.get("desc_act", False)), fmt)


def _awq_config(q: Mapping[str, Any]) -> HFQuantConfig:
    bits = _int(q, "bits", "w_bit")
    version = str(q.get("version", "gemm")).lower()
    if version != "gemm":
        raise UnsupportedQuantization(f"AWQ version {q.get('version')!r} is not supported (only 'gemm')")
    if bits != 4:
        raise UnsupportedQuantization(f"AWQ GEMM checkpoints are 4-bit, got bits={bits}")
    if q.get("zero_point", True) is False:
        raise UnsupportedQuantization("AWQ without zero points (zero_point: false) is not supported")
    gs = _int(q, "group_size", "q_group_size", default=-1)
    if gs != -1 and gs <= 0:
        raise HFQuantError(f"AWQ group_size must be positive or -1, got {gs}")
    return HFQuantConfig("awq", 4, gs, False, False, "gemm")


# ------------------------------------------------------------------ bit unpacking
def _unpack_stream(words: np.ndarray, bits: int) -> np.ndarray:
    """Little-endian bit streams along axis 0: int32/uint32 [W, c] -> uint8 [W * 32 / bits, c].

    Every 32 values fill exactly `bits` words, so value t of a block of 32 starts at bit
    t * bits of word (t * bits) // 32 and, for 3 bits, may run into the next word.
    """
    w, c = words.shape
    u = np.ascontiguousarray(words).view(np.uint32)
    if w % bits:
        if 32 % bits:  # 3 bits: a partial block would split a value between words
            raise HFQuantError(f"{w} packed words do not hold whole blocks of 32 {bits}-bit values")
        u = np.concatenate([u, np.zeros((bits - w % bits, c), np.uint32)])  # pad to whole blocks
    count = w * 32 // bits
    u = u.reshape(-1, bits, c)  # [W', c] -> [B, bits, c]
    t = np.arange(32)
    word, shift = (t * bits) // 32, ((t * bits) % 32).astype(np.uint32)  # [32]: where value t starts
    spill = shift + bits > 32  # value t continues in word + 1 (3 bits only)
    nxt = np.minimum(word + 1, bits - 1)  # a valid index where there is no spill
    left = np.where(spill, 32 - shift, 0).astype(np.uint32)  # shift of the next word's low bits
    mask = np.uint32((1 << bits) - 1)
    out = np.empty((u.shape[0], 32, c), np.uint8)  # [B, 32, c]
    step = max(1, _CHUNK // max(32 * c, 1))  # blocks per step
    for b in range(0, u.shape[0], step):
        blk = u[b : b + step]  # [b, bits, c]
        lo = blk[:, word, :] >> shift[None, :, None]  # [b, 32, c]
        hi = np.where(spill[None, :, None], blk[:, nxt, :] << left[None, :, None], np.uint32(0))
        out[b : b + step] = ((lo | hi) & mask).astype(np.uint8)
    return out.reshape(-1, c)[:count]  # [B, 32, c] -> [W * 32 / bits, c] (padding dropped)


def unpack_gptq(qweight: np.ndarray, qzeros: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ qweight int32 [k*bits/32, n], qzeros int32 [G, n*bits/32] -> codes uint8 [n, k]
    and stored zeros uint8 [n, G] (v1's zero - 1 not yet undone)."""
    codes = _unpack_stream(qweight, bits).T  # [k, n] -> [n, k]
    zeros = _unpack_stream(np.ascontiguousarray(qzeros.T), bits)  # [n*bits/32, G] -> [n, G]
    return np.ascontiguousarray(codes), zeros


def _unpack_awq_words(words: np.ndarray) -> np.ndarray:
    """int32 [r, c/8] -> uint8 [r, c] in column order (undoing AWQ's nibble interleave)."""
    u = words.view(np.uint32)
    nib = (u[:, :, None] >> (4 * np.arange(8, dtype=np.uint32))) & np.uint32(15)  # [r, c/8, 8]: nibble i
    out = np.empty(nib.shape, np.uint8)
    out[:, :, AWQ_ORDER] = nib  # nibble i -> column AWQ_ORDER[i] of its 8
    return out.reshape(words.shape[0], -1)  # [r, c/8, 8] -> [r, c]


def unpack_awq(qweight: np.ndarray, qzeros: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AWQ GEMM qweight int32 [k, n/8], qzeros int32 [G, n/8] -> codes uint8 [n, k], zeros uint8 [n, G]."""
    return np.ascontiguousarray(_unpack_awq_words(qweight).T), np.ascontiguousarray(_unpack_awq_words(qzeros).T)


# ------------------------------------------------------------------ imported linears
@dataclass(frozen=True)
class ImportedLinear:
    """One quantized linear of a checkpoint. With perm (act-order), qtensor's columns are
    in permuted order: y = x[:, perm] @ dequantize(qtensor).T."""

    qtensor: QTensor
    perm: np.ndarray | None = None  # int32 [k]

    @property
    def shape(self) -> tuple[int, int]:
        return self.qtensor.shape

    def dequantize(self) -> np.ndarray:
        """float32 [n, k] in the checkpoint's (original) column order."""
        wp = self.qtensor.dequantize()
        if self.perm is None:
            return wp
        w = np.empty_like(wp)
        w[:, self.perm] = wp  # column i of the permuted matrix is original column perm[i]
        return w

    def linear(self, mode: str = "fast", n_threads: int = 1) -> QLinear | PermutedQLinear:
        if self.perm is None:
            lin = QLinear(self.qtensor, mode=mode, n_threads=n_threads)
            lin.nbytes = lin.packed.nbytes  # type: ignore[attr-defined]  # as engine.make_linear sets it
            return lin
        return PermutedQLinear(self.qtensor, self.perm, mode=mode, n_threads=n_threads)


class PermutedQLinear:
    """y = x[:, perm] @ w.T by the LUT kernel: an act-order layer whose groups are contiguous
    only in permuted column order. Python path only (native.py takes plain QLinears)."""

    def __init__(self, weight: QTensor, perm: np.ndarray, mode: str = "fast", n_threads: int = 1):
        perm = np.asarray(perm)
        if perm.shape != (weight.k,) or not np.array_equal(np.sort(perm), np.arange(weight.k)):
            raise ValueError(f"perm must be a permutation of range({weight.k})")
        self.inner = QLinear(weight, mode=mode, n_threads=n_threads)
        self.perm = perm.astype(np.int32)
        self.packed = self.inner.packed
        self.nbytes = self.packed.nbytes + self.perm.nbytes

    @property
    def n_threads(self) -> int:
        return self.inner.n_threads

    @n_threads.setter
    def n_threads(self, n: int) -> None:
        self.inner.n_threads = n

    def __call__(self, x: np.ndarray) -> np.ndarray:
        xp = np.ascontiguousarray(np.take(x, self.perm, axis=-1))  # [m, k] gathered columns
        return self.inner(xp)


class ImportedWeight(np.ndarray):
    """A stand-in [n, k] for an imported linear in a weights dict (engine._build reads
    `.imported`): zero-stride NaN, so any float use of it shows at once."""

    imported: ImportedLinear | None = None

    def __array_finalize__(self, obj: object) -> None:
        self.imported = None  # views and copies are plain numbers, not the import


def _placeholder(imp: ImportedLinear) -> ImportedWeight:
    arr = np.broadcast_to(np.float32(np.nan), imp.shape).view(ImportedWeight)  # [] -> [n, k], no memory
    arr.imported = imp
    return arr


def _act_order(g_idx: np.ndarray, k: int, gs: int, groups: int, where: str) -> np.ndarray | None:
    """perm (int32 [k]) that makes the groups contiguous, None when they already are."""
    g = g_idx.astype(np.int64)
    if g.shape != (k,):
        raise HFQuantError(f"{where}: qweight holds k={k} inputs but g_idx has shape {g_idx.shape}")
    if g.size and (g.min() < 0 or g.max() >= groups):
        raise HFQuantError(f"{where}.g_idx: group indices must lie in [0, {groups})")
    trivial = np.arange(k) // gs
    if np.array_equal(g, trivial):
        return None
    perm = np.argsort(g, kind="stable")
    if not np.array_equal(g[perm], trivial):  # each group must hold exactly group_size columns
        raise HFQuantError(f"{where}.g_idx: groups do not each hold {gs} columns; cannot make them contiguous")
    return perm.astype(np.int32)


def _int32(folder: Any, name: str, where: str) -> np.ndarray:
    info = folder.tensors.get(name)
    if info is None:
        raise HFQuantError(f"missing tensor {name!r} of quantized module {where}")
    if info.dtype not in ("I32", "U32"):
        raise HFQuantError(f"{name}: dtype {info.dtype}, expected I32 (packed codes)")
    a = folder.raw(name)
    if a.ndim != 2 and not name.endswith("g_idx"):
        raise HFQuantError(f"{name}: shape {a.shape}, expected 2-D")
    return a


def _scales(folder: Any, name: str, shape: tuple[int, int]) -> np.ndarray:
    if name not in folder.tensors:
        raise HFQuantError(f"missing tensor {name!r} of a quantized module")
    s = folder.load_float(name)
    if s.shape != shape:
        raise HFQuantError(f"{name}: shape {s.shape}, expected {shape} (groups, n)")
    return np.ascontiguousarray(s.T.astype(np.float16))  # [G, n] -> [n, G]


def import_linear(folder: Any, module: str, cfg: HFQuantConfig) -> ImportedLinear:
    """The QTensor (and act-order perm) of quantized module `module` (e.g.
    "model.layers.0.mlp.up_proj") of an HFFolder."""
    qweight = _int32(folder, module + ".qweight", module)
    qzeros = _int32(folder, module + ".qzeros", module)
    bits = cfg.bits
    if cfg.method == "awq":
        k, n = qweight.shape[0], qweight.shape[1] * 8
    else:
        if (qweight.shape[0] * 32) % bits:
            raise HFQuantError(f"{module}.qweight: {qweight.shape[0]} rows do not hold whole {bits}-bit blocks")
        k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
    gs = k if cfg.group_size == -1 else cfg.group_size
    groups = -(-k // gs)
    if cfg.method == "awq":
        zshape = (groups, n // 8)
    else:
        if (n * bits) % 32:
            raise HFQuantError(f"{module}: n={n} {bits}-bit zeros do not fill whole int32 words")
        zshape = (groups, n * bits // 32)
    if qzeros.shape != zshape:
        raise HFQuantError(f"{module}.qzeros: shape {qzeros.shape}, expected {zshape} for k={k}, n={n}, "
                           f"group_size={gs}, {bits} bits")  # fmt: skip
    try:
        check_group_size(k, gs)
    except ValueError as e:
        raise UnsupportedQuantization(f"{module}: {e}") from None
    scales = _scales(folder, module + ".scales", (groups, n))
    if cfg.method == "awq":
        codes, z = unpack_awq(qweight, qzeros)
        zeros: np.ndarray | None = z.astype(np.float16)
    else:
        codes, z = unpack_gptq(qweight, qzeros, bits)
        real = z.astype(np.int32) + (1 if cfg.fmt == "gptq" else 0)  # v1 stores zero - 1
        symmetric = cfg.sym and bool(np.all(real == default_zero(bits)))
        zeros = None if symmetric else real.astype(np.float16)
    perm = None
    if cfg.method == "gptq" and module + ".g_idx" in folder.tensors:
        perm = _act_order(_int32(folder, module + ".g_idx", module).reshape(-1), k, gs, groups, module)
    elif cfg.desc_act:
        raise HFQuantError(f"{module}: desc_act checkpoint without g_idx")
    if perm is not None:
        codes = np.ascontiguousarray(codes[:, perm])  # [n, k] columns in group order
    return ImportedLinear(QTensor(codes, scales, zeros, bits, gs), perm)


class _QuantView:
    """An HFFolder as hf_to_gguf_weights sees it, with `P.weight` for every quantized
    module P: imported (codes kept) instead of read as floats."""

    def __init__(self, folder: Any, cfg: HFQuantConfig, keep_codes: bool) -> None:
        self.folder, self.cfg, self.keep_codes = folder, cfg, keep_codes
        self.config, self.path = folder.config, folder.path
        names = folder.tensor_names
        quantized = [n[: -len(".qweight")] for n in names if n.endswith(".qweight")]
        self.modules = {m + ".weight": m for m in quantized}  # the name hf_to_gguf_weights asks for
        both = sorted(set(self.modules) & set(names))
        if both:
            raise HFQuantError(f"{both[0]} is stored both as floats and as GPTQ/AWQ codes")
        if not self.modules:
            raise HFQuantError(f"{folder.path}: quantization_config says {cfg.method} but no tensor is a *.qweight")
        self._names = list(names) + list(self.modules)

    @property
    def tensor_names(self) -> list[str]:
        return self._names

    def load_float(self, name: str) -> np.ndarray:
        module = self.modules.get(name)
        if module is None:
            return self.folder.load_float(name)
        imp = import_linear(self.folder, module, self.cfg)
        return _placeholder(imp) if self.keep_codes else imp.dequantize()


def load_hf_weights(
    folder: Any,
    args: Any,
    progress: Callable[[int, int, str], None] | None = None,
    keep_codes: bool = False,
) -> dict[str, np.ndarray]:
    """hf_to_gguf_weights for any HFFolder, GPTQ/AWQ checkpoints included: their quantized
    linears are dequantized exactly (float32, original column order), or with keep_codes
    are ImportedWeight stand-ins whose `.imported` the engine turns into LUT linears."""
    from ..models.hf_names import hf_to_gguf_weights

    cfg = quantization_config(folder.config, folder.path)
    if cfg is None:
        return hf_to_gguf_weights(folder, args, progress)
    if args.rope_style == "interleaved":  # would need a row permutation of the codes
        raise UnsupportedQuantization("GPTQ/AWQ import with an interleaved RoPE layout is not supported")
    return hf_to_gguf_weights(_QuantView(folder, cfg, keep_codes), args, progress)
