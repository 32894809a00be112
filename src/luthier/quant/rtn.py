"""Round-to-nearest quantization to a QTensor, symmetric or asymmetric, per group."""

from __future__ import annotations

import numpy as np

from .qtensor import SUPPORTED_BITS, QTensor, check_group_size, default_zero


def _grouped(w: np.ndarray, group_size: int) -> tuple[np.ndarray, int]:
    """w [n, k] -> [n, G, gs] zero-padded (the last group may be partial), and k."""
    n, k = w.shape
    g = -(-k // group_size)
    pad = g * group_size - k
    wp = np.pad(w, ((0, 0), (0, pad))) if pad else w
    return wp.reshape(n, g, group_size), k  # [n, k'] -> [n, G, gs]


def _valid_mask(n: int, k: int, group_size: int) -> np.ndarray:
    g = -(-k // group_size)
    cols = np.arange(g * group_size).reshape(g, group_size)  # [G, gs]
    return np.broadcast_to(cols < k, (n, g, group_size))


def _to_f16_scale(s: np.ndarray) -> np.ndarray:
    # scales are stored in fp16; a zero/denormal scale would make the codes meaningless
    s16 = s.astype(np.float16)
    tiny = np.float16(6.1e-5)
    return np.where(np.abs(s16) < tiny, tiny, s16).astype(np.float16)


def quantize_rtn(w: np.ndarray, bits: int, group_size: int, symmetric: bool = True) -> QTensor:
    """Quantize float weights [n, k] to `bits` with one scale (and zero) per group."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"weights must be 2-D [n, k], got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError("weights contain NaN or infinity")
    n, k = w.shape
    check_group_size(k, group_size)
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    wg, _ = _grouped(w, group_size)  # [n, G, gs]
    valid = _valid_mask(n, k, group_size)
    count = valid.sum(-1)  # [n, G]
    maxq = (1 << bits) - 1
    if symmetric:
        z = default_zero(bits)
        if bits == 1:
            # sign quantization: levels +-mean|w| minimize the squared error
            s = 2.0 * np.abs(wg).sum(-1) / np.maximum(count, 1)
        else:
            s = np.abs(wg).max(-1) * 2.0 / maxq  # levels s*(q - 2^(b-1)), q in [0, maxq]
        s16 = _to_f16_scale(s)
        q = np.rint(wg / s16.astype(np.float32)[..., None] + z)
        zeros = None
    elif bits == 1:
        # two levels: the means of the negative and the non-negative weights of the group
        # (min/max or an integer zero would put one level at 0 or at an outlier)
        neg = valid & (wg < 0)
        pos = valid & (wg >= 0)
        lo = np.where(neg, wg, 0).sum(-1) / np.maximum(neg.sum(-1), 1)
        hi = np.where(pos, wg, 0).sum(-1) / np.maximum(pos.sum(-1), 1)
        s16 = _to_f16_scale(hi - lo)
        zf = (-lo / s16.astype(np.float32)).astype(np.float16)
        q = np.rint(wg / s16.astype(np.float32)[..., None] + zf.astype(np.float32)[..., None])
        zeros = zf
    else:
        lo = np.where(valid, wg, np.inf).min(-1)
        hi = np.where(valid, wg, -np.inf).max(-1)
        lo = np.minimum(lo, 0.0)  # keep 0 representable: zero weights stay exactly zero
        hi = np.maximum(hi, 0.0)
        s16 = _to_f16_scale((hi - lo) / maxq)
        zf = np.clip(np.rint(-lo / s16.astype(np.float32)), 0, maxq).astype(np.float16)
        q = np.rint(wg / s16.astype(np.float32)[..., None]) + zf.astype(np.float32)[..., None]
        zeros = zf
    codes = np.clip(q, 0, maxq).astype(np.uint8).reshape(n, -1)[:, :k]  # [n, G, gs] -> [n, k]
    return QTensor(np.ascontiguousarray(codes), s16, zeros, bits, group_size)
