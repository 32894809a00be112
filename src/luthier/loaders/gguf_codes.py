"""A GGUF file's quantized linear weights as luthier weights, without re-quantizing.

`--bits source` keeps each block linear in the type the file stores it in, where a LUT
QTensor (w = s * (q - z) per group, fp16 s and z) or the int8 kernel holds that type:

| GGUF type | luthier weight | group | bits/weight (GGUF's) | exact? |
|---|---|---|---|---|
| Q4_0, Q5_0 | 4-/5-bit, symmetric (z = 8 / 16) | 32 | 4.5, 5.5 (same) | bit for bit |
| Q8_0 | int8 panels (csrc/int8_gemm.h) | 32 | 8.5 (same) | bit for bit |
| TQ1_0, TQ2_0 | ternary | 256 | 2.06 (1.69, 2.06) | bit for bit |
| Q4_1, Q5_1 | 4-/5-bit, z = -m / d | 32 | 5.0, 6.0 (same) | z rounded to fp16 |
| Q4_K, Q5_K | 4-/5-bit, s = d * sc, z = dmin * m / s | 32 | 5.0, 6.0 (4.5, 5.5) | s, z rounded to fp16 |
| Q6_K, Q3_K | 6-/3-bit, symmetric, s = d * sc | 16 | 7.0, 4.0 (6.56, 3.44) | s rounded to fp16 |
| Q2_K | 2-bit, s = d * sc, z = dmin * m / s | 16 | 4.0 (2.63) | s, z rounded to fp16 |

K-quants store 6- or 4-bit sub-block scales under an fp16 super-block scale; luthier's
QTensor has one fp16 scale (and zero) per group, so their products are rounded once to
fp16 (a relative error below 2^-11 of a scale: far below the codes' own rounding) and
cost more bits per weight. Other types (IQ*, MXFP4, float) are not importable: callers
dequantize those.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..quant.qtensor import QTensor
from .gguf_dequant import (
    GGUFError,
    _bits8,
    _crumbs,
    _f16,
    _k_scales,
    _nibbles,
    _q5_codes,
    _TQ1_DIGITS,
    gguf_type_name,
    gguf_type_sizes,
)

# Each extractor: blocks (nb, type_size) uint8 -> (codes uint8 (nb, block), scales float32
# (nb, sub-blocks), mins float32 (nb, sub-blocks) or None). A block's value j is
# scale[j // sub] * code[j] - min[j // sub] (asymmetric) or scale * (code - zero) (symmetric).


def _legacy4(blocks: np.ndarray, at: int) -> np.ndarray:
    nb = blocks.shape[0]
    q = np.empty((nb, 2, 16), np.uint8)  # (nb, lo/hi, 16): element j < 16 low nibble of qs[j]
    _nibbles(blocks[:, at:], q)
    return q.reshape(nb, 32)  # (nb, 2, 16) -> (nb, 32)


def _codes_q4_0(b):
    return _legacy4(b, 2), _f16(b, 0), None


def _codes_q4_1(b):  # value d * q + m: min = -m
    return _legacy4(b, 4), _f16(b, 0), -_f16(b, 2)


def _codes_q5_0(b):
    return _q5_codes(b[:, 2:6], b[:, 6:]), _f16(b, 0), None


def _codes_q5_1(b):
    return _q5_codes(b[:, 4:8], b[:, 8:]), _f16(b, 0), -_f16(b, 2)


def _codes_q2_k(b):
    nb = b.shape[0]
    sc = b[:, :16]  # low nibble scale, high nibble min, per sub-block of 16
    q = _crumbs(b[:, 16:80].reshape(nb, 2, 32)).reshape(nb, 256)  # (nb, 2, 4, 32) -> (nb, 256)
    return q, _f16(b, 80) * (sc & np.uint8(15)), _f16(b, 82) * (sc >> np.uint8(4))


def _codes_q3_k(b):
    nb = b.shape[0]
    sc_lo, sc_hi = b[:, 96:104], b[:, 104:108]
    lo = np.concatenate([sc_lo & np.uint8(15), sc_lo >> np.uint8(4)], axis=1)  # (nb, 16)
    hi = _crumbs(sc_hi.reshape(nb, 1, 4)).reshape(nb, 16)  # (nb, 1, 4, 4) -> (nb, 16)
    sc = (lo | (hi << np.uint8(4))).view(np.int8) - np.int8(32)
    q = _crumbs(b[:, 32:96].reshape(nb, 2, 32))  # (nb, 2 halves, 4 shifts, 32)
    q |= _bits8(b[:, :32]).reshape(nb, 2, 4, 32) << np.uint8(2)  # (nb, 8, 32) -> (nb, 2, 4, 32)
    return q.reshape(nb, 256), _f16(b, 108) * sc, None  # value d * sc * (q - 4)


def _codes_q4_k(b):
    nb = b.shape[0]
    dd, dm = _k_scales(b, _f16(b, 0), _f16(b, 2))  # (nb, 8, 1) each
    q = np.empty((nb, 4, 2, 32), np.uint8)  # (nb, 4 groups, lo/hi, 32)
    _nibbles(b[:, 16:].reshape(nb, 4, 32), q)
    return q.reshape(nb, 256), dd.reshape(nb, 8), dm.reshape(nb, 8)


def _codes_q5_k(b):
    nb = b.shape[0]
    dd, dm = _k_scales(b, _f16(b, 0), _f16(b, 2))
    q = np.empty((nb, 4, 2, 32), np.uint8)
    _nibbles(b[:, 48:].reshape(nb, 4, 32), q)
    q8 = q.reshape(nb, 8, 32)  # (nb, 4, 2, 32) -> (nb, 8 sub-blocks, 32)
    q8 |= _bits8(b[:, 16:48]) << np.uint8(4)
    return q8.reshape(nb, 256), dd.reshape(nb, 8), dm.reshape(nb, 8)


def _codes_q6_k(b):
    nb = b.shape[0]
    q = np.empty((nb, 2, 2, 64), np.uint8)  # (nb, 2 halves, lo/hi, 64)
    _nibbles(b[:, :128].reshape(nb, 2, 64), q)
    q8 = q.reshape(nb, 8, 32)
    q8 |= _crumbs(b[:, 128:192].reshape(nb, 2, 32)).reshape(nb, 8, 32) << np.uint8(4)
    return q8.reshape(nb, 256), _f16(b, 208) * b[:, 192:208].view(np.int8), None  # d * sc * (q - 32)


def _codes_tq1_0(b):
    nb = b.shape[0]
    q = np.empty((nb, 256), np.int8)  # digits - 1, as the dequantizer
    head = q[:, :160].reshape(nb, 5, 32)
    mid = q[:, 160:240].reshape(nb, 5, 16)
    tail = q[:, 240:].reshape(nb, 4, 4)
    for k in range(5):
        np.take(_TQ1_DIGITS[k], b[:, 0:32], out=head[:, k])
        np.take(_TQ1_DIGITS[k], b[:, 32:48], out=mid[:, k])
        if k < 4:
            np.take(_TQ1_DIGITS[k], b[:, 48:52], out=tail[:, k])
    return (q + np.int8(1)).view(np.uint8), _f16(b, 52), None


def _codes_tq2_0(b):
    nb = b.shape[0]
    q = _crumbs(b[:, :64].reshape(nb, 2, 32)).reshape(nb, 256)  # value d * (q - 1)
    return q, _f16(b, 64), None


# ggml type -> (extractor, bits, elements per scale, ternary)
_LUT_TYPES = {
    2: (_codes_q4_0, 4, 32, False),
    3: (_codes_q4_1, 4, 32, False),
    6: (_codes_q5_0, 5, 32, False),
    7: (_codes_q5_1, 5, 32, False),
    10: (_codes_q2_k, 2, 16, False),
    11: (_codes_q3_k, 3, 16, False),
    12: (_codes_q4_k, 4, 32, False),
    13: (_codes_q5_k, 5, 32, False),
    14: (_codes_q6_k, 6, 16, False),
    34: (_codes_tq1_0, 2, 256, True),
    35: (_codes_tq2_0, 2, 256, True),
}
Q8_0 = 8
IMPORTABLE_TYPES = frozenset(_LUT_TYPES) | {Q8_0}
FLOAT_TYPE_NAMES = ("F32", "F16", "BF16")  # a float block linear stays float under --bits source


def is_block_linear(name: str, shape: tuple[int, ...]) -> bool:
    """A transformer block's 2-D weight (q, k, v, o, gate, up, down): what --bits source keeps."""
    return name.startswith("blk.") and len(shape) == 2


