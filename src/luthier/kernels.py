"""Python face of the native LUT kernels: packing, tables, matmul, and QLinear.

See csrc/lut_gemm.h for the contract. Outputs are allocated here; the native calls release
the GIL and never allocate in the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _core
from .quant.qtensor import QTensor

MODES = ("exact", "fast")
DEFAULT_MODE = "fast"  # measured: as accurate as "exact" on real activations (benchmarks/README.md)


@dataclass(frozen=True)
class PackedWeight:
    """A QTensor in the kernel layout: all the memory a quantized layer keeps."""

    n: int
    k: int
    bits: int
    group_size: int
    ternary: bool
    w: np.ndarray  # uint8 [weight_bytes]
    s: np.ndarray  # uint16 (fp16 bits) [scale_count]
    z: np.ndarray | None  # uint16 [scale_count] or None (symmetric)
    zero_const: float

    @property
    def nbytes(self) -> int:
        return self.w.nbytes + self.s.nbytes + (self.z.nbytes if self.z is not None else 0)


def packed_nbytes(n: int, k: int, bits: int, group_size: int, zeros: bool = False) -> int:
    """Bytes of the packed layout (weights + fp16 scales (+ zeros)) for a [n, k] weight."""
    wb, sc, *_ = _core.packed_shape(n, k, bits, group_size)
    return wb + sc * 2 * (2 if zeros else 1)


def pack(qt: QTensor) -> PackedWeight:
    n, k = qt.shape
    wb, sc, *_ = _core.packed_shape(n, k, qt.bits, qt.group_size)
    w = np.empty(wb, np.uint8)
    s = np.empty(sc, np.uint16)
    z = np.empty(sc, np.uint16) if qt.zeros is not None else None
    zeros = qt.zeros.view(np.uint16) if qt.zeros is not None else None
    _core.pack(qt.codes, qt.scales.view(np.uint16), zeros, qt.bits, qt.group_size, w, s, z)
    return PackedWeight(n, k, qt.bits, qt.group_size, qt.ternary, w, s, z, qt.zero_const)


def unpack(pw: PackedWeight) -> QTensor:
    groups = -(-pw.k // pw.group_size)
    codes = np.empty((pw.n, pw.k), np.uint8)
    scales = np.empty((pw.n, groups), np.uint16)
    zeros = np.empty((pw.n, groups), np.uint16) if pw.z is not None else None
    _core.unpack(pw.n, pw.k, pw.bits, pw.group_size, pw.w, pw.s, pw.z, codes, scales, zeros)
    z16 = zeros.view(np.float16) if zeros is not None else None
    return QTensor(codes, scales.view(np.float16), z16, pw.bits, pw.group_size, pw.ternary)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _as_activations(x: np.ndarray, k: int) -> tuple[np.ndarray, bool]:
    """x [k] or [m, k] float32 -> C-contiguous [m, k], and whether it was 1-D."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"activations must be a numpy array, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise TypeError(f"activations must be float32, got {x.dtype}")
    vec = x.ndim == 1
    x2 = x[None] if vec else x  # [k] -> [1, k]
    if x2.ndim != 2 or x2.shape[1] != k:
        raise ValueError(f"activations have shape {x.shape}, expected [m, {k}] or [{k}]")
    if x2.shape[0] == 0:
        raise ValueError("activations have no rows")
    return np.ascontiguousarray(x2), vec


@dataclass(frozen=True)
class Tables:
    mode: str
    k: int
    group_size: int
    tables: np.ndarray  # uint8 [m, bytes_per_token]
    tscale: np.ndarray  # float32 [m, G]
    xsum: np.ndarray  # float32 [m, G]


def build_tables(
    x: np.ndarray,
    group_size: int,
    mode: str = DEFAULT_MODE,
    norm_weight: np.ndarray | None = None,
    eps: float = 1e-6,
    n_threads: int = 1,
) -> Tables:
    """Lookup tables of activations x [m, k] (optionally RMS-normalized in the same pass)."""
    _check_mode(mode)
    k = x.shape[-1] if isinstance(x, np.ndarray) and x.ndim else 0
    x2, _ = _as_activations(x, k)
    m = x2.shape[0]
    bpt, groups = _core.table_bytes_per_token(k, group_size, mode)
    t = np.empty((m, bpt), np.uint8)
    ts = np.empty((m, groups), np.float32)
    xs = np.empty((m, groups), np.float32)
    nw = None
    if norm_weight is not None:
        nw = np.ascontiguousarray(norm_weight, dtype=np.float32)
    _core.build_tables(x2, group_size, mode, t, ts, xs, nw, eps, n_threads)
    return Tables(mode, k, group_size, t, ts, xs)


def lut_gemm(
    tables: Tables, pw: PackedWeight, n_threads: int = 1, isa: str | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """y [m, n] from prebuilt tables and a packed weight."""
    if tables.k != pw.k or tables.group_size != pw.group_size:
        raise ValueError(
            f"tables are for k={tables.k}, group_size={tables.group_size}; the weight has "
            f"k={pw.k}, group_size={pw.group_size}"
        )
    m = tables.tables.shape[0]
    y = np.empty((m, pw.n), np.float32) if out is None else out
    _core.gemm(pw.n, pw.k, pw.bits, pw.group_size, pw.w, pw.s, pw.z, pw.zero_const,
               tables.mode, tables.tables, tables.tscale, tables.xsum, y, n_threads, isa or "")
    return y


def lut_linear(
    x: np.ndarray, pw: PackedWeight, mode: str = DEFAULT_MODE, n_threads: int = 1,
    isa: str | None = None, norm_weight: np.ndarray | None = None, eps: float = 1e-6,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """y = x @ w.T (x [m, k] or [k] float32), tables built natively in the same call."""
    _check_mode(mode)
    x2, vec = _as_activations(x, pw.k)
    y = np.empty((x2.shape[0], pw.n), np.float32) if out is None else out
    nw = None
    if norm_weight is not None:
        nw = np.ascontiguousarray(norm_weight, dtype=np.float32)
    _core.linear(pw.n, pw.k, pw.bits, pw.group_size, pw.w, pw.s, pw.z, pw.zero_const, mode,
                 x2, y, nw, eps, n_threads, isa or "")
    return y[0] if vec else y


class QLinear:
    """A quantized linear layer y = x @ w.T computed by table lookup.

    Holds only the packed weight (no float copy). `mode` picks the table precision.
    """

    def __init__(self, weight: QTensor | PackedWeight, mode: str = DEFAULT_MODE,
                 n_threads: int = 1, isa: str | None = None):
        _check_mode(mode)
        self.packed = pack(weight) if isinstance(weight, QTensor) else weight
        self.mode = mode
        self.n_threads = n_threads
        self.isa = isa

    @property
    def in_features(self) -> int:
        return self.packed.k

    @property
    def out_features(self) -> int:
        return self.packed.n

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return lut_linear(x, self.packed, self.mode, self.n_threads, self.isa)


def available_isas() -> list[str]:
    """ISAs compiled in and supported by this CPU, best last."""
    return list(_core.available_isas())


def active_isa() -> str:
    """The ISA the kernels use (LUTHIER_ISA overrides the automatic choice)."""
    return _core.active_isa()
