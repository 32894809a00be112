"""Ternary quantization, {-1, 0, +1} times a scale (BitNet b1.58 absmean)."""

from __future__ import annotations

import numpy as np

from .qtensor import QTensor, check_group_size


def quantize_ternary(w: np.ndarray, group_size: int | None = None) -> QTensor:
    """absmean ternary: s = mean|w|, t = clip(round(w / s), -1, 1).

    group_size None: one scale for the whole tensor (BitNet b1.58); otherwise one per group
    along k. Codes are t + 1 in {0, 1, 2}, stored as a 2-bit QTensor with zero 1.
    """
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"weights must be 2-D [n, k], got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError("weights contain NaN or infinity")
    n, k = w.shape
    gs = k if group_size is None else group_size
    check_group_size(k, gs)
    g = -(-k // gs)
    cols = np.arange(k) // gs
    if group_size is None:
        s = np.full((n, 1), np.abs(w).mean(), np.float32)
    else:
        sums = np.zeros((n, g), np.float64)
        np.add.at(sums, (slice(None), cols), np.abs(w))  # [n, k] summed into [n, G]
        counts = np.bincount(cols, minlength=g)
        s = (sums / counts).astype(np.float32)
    s16 = np.maximum(s, 6.1e-5).astype(np.float16)
    t = np.clip(np.rint(w / s16.astype(np.float32)[:, cols]), -1, 1)
    codes = (t + 1).astype(np.uint8)
    return QTensor(codes, s16, None, 2, gs, ternary=True)