def block_linears(tensors: Mapping[str, Any]) -> list[Any]:
    """The tensor infos (GGUFFile.tensors values) of a file's block linears."""
    return [t for n, t in tensors.items() if is_block_linear(n, t.shape)]


def _fp16_scales(scale: np.ndarray, mins: np.ndarray | None, bits: int) -> tuple[np.ndarray, np.ndarray | None]:
    """fp16 (s, z) with s * (q - z) ~= scale * q - min. z is fitted at the middle code, so
    the rounding of s to fp16 errs by at most half the code range times it. A zero scale (a
    constant group) becomes s = min, z = 1 on code 0: s * (0 - 1) = -min. Values float16
    cannot hold come out inf (the caller's error)."""
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        s16 = scale.astype(np.float16)
        if mins is None:
            return s16, None
        mid = 0.5 * ((1 << bits) - 1)
        z = np.where(s16 != 0, mid - (scale * mid - mins) / s16.astype(np.float32), 1.0)
        s16 = np.where(s16 != 0, s16, mins.astype(np.float16))
        return s16.astype(np.float16), z.astype(np.float16)


@dataclass(frozen=True)
class GGUFInt8Import:
    """A Q8_0 linear as the int8 kernel's panels (the same grid: exact)."""

    q: np.ndarray  # int8 panels [P, 8 kp]
    scale: np.ndarray  # fp16 bits uint16 [P, kp / 4]
    n: int
    k: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.k

    def linear(self, mode: str = "fast", n_threads: int = 1):
        from ..int8 import Int8Linear

        return Int8Linear.from_panels(self.q, self.scale, self.n, self.k, n_threads)

    def dequantize(self) -> np.ndarray:
        return self.linear().dequantize()


def import_gguf_linear(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...], name: str = "tensor"):
    """The linear [n, k] stored as `raw` (uint8 bytes of ggml_type): a
    loaders.hf_quant.ImportedLinear (LUT QTensor) or a GGUFInt8Import (Q8_0).
    GGUFError for a type not in IMPORTABLE_TYPES, a shape that does not fit its blocks,
    or codes/scales the kernels cannot take (e.g. inf scales)."""
    from .hf_quant import ImportedLinear

    tname = gguf_type_name(ggml_type)
    if len(shape) != 2:
        raise GGUFError(f"{name}: only 2-D linears import their codes, got shape {tuple(shape)}")
    n, k = (int(d) for d in shape)
    block, size = gguf_type_sizes(ggml_type)
    if ggml_type not in IMPORTABLE_TYPES:
        raise GGUFError(f"{name}: {tname} codes cannot be kept as they are (importable: "
                        f"{', '.join(sorted(gguf_type_name(t) for t in IMPORTABLE_TYPES))})")
    if k % block or np.asarray(raw).size != n * (k // block) * size:
        raise GGUFError(f"{name}: {np.asarray(raw).size} bytes of {tname} do not hold a [{n}, {k}] tensor")
    blocks = np.asarray(raw, np.uint8).reshape(n * (k // block), size)  # rows of blocks along k
    if ggml_type == Q8_0:
        from ..int8 import q8_panels

        d = blocks[:, :2].view(np.uint16).reshape(n, k // 32)  # [n * blocks, 1] -> [n, blocks]
        if not np.all(np.isfinite(d.view(np.float16))):
            raise GGUFError(f"{name}: Q8_0 scales are not finite")
        codes = blocks[:, 2:].view(np.int8).reshape(n, k)  # [n * blocks, 32] -> [n, k]
        return GGUFInt8Import(*q8_panels(codes, d), n, k)
    fn, bits, sub, ternary = _LUT_TYPES[ggml_type]
    with np.errstate(all="ignore"):
        codes, scale, mins = fn(blocks)
    g = k // sub
    scale = np.asarray(scale, np.float32).reshape(n, g)  # [n * blocks, subs] -> [n, G]
    mins = None if mins is None else np.asarray(mins, np.float32).reshape(n, g)
    if not np.all(np.isfinite(scale)) or (mins is not None and not np.all(np.isfinite(mins))):
        raise GGUFError(f"{name}: {tname} scales are not finite")
    codes = codes.reshape(n, g, sub)  # [n * blocks, block] -> [n, G, sub]
    if mins is not None:  # a group whose scale is 0 in fp16 holds -min alone (code 0)
        codes[scale.astype(np.float16) == 0] = 0
    s16, z16 = _fp16_scales(scale, mins, bits)
    if not np.all(np.isfinite(s16)) or (z16 is not None and not np.all(np.isfinite(z16))):
        raise GGUFError(f"{name}: {tname} scales or zero points overflow float16")
    try:
        qt = QTensor(np.ascontiguousarray(codes.reshape(n, k)), s16, z16, bits, sub, ternary)
    except ValueError as e:
        raise GGUFError(f"{name}: {tname} codes: {e}") from None
    return ImportedLinear(qt)
